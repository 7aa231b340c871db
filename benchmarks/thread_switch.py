"""What leasing cores per batch costs (handlers/cores.py): the same model calls with torch's thread pool fixed,
and with the pool re-sized before every call as the handler does when its lease changes, side by side.

    python -m benchmarks.thread_switch artifacts/resnet18 [--variant int8] [--rounds 7]

For each batch size it interleaves rounds of: every call on all cores (fixed); every call on one core
(fixed); and calls alternating between one core and all cores (switching). A switch's cost is the
switching calls' median over the fixed median at the same thread count. It also times one lease plus
set_num_threads alone, without a model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.archives import ROOT
from handlers import machine
from handlers.contract import ModelCard
from handlers.cores import CorePool
from handlers.runtimes import RUNTIMES, load_model
from training.stats import percentile


def lease_cost_us(pool: CorePool, calls: int = 2000) -> float:
    """Median microseconds of one lease (every core free) plus the two thread-count changes it may cause."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        with pool.lease() as n:
            torch.set_num_threads(1)
            torch.set_num_threads(n)
        times.append(time.perf_counter() - t0)
    return percentile(times, 50) * 1e6


@torch.inference_mode()
def switching(model: Any, x: torch.Tensor, cores: int, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call at each thread count, with the pool fixed and re-sized before every call."""
    fixed: dict[int, list[float]] = {1: [], cores: []}
    switched: dict[int, list[float]] = {1: [], cores: []}
    for _ in range(rounds):
        for n in (cores, 1):
            torch.set_num_threads(n)
            model(x)
            for _ in range(calls):
                t0 = time.perf_counter()
                model(x)
                fixed[n].append(time.perf_counter() - t0)
        for i in range(2 * calls):
            n = cores if i % 2 else 1
            t0 = time.perf_counter()
            torch.set_num_threads(n)
            model(x)
            switched[n].append(time.perf_counter() - t0)
    out = {}
    for n in (1, cores):
        f, s = percentile(fixed[n], 50) * 1000, percentile(switched[n], 50) * 1000
        out[f"fixed_{n}t_ms"], out[f"switching_{n}t_ms"] = round(f, 3), round(s, 3)
        out[f"switch_cost_{n}t"] = round(s / f, 3)
    return out


def variant_parser(doc: str, out: str, rounds: int) -> argparse.ArgumentParser:
    """The options these side-by-side timings of one model share: MODEL_DIR, --variant, --rounds, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--variant", default=None, help="a variant under MODEL_DIR/variants (default: the fp32 model)")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / out)
    return ap


def write_report(module: str, args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    """Write `report` to --out with the command line that reproduces it, and return it."""
    report["command"] = f"python -m {module} {args.model_dir}" + (f" --variant {args.variant}" if args.variant else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def read_variant(model_dir: Path, variant: str | None) -> tuple[Path, ModelCard]:
    """The model (or its variant under MODEL_DIR/variants) and its card."""
    directory = model_dir / "variants" / variant if variant else model_dir
    return directory, ModelCard.read(directory)


def elastic_variant(ap: argparse.ArgumentParser, model_dir: Path, variant: str | None) -> tuple[Path, ModelCard]:
    """The model (or its variant) and its card; exits unless its runtime leases cores (torch's thread pool)."""
    directory, card = read_variant(model_dir, variant)
    if not RUNTIMES[card.runtime].elastic:
        ap.exit(2, f"error: runtime {card.runtime} fixes its thread count at load; the handler gives it a fixed "
                "share of the cores and never leases or re-sizes torch's pool, so there is nothing to measure\n")
    return directory, card


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = variant_parser(__doc__, "thread_switch.json", rounds=7)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args(argv)
    directory, card = elastic_variant(ap, args.model_dir, args.variant)
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    model = load_model(directory, card, "cpu", cores)
    size = card.input.image_size
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, 3, size, size)
        rows.append({"batch": b, **switching(model, x, cores, args.rounds, args.calls)})
        print(json.dumps(rows[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        lease_us = lease_cost_us(CorePool(cores, Path(tmp)))
    torch.set_num_threads(before)
    report = {"variant": card.variant, "runtime": card.runtime, "cores": cores, "cpu": machine.cpu_model(),
              "torch": torch.__version__, "lease_and_two_resizes_us": round(lease_us, 1), "rows": rows}
    print(f"lease + two set_num_threads calls: {lease_us:.1f} us (median); {card.variant} on {report['cpu']}")
    return write_report("benchmarks.thread_switch", args, report)


if __name__ == "__main__":
    main()
