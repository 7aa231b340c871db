"""Optimized detectors: each one frozen TorchScript, checked box for box against the eager model it came from,
scored on the test split and gated on mAP, then timed side by side with the fp32 TorchScript; the pick is what
`build_mar.sh --pick` packages.

    python -m training.detection_variants artifacts/detector                     # every variant, report, pick
    python -m training.detection_variants artifacts/detector --variants lean --proposals 50 --budget 1.0
    ./build_mar.sh artifacts/detector --pick throughput

The techniques stack with '_' (lean_svd_int8 is all three):
- lean: the region proposal network keeps its best N proposals per image at test time (torchvision: 1000, or 150
  for the 320 models). The box head runs once per proposal, so its cost falls with N.
- svd: the box head's first fully connected layer (12544 x 1024 on an FPN detector) becomes two of rank R, by
  truncated SVD, as Fast R-CNN did for its fully connected layers.
- int8: the box head's linear layers in int8, activations quantized per call (dynamic; CPU only).
`torchscript` is the fp32 export every detector gets from training.detect. Two-stage techniques are skipped, with
the reason, for one-stage detectors. The gate compares each variant's test mAP with the fp32 parent's, in points.

Writes PARENT/variants/<name>/ and PARENT/optimization/{report.json,report.md,report.png,pick.json}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.contract import STATE_DICT_FILE, TORCHSCRIPT_FILE, Metrics, ModelCard, ParentRecord, Recipe, sha256
from handlers.deprecations import known_deprecations
from handlers.loading import build_model, load_state_dict
from handlers.machine import cpu_label
from packager import gate
from packager.pick import REPORT_DIR, variant_dir, write_report
from packager.stats import interleaved, median
from training import speed
from training.detection_data import Sample, test_samples
from training.detection_eval import Detections, box_parity, coco_metrics, predict, summary
from training.export import ParityError
from training.variants.int8 import quantization_warnings

BASELINE = "torchscript"
SERVED_BATCH = 4


class NotApplicable(ValueError):
    """A technique this detector has nothing to apply to (a one-stage detector has no box head)."""


def box_head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if head is None or not isinstance(getattr(head, "fc6", None), torch.nn.Linear | torch.nn.Sequential):
        raise NotApplicable(f"{type(model).__name__} has no two-layer box head (two-stage FPN detectors have one)")
    return head


def fewer_proposals(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Keep the best `--proposals` regions per image at test time."""
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        raise NotApplicable(f"{type(model).__name__} has no region proposal network")
    before = rpn._post_nms_top_n["testing"]
    rpn._post_nms_top_n = {**rpn._post_nms_top_n, "testing": args.proposals}
    return {"proposals": args.proposals, "proposals_before": before}


def factorised_head(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Replace the box head's fc6 by its rank-`--rank` truncated SVD (two smaller layers)."""
    head = box_head(model)
    fc = head.fc6
    if not isinstance(fc, torch.nn.Linear):
        raise NotApplicable("fc6 is factorised already")
    rank = min(args.rank, *fc.weight.shape)
    u, s, vh = torch.linalg.svd(fc.weight.detach(), full_matrices=False)
    first = torch.nn.Linear(fc.in_features, rank, bias=False)
    second = torch.nn.Linear(rank, fc.out_features)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])
        second.weight.copy_(u[:, :rank])
        second.bias.copy_(fc.bias)
    head.fc6 = torch.nn.Sequential(first, second)
    kept = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    return {"rank": rank, "shape": list(fc.weight.shape), "energy_kept": round(kept, 4),
            "macs_per_region": {"before": fc.weight.numel(), "after": rank * (fc.in_features + fc.out_features)}}


def int8_head(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize the box head's linear layers to int8 weights, with activations quantized per call."""
    head = box_head(model)
    with quantization_warnings():
        model.roi_heads.box_head = torch.ao.quantization.quantize_dynamic(head, {torch.nn.Linear}, dtype=torch.qint8)
    return {"api": "torch.ao.quantization.quantize_dynamic", "layers": "box head Linear", "weights": "int8",
            "engine": torch.backends.quantized.engine}


TECHNIQUES: dict[str, Callable[[torch.nn.Module, argparse.Namespace], dict[str, Any]]] = {
    "lean": fewer_proposals, "svd": factorised_head, "int8": int8_head}
DEFAULT_VARIANTS = ("lean", "svd", "int8", "lean_svd", "lean_svd_int8")


def parent_model(parent_dir: Path, card: ModelCard) -> torch.nn.Module:
    model = build_model(card.architecture, card.num_classes)
    model.load_state_dict(load_state_dict(parent_dir / STATE_DICT_FILE))
    return model.eval()


def export(parent_dir: Path, name: str, model: torch.nn.Module, samples: list[Sample], recipe: dict[str, Any],
           eager: Detections | None = None) -> ModelCard:
    """PARENT/variants/NAME: `model` scripted and frozen, its boxes checked against the eager model's (labels equal,
    box IoU >= 0.99, scores within 1e-3 over a 0.3 threshold), and its own test mAP in its card."""
    card = ModelCard.read(parent_dir)
    model.eval()
    eager = predict(model, samples) if eager is None else eager
    out = variant_dir(parent_dir, name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    int8 = "int8" in recipe
    # Freezing's passes that do not preserve numerics leave the fp32 boxes exact but moved the int8 box head's boxes
    # (IoU 0.76 against its eager model), so int8 is frozen without them.
    with known_deprecations(), quantization_warnings():
        frozen = torch.jit.freeze(torch.jit.script(model), optimize_numerics=not int8)
        torch.jit.save(frozen, str(out / TORCHSCRIPT_FILE))
        loaded = torch.jit.load(str(out / TORCHSCRIPT_FILE)).eval()
    found = predict(loaded, samples)
    parity = box_parity(eager, found)
    if not parity["ok"]:
        raise ParityError(f"the TorchScript {name} detector's boxes differ from its eager model's: {parity}")
    parent = ParentRecord(dir=str(parent_dir), checkpoint=STATE_DICT_FILE,
                          sha256=sha256(parent_dir / STATE_DICT_FILE), variant=card.variant, test=card.test)
    variant = card.replace(variant=name, runtime="torchscript", artifact=TORCHSCRIPT_FILE, checkpoint=None,
                           parent=parent, precision="int8" if int8 else "fp32", cpu_only=int8,
                           recipe=Recipe("export" if name == BASELINE else name, recipe),
                           export={"method": "script+freeze", "optimize_numerics": not int8, "parity": parity},
                           metrics=Metrics(test=summary(coco_metrics(found, samples, card.labels))))
    variant.write(out)
    return variant


def make(parent_dir: Path, name: str, samples: list[Sample], args: argparse.Namespace) -> ModelCard:
    """One variant: its techniques applied in order to a copy of the parent, then exported."""
    model = parent_model(parent_dir, ModelCard.read(parent_dir))
    recipe = {}
    for technique in name.split("_"):
        if technique not in TECHNIQUES:
            raise ValueError(f"unknown technique {technique!r} in {name!r}; choose from {', '.join(TECHNIQUES)}")
        recipe[technique] = TECHNIQUES[technique](model, args)
    return export(parent_dir, name, model, samples, recipe)


def timed(models: dict[str, torch.jit.ScriptModule], images: list[torch.Tensor], rounds: int
          ) -> dict[str, dict[str, float]]:
    """Median ms per image one at a time, and images/s in batches of SERVED_BATCH, in interleaved rounds."""
    def run(model: torch.jit.ScriptModule) -> Callable[[], tuple[float, float]]:
        def once() -> tuple[float, float]:
            with torch.inference_mode():
                started = time.perf_counter()
                for image in images:
                    model([image])
                single = (time.perf_counter() - started) / len(images)
                started = time.perf_counter()
                for i in range(0, len(images), SERVED_BATCH):
                    model(images[i:i + SERVED_BATCH])
                return single, len(images) / (time.perf_counter() - started)
        return once

    for model in models.values():  # the first calls of a frozen module optimise its graph
        run(model)()
    results = interleaved({name: run(m) for name, m in models.items()}, rounds, rotate=True,
                          after=lambda r, name, _: print(f"  round {r + 1}/{rounds}: {name}", flush=True))
    return {name: {"latency_ms_bs1": round(1000 * median(s for s, _ in runs), 2),
                   f"throughput_bs{SERVED_BATCH}": round(median(t for _, t in runs), 2)}
            for name, runs in results.items()}


def choose(rows: dict[str, dict[str, Any]], budget: float) -> dict[str, Any]:
    """The fastest gated variant one image at a time, in served batches, and with no mAP loss."""
    passed = [r for r in rows.values() if r["gate"]["passed"]]
    key = f"throughput_bs{SERVED_BATCH}"
    lossless = [r for r in passed if r["drop_pt"] <= 0]
    picks = {"latency": min(passed, key=lambda r: r["latency_ms_bs1"]) if passed else None,
             "throughput": max(passed, key=lambda r: r[key]) if passed else None,
             "lossless": max(lossless, key=lambda r: r[key]) if lossless else None}
    fields = ("variant", "runtime", "precision", "drop_pt", "latency_ms_bs1", key, f"speedup_bs{SERVED_BATCH}")
    return {kind: None if r is None else {f: r[f] for f in fields} for kind, r in picks.items()}


def row(name: str, card: ModelCard, budget: float) -> dict[str, Any]:
    passed, verdict = gate.check(card, budget)
    assert card.parent is not None and card.test.map is not None and card.parent.test.map is not None
    return {"variant": name, "runtime": card.runtime, "precision": card.precision, "recipe": card.recipe.args,
            "map": card.test.map, "map50": card.test.map50, "drop_pt": round(100 * (card.parent.test.map -
                                                                                     card.test.map), 3),
            "parity": card.export["parity"] if card.export else None,
            "gate": {"passed": passed, "budget_pt": budget, "verdict": verdict}}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    key = f"throughput_bs{SERVED_BATCH}"
    env = report["environment"]
    lines = [f"# Detector variants of {report['parent']}", "",
             f"{report['architecture']}, {report['images']} test images; {cpu_label(env['machine'])}, "
             f"{env['threads']} threads, {report['rounds']} interleaved rounds.", "",
             f"`{report['command']}`", "",
             f"| variant | mAP | mAP@.5 | Δ mAP (pt) | gate | ms/image (bs1) | images/s (bs{SERVED_BATCH}) | × fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['map']:.4f} | {r['map50']:.4f} | {0.0 - r['drop_pt']:+.2f} | "
                     f"{'pass' if r['gate']['passed'] else 'FAIL'} | {r['latency_ms_bs1']} | {r[key]} | "
                     f"{r[f'speedup_bs{SERVED_BATCH}']} |")
    lines += ["", *(f"- skipped {k}: {v}" for k, v in report["skipped"].items()), "",
              "Picks: " + ", ".join(f"{k} **{c['variant']}**" if c else f"{k}: none"
                                    for k, c in report["pick"]["choice"].items())]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"throughput_bs{SERVED_BATCH}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        ax.scatter(r[key], r["map"], color="tab:green" if r["gate"]["passed"] else "tab:red")
        ax.annotate(r["variant"], (r[key], r["map"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"images/s, batches of {SERVED_BATCH}")
    ax.set_ylabel("test mAP@[.5:.95]")
    ax.set_title(f"{report['architecture']}\ngreen: within the {report['budget_pt']} pt mAP budget, red: over it",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def optimize(parent_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    card = ModelCard.read(parent_dir)
    if card.task != "detection" or card.parent is not None:
        raise ValueError(f"{parent_dir} is not a trained detector (task {card.task}); train one with python -m "
                         "training.detect, or optimize a classifier with python -m training.optimize")
    samples = test_samples(card)
    made: dict[str, ModelCard] = {}
    skipped: dict[str, str] = {}
    # The fp32 baseline again, so that it and the variants are exported and timed by one version of this code.
    made[BASELINE] = export(parent_dir, BASELINE, parent_model(parent_dir, card), samples, {"method": "script+freeze"})
    for i, name in enumerate(args.variants, 1):
        started = time.perf_counter()
        try:
            made[name] = make(parent_dir, name, samples, args)
        except (NotApplicable, ParityError) as e:
            skipped[name] = str(e)
            print(f"[{i}/{len(args.variants)}] {name}: skipped, {e}", flush=True)
            continue
        print(f"[{i}/{len(args.variants)}] {name}: mAP {made[name].test.map:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = {name: row(name, c, args.budget) for name, c in made.items()}
    images = [s.image.float() / 255 for s in samples[:args.timing_images]]
    print(f"timing {len(made)} detectors side by side ({args.rounds} rounds, {len(images)} images) ...", flush=True)
    with known_deprecations():
        models = {name: torch.jit.load(str(variant_dir(parent_dir, name) / c.artifact)).eval()
                  for name, c in made.items()}
    timing = timed(models, images, args.rounds)
    key = f"throughput_bs{SERVED_BATCH}"
    for name, r in rows.items():
        r.update(timing[name])
        r[f"speedup_bs{SERVED_BATCH}"] = round(r[key] / timing[BASELINE][key], 3)
    env = speed.environment(torch.get_num_threads())
    report = {"parent": str(parent_dir), "architecture": card.architecture, "images": len(samples),
              "rounds": args.rounds, "budget_pt": args.budget, "environment": env, "rows": list(rows.values()),
              "skipped": skipped, "command": args.command}
    report["pick"] = {"choice": choose(rows, args.budget), "served_batch": SERVED_BATCH, "budget_pt": args.budget,
                      "threads": env["threads"], "machine": env["machine"], "torch": env["torch"]}
    write_report(parent_dir, report, write_markdown, plot)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="a detector directory from python -m training.detect")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--proposals", type=int, default=50, help="lean: proposals kept per image at test time")
    ap.add_argument("--rank", type=int, default=256, help="svd: rank of the factorised fc6")
    ap.add_argument("--budget", type=float, default=gate.DEFAULT_BUDGET_PT, help="allowed mAP drop, in points")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timing-images", type=int, default=8)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v and v != BASELINE]
    for name in ("proposals", "rank", "rounds", "timing_images"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in args.variants:
        unknown = [t for t in name.split("_") if t not in TECHNIQUES]
        if unknown:
            ap.error(f"variant {name!r}: unknown technique {unknown[0]!r}; combine {', '.join(TECHNIQUES)} with '_'")
    args.command = "python -m training.detection_variants " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = optimize(args.parent_dir, args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    for r in report["rows"]:
        print(f"{r['variant']:16s} mAP {r['map']:.4f} ({0.0 - r['drop_pt']:+.2f} pt, gate "
              f"{'pass' if r['gate']['passed'] else 'FAIL'})  {r['latency_ms_bs1']:7.1f} ms/image  "
              f"{r[f'throughput_bs{SERVED_BATCH}']:6.1f} images/s  {r[f'speedup_bs{SERVED_BATCH}']}x")
    print("pick:", {k: c and c["variant"] for k, c in report["pick"]["choice"].items()},
          "->", args.parent_dir / REPORT_DIR)


if __name__ == "__main__":
    main()
