"""One command, one machine, one load generator: stock TorchServe vs this project's handler vs in-process.

    python -m benchmarks.run --quick                 # CI smoke run, under 3 minutes
    python -m benchmarks.run --full                  # the figures for the README
    python -m benchmarks.run --full --model artifacts/resnet18 --variants artifacts/resnet18/variants
    python -m benchmarks.run --full --only fp32,int8,bf16 --duration 10   # a subset, shorter runs
    python -m benchmarks.run --full --pick throughput   # fp32 and the variant training.optimize --pick chose
    python -m benchmarks.run --full --gpu --model artifacts/resnet50 --amp bf16   # GPU path (untested here)

Steps: inputs (held-out digit JPEGs, sklearn photos) -> in-process ceiling per variant (batch 1/8, with
and without decode) -> preprocessing vs the stock PIL path -> archives (stock image_classifier on the
fp32 TorchScript; ours via build_mar.sh for fp32 + every variant) -> startup time -> stock TorchServe
under wrk -> ours under wrk -> open loop (locust) at 30/50/70/90% of max for stock, ours fp32 and the fastest
variant -> light load: every stock setting and ours up at once, 1 connection, rounds in turn
(benchmarks.light_load; the 1-connection acceptance lines use their medians) -> benchmarks/results/report.{json,md}
+ PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from benchmarks import inputs, light_load, preprocess, report, stock
from benchmarks.acceptance import acceptance, add_ratios
from benchmarks.archives import ROOT, BuildError, build_ours
from benchmarks.environment import machine, versions
from benchmarks.inprocess import measure_variant, model_dirs
from benchmarks.served import PRIME_S, SETTLE_S, Bench
from benchmarks.startup import startup_time
from benchmarks.tools import ensure_captum
from handlers.contract import CARD_FILE, TORCHSCRIPT_FILE, ModelCard, git_commit
from handlers.cores import restart_with_openmp_env
from harness.open_loop import ensure_locust
from harness.wrk_throughput import ensure_wrk
from packager.config import serving_config
from packager.pick import PICK_KINDS, read_pick


@dataclass(frozen=True)
class Mode:
    name: str
    levels: tuple[int, ...]  # wrk connections
    fractions: tuple[float, ...]  # open-loop arrival rates, as shares of the model's best closed-loop req/s
    arrivals: tuple[str, ...]  # open-loop schedules (harness.open_loop.ARRIVALS); acceptance reads "constant"
    duration_s: float
    digits: int | None  # how many held-out digits (None: the whole test split)
    min_time: float  # seconds per in-process timing
    light_rounds: int  # rounds of 1-connection points, stock and ours in turn (benchmarks.light_load)
    light_s: float  # seconds per such point
    prime_s: float  # seconds of unreported load on each archive before its first point (Bench.prime)
    settle_s: float  # at most this much more on a fresh frontend, until its JIT goes quiet (Bench.prime)


QUICK = Mode("quick", (4,), (0.5,), ("constant",), 4, 24, 0.3, 1, 2, 1, 0)
FULL = Mode("full", (1, 4, 16, 64), (0.3, 0.5, 0.7, 0.9), ("constant", "poisson"), 10, None, 3.0, 5, 5, PRIME_S,
            SETTLE_S)


def measure_server(bench: Bench, server: str, name: str, mar: str, variant: str, batch: int,
                   sets: list[inputs.InputSet], mode: Mode, progress: tqdm, workers: int = 1,
                   threads: str = "auto", open_loop: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Load one archive alone and drive it closed-loop at each concurrency with the digits and the photos; with
    `open_loop`, then at the mode's fractions of its best digits req/s, open-loop (rows appended there)."""
    rows: list[dict[str, Any]] = []
    bench.register(name, mar, workers=workers)
    try:
        for s in sets:
            bench.prime(name, s.files[0].read_bytes(), s.list_file, mode.prime_s, settle_s=mode.settle_s)
        runs = [(s, c) for s in sets for c in mode.levels]
        for s, c in runs:
            bench.warm(name, s.files[0].read_bytes(), n=1)  # returns once the last run's queue has drained
            result, server_metrics = bench.measure(name, s.list_file, c, mode.duration_s)
            if result.requests == 0:  # slower than the window: measure once more, three times longer
                result, server_metrics = bench.measure(name, s.list_file, c, 3 * mode.duration_s)
            rows.append({"server": server, "model": name, "variant": variant, "input": s.name, "batch_size": batch,
                         "workers": workers, "threads": threads, **result.to_dict(),
                         "server_metrics": server_metrics})
            progress.update(1)
            progress.set_postfix_str(f"{name} {s.name} c{c}: {result.rps:.1f} req/s")
        if open_loop is not None:
            peak = max((r for r in rows if r["input"] == "digits"), key=lambda r: r["rps"])
            for arrivals, fraction in itertools.product(mode.arrivals, mode.fractions):
                bench.warm(name, sets[0].files[0].read_bytes(), n=1)
                result, server_metrics = bench.measure_open(name, sets[0].list_file, fraction * peak["rps"],
                                                            mode.duration_s, arrivals)
                open_loop.append({"server": server, "model": name, "variant": variant, "workers": workers,
                                  "threads": threads, "max_rps": peak["rps"], "fraction": fraction,
                                  **result.to_dict(), "p99_over_p50": round(result.p99_ms / result.p50_ms, 3)
                                  if result.p50_ms else None, "server_metrics": server_metrics})
                progress.update(1)
                progress.set_postfix_str(f"{name} open loop ({arrivals}) {fraction:.0%}: p99 {result.p99_ms:.1f} ms")
    finally:
        bench.unregister(name)
    return rows


def fastest(inproc: list[dict[str, Any]], served: set[str]) -> str:
    """Of the variants being served, the one with the most images/s in-process at batch 8, decode included."""
    rows = [r for r in inproc if r["variant"] in served and r["batch"] == 8 and r["decode"]]
    return max(rows, key=lambda r: r["images_per_s"])["variant"] if rows else "fp32"


@dataclass(frozen=True)
class Ours:
    """One of our archives in the run, with the model-config.yaml it packs."""
    name: str
    variant: str
    mar: Path
    cfg: dict[str, Any]
    sources: str  # where cfg came from (packager.config.serving_config)

    @property
    def batch(self) -> int:
        return int(self.cfg.get("batchSize", 1))

    @property
    def workers(self) -> int:
        return int(self.cfg.get("minWorkers", 1))

    @property
    def threads(self) -> str:
        return str((self.cfg.get("handler") or {}).get("threads", "lease"))


def served_config(model_dir: Path, config: Path | None, work: Path, amp: str | None
                  ) -> tuple[Path | None, dict[str, Any], str]:
    """The --config build_mar.sh gets for MODEL_DIR (None: its own rule, the variant's tuned keys over
    handlers/model-config.yaml), the config that packs, and its sources; on GPU, that config plus AMP."""
    cfg, sources = serving_config(model_dir, config)
    origin = " + ".join(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p) for p in sources)
    if amp is None:
        return config, cfg, origin
    cfg.setdefault("handler", {})["amp"] = amp
    path = work / f"model-config-{model_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, cfg, f"{origin} + amp {amp}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="CI smoke run: one concurrency, short runs")
    group.add_argument("--full", action="store_true", help="all concurrency levels, 15 s runs (default)")
    ap.add_argument("--model", type=Path, default=None, help="fp32 model dir (default artifacts/resnet18, "
                                                             "artifacts/resnet50 with --gpu)")
    ap.add_argument("--variants", type=Path, default=None, help="variant parent dir (default MODEL/variants)")
    ap.add_argument("--only", type=lambda t: [x for x in t.split(",") if x], default=None,
                    help="comma-separated variant names to serve (default: fp32 and every variant found)")
    ap.add_argument("--pick", choices=PICK_KINDS, default=None,
                    help="also serve the variant python -m training.optimize MODEL --pick chose as this kind, and "
                         "check it against stock (with no --only: fp32 and the pick only)")
    ap.add_argument("--config", type=Path, default=None,
                    help="model-config.yaml for all our archives, packed as is (default: as build_mar.sh does, "
                         "handlers/model-config.yaml with each variant's tuned-config.yaml over it)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--gpu", action="store_true", help="serve on CUDA with --amp autocast (ResNet-50 config)")
    ap.add_argument("--amp", choices=["bf16", "fp16"], default="bf16", help="GPU autocast dtype")
    ap.add_argument("--duration", type=float, default=None, help="seconds per wrk run (overrides the mode)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (archives, server logs)")
    args = ap.parse_args(argv)

    mode = QUICK if args.quick else FULL
    if args.duration:
        mode = dataclasses.replace(mode, duration_s=args.duration)
    model = args.model or ROOT / "artifacts" / ("resnet50" if args.gpu else "resnet18")
    if not (model / CARD_FILE).is_file():
        sys.exit(f"error: {model}/{CARD_FILE} not found; train and export the model first "
                 f"(python -m training.train --out {model} && python -m training.export {model}) or pass --model")
    picked = None
    try:
        if args.pick:
            picked = ModelCard.read(read_pick(model, args.pick)).variant
            args.only = [*(args.only or ["fp32"]), picked]
        dirs = model_dirs(model, args.variants, args.only)
        for d in dirs:
            serving_config(d, args.config)  # a missing or refused config stops the run before it starts
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if not (dirs[0] / TORCHSCRIPT_FILE).is_file():
        sys.exit(f"error: {dirs[0]}/{TORCHSCRIPT_FILE} (fp32 TorchScript, needed by stock TorchServe) not "
                 f"found; export it: python -m training.export {model}")
    if args.gpu and not torch.cuda.is_available():
        sys.exit("error: --gpu given but CUDA is not available on this machine; run without --gpu")
    ensure_wrk()
    ensure_locust()
    ensure_captum()  # before the long steps, so a failed install stops the run early
    device = "gpu" if args.gpu else "cpu"

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t_start = time.monotonic()
    notes: list[str] = []
    if not args.gpu:
        notes.append("GPU (ResNet-50 fp16/bf16 via --gpu --amp) not measured: no GPU on this machine.")
    try:
        sets = [inputs.digits(model, work / "inputs", mode.digits), inputs.photos(work / "inputs")]
        configs = {d: served_config(d, args.config, work, args.amp if args.gpu else None) for d in dirs}
        options = {"amp": args.amp} if args.gpu else None

        print(f"[1/6] in-process ceiling: {', '.join(d.name for d in dirs)}", file=sys.stderr)
        bodies = sets[0].bodies()
        inproc: list[dict[str, Any]] = []
        for d in tqdm(dirs, desc="in-process", leave=False):
            inproc += measure_variant(d, bodies, mode.min_time, options=options, gpu=args.gpu,
                                      batches=sorted({1, 8, int(configs[d][1].get("batchSize", 1))}))

        print("[2/6] preprocessing vs the stock PIL path", file=sys.stderr)
        pre = preprocess.compare(dirs[0], sets, mode.min_time)

        print("[3/6] archives and startup time", file=sys.stderr)
        store = work / "store"
        stock_mar = stock.build(dirs[0], store, "stock")
        ours: list[Ours] = []
        for d in dirs:
            variant, (path, cfg, origin) = ModelCard.read(d).variant, configs[d]
            try:
                ours.append(Ours(f"ours_{variant}", variant, build_ours(d, store, f"ours_{variant}", path, device),
                                 cfg, origin))
            except BuildError as e:
                notes.append(f"variant {variant} ({d}) not served: {e}")
        if not ours or ours[0].variant != "fp32":
            raise RuntimeError(f"the fp32 archive could not be built: {notes[-1] if notes else 'unknown'}")
        startup_s, startup_phases_s = startup_time(ours[0].mar, work)

        # open loop for stock, ours fp32 and the fastest (or picked) variant
        looped = {"ours_fp32", f"ours_{picked or fastest(inproc, {o.variant for o in ours})}"}
        stocks = len(stock.settings(mode.name == "full"))
        runs = 2 * len(mode.levels) * (stocks + len(ours)) + len(mode.fractions) * len(mode.arrivals) * (
            stocks + len(looped))
        served: list[dict[str, Any]] = []
        open_loop: list[dict[str, Any]] = []
        with tqdm(total=runs, desc="served", leave=False) as progress:
            print("[4/6] stock TorchServe image_classifier", file=sys.stderr)
            for workers, threads in stock.settings(mode.name == "full"):
                with stock.server(work / f"ts-stock-{workers}", store, threads) as bench:
                    served += measure_server(bench, "stock", "stock", stock_mar.name, "fp32", 1, sets, mode,
                                             progress, workers, threads, open_loop)
            print("[5/6] this project's handler", file=sys.stderr)
            with Bench(work / "ts-ours", store) as bench:
                for o in ours:
                    served += measure_server(bench, "ours", o.name, o.mar.name, o.variant, o.batch, sets, mode,
                                             progress, o.workers, o.threads, open_loop if o.name in looped else None)
            add_ratios(served, inproc)
        print(f"[6/6] light load side by side: stock and ours at 1 connection, {mode.light_rounds} rounds in turn",
              file=sys.stderr)
        light = light_load.measure(work, store, stock_mar, ours[0].mar, ours[0].workers, ours[0].threads, sets,
                                   mode.light_rounds, mode.light_s, mode.name == "full", mode.settle_s)
    finally:
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "mode": mode.name, "device": "cuda " + args.amp if args.gpu else "cpu", "started": started,
        "wall_s": round(time.monotonic() - t_start, 1),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_commit(), "machine": machine(), "versions": versions(),
        "settings": {"levels": list(mode.levels), "fractions": list(mode.fractions), "duration_s": mode.duration_s,
                     "ours_config": {o.variant: {"from": o.sources, **{k: o.cfg.get(k) for k in (
                         "batchSize", "maxBatchDelay", "minWorkers", "maxWorkers")}, "threads": o.threads}
                                     for o in ours},
                     "model": str(model), "variants": [str(d) for d in dirs]},
        "inputs": [{"name": s.name, "count": len(s.files), "description": s.description} for s in sets],
        "inprocess": inproc, "preprocess": pre, "served": served, "open_loop": open_loop,
        "light": {"rounds": mode.light_rounds, "duration_s": mode.light_s, "rows": light,
                  "summary": light_load.summary(light)},
        "startup_s": startup_s,
        "startup_phases_s": startup_phases_s,
        "notes": notes,
    }
    result["pick"] = {"kind": args.pick, "variant": picked} if picked else None
    result["acceptance"] = acceptance(served, inproc, open_loop, startup_s, picked, result["light"]["summary"])
    report.write(result, args.out)
    print(report.markdown(result))
    print(f"wrote {args.out / 'report.json'}, report.md, {report.PLOT} ({result['wall_s']} s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    restart_with_openmp_env()
    main()
