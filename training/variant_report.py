"""A task's served variants side by side: timed in interleaved rounds, gated, written to the optimization report
(JSON, markdown, plot) with the pick that `build_mar.sh --pick` packages. training.detection_variants and
training.text_variants make the variants; this module compares them the same way for both.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from handlers.contract import ModelCard
from handlers.machine import cpu_label
from packager import gate
from packager.pick import REPORT_DIR, write_report
from packager.stats import interleaved, median
from training import speed
from training.export import ParityError

BASELINE = "torchscript"  # the fp32 export every variant is timed against
SERVED_BATCH = 4  # the batch the variants are timed and picked at, as the shipped model-config batches
THROUGHPUT = f"throughput_bs{SERVED_BATCH}"
SPEEDUP = f"speedup_bs{SERVED_BATCH}"


def parent_card(parent_dir: Path, task: str, hint: str) -> ModelCard:
    """The card of a trained (or brought) `task` model, which variants are made from; else what to run instead."""
    card = ModelCard.read(parent_dir)
    if card.task != task or card.parent is not None:
        raise ValueError(f"{parent_dir} is not a trained {task} model (task {card.task}, variant {card.variant}); "
                         f"{hint}")
    return card


def timed(models: dict[str, Callable[[Any], Any]], singles: Sequence[Any], batches: Sequence[Any], items: int,
          rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per item called one at a time (`singles`, one model input each), and items/s over `batches` (model
    inputs of SERVED_BATCH items, `items` in all), in interleaved rounds."""
    def run(model: Callable[[Any], Any]) -> Callable[[], tuple[float, float]]:
        def once() -> tuple[float, float]:
            with torch.inference_mode():
                started = time.perf_counter()
                for x in singles:
                    model(x)
                single = (time.perf_counter() - started) / len(singles)
                started = time.perf_counter()
                for x in batches:
                    model(x)
                return single, items / (time.perf_counter() - started)
        return once

    for model in models.values():  # the first calls of a frozen module optimise its graph
        run(model)()
    results = interleaved({name: run(m) for name, m in models.items()}, rounds, rotate=True,
                          after=lambda r, name, _: print(f"  round {r + 1}/{rounds}: {name}", flush=True))
    return {name: {"latency_ms_bs1": round(1000 * median(s for s, _ in runs), 3),
                   THROUGHPUT: round(median(t for _, t in runs), 2)}
            for name, runs in results.items()}


def row(name: str, card: ModelCard, budget: float, figures: dict[str, float | None]) -> dict[str, Any]:
    """A variant's line in the report: what it is, its `figures` (headline first), its loss and its gate."""
    passed, verdict = gate.check(card, budget)
    assert card.parent is not None and card.parent.test is not None
    headline = card.test.headline[1] - card.parent.test.headline[1]
    return {"variant": name, "runtime": card.runtime, "precision": card.precision, "recipe": card.recipe.args,
            **figures, "drop_pt": round(-100 * headline, 3),
            "parity": card.export["parity"] if card.export else None,
            "gate": {"passed": passed, "budget_pt": budget, "verdict": verdict}}


def choose(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest gated variant one item at a time, in served batches, and with no loss."""
    passed = [r for r in rows.values() if r["gate"]["passed"]]
    lossless = [r for r in passed if r["drop_pt"] <= 0]
    picks = {"latency": min(passed, key=lambda r: r["latency_ms_bs1"]) if passed else None,
             "throughput": max(passed, key=lambda r: r[THROUGHPUT]) if passed else None,
             "lossless": max(lossless, key=lambda r: r[THROUGHPUT]) if lossless else None}
    fields = ("variant", "runtime", "precision", "drop_pt", "latency_ms_bs1", THROUGHPUT, SPEEDUP)
    return {kind: None if r is None else {f: r[f] for f in fields} for kind, r in picks.items()}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    env, unit, columns = report["environment"], report["unit"], report["columns"]
    lines = [f"# {report['title']} of {report['parent']}", "",
             f"{report['architecture']}, {report['items']} test {unit}s; {cpu_label(env['machine'])}, "
             f"{env['threads']} threads, {report['rounds']} interleaved rounds.", "",
             f"`{report['command']}`", "",
             f"| variant | {' | '.join(columns.values())} | Δ {next(iter(columns.values()))} (pt) | gate | "
             f"ms/{unit} (bs1) | {unit}s/s (bs{SERVED_BATCH}) | × baseline |",
             "|---|" + "---|" * (len(columns) + 5)]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {' | '.join(f'{r[k]:.4f}' for k in columns)} | {0.0 - r['drop_pt']:+.2f} | "
                     f"{'pass' if r['gate']['passed'] else 'FAIL'} | {r['latency_ms_bs1']} | {r[THROUGHPUT]} | "
                     f"{r[SPEEDUP]} |")
    lines += ["", *(f"- skipped {k}: {v}" for k, v in report.get("skipped", {}).items()), "",
              "Picks: " + ", ".join(f"{k} **{c['variant']}**" if c else f"{k}: none"
                                    for k, c in report["pick"]["choice"].items())]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, (metric, title) = THROUGHPUT, next(iter(report["columns"].items()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in report["rows"]:
        ax.scatter(r[key], r[metric], color="tab:green" if r["gate"]["passed"] else "tab:red")
        ax.annotate(r["variant"], (r[key], r[metric]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel(f"{report['unit']}s/s, batches of {SERVED_BATCH}")
    ax.set_ylabel(f"test {title}")
    ax.set_title(f"{report['architecture']}\ngreen: within the {report['budget_pt']} pt {title} budget, red: over it",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def publish(parent_dir: Path, card: ModelCard, rows: dict[str, dict[str, Any]], timing: dict[str, dict[str, float]],
            baseline: str, args: argparse.Namespace, **about: Any) -> dict[str, Any]:
    """Timings into the rows (speed-up over `baseline`), the pick, and PARENT/optimization/report.{json,md,png} +
    pick.json. `about`: title, unit, items, columns (row key -> its title, headline first), skipped."""
    for name, r in rows.items():
        r.update(timing[name])
        r[SPEEDUP] = round(r[THROUGHPUT] / timing[baseline][THROUGHPUT], 3)
    env = speed.environment(torch.get_num_threads())
    report = {"parent": str(parent_dir), "architecture": card.architecture, **about, "rounds": args.rounds,
              "budget_pt": args.budget, "environment": env, "rows": list(rows.values()), "command": args.command}
    report["pick"] = {"choice": choose(rows), "served_batch": SERVED_BATCH, "budget_pt": args.budget,
                      "threads": env["threads"], "machine": env["machine"], "torch": env["torch"]}
    write_report(parent_dir, report, write_markdown, plot)
    return report


def arguments(doc: str, parent: str, measure: str, unit: str, timing: int, variants: str) -> argparse.ArgumentParser:
    """The options every variants command takes: the parent, which variants, the gate's budget and the timing."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help=parent)
    ap.add_argument("--variants", default=variants, help=f"comma-separated (default {variants}; {BASELINE} is "
                    "always made)")
    ap.add_argument("--budget", type=float, default=gate.DEFAULT_BUDGET_PT, help=f"allowed {measure} drop, in points")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(f"--timing-{unit}s", type=int, default=timing, help=f"{unit}s timed per round")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None, module: str, positive: Sequence[str]
          ) -> argparse.Namespace:
    """Parsed options: variants as a list (the baseline aside), the `positive` ones checked, the command kept."""
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v and v != BASELINE]
    for name in positive:
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.command = f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def run(optimize: Callable[[Path, argparse.Namespace], dict[str, Any]], args: argparse.Namespace) -> None:
    """A variants command: make, time and pick, then print the rows; a known failure is one line and exit 1."""
    try:
        report = optimize(args.parent_dir, args)
    except (FileNotFoundError, ValueError, ParityError) as e:
        raise SystemExit(f"error: {e}") from e
    print_rows(report)
    print("->", args.parent_dir / REPORT_DIR)


def print_rows(report: dict[str, Any]) -> None:
    unit, headline = report["unit"], next(iter(report["columns"]))
    for r in report["rows"]:
        print(f"{r['variant']:18s} {headline} {r[headline]:.4f} ({0.0 - r['drop_pt']:+.2f} pt, gate "
              f"{'pass' if r['gate']['passed'] else 'FAIL'})  {r['latency_ms_bs1']:8.2f} ms/{unit}  "
              f"{r[THROUGHPUT]:7.1f} {unit}s/s  {r[SPEEDUP]}x")
    print("pick:", {k: c and c["variant"] for k, c in report["pick"]["choice"].items()})
