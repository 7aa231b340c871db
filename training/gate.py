"""The accuracy gate: a variant ships only if its held-out top-1 is within a budget of its fp32 parent.

    python -m training.gate artifacts/resnet18/variants/int8 --budget 0.5   # exit 1 if over budget
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from training import metadata

DEFAULT_BUDGET_PT = 0.5


def check(meta: dict[str, Any], budget_pt: float = DEFAULT_BUDGET_PT) -> tuple[bool, str]:
    """(passed, one-line verdict) comparing test top-1 with the parent's, in percentage points."""
    test = meta.get("metrics", {}).get("test")
    if not test:
        return False, (f"variant {meta.get('variant')} has no held-out metrics; "
                       "evaluate it with: python -m training.evaluate <model_dir>")
    top1 = 100 * test["top1"]
    parent = meta.get("parent")
    if not parent:
        return True, f"{meta['variant']} is a parent model (test top-1 {top1:.2f}%); no gate to apply"
    parent_top1 = 100 * parent["metrics"]["test"]["top1"]
    drop = parent_top1 - top1
    verdict = (f"variant {meta['variant']}: test top-1 {top1:.2f}% vs fp32 parent {parent_top1:.2f}% "
               f"(drop {drop:+.2f} pt, budget {budget_pt:.2f} pt)")
    return drop <= budget_pt + 1e-9, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_PT, help="allowed top-1 drop, in points")
    args = ap.parse_args()
    passed, verdict = check(metadata.read(args.model_dir), args.budget)
    if not passed:
        sys.exit(f"error: accuracy gate FAILED - {verdict}. Not packaging; retune the variant or raise --budget")
    print(f"accuracy gate passed - {verdict}")


if __name__ == "__main__":
    main()
