#!/usr/bin/env bash
# The test command: set up .venv if needed, lint, then run the tests (real TorchServe included) in random order.
#
#   bash tests/run.sh                    # both tiers in one session: fast, then slow (what CI runs)
#   bash tests/run.sh --tier fast        # everything not marked slow (~6 min on 2 cores)
#   bash tests/run.sh --tier slow        # soak, fault, rollout and benchmark-harness tests (~33 min)
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
# Both tiers run in one pytest session, fast first (tests/conftest.py orders them and stops before the slow
# tier when a fast test failed), so the session's fixtures are built once.
case "$TIER" in fast) marker=(-m "not slow") ;; slow) marker=(-m slow) ;; all) marker=() ;; esac
started=$SECONDS status=0
echo "==> tier: $TIER"
PYTHONPATH="$ROOT" .venv/bin/python -m pytest "${marker[@]}" --durations=25 "$@" || status=$?
echo "==> tier $TIER: exit $status in $((SECONDS - started)) s"
# Exit 5 (nothing selected, e.g. -k matching only the other tier's tests) is not a failure.
[[ $status == 0 || $status == 5 ]] || exit "$status"
