"""The optimization pipeline: one trained fp32 checkpoint in, every variant + a measured report out.

    python -m training.optimize artifacts/resnet18     # fp32, sparse, pruned, int8, pruned_int8, bf16, distilled
    python -m training.optimize artifacts/resnet18 --variants fp32,int8 --threads 2
    python -m training.optimize artifacts/resnet18 --prune-ratio 0.6 --kd-epochs 15 --budget 1.0

Each variant is made by its technique (training/variants/) through training.technique.build and lands in
<parent>/variants/<name>/ (frozen TorchScript model.pt + a model card with the recipe, the parent's checkpoint
hash, the variant's own held-out test metrics and its profile). Then all artifacts, and the parent as eager
PyTorch (the baseline), are timed side by side at a fixed thread count, and
<parent>/optimization/report.{json,md,png} is written: top-1, macro-F1, size on disk, params, MACs,
batch-1 latency and batch-8 throughput (medians), ratios vs fp32 eager, and the accuracy-gate verdict.
The technique flags (--sparsity, --prune-ratio, --calibration-images, --kd-temperature, ...) are the same
as those of each technique's own command (python -m training.variants.pruned --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from handlers.contract import CardError, ModelCard
from handlers.cores import restart_with_openmp_env
from handlers.runtimes import load_model
from packager import gate
from packager.pick import REPORT_DIR, write_report
from training import speed, support
from training.export import ParityError
from training.technique import (
    NotSupportedHere,
    Technique,
    add_options,
    build,
    describe,
    load_parent,
    on_cpu,
    parent_record,
    variant_dir,
)
from training.variants.aot_inductor import AOTI
from training.variants.bf16 import BF16
from training.variants.compiled import COMPILED
from training.variants.distilled import DISTILLED
from training.variants.ensemble import CASCADE, ENSEMBLE
from training.variants.fp32 import FP32
from training.variants.int8 import DYNAMIC_INT8, INT8, PRUNED_INT8
from training.variants.onnx_runtime import ONNX_RUNTIME
from training.variants.openvino_ir import OPENVINO
from training.variants.pruned import PRUNED
from training.variants.sparse import SPARSE
from training.variants.tensorrt_engine import TENSORRT

TECHNIQUES: dict[str, Technique] = {t.name: t for t in (FP32, SPARSE, PRUNED, INT8, PRUNED_INT8, DYNAMIC_INT8,
                                                         BF16, DISTILLED, *ONNX_RUNTIME, *OPENVINO, *AOTI,
                                                         *COMPILED, *TENSORRT, ENSEMBLE, CASCADE)}
# Techniques on TorchScript, then the runtimes alone, then stacked on the pruned and distilled models, then
# ensembles of those (their timing here is on random inputs, so a cascade's cost is benchmarks.fusion's). Variants
# this machine cannot build (CUDA-only ones on a CPU host, bf16 without bf16 units) are skipped with the reason.
DEFAULT_VARIANTS = ("fp32", "sparse", "pruned", "int8", "pruned_int8", "bf16", "distilled",
                    "onnxruntime", "onnxruntime_int8", "openvino", "openvino_bf16", "openvino_int8", "aoti", "compile",
                    "pruned_onnxruntime_int8", "pruned_openvino_int8", "distilled_onnxruntime_int8",
                    "distilled_openvino_bf16", "distilled_openvino_int8", "aoti_cuda", "tensorrt_fp16", "ensemble",
                    "cascade")
BASELINE = "fp32_eager"
# Acceptance targets from the issue, checked (not asserted) in the report.
TARGETS = {"int8": {"min_speedup_bs8": 6.0, "max_drop_pt": 0.5},
           "pruned_int8": {"min_speedup_bs8": 6.0, "max_drop_pt": 0.5},
           "pruned": {"min_macs_removed": 0.5, "max_drop_pt": 1.0},
           "distilled": {"max_drop_pt": 1.0}}


def reusable(parent_dir: Path, name: str, parent_sha: str) -> ModelCard | None:
    """An existing variant built from this very checkpoint (same sha256), with its profile recorded."""
    vdir = variant_dir(parent_dir, name)
    try:
        card = ModelCard.read(vdir)
    except (FileNotFoundError, CardError):
        return None
    same_parent = card.parent is not None and card.parent.sha256 == parent_sha
    return card if same_parent and card.profile is not None and (vdir / card.artifact).is_file() else None


def row(name: str, card: ModelCard, files: list[Path], parent_top1: float, budget: float) -> dict[str, Any]:
    test = card.test
    passed, verdict = gate.check(card, budget) if card.parent else (True, "baseline")
    assert card.profile is not None
    return {
        "variant": name,
        "technique": card.recipe.technique,
        "architecture": card.architecture,
        "artifact": str(files[0]),
        "runtime": card.runtime,
        "precision": card.precision,
        "cpu_only": card.cpu_only,
        "cuda_only": card.cuda_only,
        "top1": test.top1,
        "macro_f1": test.macro_f1,
        "drop_pt": round(100 * (parent_top1 - test.top1), 3),
        "size_bytes": sum(speed.size_on_disk(f) for f in files),
        "params": card.profile.params,
        "macs": card.profile.macs,
        "gate": {"passed": passed, "budget_pt": budget, "verdict": verdict},
    }


def pick(rows: dict[str, dict[str, Any]], batch: int, budget: float) -> dict[str, Any] | None:
    """The fastest gated variant at batch 1, at the served batch within the budget, and with no top-1 loss
    (None when no variant passed the gate)."""
    passed = [r for name, r in rows.items() if name != BASELINE and r["gate"]["passed"]]
    if not passed:
        return None
    key = f"throughput_bs{batch}"
    lossless = [r for r in passed if r["drop_pt"] <= 0]
    choice = {"latency": min(passed, key=lambda r: r["latency_ms_bs1"]),
              "throughput": max((r for r in passed if r["drop_pt"] <= budget), key=lambda r: r[key]),
              "lossless": max(lossless, key=lambda r: r[key]) if lossless else None}
    return {kind: None if r is None else {"variant": r["variant"], "runtime": r["runtime"], "precision":
                                          r["precision"], "drop_pt": r["drop_pt"], "latency_ms_bs1":
                                          r["latency_ms_bs1"], key: r[key], f"speedup_bs{batch}":
                                          r[f"speedup_bs{batch}"]}
            for kind, r in choice.items()}


def check_targets(rows: dict[str, dict[str, Any]], picked: dict[str, Any] | None, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    key = f"throughput_bs{batch}"
    if picked and picked["lossless"] and "fp32" in rows:  # runtimes: no top-1 loss at >= 2x TorchScript fp32
        ratio = picked["lossless"][key] / rows["fp32"][key]
        out["lossless_vs_torchscript"] = {"variant": picked["lossless"]["variant"], "ratio": round(ratio, 2),
                                          "min_ratio": 2.0, "met": ratio >= 2.0}
    best = picked["throughput"] if picked else None
    if best and best["drop_pt"] <= 0.5:  # within 0.5 pt at >= 15x fp32 eager
        out["within_half_pt_vs_eager"] = {"variant": best["variant"], "speedup_bs8": best[f"speedup_bs{batch}"],
                                          "drop_pt": best["drop_pt"], "min_speedup": 15.0,
                                          "met": best[f"speedup_bs{batch}"] >= 15.0}
    for name in ("int8", "pruned_int8"):
        if name in rows:
            r, t = rows[name], TARGETS[name]
            out[name] = {"speedup_bs8": r["speedup_bs8"], "drop_pt": r["drop_pt"], **t,
                         "met": r["speedup_bs8"] >= t["min_speedup_bs8"] and r["drop_pt"] <= t["max_drop_pt"]}
    if "pruned" in rows:
        r, t = rows["pruned"], TARGETS["pruned"]
        removed = 1 - r["macs"] / rows[BASELINE]["macs"]
        out["pruned"] = {"macs_removed": round(removed, 4), "drop_pt": r["drop_pt"], **t,
                         "met": removed >= t["min_macs_removed"] and r["drop_pt"] <= t["max_drop_pt"]}
    if "distilled" in rows:
        r, t = rows["distilled"], TARGETS["distilled"]
        out["distilled"] = {"drop_pt": r["drop_pt"], **t, "met": r["drop_pt"] <= t["max_drop_pt"]}
    return out


def fmt_table(rows: list[dict[str, Any]], batch: int) -> str:
    head = ["variant", "technique", "runtime", "precision", "arch", "top-1 %", "Δ pt", "macro-F1", "size MB",
            "params M", "MACs G", "bs1 latency ms", f"bs{batch} img/s", f"× fp32 eager (bs{batch})", "start-up s",
            "device", "gate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], r["technique"], r["runtime"], r["precision"], r["architecture"], f"{100 * r['top1']:.2f}",
            f"{-r['drop_pt']:+.2f}", f"{r['macro_f1']:.4f}", f"{r['size_bytes'] / 1e6:.1f}",
            f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e9:.3f}", f"{r['latency_ms_bs1']:.1f}",
            f"{r[f'throughput_bs{batch}']:.1f}", f"{r[f'speedup_bs{batch}']:.2f}×", f"{r['startup_s']:.1f}",
            "CPU" if r["cpu_only"] else ("CUDA" if r["cuda_only"] else "CPU/CUDA"),
            "—" if r["variant"] == BASELINE else ("pass" if r["gate"]["passed"] else "FAIL"),
        ]) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    env, batch = report["environment"], report["batch"]
    lines = [
        f"# Optimization report: {report['parent']['dir']}",
        "",
        f"Parent checkpoint sha256 `{report['parent']['sha256'][:16]}…`, test split n={report['parent']['test_n']}. "
        f"Timed in-process on {env['cpu']} with torch {env['torch']}, {env['threads']} threads, "
        f"medians of {report['timing']['rounds']} interleaved rounds "
        f"({report['timing']['latency_calls']} batch-1 and {report['timing']['throughput_calls']} "
        f"batch-{batch} calls each). Accuracy gate budget {report['budget_pt']} pt.",
        "",
        fmt_table(report["rows"], batch),
        "",
        "Sparse (unstructured) weights run through dense kernels: same MACs, same speed, same file size.",
        "MACs of int8/bf16/sparse variants are those of the float model they came from.",
        "",
        "## Targets",
        "",
    ]
    for name, t in report["targets"].items():
        facts = ", ".join(f"{k} {v}" for k, v in t.items() if k != "met")
        lines.append(f"- {name}: {'met' if t['met'] else 'MISSED'} ({facts})")
    if report["skipped"]:
        lines += ["", "## Not built on this machine", ""]
        lines += [f"- {name}: {why}" for name, why in report["skipped"].items()]
    if "pick" in report:
        p, key = report["pick"], f"throughput_bs{batch}"
        lines += ["", f"## Pick for this machine ({env['cpu']}, flags {', '.join(env['machine']['cpu_flags'])}, "
                      f"GPU {env['machine']['gpu'] or 'none'}; `build_mar.sh {report['parent']['dir']} --pick KIND`)",
                  ""]
        for kind, what in (("latency", "fastest at batch 1"),
                           ("throughput", f"fastest at batch {batch} within {p['budget_pt']} pt"),
                           ("lossless", f"fastest at batch {batch} with no top-1 loss")):
            c = p["choice"][kind]
            lines.append(f"- {kind} ({what}): " + ("none qualified" if c is None else
                         f"**{c['variant']}** ({c['runtime']} {c['precision']}, {c['latency_ms_bs1']} ms at bs1, "
                         f"{c[key]} img/s at bs{batch}, {c[f'speedup_bs{batch}']}× fp32 eager, "
                         f"Δ {-c['drop_pt']:+.2f} pt)"))
    c = report["kernel_ceiling"]
    lines += [
        "",
        "## Kernel ceiling on this CPU",
        "",
        f"One 3x3 conv layer per ResNet stage, batch {c['batch']}, {c['threads']} threads, same run "
        f"(quantized engine {c['quantized_engine']}):",
        "",
        "| channels | map | fp32 GMAC/s | int8 GMAC/s |",
        "|---|---|---|---|",
        *[f"| {r['channels']} | {r['side']}² | {r['fp32_gmacs']} | {r['int8_gmacs']} |" for r in c["layers"]],
        "",
        f"The fp32 eager model runs at {c['eager_model_gmacs']} GMAC/s. Even if every MAC ran at the fastest "
        f"int8 kernel's {c['int8_gmacs_max']} GMAC/s, quantization alone could reach at most "
        f"**{c['int8_speedup_bound']}×** fp32 eager here; more needs fewer MACs (pruned_int8) or int8 matrix "
        "units (AMX).",
    ]
    path.write_text("\n".join(lines) + "\n")


def highlights(report: dict[str, Any]) -> set[str]:
    """Variants worth a label: the baseline, the picks, each runtime's fastest gated variant, and gate failures."""
    rows = report["rows"]
    names = {BASELINE} | {c["variant"] for c in report.get("pick", {}).get("choice", {}).values() if c}
    names |= {r["variant"] for r in rows if r["variant"] != BASELINE and not r["gate"]["passed"]}
    for runtime in {r["runtime"] for r in rows}:
        gated = [r for r in rows if r["runtime"] == runtime and (r["variant"] == BASELINE or r["gate"]["passed"])]
        if gated:
            names.add(min(gated, key=lambda r: r["latency_ms_bs1"])["variant"])
    return names


def plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(12, 7))
    runtimes = sorted({r["runtime"] for r in report["rows"]})
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(runtimes)}
    for name in runtimes:
        ax.scatter([], [], color=colors[name], label=f"runtime: {name}")
    sizes = [r["size_bytes"] / 1e6 for r in report["rows"]]
    scale = 1500 / max(sizes)
    # Twenty variants crowd the fp32 corner; label the ones a reader looks for and leave the rest to report.md.
    labelled = highlights(report)
    for i, (r, mb) in enumerate(zip(report["rows"], sizes, strict=True)):
        color = colors[r["runtime"]]
        ax.scatter(r["latency_ms_bs1"], 100 * r["top1"], s=max(30.0, mb * scale), alpha=0.55, color=color,
                   edgecolors="black", linewidths=0.6)
        if r["variant"] in labelled:
            ax.annotate(f"{r['variant']} ({mb:.1f} MB)", (r["latency_ms_bs1"], 100 * r["top1"]), fontsize=8,
                        xytext=(12, 14 * (i % 3 - 1)), textcoords="offset points", ha="left", va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"})
    parent = 100 * report["parent"]["top1"]
    ax.axhline(parent - report["budget_pt"], color="tab:red", ls="--", lw=1,
               label=f"gate: fp32 {parent:.2f}% - {report['budget_pt']} pt")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 3, 10, 30 ms rather than 3×10⁰
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"in-process latency at batch 1, ms (median, {report['environment']['threads']} threads, log scale)")
    ax.set_ylabel("held-out test top-1, %")
    ax.set_title(f"{report['parent']['architecture']} variants: accuracy vs latency on {report['environment']['cpu']}"
                 "\n(marker area = size on disk; colour = runtime; labelled: baseline, picks, each runtime's "
                 "fastest gated variant, gate failures; every row is in report.md)", fontsize=10)
    ax.margins(x=0.25, y=0.25)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    parent_dir: Path = args.parent_dir
    started = time.perf_counter()
    parent_card, parent = load_parent(parent_dir)
    parent_top1 = parent_card.test.top1
    print(f"parent: {parent_dir} ({parent_card.architecture} @ {parent_card.input.image_size}px, "
          f"test top-1 {100 * parent_top1:.2f}%); variants: {', '.join(args.variants)}", flush=True)

    # Known gaps of the architecture's family (training/support.py) are refused before any variant is built.
    gaps = {}
    for name in args.variants:
        try:
            support.check_technique(parent_card.architecture, TECHNIQUES[name], args)
        except support.Unsupported as e:
            gaps[name] = str(e)
    if gaps and args.explicit:
        raise support.Unsupported("; ".join(gaps.values()) + "; leave them out of --variants")

    record = parent_record(parent_dir, parent_card)
    made: dict[str, ModelCard] = {}
    skipped: dict[str, str] = {}
    for i, name in enumerate(args.variants, 1):
        t0 = time.perf_counter()
        if args.reuse and (card := reusable(parent_dir, name, record.sha256)):
            made[name] = card
            print(f"[{i}/{len(args.variants)}] reused {describe(card)}", flush=True)
            continue
        if missing := [r for r in TECHNIQUES[name].requires(args) if r in skipped]:
            skipped[name] = f"made from {', '.join(missing)}, which was skipped"
            continue
        if name in gaps:
            skipped[name] = gaps[name]
            print(f"[{i}/{len(args.variants)}] skipped: {gaps[name]}", flush=True)
            continue
        print(f"[{i}/{len(args.variants)}] {name} ...", flush=True)
        try:
            made[name] = build(parent_dir, TECHNIQUES[name], args)
        except NotSupportedHere as e:
            skipped[name] = str(e)
            print(f"[{i}/{len(args.variants)}] skipped: {e}", flush=True)
            continue
        except ParityError as e:  # depends on the weights (docs/support.md): this variant is out, the rest go on
            skipped[name] = f"refused, its artifact does not match its source: {e}"
            print(f"[{i}/{len(args.variants)}] skipped: {skipped[name]}", flush=True)
            continue
        print(f"[{i}/{len(args.variants)}] {describe(made[name])} ({time.perf_counter() - t0:.0f}s)", flush=True)

    print(f"loading {len(made) + 1} models and timing them side by side ({args.threads} threads, {args.rounds} "
          "rounds) ...", flush=True)
    size = parent_card.input.image_size
    models, startup = {}, {}
    with speed.thread_count(args.threads):
        eager = parent_card.replace(runtime="eager", artifact=parent_card.checkpoint)  # the baseline: fp32 eager
        for name, card in {BASELINE: eager, **made}.items():
            directory = parent_dir if name == BASELINE else variant_dir(parent_dir, name)
            device = torch.device("cuda" if card.cuda_only else "cpu")
            models[name], startup[name] = speed.startup(
                lambda d=directory, c=card, dev=device: on_cpu(load_model(d, c, dev, args.threads), dev),
                size, args.batch)
    timing = speed.benchmark(models, size, args.threads, args.rounds, args.latency_calls, args.throughput_calls,
                             args.batch, args.progress)

    baseline = eager.replace(recipe=dataclasses.replace(parent_card.recipe, technique="none (eager PyTorch)"),
                             profile=speed.profile(parent, size))
    assert parent_card.checkpoint is not None
    rows = {BASELINE: row(BASELINE, baseline, [parent_dir / parent_card.checkpoint], parent_top1, args.budget)}
    for name, card in made.items():
        rows[name] = row(name, card, [variant_dir(parent_dir, name) / f for f in card.files], parent_top1,
                         args.budget)
    key = f"throughput_bs{args.batch}"
    base = timing[BASELINE]
    for name, r in rows.items():
        r.update(timing[name], **startup[name])
        r[f"speedup_bs{args.batch}"] = round(r[key] / base[key], 3)
        r["latency_speedup_bs1"] = round(base["latency_ms_bs1"] / r["latency_ms_bs1"], 3)

    picked = pick(rows, args.batch, args.budget)
    env = speed.environment(args.threads)
    ceiling = speed.kernel_ceiling(args.threads, args.batch)
    eager_gmacs = rows[BASELINE]["macs"] * base[key] / 1e9
    # What the int8 target asks of the kernels, next to what they can do on this CPU.
    ceiling.update(eager_model_gmacs=round(eager_gmacs, 1),
                   int8_speedup_bound=round(ceiling["int8_gmacs_max"] / eager_gmacs, 2))
    # The variant's speed travels with it (and so into the .mar and the describe response).
    for name, card in made.items():
        speed_record = {k: rows[name][k] for k in ("latency_ms_bs1", key, f"speedup_bs{args.batch}", "size_bytes",
                                                    "params", "macs", "startup_s")}
        speed_record.update(threads=args.threads, machine=env["machine"], torch=env["torch"], baseline=BASELINE)
        card.replace(metrics=dataclasses.replace(card.metrics, speed=speed_record)).write(variant_dir(parent_dir, name))

    report = {
        "parent": {"dir": str(parent_dir), "sha256": record.sha256, "architecture": parent_card.architecture,
                   "input_size": size, "top1": parent_top1, "test_n": parent_card.test.n},
        "environment": env,
        "batch": args.batch,
        "timing": {"rounds": args.rounds, "latency_calls": args.latency_calls,
                   "throughput_calls": args.throughput_calls, "statistic": "median", "baseline": BASELINE},
        "budget_pt": args.budget,
        "rows": list(rows.values()),
        "targets": check_targets(rows, picked, args.batch),
        "skipped": skipped,
        "kernel_ceiling": ceiling,
        "recipes": {n: dataclasses.asdict(c.recipe) for n, c in made.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.pick:
        if picked is None:
            raise ValueError("no variant passed the accuracy gate, so there is nothing to pick; raise --budget or "
                             "retune the techniques")
        report["pick"] = {"choice": picked, "served_batch": args.batch,
                          "budget_pt": args.budget, "threads": args.threads, "machine": env["machine"],
                          "torch": env["torch"]}
    write_report(parent_dir, report, write_markdown, plot)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory (python -m training.train --out)")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, in order (default {','.join(DEFAULT_VARIANTS)}, less the known gaps of "
                         f"the architecture's family, docs/support.md; all: {','.join(TECHNIQUES)})")
    ap.add_argument("--budget", type=float, default=gate.DEFAULT_BUDGET_PT,
                    help="accuracy gate shown in the report: allowed top-1 drop vs fp32, points")
    g = ap.add_argument_group("timing")
    g.add_argument("--threads", type=int, default=2, help="torch threads while timing (fixed for every model)")
    g.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    g.add_argument("--latency-calls", type=int, default=5, help="batch-1 calls per model per round")
    g.add_argument("--throughput-calls", type=int, default=3, help="batch calls per model per round")
    g.add_argument("--batch", type=int, default=8, help="throughput batch size")
    ap.add_argument("--pick", action="store_true",
                    help="write optimization/pick.json: the fastest gated variant at batch 1 (latency), at --batch "
                         "within --budget (throughput) and with no top-1 loss (lossless), for build_mar.sh --pick")
    ap.add_argument("--reuse", action="store_true",
                    help="keep variants already built from this same checkpoint (sha256); only re-time and report")
    add_options(ap, list(TECHNIQUES.values()))
    args = ap.parse_args(argv)
    args.explicit = args.variants is not None  # named variants are never skipped quietly for a known gap
    args.variants = [v.strip() for v in (args.variants or ",".join(DEFAULT_VARIANTS)).split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(TECHNIQUES))
    if unknown or not args.variants:
        ap.exit(2, f"error: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
                   f"choose from {', '.join(TECHNIQUES)}\n")
    order = args.variants
    for name in order:
        for source in TECHNIQUES[name].requires(args):
            if source in order and order.index(source) > order.index(name):
                ap.exit(2, f"error: {name} is made from {source}; list {source} before it\n")
    if args.threads < 1:
        ap.exit(2, "error: --threads must be at least 1\n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError, CardError, ParityError) as e:
        sys.exit(f"error: {e}")
    out = args.parent_dir / REPORT_DIR
    print(fmt_table(report["rows"], args.batch))
    for name, t in report["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'MISSED'} {({k: v for k, v in t.items() if k != 'met'})}")
    print(f"report: {out}/report.json, report.md, report.png ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    restart_with_openmp_env()
    main()
