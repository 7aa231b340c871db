"""ensemble and cascade: variants of one parent, already built and gated, served together as one model.

    python -m training.variants.ensemble artifacts/resnet18                        # int8 + distilled_openvino_int8
    python -m training.variants.ensemble artifacts/resnet18 --ensemble-members int8,distilled --fusion weighted
    python -m training.variants.ensemble artifacts/resnet18 --variant cascade     # distilled_openvino_int8 -> fp32

ensemble: the members' probabilities averaged (--fusion mean) or weighted, with the weights that minimise the
validation split's log loss (--fusion weighted, a grid of step 0.1). cascade: the first (cheap) member answers
when its top probability reaches a threshold, and the second (big) one answers the rest; the threshold is the
lowest whose validation top-1 is within --cascade-drop points of the big member's, so the big one runs least.

Each member is copied whole into <variant>/members/<member>/ with its own card; the artifact, members.sha256,
pins their files. The ensemble is then evaluated, gated and packaged like any other variant.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
from pathlib import Path
from typing import Any

import torch

from handlers.contract import CARD_FILE, MEMBERS_DIR, Fusion, Member, ModelCard, Profile, sha256
from handlers.deprecations import known_deprecations
from handlers.runtimes import Fused, Predictor, load_model
from training.evaluate import predict
from training.technique import Exported, Option, Source, Technique, Transformed, run_cli, variant_dir

PRECISION_ORDER = ("int8", "fp16", "bf16", "fp32")  # an ensemble is recorded at its lowest member precision


def member_names(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


def read_members(source: Source, names: str) -> list[tuple[Path, ModelCard]]:
    """The variants named, each built, evaluated and made for the same input as the parent."""
    wanted = member_names(names)
    if len(wanted) < 2 or len(set(wanted)) != len(wanted):
        raise ValueError(f"an ensemble needs two or more different variants of {source.parent_dir}, got {names!r}")
    members = []
    for name in wanted:
        vdir = variant_dir(source.parent_dir, name)
        try:
            card = ModelCard.read(vdir)
        except FileNotFoundError:
            raise FileNotFoundError(f"member {vdir} not found; build it first: python -m training.optimize "
                                    f"{source.parent_dir} --variants {name}") from None
        if card.runtime == "ensemble":
            raise ValueError(f"member {name} is itself an ensemble; list its members instead")
        if card.input != source.parent.input or card.labels != source.parent.labels:
            raise ValueError(f"member {name} takes {card.input} with labels {card.labels[:3]}..., not the parent's "
                             f"{source.parent.input}; members must share the parent's input contract and labels")
        card.test  # noqa: B018  (raises, naming the command, when the member was never evaluated)
        members.append((vdir, card))
    return members


def probabilities(run: Predictor, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs and labels of one member on the validation split."""
    with known_deprecations():
        logits, labels = predict(run, source.splits.val, source.parent.input.mean, source.parent.input.std)
    return torch.softmax(logits, 1), labels


def log_loss(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float(-torch.log(probs[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean())


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probs.argmax(1) == labels).float().mean())


def fit_weights(probs: list[torch.Tensor], labels: torch.Tensor, step: int = 10) -> tuple[list[float], float]:
    """Weights on a grid of 1/step summing to 1 (each member at least one step) with the lowest log loss."""
    best: tuple[float, list[float]] | None = None
    for parts in itertools.product(range(1, step), repeat=len(probs) - 1):
        if sum(parts) >= step:
            continue
        weights = [p / step for p in (*parts, step - sum(parts))]
        loss = log_loss(sum(w * p for w, p in zip(weights, probs, strict=True)), labels)
        if best is None or loss < best[0] - 1e-9:
            best = (loss, weights)
    assert best is not None
    return best[1], best[0]


def fit_threshold(cheap: torch.Tensor, big: torch.Tensor, labels: torch.Tensor, drop_pt: float
                  ) -> tuple[float, dict[str, float]]:
    """The lowest threshold on the cheap member's top probability whose cascade keeps validation top-1 within
    `drop_pt` points of the big member's (1.0 defers every row whose confidence is below certainty)."""
    confidence = cheap.max(1).values
    required = top1(big, labels) - drop_pt / 100
    for t in sorted({*confidence.tolist(), 1.0}):
        defer = confidence < t
        answer = torch.where(defer[:, None], big, cheap)
        if top1(answer, labels) >= required - 1e-9:
            deferred = float(defer.float().mean())
            return t, {"val_top1": round(top1(answer, labels), 6), "val_deferred": round(deferred, 6)}
    raise ValueError(f"no threshold keeps the cascade within {drop_pt} pt of the big member on the validation "
                     "split (the cheap member's confident mistakes cost more than that); raise --cascade-drop")


class Ensemble(Technique):
    recipe = "ensemble"
    options = (Option("--ensemble-members", "int8,distilled_openvino_int8", "ensemble: comma-separated variants"),
               Option("--fusion", "mean", "ensemble: how members' probabilities are combined", ("mean", "weighted")),
               Option("--cascade-members", "distilled_openvino_int8,fp32", "cascade: the cheap variant, then the big"),
               Option("--cascade-drop", 0.0, "cascade: allowed validation top-1 drop vs the big member, points"))

    def __init__(self, name: str) -> None:
        self.name = name

    def members(self, args: argparse.Namespace) -> str:
        return args.cascade_members if self.name == "cascade" else args.ensemble_members

    def requires(self, args: argparse.Namespace) -> list[str]:
        return member_names(self.members(args))

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        members = read_members(source, self.members(args))
        with known_deprecations():
            runs = [load_model(vdir, card, repeatable=True) for vdir, card in members]
        val = [probabilities(run, source) for run in runs]
        labels = val[0][1]
        probs = [p for p, _ in val]
        figures: dict[str, Any] = {"val_top1_members": {card.variant: round(top1(p, labels), 6)
                                                        for (_, card), p in zip(members, probs, strict=True)}}
        threshold = None
        if self.name == "cascade":
            if len(members) != 2:
                raise ValueError(f"a cascade has two members (cheap, then big), got {len(members)}")
            kind, weights = "cascade", [0.0, 0.0]
            threshold, chosen = fit_threshold(probs[0], probs[1], labels, args.cascade_drop)
            figures.update(chosen, cascade_drop_pt=args.cascade_drop)
        elif args.fusion == "weighted":
            kind, (weights, loss) = "weighted", fit_weights(probs, labels)
            figures["val_log_loss"] = round(loss, 6)
        else:
            kind, weights = "mean", [1 / len(members)] * len(members)
        if kind != "cascade":
            fused = sum(w * p for w, p in zip(weights, probs, strict=True))
            figures["val_top1"] = round(top1(fused, labels), 6)
        fusion = Fusion(kind, [Member(card.variant, card.variant, w, card.files, card.test.top1)
                               for (_, card), w in zip(members, weights, strict=True)], threshold)
        return Transformed(
            Fused(fusion, runs), {"members": [c.variant for _, c in members], "fusion": kind, **figures}, None,
            precision=min((c.precision for _, c in members), key=PRECISION_ORDER.index),
            cpu_only=any(c.cpu_only for _, c in members), fusion=fusion,
            profile=self.profile(fusion, [c for _, c in members], figures.get("val_deferred")),
            details={"member_dirs": [str(vdir) for vdir, _ in members]})

    @staticmethod
    def profile(fusion: Fusion, cards: list[ModelCard], deferred: float | None) -> Profile | None:
        """Params of all members; MACs per item: all members, or a cascade's cheap one plus its deferred share
        of the big one (on the validation split)."""
        if any(c.profile is None for c in cards):
            return None
        params = sum(c.profile.params for c in cards)  # type: ignore[union-attr]
        macs = [c.profile.macs for c in cards]  # type: ignore[union-attr]
        expected = macs[0] + (deferred or 0.0) * macs[1] if fusion.kind == "cascade" else sum(macs)
        return Profile(params=params, macs=round(expected))

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        assert t.fusion is not None
        lines = []
        for member, vdir in zip(t.fusion.members, t.details["member_dirs"], strict=True):
            dest = out / MEMBERS_DIR / member.dir
            dest.mkdir(parents=True)
            for name in (CARD_FILE, *member.files):
                shutil.copy2(Path(vdir) / name, dest / name)
                lines.append(f"{sha256(dest / name)}  {MEMBERS_DIR}/{member.dir}/{name}")
        (out / "members.sha256").write_text("\n".join(lines) + "\n")
        return Exported("members.sha256", "ensemble", f"{t.fusion.kind} of {len(t.fusion.members)} members")


ENSEMBLE = Ensemble("ensemble")
CASCADE = Ensemble("cascade")

if __name__ == "__main__":
    run_cli([ENSEMBLE, CASCADE], __doc__)
