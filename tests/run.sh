#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, run every test (real TorchServe included).
# Extra arguments go to pytest, e.g. bash tests/run.sh -k serving
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash deploy/setup.sh
.venv/bin/ruff check .
PYTHONPATH="$ROOT" .venv/bin/python -m pytest -m "not slow" --durations=15 "$@"
