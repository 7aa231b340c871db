#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, then run the tests (real TorchServe included) in random order.
#
#   bash tests/run.sh                    # both tiers: fast, then slow (what CI runs)
#   bash tests/run.sh --tier fast        # everything not marked slow (~5 min on 2 cores)
#   bash tests/run.sh --tier slow        # soak, fault, rollout and benchmark-harness tests (~8 min)
#   bash tests/run.sh --tier fast -k serving --randomly-seed=1234   # extra arguments go to pytest (replay an order)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TIER=all
if [[ "${1:-}" == "--tier" ]]; then
  TIER="${2:?--tier needs fast, slow or all}"
  shift 2
fi
case "$TIER" in fast|slow|all) ;; *) echo "error: --tier must be fast, slow or all, got '$TIER'" >&2; exit 2 ;; esac
bash deploy/setup.sh
.venv/bin/ruff check .
run_tier() {
  local started=$SECONDS status=0
  echo "==> $1 tier"
  # Exit 5 (nothing selected, e.g. -k matching only the other tier's tests) is not a failure of the tier.
  PYTHONPATH="$ROOT" .venv/bin/python -m pytest -m "$2" --durations=25 "${@:3}" || status=$?
  echo "==> $1 tier: exit $status in $((SECONDS - started)) s"
  [[ $status == 0 || $status == 5 ]] || exit "$status"
}
[[ "$TIER" == slow ]] || run_tier fast "not slow" "$@"
[[ "$TIER" == fast ]] || run_tier slow "slow" "$@"
