"""The accuracy gate: a variant ships only if its held-out top-1 is within a budget of its fp32 parent.

    python -m packager.gate artifacts/resnet18/variants/int8 --budget 0.5   # exit 1 if over budget
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from handlers.contract import CardError, ModelCard

DEFAULT_BUDGET_PT = 0.5


def check(card: ModelCard, budget_pt: float = DEFAULT_BUDGET_PT) -> tuple[bool, str]:
    """(passed, one-line verdict) comparing test top-1 with the parent's, in percentage points."""
    if card.metrics.test is None:
        return False, (f"variant {card.variant} has no held-out metrics; "
                       "evaluate it with: python -m training.evaluate <model_dir>")
    top1 = 100 * card.metrics.test.top1
    if card.parent is None:
        return True, f"{card.variant} is a parent model (test top-1 {top1:.2f}%); no gate to apply"
    parent_top1 = 100 * card.parent.test.top1
    drop = parent_top1 - top1
    verdict = (f"variant {card.variant}: test top-1 {top1:.2f}% vs fp32 parent {parent_top1:.2f}% "
               f"(drop {drop:+.2f} pt, budget {budget_pt:.2f} pt)")
    return drop <= budget_pt + 1e-9, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_PT, help="allowed top-1 drop, in points")
    args = ap.parse_args()
    try:
        passed, verdict = check(ModelCard.read(args.model_dir), args.budget)
    except (FileNotFoundError, CardError) as e:
        sys.exit(f"error: {e}")
    if not passed:
        sys.exit(f"error: accuracy gate FAILED - {verdict}. Not packaging; retune the variant or raise --budget")
    print(f"accuracy gate passed - {verdict}")


if __name__ == "__main__":
    main()
