"""Members vs ensemble vs cascade, side by side in one run: held-out top-1, mean batch-1 cost over the held-out
images, and served req/s at 16 connections under the real TorchServe.

    python -m benchmarks.fusion                                   # artifacts/resnet18's ensemble and cascade
    python -m benchmarks.fusion --model artifacts/resnet18 --fused ensemble,cascade --duration 10 --out docs

The ensemble and cascade variants come from python -m training.variants.ensemble (or training.optimize); their
members are read from their cards. The cost is the mean over every held-out test image, one at a time, because a
cascade's cost depends on the image (confident ones never reach the big model); interleaved rounds, median of
the round means. Writes OUT/fusion.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import inputs
from benchmarks.archives import ROOT, BuildError, build_ours
from benchmarks.served import Bench
from handlers.contract import CardError, ModelCard
from handlers.deprecations import known_deprecations
from handlers.imaging import Normalizer
from handlers.runtimes import Fused, Predictor, load_model
from harness.wrk_throughput import ensure_wrk
from packager.stats import interleaved, median
from training.evaluate import splits_for
from training.speed import environment, thread_count
from training.technique import variant_dir

CONNECTIONS = 16
TARGET = {"max_drop_pt": 0.2, "max_cost_ratio": 0.6}  # the cascade vs its big member


def models(parent: Path, fused: list[str]) -> dict[str, tuple[Path, ModelCard, str]]:
    """name -> (directory, card, role): every fused variant's members first, then the fused variants."""
    out: dict[str, tuple[Path, ModelCard, str]] = {}
    cards = {name: ModelCard.read(variant_dir(parent, name)) for name in fused}
    for name, card in cards.items():
        if card.fusion is None:
            raise ValueError(f"variant {name} is not an ensemble or cascade ({card.runtime})")
        for i, m in enumerate(card.fusion.members):
            role = ("cheap member" if i == 0 else "big member") if card.fusion.kind == "cascade" else "member"
            prior = out.get(m.variant, (None, None, ""))[2]
            role = f"{prior}, {role}" if prior and role not in prior else prior or role
            out[m.variant] = (variant_dir(parent, m.variant), ModelCard.read(variant_dir(parent, m.variant)), role)
    for name, card in cards.items():
        out[name] = (variant_dir(parent, name), card, card.fusion.kind)  # type: ignore[union-attr]
    return out


@torch.inference_mode()
def costs(runs: dict[str, Predictor], images: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Mean ms per image at batch 1 over `images`, interleaved across models; median of the round means."""
    for run in runs.values():  # warm-up (TorchScript specialises on its first calls)
        for x in images[:8]:
            run(x[None])
    for fused in (r for r in runs.values() if isinstance(r, Fused)):
        fused.seen = fused.deferred = 0
    def one_pass(run: Predictor) -> float:
        t0 = time.perf_counter()
        for x in images:
            run(x[None])
        return 1000 * (time.perf_counter() - t0) / len(images)

    means = interleaved({name: functools.partial(one_pass, run) for name, run in runs.items()}, rounds)
    out = {name: {"ms_per_image": round(median(ms), 3)} for name, ms in means.items()}
    for name, run in runs.items():
        if isinstance(run, Fused) and run.fusion.kind == "cascade":
            out[name]["deferred"] = round(run.deferred / max(1, run.seen), 4)
    return out


def served(entries: dict[str, tuple[Path, ModelCard, str]], work: Path, duration: float) -> dict[str, dict[str, Any]]:
    """req/s and latency of each model at CONNECTIONS connections, one archive registered at a time."""
    store = work / "store"
    digits = inputs.digits(next(iter(entries.values()))[0], work / "inputs")
    mars = {name: build_ours(d, store, f"fusion_{name}", ROOT / "handlers" / "model-config.yaml").name
            for name, (d, _, _) in entries.items()}
    out = {}
    with Bench(work / "ts", store) as bench:
        for name, mar in mars.items():
            bench.register(name, mar)
            try:
                bench.warm(name, digits.files[0].read_bytes())
                result, _ = bench.measure(name, digits.list_file, CONNECTIONS, duration)
            finally:
                bench.unregister(name)
            out[name] = {k: getattr(result, k) for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")}
            print(f"  served {name}: {result.rps:.1f} req/s at {CONNECTIONS} connections, {result.errors} errors",
                  flush=True)
    return out


def verdict(rows: dict[str, dict[str, Any]], cascade: str) -> dict[str, Any]:
    """The cascade against its big member: top-1 within 0.2 pt at <= 0.6x its mean cost."""
    big = next(n for n, r in rows.items() if "big member" in r["role"])
    drop = round(100 * (rows[big]["top1"] - rows[cascade]["top1"]), 2)
    ratio = round(rows[cascade]["ms_per_image"] / rows[big]["ms_per_image"], 3)
    return {"cascade": cascade, "big": big, "drop_pt": drop, "cost_ratio": ratio, **TARGET,
            "met": drop <= TARGET["max_drop_pt"] and ratio <= TARGET["max_cost_ratio"]}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Members, ensemble and cascade\n\n{report['machine']}, {report['threads']} threads. Command: "
             f"`{report['command']}`.\n",
             f"Top-1 on the {report['test_n']} held-out test digits (the cards' evaluation). Cost: mean ms per image "
             f"at batch 1 over those images, {report['rounds']} interleaved rounds, median of the round means. "
             f"Served: the real TorchServe with each archive alone, wrk at {CONNECTIONS} connections for "
             f"{report['duration_s']} s on the held-out digits as JPEG.\n",
             "| model | role | top-1 | bs1 cost ms/image | cost vs the cheapest member | served req/s | p99 ms "
             "| errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    cheapest = min(r["ms_per_image"] for r in report["rows"].values() if "member" in r["role"])
    for name, r in report["rows"].items():
        s = r.get("served") or {}
        lines.append(f"| {name} | {r['role']} | {100 * r['top1']:.2f}% | {r['ms_per_image']:.2f} | "
                     f"{r['ms_per_image'] / cheapest:.2f}x | {s.get('rps', float('nan')):.1f} | "
                     f"{s.get('p99_ms', float('nan')):.0f} | {s.get('errors', '')} |")
    for r in report["rows"].values():
        if "deferred" in r:
            lines.append(f"\nThe cascade sent {100 * r['deferred']:.1f}% of the held-out images to its big member "
                         f"(threshold {r['threshold']:.3f} on the cheap member's top probability, fitted on the "
                         f"validation split, where it deferred {100 * r['val_deferred']:.1f}%).")
    v = report.get("cascade_target")
    if v:
        lines.append(f"\nTarget: the cascade within {v['max_drop_pt']} pt of {v['big']} at <= {v['max_cost_ratio']}x "
                     f"its cost. Measured: {v['drop_pt']:+.2f} pt, {v['cost_ratio']}x: "
                     f"**{'met' if v['met'] else 'MISSED'}**.")
    lines.append("\n![members, ensemble and cascade](fusion.png)\n")
    return "\n".join(lines)


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    colors = {"mean": "tab:red", "weighted": "tab:red", "cascade": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, r) in enumerate(rows.items()):
        color = colors.get(r["role"], "tab:blue")
        left.scatter(r["ms_per_image"], 100 * r["top1"], color=color, s=40)
        left.annotate(name, (r["ms_per_image"], 100 * r["top1"]), fontsize=8, xytext=(4, 6 if i % 2 else -12),
                      textcoords="offset points")
    left.set_xscale("log")
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("mean batch-1 cost over the held-out images, ms (log)")
    left.set_ylabel("held-out top-1, %")
    left.grid(alpha=0.3)
    names = [n for n in rows if rows[n].get("served")]
    right.barh(names, [rows[n]["served"]["rps"] for n in names],
               color=[colors.get(rows[n]["role"], "tab:blue") for n in names])
    right.set_xlabel(f"served req/s at {CONNECTIONS} connections")
    right.invert_yaxis()
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(f"members (blue), ensemble (red), cascade (green); {report['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "resnet18", help="the parent model dir")
    p.add_argument("--fused", default="ensemble,cascade", help="its ensemble/cascade variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per served model")
    p.add_argument("--no-serve", dest="serve", action="store_false", help="in-process figures only")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    try:
        entries = models(args.model, [n.strip() for n in args.fused.split(",") if n.strip()])
        parent = ModelCard.read(args.model)
        splits = splits_for(parent)
    except (FileNotFoundError, ValueError, CardError) as e:
        p.error(f"{e}; build them with python -m training.variants.ensemble {args.model} [--variant cascade]")
    if args.serve:
        ensure_wrk()
    started = time.monotonic()
    images = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    images = Normalizer(parent.input.mean, parent.input.std)(images).contiguous(memory_format=torch.channels_last)
    print(f"timing {len(entries)} models at batch 1 over {len(images)} held-out images ...", flush=True)
    with thread_count(args.threads), known_deprecations():
        runs = {name: load_model(d, card, "cpu", args.threads) for name, (d, card, _) in entries.items()}
        measured = costs(runs, images, args.rounds)
    rows: dict[str, dict[str, Any]] = {}
    for name, (_, card, role) in entries.items():
        rows[name] = {"role": role, "top1": card.test.top1, "runtime": card.runtime, "precision": card.precision,
                      **measured[name]}
        if card.fusion is not None and card.fusion.kind == "cascade":
            rows[name].update(threshold=card.fusion.threshold, val_deferred=card.recipe.args.get("val_deferred"))
        print(f"  {name}: top-1 {100 * card.test.top1:.2f}%, {measured[name]['ms_per_image']:.2f} ms/image", flush=True)
    if args.serve:
        with tempfile.TemporaryDirectory(prefix="fusion-") as tmp:
            try:
                for name, figures in served(entries, Path(tmp), args.duration).items():
                    rows[name]["served"] = figures
            except BuildError as e:
                sys.exit(f"error: an archive did not build: {e}")
    env = environment(args.threads)
    command = " ".join(["python -m benchmarks.fusion", *(sys.argv[1:] if argv is None else argv)])
    report = {"machine": f"{env['cpu']}, {env['cpu_count']} CPUs", "threads": args.threads, "command": command,
              "test_n": len(images), "rounds": args.rounds, "duration_s": args.duration, "rows": rows,
              "seconds": round(time.monotonic() - started, 1)}
    cascades = [n for n, r in rows.items() if r["role"] == "cascade"]
    if cascades:
        report["cascade_target"] = verdict(rows, cascades[0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fusion.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "fusion.md").write_text(markdown(report))
    plot(args.out / "fusion.png", report)
    print(markdown(report))
    print(f"wrote {args.out}/fusion.{{json,md,png}} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
