#!/usr/bin/env bash
# Package a trained, exported model directory as model_store/<name>.mar.
#
#   ./build_mar.sh artifacts/resnet18                          # name and version from metadata.json
#   ./build_mar.sh artifacts/resnet18/variants/int8 --name digits_int8 --version 1.1
#   ./build_mar.sh artifacts/resnet18 --pick throughput          # the variant training.optimize --pick chose
#
# Steps: check inputs -> accuracy gate -> stage metadata + handlers + model-config.yaml
#        -> torch-model-archiver -> record sha256 in model_store/manifest.json
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() {
  cat <<EOF
usage: build_mar.sh MODEL_DIR [options]
  --name NAME        model name to serve under (default: "name" in metadata.json)
  --version V        archive version (default: "version" in metadata.json)
  --archive FILE     archive file name without .mar (default: NAME)
  --pick KIND        package the variant of MODEL_DIR that python -m training.optimize MODEL_DIR --pick
                     chose on this machine: latency | throughput | lossless
  --handler NAME     handler module in handlers/ (default: image_classifier)
  --config FILE      model-config.yaml to pack as is (default: handlers/model-config.yaml, with the tuner's
                     choice for this variant, MODEL_DIR/tuned-config.yaml, over it when present)
  --device D         auto|cpu|gpu deviceType (default auto: gpu, or cpu for CPU-only variants)
  --budget PT        accuracy gate: allowed top-1 drop vs the fp32 parent, in points (default 0.5)
  --explain          pack the fp32 parent's weights so POST /explanations/NAME answers (needs captum in
                     the workers' environment: pip install captum==0.9.0)
  --store DIR        output directory (default: model_store)
  --force            overwrite an existing archive
EOF
}
die() { echo "error: $*" >&2; exit 1; }

MODEL_DIR="" NAME="" VERSION="" ARCHIVE="" HANDLER="image_classifier" CONFIG=""
DEVICE="auto" BUDGET="0.5" STORE="$ROOT/model_store" FORCE=0 PICK="" EXPLAIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --archive) ARCHIVE="$2"; shift 2 ;;
    --handler) HANDLER="$2"; shift 2 ;;
    --pick) PICK="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --store) STORE="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --explain) EXPLAIN="--explain"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) [[ -z "$MODEL_DIR" ]] || die "one MODEL_DIR only (got $MODEL_DIR and $1)"; MODEL_DIR="$1"; shift ;;
  esac
done
[[ -n "$MODEL_DIR" ]] || { usage >&2; die "MODEL_DIR is required"; }

# The project's virtualenv when present, so the script works without activating it.
if [[ -x "$ROOT/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
command -v torch-model-archiver >/dev/null || die "torch-model-archiver not found; run: pip install -r requirements.txt"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "$PICK" ]]; then
  [[ -d "$MODEL_DIR" ]] || die "$MODEL_DIR not found; --pick takes the trained parent directory"
  MODEL_DIR="$(python -m training.package pick "$MODEL_DIR" "$PICK")" || exit 1
  echo "pick '$PICK': $MODEL_DIR"
fi
[[ -d "$MODEL_DIR" ]] || die "$MODEL_DIR not found; train it with: python -m training.train --out $MODEL_DIR"
[[ -f "$MODEL_DIR/metadata.json" ]] || die "$MODEL_DIR/metadata.json not found; make it with: python -m training.train --out $MODEL_DIR"
[[ -f "$ROOT/handlers/$HANDLER.py" ]] || die "handler handlers/$HANDLER.py not found; pick one of: $(cd "$ROOT/handlers" && ls ./*.py | xargs -n1 basename | sed 's/\.py$//' | tr '\n' ' ')"

python -m training.gate "$MODEL_DIR" --budget "$BUDGET"

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
FACTS="$(python -m training.package stage "$MODEL_DIR" "$STAGE" ${CONFIG:+--config "$CONFIG"} --device "$DEVICE" ${VERSION:+--version "$VERSION"} $EXPLAIN)"
fact() { sed -n "s/^$1=//p" <<<"$FACTS"; }
NAME="${NAME:-$(fact name)}"
VERSION="$(fact version)"
ARCHIVE="${ARCHIVE:-$NAME}"
MAR="$STORE/$ARCHIVE.mar"

mkdir -p "$STORE" "$STAGE/out"
if [[ -e "$MAR" ]]; then
  [[ $FORCE == 1 ]] || die "$MAR already exists; pass --force to overwrite it, or --archive/--name for a new file"
  echo "overwriting $MAR (--force)"
fi

# The archiver stages files in $TMPDIR/<model-name>; a private TMPDIR keeps parallel builds apart.
TMPDIR="$STAGE" torch-model-archiver \
  --model-name "$NAME" \
  --version "$VERSION" \
  --serialized-file "$(fact artifact)" \
  --handler "$ROOT/handlers/$HANDLER.py" \
  --extra-files "$STAGE/extra" \
  --config-file "$STAGE/model-config.yaml" \
  --export-path "$STAGE/out" \
  --archive-format default
mv -f "$STAGE/out/$NAME.mar" "$MAR"

python -m training.package record "$MAR" "$MODEL_DIR"
echo "built $MAR (model $NAME, version $VERSION, deviceType $(fact device), config $(fact config))"
