#!/usr/bin/env bash
# Start TorchServe in the background from the current directory, as the quick start does, with its key renewer:
# TorchServe's keys expire after token_expiration_min, and only the token API with the API key makes new ones
# (deploy/keys.py renews both at half their lifetime and exits once the server is gone).
#   bash deploy/serve.sh [CONFIG]     # default: deploy/operator.properties; stop with: torchserve --stop
# Start one renewer per server: a second refuses to run (it would only replace the keys twice as often).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-$ROOT/deploy/operator.properties}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCHSERVE="$(dirname "$PY")/torchserve"
rm -f key_file.json  # TorchServe writes fresh keys at start; an old file would hold stale ones
mkdir -p logs
# Into a file, not the caller's terminal or pipe: the daemon would hold that open for as long as it runs.
if ! "$TORCHSERVE" --start --ts-config "$CONFIG" --ncs >logs/torchserve_start.log 2>&1; then
  cat logs/torchserve_start.log >&2; exit 1
fi
for _ in $(seq 240); do [[ -s key_file.json ]] && break; sleep 0.5; done
[[ -s key_file.json ]] || { echo "error: TorchServe wrote no key_file.json in 120 s; see logs/ts_log.log" >&2; exit 1; }
# Its own session: a Ctrl-C in the calling script must not stop the renewal of a server that keeps running.
PYTHONPATH="$ROOT" setsid nohup "$PY" -m deploy.keys renew --config "$CONFIG" >>logs/key_renewal.log 2>&1 </dev/null &
echo "TorchServe started ($CONFIG); key renewer pid $! (log: logs/key_renewal.log)"
