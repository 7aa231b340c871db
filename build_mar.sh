#!/usr/bin/env bash
# Package a trained, exported model directory as model_store/<name>.mar.
#
#   ./build_mar.sh artifacts/resnet18                          # name and version from metadata.json
#   ./build_mar.sh artifacts/resnet18/variants/int8 --name digits_int8 --version 1.1
#   ./build_mar.sh artifacts/resnet18 --pick throughput          # the variant training.optimize --pick chose
#   ./build_mar.sh --help                                        # every option
#
# Steps (packager/build.py, one Python process): check inputs -> accuracy gate -> stage metadata + handlers +
# model-config.yaml -> torch-model-archiver -> record sha256 in model_store/manifest.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's virtualenv when present, so the script works without activating it.
if [[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec python -m packager.build "$@"
