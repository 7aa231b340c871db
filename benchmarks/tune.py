"""Serving tuner: for a p99 target over the loads that matter, sweep workers x threads x batchSize x
maxBatchDelay for one variant, and write the setting that serves most within the target across the whole load
curve into the model-config.yaml that build_mar.sh packs.

    python -m benchmarks.tune artifacts/resnet18 --p99-ms 100 [--loads 1,4,16,64] [--config handlers/model-config.yaml]
        [--batch 1,8] [--delay 1,2,5] [--workers 1,2] [--threads lease,auto] [-d 5] [--runoff 2] [--margin 0.1]
        [--tail-share 0.7] [--max-tail 2] [--quick] [--dry-run] [--for-variant]

Each setting is a real archive (build_mar.sh --config <setting>) loaded alone into a real TorchServe and
driven by wrk with the held-out digit JPEGs at every load (closed loop, that many connections). Stock
TorchServe on the fp32 TorchScript of the same weights runs the same loads in the same run (its default and
one single-threaded worker per core; the better at each load is the curve shown). At each load a setting's
share is its req/s over stock's there (over the best setting's when stock is not measured), 0 when its p99 is
over the target or it had errors; its score is its lowest share over the loads. The setting whose worst load
does best against stock wins, so a gain at 64 connections cannot buy a loss at 1 (ties: the higher sum). A 5 s
point moves by ~10% on a shared machine, so the settings within --margin of the best score go to a run-off:
--runoff more rounds of them, in turn, and each load's median round counts. A closed loop hides queueing, so
the best settings then face an open loop too: constant arrivals at --tail-share (70%) of the setting's own best
req/s, best score first, until one keeps p99 <= --max-tail (2) x p50; the ones that do not are out. Only
batchSize, maxBatchDelay,
minWorkers, maxWorkers and handler.threads change in the config; comments stay. With --for-variant they go
into VARIANT_DIR/tuned-config.yaml instead, which build_mar.sh packs over handlers/model-config.yaml for that
variant only (packager.config.serving_config).
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import yaml
from tqdm import tqdm

from benchmarks import inputs, stock
from benchmarks.archives import ROOT, BuildError, build_ours
from benchmarks.environment import machine
from benchmarks.served import PRIME_S, SETTLE_S, Bench
from handlers.contract import CARD_FILE, TORCHSCRIPT_FILE, ModelCard
from handlers.machine import cpu_label
from harness.open_loop import ensure_locust
from packager.config import DEFAULT_CONFIG, TUNED_FILE, check_config, set_keys, tuned_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

THREAD_POLICIES = ("lease", "auto")
# What an open-loop check keeps besides latency: where the tail was measured, and where the CPU went.
SERVER_TAIL = ("frontend_p50_ms", "frontend_p99_ms", "cpu_ms_per_request", "cpu_busy_share")


def setting_values(s: dict[str, Any]) -> dict[str, int | str]:
    return {"batchSize": s["batch_size"], "maxBatchDelay": s["max_batch_delay"], "minWorkers": s["workers"],
            "maxWorkers": s["workers"], "handler.threads": s["threads"]}


def score(results: list[dict[str, Any]], p99_ms: float, reference: dict[int, float] | None = None
          ) -> list[dict[str, Any]]:
    """One row per setting with its curve, `share` at each load (its req/s over `reference`'s req/s at that load,
    stock's, or else over the best req/s within the target there; 0 where its p99 is over the target or it had
    errors), `score` (the lowest share: max-min over the loads) and `total` (the sum of shares). Loads where no
    setting met the target are left out of both."""
    def meets(r: dict[str, Any]) -> bool:
        return r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] <= p99_ms

    results = typical(results)
    best = {}
    for r in results:
        if meets(r):
            best[r["concurrency"]] = max(best.get(r["concurrency"], 0.0), r["rps"])
    settings: dict[int, dict[str, Any]] = {}
    for r in results:
        row = settings.setdefault(r["setting"], {k: r[k] for k in ("setting", "batch_size", "max_batch_delay",
                                                                   "workers", "threads")} | {"curve": []})
        share = r["rps"] / ((reference or {}).get(r["concurrency"]) or best[r["concurrency"]]) if meets(r) else 0.0
        row["curve"].append({k: r[k] for k in ("concurrency", "rps", "p50_ms", "p99_ms", "errors", "rounds")} | {
            "meets": meets(r), "share": round(share, 4)})
    for row in settings.values():
        shares = [c["share"] for c in row["curve"] if c["concurrency"] in best]
        row["score"] = min(shares, default=0.0)
        row["total"] = round(sum(shares), 4)
    return list(settings.values())


def typical(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, load): the measurement with the median req/s (the lower of two), carrying every
    round's errors and how many rounds there were."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["concurrency"]), []).append(r)
    out = []
    for rows in groups.values():
        median = sorted(rows, key=lambda r: r["rps"])[(len(rows) - 1) // 2]
        out.append({**median, "errors": sum(r["errors"] for r in rows), "rounds": len(rows)})
    return out


def contenders(settings: list[dict[str, Any]], margin: float) -> list[int]:
    """The settings whose score is within `margin` (a share) of the best one's: too close for one measurement."""
    top = max((s["score"] for s in settings), default=0.0)
    return [s["setting"] for s in settings if top > 0 and s["score"] >= top * (1 - margin)]


def ranked(settings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The settings that met the target at every load some setting met it at, best first: the highest score
    (worst-load share), ties to the higher total, and none whose open-loop tail failed."""
    ok = [s for s in settings if s["score"] > 0 and (s.get("tail") or {}).get("ok", True)]
    return sorted(ok, key=lambda s: (s["score"], s["total"]), reverse=True)


def pick(settings: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best of `ranked`, or None."""
    best = ranked(settings)
    return best[0] if best else None


def tail_check(bench: Bench, grid: list[dict[str, Any]], archives: list[Path], settings: list[dict[str, Any]],
               digits: inputs.InputSet, share: float, bound: float, duration: float) -> dict[int, dict[str, Any]]:
    """Open loop, best setting first, until one passes: constant arrivals at `share` of the setting's best
    closed-loop req/s; it passes when p99 <= `bound` x p50 with no errors. Returns {setting: tail}."""
    tails: dict[int, dict[str, Any]] = {}
    body = digits.files[0].read_bytes()
    for s in ranked(settings):
        i, name = s["setting"], f"t{s['setting']}"
        rate = share * max(c["rps"] for c in s["curve"])
        bench.register(name, archives[i].name)
        try:
            bench.warm(name, body)
            result, server = bench.measure_open(name, digits.list_file, rate, duration)
        finally:
            bench.unregister(name)
        ratio = result.p99_ms / result.p50_ms if result.p50_ms else float("inf")
        tails[i] = {"share": share, "rate": round(rate, 1), "achieved_rps": result.achieved_rps,
                    "p50_ms": result.p50_ms, "p99_ms": result.p99_ms, "p99_over_p50": round(ratio, 3),
                    "errors": result.errors, "mean_batch": server.get("mean_batch"),
                    **{k: server[k] for k in SERVER_TAIL if k in server}, "ok": ratio <= bound and result.errors == 0}
        print(f"open loop at {share:.0%} of max ({rate:.0f} req/s): b{grid[i]['batch_size']} "
              f"d{grid[i]['max_batch_delay']} w{grid[i]['workers']} {grid[i]['threads']}: p50 {result.p50_ms:.1f}, "
              f"p99 {result.p99_ms:.1f} ms (x{ratio:.2f}; access log p99 {server.get('frontend_p99_ms', '-')} ms) "
              f"{'kept' if tails[i]['ok'] else 'out'}", file=sys.stderr)
        if tails[i]["ok"]:
            break
    return tails


def build_archives(variant_dir: Path, base_config: Path, grid: list[dict[str, Any]], work: Path,
                   device: str = "cpu") -> list[Path]:
    """One archive per setting, each with its model-config.yaml, in work/store."""
    base = yaml.safe_load(base_config.read_text()) or {}
    archives = []
    for i, s in enumerate(tqdm(grid, desc="building archives", leave=False)):
        cfg_path = work / f"config-{i}.yaml"
        cfg_path.write_text(set_keys(base_config.read_text(), setting_values(s)))
        assert (yaml.safe_load(cfg_path.read_text()) or {}).keys() >= base.keys()
        archives.append(build_ours(variant_dir, work / "store", f"t{i}", cfg_path, device))
    return archives


def sweep(bench: Bench, grid: list[dict[str, Any]], archives: list[Path], which: list[int], loads: list[int],
          duration: float, digits: inputs.InputSet, round_: int, settle_s: float = 0.0) -> list[dict[str, Any]]:
    """Load and measure the settings `which` at each load, one after another; one row per (setting, load)."""
    rows = []
    body = digits.files[0].read_bytes()
    with tqdm(total=len(which) * len(loads), desc=f"measuring, round {round_}") as progress:
        for i in which:
            s, name = grid[i], f"t{i}"
            load_s = bench.register(name, archives[i].name)
            try:
                bench.prime(name, body, digits.list_file, min(PRIME_S, duration), settle_s=settle_s)
                for c in loads:
                    bench.warm(name, body, n=1)  # returns once the last load's queue has drained
                    result, server = bench.measure(name, digits.list_file, c, duration)
                    rows.append({"setting": i, "round": round_, **s, **result.to_dict(), "server_metrics": server,
                                 "load_s": round(load_s, 2)})
                    progress.update(1)
                    progress.set_postfix_str(f"b{s['batch_size']} d{s['max_batch_delay']} w{s['workers']} "
                                             f"{s['threads']} c{c}: {result.rps:.0f} req/s p99 {result.p99_ms:.0f}")
            finally:
                bench.unregister(name)
    return rows


def stock_curve(model_dir: Path, loads: list[int], duration: float, work: Path,
                digits: inputs.InputSet, settle_s: float = 0.0) -> list[dict[str, Any]]:
    """Stock TorchServe on the same fp32 TorchScript at each load: its default (1 worker) and one
    single-threaded worker per core, the better req/s at each load."""
    mar = stock.build(model_dir, work / "store", "stock")
    rows: dict[int, dict[str, Any]] = {}
    for workers, threads in stock.settings():
        with stock.server(work / f"ts-stock-{workers}", work / "store", threads) as bench:
            bench.register("stock", mar.name, workers=workers)
            bench.prime("stock", digits.files[0].read_bytes(), digits.list_file, min(PRIME_S, duration),
                        settle_s=settle_s)
            for c in tqdm(loads, desc=f"stock, {workers} worker(s)", leave=False):
                bench.warm("stock", digits.files[0].read_bytes(), n=1)
                result, _ = bench.measure("stock", digits.list_file, c, duration)
                if result.rps > rows.get(c, {}).get("rps", -1):
                    rows[c] = {**result.to_dict(), "workers": workers, "threads": threads}
    return [rows[c] for c in loads]


def grid_of(batches: list[int], delays: list[int], workers: list[int], threads: list[str]) -> list[dict[str, Any]]:
    """Every combination, less the ones that are the same setting (auto with one worker is every core, fixed:
    the lease with nothing to share it with; batch 1 never waits, so only its shortest delay)."""
    return [{"batch_size": b, "max_batch_delay": d, "workers": w, "threads": t}
            for b, d, w, t in itertools.product(batches, delays, workers, threads)
            if not (t == "auto" and w == 1 and "lease" in threads) and not (b == 1 and d != min(delays))]


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def delays(text: str) -> list[int]:
    """Checked as build_mar.sh will check them (with batches), before minutes of archive builds."""
    values = ints(text)
    for v in values:
        try:
            check_config({"maxBatchDelay": v, "batchSize": 2}, Path("--delay"))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return values


def policies(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values or set(values) - set(THREAD_POLICIES):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(THREAD_POLICIES)}, got {text!r}")
    return values


def stock_model(variant_dir: Path) -> Path | None:
    """The fp32 model directory holding the TorchScript stock TorchServe serves: the variant's own, or its parent's."""
    for d in (variant_dir, variant_dir.parent.parent):
        if (d / TORCHSCRIPT_FILE).is_file() and (d / CARD_FILE).is_file() and ModelCard.read(d).variant == "fp32":
            return d
    return None


def markdown(report: dict[str, Any]) -> str:
    w, target = report["winner"], report["p99_bound_ms"]
    against = "stock's req/s" if report["stock"] else "the best setting's req/s within the target"
    lines = [f"# Tuning {report['variant']} for p99 <= {target:g} ms over {report['loads']} connections", "",
             f"{cpu_label(report['machine'])}, {report['machine']['cpus']} CPUs. Command: `{report['command']}`", "",
             f"Winner: batchSize {w['batch_size']}, maxBatchDelay {w['max_batch_delay']} ms, {w['workers']} "
             f"worker(s), threads {w['threads']}: at its worst load {w['score']:.2f}× {against}.", "",
             "| batch | delay ms | workers | threads | worst share | " + " | ".join(
                 f"c{c} req/s (p99 ms)" for c in report["loads"]) + " | open loop p99/p50 |",
             "|---:|---:|---:|---|---:|" + "---:|" * len(report["loads"]) + "---:|"]
    for s in sorted(report["settings"], key=lambda s: (-s["score"], -s["total"])):
        cells = [f"{c['rps']:.1f} ({c['p99_ms']:.0f}){'' if c['meets'] else ' ✗'}" for c in s["curve"]]
        tail = s.get("tail")
        cells.append("-" if not tail else f"{tail['p99_over_p50']:.2f}{'' if tail['ok'] else ' ✗'}")
        lines.append(f"| {s['batch_size']} | {s['max_batch_delay']} | {s['workers']} | {s['threads']} | "
                     f"{s['score']:.2f} | " + " | ".join(cells) + " |")
    if report["stock"]:
        cells = [f"{c['rps']:.1f} ({c['p99_ms']:.0f})" for c in report["stock"]]
        lines.append("| stock | 1 | best of 1 and cores | default / 1 | - | " + " | ".join(cells) + " | - |")
        ratios = [f"c{c['concurrency']} {c['rps'] / s['rps']:.2f}x" for c, s in zip(w["curve"], report["stock"],
                                                                                      strict=True)]
        lines += ["", "Winner ÷ stock req/s: " + ", ".join(ratios) + "."]
    rounds = max(c["rounds"] for s in report["settings"] for c in s["curve"])
    runoff = (f" Settings within {report['margin']:.0%} of the best score after round 1 were measured in up to "
              f"{rounds} rounds, in turn; each load shows its median round." if rounds > 1 else "")
    lines += ["", f"worst share: the lowest, over the loads, of the setting's req/s over {against} at that load "
              f"(the tuner picks the highest).{runoff} ✗: p99 over the target, or errors. "
              + (f"Open loop: constant arrivals at {report['tail_share']:.0%} of the setting's best req/s for "
                 f"{2 * report['duration_s']:g} s, best score first until one keeps p99/p50 <= "
                 f"{report['max_tail']:g} (✗: out; -: not reached). " if report["tail_share"] else "")
              + f"Closed loop (wrk), held-out digit JPEGs, {report['duration_s']:g} s per load.", "",
              f"![tuned curve]({report['stem']}.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """req/s and p99 against connections: every setting faint, the winner and stock bold."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    loads = report["loads"]
    for s in report["settings"]:
        chosen = s["setting"] == report["winner"]["setting"]
        kw = {"color": "C0", "lw": 2.5, "label": "ours, tuned"} if chosen else {"color": "grey", "alpha": 0.3, "lw": 1}
        ax.plot(loads, [c["rps"] for c in s["curve"]], marker="o", **kw)
        ax2.plot(loads, [c["p99_ms"] for c in s["curve"]], marker="o", **kw)
    if report["stock"]:
        for a, key in ((ax, "rps"), (ax2, "p99_ms")):
            a.plot(loads, [c[key] for c in report["stock"]], marker="s", color="C3", lw=2, ls="--",
                   label="stock TorchServe (best setting per load)")
    ax2.axhline(report["p99_bound_ms"], color="k", lw=1, ls=":", label=f"target {report['p99_bound_ms']:g} ms")
    for a, ylabel in ((ax, "req/s"), (ax2, "p99 ms")):
        a.set_xscale("log", base=2)
        a.set_xticks(loads, [str(c) for c in loads])
        a.set_xlabel("connections (closed loop)")
        a.set_ylabel(ylabel)
        a.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.suptitle(f"{report['variant']}: tuned for p99 <= {report['p99_bound_ms']:g} ms "
                 f"({cpu_label(report['machine'])})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant_dir", type=Path)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model-config.yaml to update")
    ap.add_argument("--p99-ms", type=float, default=100.0, help="p99 target, in ms, at every load")
    ap.add_argument("--loads", type=ints, default=None, help="connections (default 1,4,16,64; quick 1,8)")
    ap.add_argument("--batch", type=ints, default=None, help="batch sizes (default 1,8; quick 1,8)")
    ap.add_argument("--delay", type=delays, default=None, help="maxBatchDelay ms, at least 1 (default 1,2,5; quick 1)")
    ap.add_argument("--workers", type=ints, default=None, help="workers (default 1,2; quick 1)")
    ap.add_argument("--threads", type=policies, default=None,
                    help="handler thread policies (default lease,auto; quick lease)")
    ap.add_argument("-d", "--duration", type=float, default=None, help="seconds per load (default 5; quick 2)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--runoff", type=int, default=None,
                    help="rounds that measure again the settings within --margin of the best score; each load's "
                         "median round counts (default 2; quick 0)")
    ap.add_argument("--margin", type=float, default=0.1, help="how close to the best score a run-off takes (0.1)")
    ap.add_argument("--tail-share", type=float, default=0.7,
                    help="open-loop check: constant arrivals at this share of a setting's best req/s (0: no check)")
    ap.add_argument("--max-tail", type=float, default=2.0, help="open-loop check: the largest p99/p50 kept (2)")
    ap.add_argument("--quick", action="store_true", help="a two-setting sweep for CI, without stock")
    ap.add_argument("--dry-run", action="store_true", help="measure and report, but leave the config alone")
    ap.add_argument("--for-variant", action="store_true",
                    help=f"write the choice to VARIANT_DIR/{TUNED_FILE} (packed over --config for this variant "
                         "only) instead of editing --config")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where tune.{json,md,png} go (with --for-variant: tune_VARIANT.{json,md,png})")
    args = ap.parse_args(argv)

    card_file = args.variant_dir / CARD_FILE
    if not card_file.is_file():
        sys.exit(f"error: {card_file} not found; pass a model or variant directory (e.g. artifacts/resnet18)")
    if not args.config.is_file():
        sys.exit(f"error: config {args.config} not found; start from handlers/model-config.yaml")
    if args.for_variant and args.config.resolve() != DEFAULT_CONFIG.resolve():
        sys.exit(f"error: --for-variant keys go over {DEFAULT_CONFIG} when build_mar.sh packs the variant; tune "
                 f"against that file (leave out --config {args.config})")
    q = args.quick
    grid = grid_of(args.batch or [1, 8], args.delay or ([1] if q else [1, 2, 5]),
                   args.workers or ([1] if q else [1, 2]), args.threads or (["lease"] if q else list(THREAD_POLICIES)))
    loads = args.loads or ([1, 8] if q else [1, 4, 16, 64])
    duration = args.duration or (2 if q else 5)
    parent = None if q else stock_model(args.variant_dir)
    settle_s = 0.0 if q else SETTLE_S
    if args.tail_share > 0:
        ensure_locust()  # before the long steps, so a failed install stops the run early
    work = Path(tempfile.mkdtemp(prefix="tune-"))
    try:
        digits = inputs.digits(args.variant_dir, work / "inputs", limit=32 if q else None)
        stock_rows = stock_curve(parent, loads, duration, work, digits, settle_s) if parent else []
        reference = {r["concurrency"]: r["rps"] for r in stock_rows if r["rps"] > 0}
        archives = build_archives(args.variant_dir, args.config, grid, work, args.device)
        with Bench(work / "ts", work / "store") as bench:
            rows = sweep(bench, grid, archives, list(range(len(grid))), loads, duration, digits, 1, settle_s)
            for r in range(2, 2 + (args.runoff if args.runoff is not None else 0 if q else 2)):
                close = contenders(score(rows, args.p99_ms, reference), args.margin)
                if len(close) < 2:
                    break
                rows += sweep(bench, grid, archives, close, loads, duration, digits, r)
            tails = tail_check(bench, grid, archives, score(rows, args.p99_ms, reference), digits, args.tail_share,
                               args.max_tail, 2 * duration) if args.tail_share > 0 else {}
    except BuildError as e:
        sys.exit(f"error: could not build the variant's archive: {e}")
    except ValueError as e:  # a card that names no digits split, a config without a handler section
        sys.exit(f"error: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    settings = score(rows, args.p99_ms, reference)
    for s in settings:
        s["tail"] = tails.get(s["setting"])
    best = pick(settings)
    variant = ModelCard.read(args.variant_dir).variant
    stem = f"tune_{variant}" if args.for_variant else "tune"
    report = {"variant_dir": str(args.variant_dir), "variant": variant, "stem": stem,
              "config": str(args.config), "p99_bound_ms": args.p99_ms, "loads": loads, "duration_s": duration,
              "margin": args.margin, "tail_share": args.tail_share, "max_tail": args.max_tail,
              "machine": machine(), "command": "python -m benchmarks.tune " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "results": rows, "settings": settings, "stock": stock_rows, "winner": best, "changed": False}
    args.out.mkdir(parents=True, exist_ok=True)
    if best is None:
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        if tails:
            low = min(tails.values(), key=lambda t: t["p99_over_p50"])
            sys.exit(f"error: every setting within the {args.p99_ms:g} ms target failed the open-loop check at "
                     f"{args.tail_share:.0%} of its max (p99/p50 over {args.max_tail:g}; lowest "
                     f"{low['p99_over_p50']:.2f}); raise --max-tail, or --p99-ms so that more settings qualify")
        lowest = min(rows, key=lambda r: r["p99_ms"])
        sys.exit(f"error: no setting kept p99 under {args.p99_ms:g} ms with zero errors at any load (lowest p99 "
                 f"{lowest['p99_ms']:.1f} ms at {lowest['concurrency']} connections); raise --p99-ms")
    print("\n" + markdown(report))
    target = args.variant_dir / TUNED_FILE if args.for_variant else args.config
    old = target.read_text() if target.is_file() else ""
    header = (f"benchmarks.tune's choice for this variant on {cpu_label(report['machine'])}:\n{report['command']}\n"
              "build_mar.sh packs it over handlers/model-config.yaml.")
    new = tuned_text(setting_values(best), header) if args.for_variant else set_keys(old, setting_values(best))
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(target), str(target)))
    if args.dry_run:
        print(f"--dry-run: {target} left unchanged; the change would be:\n{diff or '(none)'}")
    elif new == old:
        print(f"{target} already holds these values; nothing changed")
    else:
        target.write_text(new)
        report["changed"] = True
        print(f"updated {target}; rebuild the archive with build_mar.sh to use it:\n{diff}")
    report["written_to"] = str(target)
    report["diff"] = diff
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    plot(report, args.out / f"{stem}.png")
    return report


if __name__ == "__main__":
    main()
