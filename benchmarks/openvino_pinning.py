"""What OpenVINO's thread pinning does to workers that share a machine: worker processes that run the same
OpenVINO variant at the same time, back to back at one batch size, as busy TorchServe workers do.

    python -m benchmarks.openvino_pinning artifacts/resnet18 [--variant pruned_openvino_int8] [--rounds 3] [-d 5]

Settings, in interleaved rounds: one worker on every core (pinned, as handlers/runtimes.py serves it); one
worker per core on one thread each with OpenVINO's default ENABLE_CPU_PINNING; the same as served (unpinned: a
worker on fewer threads than cores is not pinned). Each worker counts the images it ran while all were running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.thread_switch import read_variant, variant_parser, write_report
from handlers import machine
from handlers.contract import ModelCard
from handlers.runtimes import openvino_config


def worker(conn: Connection, directory: Path, threads: int, pin: bool, batch: int, seconds: float) -> None:
    """Compile the variant with `threads` and `pin`, wait for the start, then run batches for `seconds`;
    send back the images run and the wall seconds."""
    import openvino

    card = ModelCard.read(directory)
    config = {**openvino_config(card.precision, threads), "ENABLE_CPU_PINNING": pin}
    request = openvino.Core().compile_model(str(directory / card.artifact), "CPU", config).create_infer_request()
    x = np.random.rand(batch, *card.input.shape).astype(np.float32)
    for _ in range(3):
        request.infer({0: x})
    conn.send("ready")
    conn.recv()
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        request.infer({0: x})
        images += batch
    conn.send((images, time.perf_counter() - t0))


def run_together(directory: Path, workers: int, threads: int, pin: bool, batch: int, seconds: float) -> list[float]:
    """Images/s of each of `workers` processes started together."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(workers):
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(theirs, directory, threads, pin, batch, seconds), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    try:
        for p in pipes:
            p.recv()
        for p in pipes:
            p.send(True)
        results = [p.recv() for p in pipes]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    return [images / wall for images, wall in results]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = variant_parser(__doc__, "openvino_pinning.json", rounds=3)
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per setting and round")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    directory, card = read_variant(args.model_dir, args.variant or "pruned_openvino_int8")
    if card.runtime != "openvino":
        ap.exit(2, f"error: variant {card.variant} runs on {card.runtime}, not openvino\n")
    cores = len(os.sched_getaffinity(0))
    settings = {f"1 worker x {cores} threads, pinned (as served)": (1, cores, True),
                f"{cores} workers x 1 thread, pinned (OpenVINO's default)": (cores, 1, True),
                f"{cores} workers x 1 thread, unpinned (as served)": (cores, 1, False)}
    rates: dict[str, list[list[float]]] = {name: [] for name in settings}
    for r in range(args.rounds):
        for name, (workers, threads, pin) in settings.items():
            rates[name].append(run_together(directory, workers, threads, pin, args.batch, args.duration))
            print(f"round {r + 1}/{args.rounds}, {name}: {sum(rates[name][-1]):.1f} images/s", flush=True)
    rows = [{"setting": name, "workers": settings[name][0], "threads": settings[name][1], "pinned": settings[name][2],
             "images_per_s_total": round(float(np.median([sum(x) for x in rounds])), 1),
             "images_per_s_per_worker": round(float(np.median([v for x in rounds for v in x])), 1),
             "rounds_total": [round(sum(x), 1) for x in rounds]} for name, rounds in rates.items()]
    report = {"variant": card.variant, "batch": args.batch, "cores": cores,
              "cpu": machine.cpu_label(machine.fingerprint()), "duration_s": args.duration,
              "rounds": args.rounds, "rows": rows}
    for row in rows:
        print(f"{row['setting']:50s} {row['images_per_s_total']:7.1f} images/s "
              f"({row['images_per_s_per_worker']:.1f} per worker; rounds {row['rounds_total']})")
    return write_report("benchmarks.openvino_pinning", args, report)


if __name__ == "__main__":
    main()
