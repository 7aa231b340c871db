#!/usr/bin/env bash
# The one command. First a good model serves within minutes, then the full one is trained and optimized
# while it serves, and the best gated variant is rolled out as version 2.0 under a small load:
#   1. .venv from requirements.txt
#   2. quick model (resnet18 @ 64 px, 3 epochs) -> TorchScript -> gate + archive -> TorchServe -> a prediction
#   3. full model (resnet18 @ 224, 8 epochs) -> TorchScript -> every technique and runtime -> the pick
#   4. the pick, gated, as digits 2.0: register -> canary -> promote, with requests running throughout
# Re-running skips finished steps and reuses finished variants (delete artifacts/ and model_store/ to start over).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK="${QUICK:-artifacts/quick}"
MODEL="${MODEL:-artifacts/resnet18}"
T0=$SECONDS
step() { printf '\n==> [%dm%02ds] %s\n' $(((SECONDS - T0) / 60)) $(((SECONDS - T0) % 60)) "$*"; }

step "environment (.venv from requirements.txt)"
bash deploy/setup.sh
source .venv/bin/activate
export PYTHONPATH="$ROOT"

for port in 8080 8081 8082; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "error: 127.0.0.1:$port is already in use (a TorchServe already running?). Stop it with" \
         "'.venv/bin/torchserve --stop', or change the addresses in deploy/operator.properties" >&2
    exit 1
  fi
done

if [[ -f "$QUICK/metadata.json" ]]; then step "quick model: $QUICK exists, skipping"
else step "quick model: resnet18 @ 64 px, 3 epochs on the bundled digits"
  python -m training.train --out "$QUICK" --input-size 64 --epochs 3 --version 1.0 --resume; fi
[[ -f "$QUICK/model.pt" ]] || { step "export the quick model to TorchScript (parity-checked)"; python -m training.export "$QUICK"; }
[[ -f model_store/digits-1.0.mar ]] || ./build_mar.sh "$QUICK" --name digits --version 1.0 --archive digits-1.0

step "serve: torchserve --start --ts-config deploy/operator.properties, and its key renewer (deploy/serve.sh)"
# The workers inherit this environment: the OpenMP setting the handler's core lease needs (handlers/cores.py).
eval "$(python -c 'from handlers.cores import OPENMP_ENV; print(*(f"export {k}=${{{k}:-{v}}}" for k, v in OPENMP_ENV.items()))')"
bash deploy/serve.sh deploy/operator.properties
python -m deploy.deploy --no-progress register digits-1.0.mar
python -m deploy.deploy wait digits --timeout 180
python - <<'PY'
from pathlib import Path
from torchvision.io import encode_png
from handlers.contract import ModelCard
from handlers.deprecations import known_deprecations
from training.evaluate import splits_for
test = splits_for(ModelCard.read(Path("artifacts/quick")), 224).test  # held out from every model trained here
out = Path("artifacts/samples"); out.mkdir(exist_ok=True)
for i in range(8):
    image, label = test[i]
    with known_deprecations():
        (out / f"digit_{i}_label_{label}.png").write_bytes(encode_png(image).numpy().tobytes())
PY
SAMPLES=(artifacts/samples/*.png)
TOKEN="$(python -m handlers.contract key inference)"
curl -sS -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/octet-stream' \
  --data-binary @"${SAMPLES[0]}" http://127.0.0.1:8080/predictions/digits
echo
step "first served prediction (digits 1.0, the quick model); try it yourself:"
echo "curl -s -H \"Authorization: Bearer \$(.venv/bin/python -m handlers.contract key inference)\" -H 'Content-Type: application/octet-stream' --data-binary @${SAMPLES[0]} http://127.0.0.1:8080/predictions/digits"

if [[ -f "$MODEL/metadata.json" ]]; then step "full model: $MODEL exists, skipping"
else step "full model: resnet18 @ 224, 8 epochs (digits 1.0 keeps serving)"; python -m training.train --out "$MODEL" --resume; fi
[[ -f "$MODEL/model.pt" ]] || { step "export the full model to TorchScript"; python -m training.export "$MODEL"; }
step "optimize: every technique and runtime this machine runs, each gated, timed and compared; then the pick"
python -m training.optimize "$MODEL" --pick --reuse  # --reuse: variants already built from this checkpoint stay

step "roll the pick out as digits 2.0: register -> canary -> promote -> retire 1.0, under a small load"
[[ -f model_store/digits-2.0.mar ]] || ./build_mar.sh "$MODEL" --pick throughput --name digits --version 2.0 --archive digits-2.0
python -m deploy.deploy --no-progress rollout digits-2.0.mar --watch "${SAMPLES[@]}"

step "done"
python -m deploy.summary "$MODEL" "${SAMPLES[0]}"
echo "versions: python -m deploy.deploy list digits    stop: .venv/bin/torchserve --stop"
