#!/usr/bin/env bash
# Install one serving replica into PREFIX: its packages in PREFIX/venv, the server's code in PREFIX/app.
# The Dockerfile runs this (in two layers, so a code change does not reinstall torch); so does
# tests/test_container.py, in full, into a temporary prefix.
#
#   deploy/container/install.sh PREFIX                    # everything
#   deploy/container/install.sh --only packages PREFIX    # checks, venv, packages
#   deploy/container/install.sh --only app PREFIX         # checks, code, import check (needs the packages)
#
# GPU=1 also installs requirements-gpu.txt. PYTHON picks the interpreter (default python3). Versions come only
# from the repository's requirements.txt (as constraints); deploy/container/packages.txt names what the server needs.
set -euo pipefail
umask 022  # the prefix is read by the image's non-root user, whatever the caller's umask
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
usage="usage: install.sh [--only packages|app] PREFIX"
ONLY=all
if [[ "${1:-}" == --only ]]; then
  ONLY="${2:-}"
  shift 2 || true
fi
PREFIX="${1:?$usage}"
PY="${PYTHON:-python3}"
GPU="${GPU:-0}"
die() { echo "install.sh: error: $*" >&2; exit 1; }
step() { echo "==> [$1] $2"; }
[[ "$ONLY" == all || "$ONLY" == packages || "$ONLY" == app ]] || die "--only takes packages or app, got '$ONLY'"
[[ "$GPU" == 0 || "$GPU" == 1 ]] || die "GPU must be 0 or 1, got '$GPU'"

step check "Python >= 3.10 and Java 17"
command -v "$PY" >/dev/null || die "$PY not found: the server needs Python >= 3.10 (set PYTHON=/path/to/python3)"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || die "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'): the server needs Python >= 3.10 (set PYTHON=/path/to/python3)"
"$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY cannot create virtual environments (Debian: apt-get install python3-venv)"
command -v java >/dev/null || die "java not found: TorchServe's frontend needs Java 17 (apt-get install openjdk-17-jre-headless)"
java_version="$(java -version 2>&1 | sed -nE '1s/.*version "([0-9]+).*/\1/p')"
[[ "$java_version" =~ ^[0-9]+$ && "$java_version" -ge 17 ]] \
  || die "java is version '${java_version:-unknown}': TorchServe's frontend needs Java 17 (apt-get install openjdk-17-jre-headless)"
echo "    $("$PY" --version), Java $java_version, GPU=$GPU"
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"

if [[ "$ONLY" != app ]]; then
  step venv "$PREFIX/venv"
  [[ -x "$PREFIX/venv/bin/python" ]] || "$PY" -m venv "$PREFIX/venv"

  files=packages.txt
  if [[ "$GPU" == 1 ]]; then files+=" + requirements-gpu.txt"; fi
  step packages "$files, versions from requirements.txt"
  # pip refuses extras in a constraints file ("Constraints cannot have extras"): strip them, keep the pins.
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  sed -E 's/\[[^]]*\]//' "$SRC/requirements.txt" > "$constraints"
  # pip itself first, at requirements.txt's pin when it has one (else the interpreter's own stays).
  "$PREFIX/venv/bin/python" -m pip install --no-input --progress-bar off -c "$constraints" pip
  reqs=(-r "$SRC/deploy/container/packages.txt")
  if [[ "$GPU" == 1 ]]; then reqs+=(-r "$SRC/requirements-gpu.txt"); fi
  "$PREFIX/venv/bin/python" -m pip install --no-input --progress-bar off -c "$constraints" "${reqs[@]}"
  "$PREFIX/venv/bin/python" -m pip check
  [[ -x "$PREFIX/venv/bin/torchserve" ]] || die "no torchserve launcher in $PREFIX/venv/bin"
  # Transitive dependencies are not pinned by requirements.txt: record what this install resolved.
  "$PREFIX/venv/bin/python" -m pip freeze --all > "$PREFIX/installed.txt"
fi

if [[ "$ONLY" != packages ]]; then
  step app "the server's code into $PREFIX/app"
  [[ -x "$PREFIX/venv/bin/python" ]] || die "no $PREFIX/venv: install the packages first (--only packages)"
  rm -rf "$PREFIX/app"
  mkdir -p "$PREFIX/app"
  # Not the server's code: generated gRPC client stubs, bytecode, Kubernetes manifests.
  tar -C "$SRC" --exclude=__pycache__ --exclude='deploy/ts_grpc*' --exclude=deploy/k8s \
    -cf - handlers deploy config.properties | tar -C "$PREFIX/app" -xf -

  step verify "imports from $PREFIX/app with $PREFIX/venv"
  (cd "$PREFIX/app" && PYTHONPATH='' "$PREFIX/venv/bin/python" -c \
    'import deploy.pod, deploy.oip_gateway, handlers.handler, handlers.tasks.classification, handlers.tasks.detection')
  # Bytecode now: starts are quicker and a read-only root filesystem costs nothing.
  "$PREFIX/venv/bin/python" -m compileall -q "$PREFIX/app"
fi
echo "==> installed into $PREFIX ($ONLY)"
