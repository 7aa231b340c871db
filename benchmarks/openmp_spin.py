"""What OpenMP's spinning costs the core lease: worker processes that take turns at batch-1 inferences, as
TorchServe hands a lone client's requests to its workers in turn, each leasing the cores (handlers/cores.py) as
the handler does. One worker alone is the reference; two workers run with libgomp's default spin and with
handlers.cores.OPENMP_ENV, in interleaved rounds.

    python -m benchmarks.openmp_spin artifacts/resnet18 [--variant int8] [--rounds 3] [--calls 60]

A worker's call is timed inside the worker, from the lease to the answer; between calls the driver waits
--gap-ms (the answer's trip to the client and the next request's back).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from benchmarks.stock import LIBGOMP_DEFAULT
from benchmarks.thread_switch import elastic_variant, variant_parser, write_report
from handlers import machine
from handlers.contract import ModelCard
from handlers.cores import OPENMP_ENV, CorePool
from handlers.runtimes import load_model
from training.stats import percentile


def worker(conn: Connection, directory: Path, pool_dir: Path) -> None:
    """Load the model, then answer each message with the seconds one leased batch-1 call took."""
    card = ModelCard.read(directory)
    pool = CorePool(directory=pool_dir)
    model = load_model(directory, card, "cpu", pool.cores)
    x = torch.randn(1, 3, card.input.image_size, card.input.image_size)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        conn.send("ready")
        while conn.recv():
            t0 = time.perf_counter()
            with pool.lease() as n:
                if n != torch.get_num_threads():
                    torch.set_num_threads(n)
                model(x)
            conn.send(time.perf_counter() - t0)


def take_turns(workers: int, env: dict[str, str], directory: Path, calls: int, gap_s: float) -> list[float]:
    """Start `workers` processes with `env` (read by OpenMP when torch loads), send them `calls` calls in turn."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned child starts from this process's environment
    try:
        ctx = mp.get_context("spawn")
        with tempfile.TemporaryDirectory() as pool_dir:
            pipes, procs = [], []
            for _ in range(workers):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=worker, args=(theirs, directory, Path(pool_dir)), daemon=True)
                proc.start()
                pipes.append(ours)
                procs.append(proc)
            try:
                for p in pipes:
                    p.recv()
                times = []
                for i in range(calls):
                    pipes[i % workers].send(True)
                    times.append(pipes[i % workers].recv())
                    time.sleep(gap_s)
            finally:
                for p in pipes:
                    p.send(False)
                for proc in procs:
                    proc.join(timeout=30)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = variant_parser(__doc__, "openmp_spin.json", rounds=3)
    ap.add_argument("--calls", type=int, default=60, help="calls per setting and round (the first 5 are dropped)")
    ap.add_argument("--gap-ms", type=float, default=1.5)
    args = ap.parse_args(argv)
    directory, card = elastic_variant(ap, args.model_dir, args.variant)
    settings = {"one worker": (1, LIBGOMP_DEFAULT), "two workers, libgomp default": (2, LIBGOMP_DEFAULT),
                f"two workers, {' '.join(f'{k}={v}' for k, v in OPENMP_ENV.items())}": (2, OPENMP_ENV)}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, (workers, env) in settings.items():
            times[name] += take_turns(workers, env, directory, args.calls, args.gap_ms / 1000)[5:]
            print(f"round {r + 1}/{args.rounds}, {name}: p50 {percentile(times[name], 50) * 1000:.2f} ms", flush=True)
    one = percentile(times["one worker"], 50)
    rows = [{"setting": name, "workers": settings[name][0], "env": settings[name][1], "calls": len(t),
             "p50_ms": round(percentile(t, 50) * 1000, 2), "p90_ms": round(percentile(t, 90) * 1000, 2),
             "vs_one_worker": round(percentile(t, 50) / one, 3)} for name, t in times.items()]
    report = {"variant": card.variant, "runtime": card.runtime, "cores": len(os.sched_getaffinity(0)),
              "cpu": machine.cpu_model(), "torch": torch.__version__, "gap_ms": args.gap_ms, "rows": rows}
    for row in rows:
        print(f"{row['setting']:40s} p50 {row['p50_ms']:7.2f} ms  p90 {row['p90_ms']:7.2f} ms  "
              f"{row['vs_one_worker']:.2f}x one worker's")
    return write_report("benchmarks.openmp_spin", args, report)


if __name__ == "__main__":
    main()
