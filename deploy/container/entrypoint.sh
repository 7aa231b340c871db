#!/usr/bin/env bash
# Start one serving replica from an install.sh prefix: PREFIX/app/deploy/container/entrypoint.sh [pod flags].
# Configuration comes from the environment (deploy/pod.py's MODEL_STORE, CLIENT_TOKEN_FILE, ...; the Dockerfile
# sets the container's defaults). exec: the pod gets SIGTERM itself and drains.
set -euo pipefail
APP="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="$(dirname "$APP")"
cd "$APP"
exec "$PREFIX/venv/bin/python" -m deploy.pod "$@"
