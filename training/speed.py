"""Model cost and speed: params, MACs, size on disk, in-process latency (batch 1) and throughput (batch 8).

    python -m training.speed artifacts/resnet18 artifacts/resnet18/variants/int8 --threads 2

Timings use a fixed torch thread count and report medians. Models are measured side by side,
interleaved round by round, so a noisy neighbour slows them all alike and the ratios between
them stay fair. Nothing here asserts a speed; the numbers go into reports.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from handlers import machine
from handlers.contract import CardError, ModelCard, Profile
from handlers.deprecations import known_deprecations
from handlers.runtimes import load_model
from packager.stats import interleaved, median


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: torch.nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one image through an eager float model (Torch-Pruning's counter).

    Quantized, bf16 and sparse variants do the same MACs as the float model they came from
    (sparse weights still run through dense kernels), so they are counted on that model.
    """
    import torch_pruning as tp  # only needed here; keeps `python -m training.speed` light

    example = torch.randn(1, 3, input_size, input_size)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def profile(model: torch.nn.Module, input_size: int) -> Profile:
    """Params and MACs of an eager float model, as the model card records them."""
    return Profile(params=count_params(model), macs=count_macs(model, input_size))


def size_on_disk(path: Path) -> int:
    return Path(path).stat().st_size


def environment(threads: int) -> dict[str, Any]:
    return {"threads": threads, "torch": torch.__version__, "cpu": machine.cpu_model(),
            "machine": machine.fingerprint(), "cpu_count": os.cpu_count(),
            "quantized_engine": torch.backends.quantized.engine}


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def any_algorithms() -> Iterator[None]:
    """Lift training's deterministic-algorithms switch (seed_everything) while running inference: it would
    warn on every quantized op and may pick slower kernels for timing."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def median_seconds(fn: Callable[[], object], min_time: float = 0.0, min_reps: int = 5, max_reps: int = 500,
                   warmup: int = 2) -> float:
    """Median wall time of fn() after `warmup` calls; repeats at least min_reps times and for min_time seconds."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


@torch.inference_mode()
def startup(load: Callable[[], Callable[[torch.Tensor], torch.Tensor]], input_size: int, batch: int = 8
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, float]]:
    """Load a model and make its first batch-1 and batch-`batch` calls, as a worker's start-up does: the
    seconds each took (a compile runtime compiles during its first calls)."""
    t0 = time.perf_counter()
    model = load()
    t1 = time.perf_counter()
    for size in (1, batch):
        model(torch.randn(size, 3, input_size, input_size).contiguous(memory_format=torch.channels_last))
    t2 = time.perf_counter()
    return model, {"load_s": round(t1 - t0, 3), "first_calls_s": round(t2 - t1, 3), "startup_s": round(t2 - t0, 3)}


def _time_calls(model: torch.nn.Module, x: torch.Tensor, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return times


@torch.inference_mode()
def benchmark(
    models: dict[str, torch.nn.Module],
    input_size: int,
    threads: int = 2,
    rounds: int = 7,
    latency_calls: int = 5,
    throughput_calls: int = 3,
    batch: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Per model: median latency (ms) of batch-1 calls and median throughput (images/s) of batch-`batch` calls.

    Inputs are normalized float32 channels_last tensors, as the handler feeds them. Each round runs
    every model in turn; the median over all timed calls of all rounds is reported.
    """
    one = torch.randn(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    many = torch.randn(batch, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    def one_round(model: torch.nn.Module) -> tuple[list[float], list[float]]:
        return _time_calls(model, one, latency_calls), _time_calls(model, many, throughput_calls)

    with thread_count(threads), any_algorithms(), known_deprecations():
        for model in models.values():  # warm-up: TorchScript profiles and optimizes its first calls
            _time_calls(model, one, 3)
            _time_calls(model, many, 2)
        with tqdm(total=rounds * len(models), desc="benchmark rounds", leave=False, disable=not progress) as bar:
            runs = interleaved({name: functools.partial(one_round, m) for name, m in models.items()}, rounds,
                               after=lambda *_: bar.update(1))
    lat = {name: [t for calls, _ in rs for t in calls] for name, rs in runs.items()}
    thr = {name: [t for _, calls in rs for t in calls] for name, rs in runs.items()}
    return {
        name: {
            "latency_ms_bs1": round(1000 * median(lat[name]), 3),
            f"throughput_bs{batch}": round(batch / median(thr[name]), 2),
            "timed_calls": len(lat[name]) + len(thr[name]),
        }
        for name in models
    }


# 3x3 convolutions at the four stage widths of a ResNet on 224 px input (channels, feature map side).
CEILING_CONVS = ((64, 56), (128, 28), (256, 14), (512, 7))


@torch.inference_mode()
def kernel_ceiling(threads: int = 2, batch: int = 8, calls: int = 15) -> dict[str, Any]:
    """The fastest the CPU's conv kernels go: GMAC/s of one fp32 and one int8 3x3 conv layer per ResNet stage.

    A conv net's throughput cannot beat its kernels, so int8 conv GMAC/s divided by the fp32 eager model's
    GMAC/s bounds the int8 speedup that quantization alone can reach on this machine.
    """
    from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

    fp32, int8 = [], []
    with thread_count(threads), any_algorithms(), warnings.catch_warnings():
        # Quantized tensor constructors are deprecated in torch 2.14 (still the kernels int8 models run).
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
        for channels, side in CEILING_CONVS:
            x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).eval().to(memory_format=torch.channels_last)
            qconv = QuantizedConv2d(channels, channels, 3, padding=1)
            scales = conv.weight.detach().abs().amax(dim=(1, 2, 3)) / 127
            qconv.set_weight_bias(torch.quantize_per_channel(conv.weight.detach(), scales,
                                                             torch.zeros(channels, dtype=torch.long), 0, torch.qint8),
                                  conv.bias.detach())
            qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
            macs = batch * channels * channels * 9 * side * side
            fp32.append(macs / median_seconds(lambda: conv(x), min_reps=calls, max_reps=calls, warmup=1) / 1e9)  # noqa: B023
            int8.append(macs / median_seconds(lambda: qconv(qx), min_reps=calls, max_reps=calls, warmup=1) / 1e9)  # noqa: B023
    return {"layers": [{"channels": c, "side": s, "fp32_gmacs": round(a, 1), "int8_gmacs": round(b, 1)}
                       for (c, s), a, b in zip(CEILING_CONVS, fp32, int8, strict=True)],
            "fp32_gmacs_max": round(max(fp32), 1), "int8_gmacs_max": round(max(int8), 1),
            "quantized_engine": torch.backends.quantized.engine, "threads": threads, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dirs", type=Path, nargs="+", help="model or variant directories (their served artifact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    models, sizes = {}, set()
    for d in args.model_dirs:
        try:
            card = ModelCard.read(d)
            models[str(d)] = load_model(d, card)
            sizes.add(card.input.image_size)
        except (FileNotFoundError, ValueError, CardError) as e:
            raise SystemExit(f"error: {e}") from e
    if len(sizes) != 1:
        raise SystemExit(f"error: the models take different input sizes {sorted(sizes)}; compare like with like")
    results = benchmark(models, sizes.pop(), args.threads, args.rounds)
    print(json.dumps({"environment": environment(args.threads), "results": results}, indent=2))


if __name__ == "__main__":
    main()
