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
torchserve --start --ts-config config.properties --model-store model_store --ncs >/dev/null
python - <<'PY'
import json, sys, time, requests
deadline = time.time() + 180
while time.time() < deadline:
    try:
        key = json.load(open("key_file.json"))["management"]["key"]
        models = requests.get("http://127.0.0.1:8081/models", headers={"Authorization": f"Bearer {key}"}, timeout=2)
        ready = [m["modelName"] for m in models.json()["models"]
                 if any(w["status"] == "READY" for w in requests.get(
                     f"http://127.0.0.1:8081/models/{m['modelName']}", headers={"Authorization": f"Bearer {key}"},
                     timeout=2).json()[0]["workers"])]
        if {"digits", "digits_int8"} <= set(ready):
            sys.exit(0)
    except (OSError, ValueError, KeyError, IndexError, requests.RequestException):
        pass
    time.sleep(1)
sys.exit("error: models not READY after 180 s; see logs/ts_log.log and logs/model_log.log")
PY
python - <<'PY'
from pathlib import Path
from torchvision.io import encode_png
from training.data import DataSpec, load_splits
from training import metadata
meta = metadata.read(Path("artifacts/resnet18"))
test = load_splits(DataSpec(**meta["data"]["spec"])).test
out = Path("artifacts/samples"); out.mkdir(exist_ok=True)
for i in range(3):
    image, label = test[i]
    (out / f"digit_{i}_label_{label}.png").write_bytes(encode_png(image).numpy().tobytes())
PY
SAMPLE="$(ls artifacts/samples/*.png | head -n1)"
TOKEN_CMD='$(python3 -c "import json;print(json.load(open(\"key_file.json\"))[\"inference\"][\"key\"])")'
step "serving digits (fp32) and digits_int8 (CPU) on 127.0.0.1:8080 - try it:"
echo "curl -s -H \"Authorization: Bearer $TOKEN_CMD\" -H 'Content-Type: application/octet-stream' --data-binary @$SAMPLE http://127.0.0.1:8080/predictions/digits"
TOKEN="$(python3 -c 'import json;print(json.load(open("key_file.json"))["inference"]["key"])')"
curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/octet-stream' --data-binary @"$SAMPLE" \
  http://127.0.0.1:8080/predictions/digits
echo
echo "stop with: .venv/bin/torchserve --stop"
