"""The accuracy gate: a variant ships only if its held-out headline figure (top-1, or mAP for a detector) is
within a budget of its fp32 parent's, in points. build_mar.sh runs it before packing
(`./build_mar.sh DIR --check --budget 0.5` runs only it).
"""

from __future__ import annotations

from handlers.contract import ModelCard

DEFAULT_BUDGET_PT = 0.5


def check(card: ModelCard, budget_pt: float = DEFAULT_BUDGET_PT) -> tuple[bool, str]:
    """(passed, one-line verdict) comparing the test headline (top-1 or mAP) with the parent's, in points."""
    if card.metrics.test is None and card.parent is None and card.recipe.technique == "import":
        return True, (f"{card.name} was brought from elsewhere without a held-out evaluation; nothing to gate (add "
                      "--eval-dir to python -m training.bring to score it)")
    if card.metrics.test is None:
        return False, (f"variant {card.variant} has no held-out metrics; "
                       "evaluate it with: python -m training.evaluate <model_dir>")
    name, value = card.metrics.test.headline
    if card.parent is None:
        return True, f"{card.variant} is a parent model (test {name} {100 * value:.2f}%); no gate to apply"
    parent = card.parent.test.headline[1]
    drop = 100 * (parent - value)
    verdict = (f"variant {card.variant}: test {name} {100 * value:.2f}% vs fp32 parent {100 * parent:.2f}% "
               f"(drop {drop:+.2f} pt, budget {budget_pt:.2f} pt)")
    return drop <= budget_pt + 1e-9, verdict

