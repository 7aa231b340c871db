#!/usr/bin/env bash
# Create .venv with the pinned requirements (idempotent: reinstalls only when requirements.txt changes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
command -v java >/dev/null || { echo "error: java not found; TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }
PY="${PYTHON:-python3}"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null || { echo "error: $PY must be Python >= 3.10" >&2; exit 1; }
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
# GPU hosts also get requirements-gpu.txt (Torch-TensorRT for the tensorrt variant).
files=(requirements.txt)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then files+=(requirements-gpu.txt); fi
stamp=.venv/.requirements.sha256
want="$(cat "${files[@]}" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "installing ${files[*]} into .venv (torch is a ~5 GB download the first time)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "${files[@]/#/-r}"
  echo "$want" > "$stamp"
fi
# TorchServe's gRPC stubs from the installed jar (deploy/ts_grpc/, gitignored); a no-op when already current.
.venv/bin/python -m deploy.grpc_stubs
