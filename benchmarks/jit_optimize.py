"""What `torch.jit.optimize_for_inference` (the TorchScript runtime's fp32 CPU path) buys over the frozen module
as exported, side by side: interleaved rounds of calls on both, at each batch size, on every core.

    python -m benchmarks.jit_optimize artifacts/resnet18 [--variant pruned] [--rounds 7]
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from benchmarks.thread_switch import read_variant, variant_parser, write_report
from handlers import machine
from handlers.deprecations import known_deprecations
from handlers.runtimes import load_model
from training.stats import percentile


@torch.inference_mode()
def side_by_side(models: dict[str, Any], x: torch.Tensor, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call of each model, their calls interleaved round by round."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            model(x)
            for _ in range(calls):
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {f"{name}_ms": round(percentile(t, 50) * 1000, 3) for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = variant_parser(__doc__, "jit_optimize.json", rounds=7)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args(argv)
    directory, card = read_variant(args.model_dir, args.variant)
    if card.runtime != "torchscript" or card.precision != "fp32":
        ap.exit(2, f"error: {directory} is {card.runtime} {card.precision}; the TorchScript runtime optimizes fp32 "
                "TorchScript only\n")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    with known_deprecations():
        models = {"as_exported": torch.jit.load(str(directory / card.artifact)).eval(),
                  "served": load_model(directory, card, "cpu")}
    rows = []
    for b in (int(v) for v in args.batches.split(",")):
        x = torch.randn(b, 3, card.input.image_size, card.input.image_size).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            diff = (models["served"](x) - models["as_exported"](x)).abs().max().item()
        row = {"batch": b, **side_by_side(models, x, args.rounds, 8 if b == 1 else 3), "max_abs_logit_diff": diff}
        row["served_over_exported"] = round(row["served_ms"] / row["as_exported_ms"], 3)
        rows.append(row)
        print(json.dumps(row))
    report = {"variant": card.variant, "cpu": machine.cpu_model(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    return write_report("benchmarks.jit_optimize", args, report)


if __name__ == "__main__":
    main()
