#!/usr/bin/env bash
# The one command: set up .venv, train the default model, export, optimize, package, serve,
# and print a working curl. Re-running skips finished steps (delete artifacts/ to start over).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-artifacts/resnet18}"
step() { printf '\n==> %s\n' "$*"; }

step "environment (.venv from requirements.txt)"
bash deploy/setup.sh
source .venv/bin/activate
export PYTHONPATH="$ROOT"

for port in 8080 8081 8082; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use (a TorchServe already running?). Stop it with" \
         "'.venv/bin/torchserve --stop', or change the addresses in config.properties" >&2
    exit 1
  fi
done

if [[ -f "$MODEL/metadata.json" ]]; then step "train: $MODEL exists, skipping"
else step "train resnet18 @ 224 on the bundled digits"; python -m training.train --out "$MODEL"; fi

if [[ -f "$MODEL/model.pt" ]]; then step "export: $MODEL/model.pt exists, skipping"
else step "export to frozen TorchScript (parity-checked)"; python -m training.export "$MODEL"; fi

if [[ -f "$MODEL/optimization/report.json" ]]; then step "optimize: report exists, skipping"
else step "optimize: int8, structured pruning, distillation, bf16"; python -m training.optimize "$MODEL"; fi

step "package (accuracy gate + torch-model-archiver)"
[[ -f model_store/digits.mar ]] || ./build_mar.sh "$MODEL" --name digits
[[ -f model_store/digits_int8.mar ]] || ./build_mar.sh "$MODEL/variants/int8" --name digits_int8

step "serve: torchserve --start --ts-config config.properties"
rm -f key_file.json  # TorchServe writes fresh keys at start; an old file would hold stale ones
torchserve --start --ts-config config.properties --model-store model_store --ncs >/dev/null
for _ in $(seq 120); do [[ -f key_file.json ]] && break; sleep 0.5; done
python -m deploy.deploy wait digits digits_int8 --timeout 180
python - <<'PY'
from pathlib import Path
from torchvision.io import encode_png
from handlers.contract import ModelCard
from handlers.deprecations import known_deprecations
from training.evaluate import splits_for
test = splits_for(ModelCard.read(Path("artifacts/resnet18"))).test
out = Path("artifacts/samples"); out.mkdir(exist_ok=True)
for i in range(3):
    image, label = test[i]
    with known_deprecations():
        (out / f"digit_{i}_label_{label}.png").write_bytes(encode_png(image).numpy().tobytes())
PY
SAMPLE="$(ls artifacts/samples/*.png | head -n1)"
step "serving digits (fp32) and digits_int8 (CPU) on 127.0.0.1:8080 - try it:"
echo "curl -s -H \"Authorization: Bearer \$(.venv/bin/python -m handlers.contract key inference)\" -H 'Content-Type: application/octet-stream' --data-binary @$SAMPLE http://127.0.0.1:8080/predictions/digits"
TOKEN="$(python -m handlers.contract key inference)"
curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/octet-stream' --data-binary @"$SAMPLE" \
  http://127.0.0.1:8080/predictions/digits
echo
echo "stop with: .venv/bin/torchserve --stop"
