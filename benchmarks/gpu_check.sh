#!/usr/bin/env bash
# The GPU proof in one command (benchmarks/gpu_check.py says what each step does):
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with PyPI: .gpu/ holds what the GPU image lacks (<= 64 MiB)
#   bash benchmarks/gpu_check.sh             # on the GPU machine with .gpu/ carried: $OUT/gpu_check.json + .log
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes: the same steps (CI)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1
# Here the project's .venv; on the GPU machine (no .venv travels) the image's python3, which holds its torch.
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
exec "$PY" -m benchmarks.gpu_check "$@"
