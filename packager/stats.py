"""Summary statistics of timings and latencies, and the interleaved rounds that timings are taken in: one definition
for training, the deploy canary, the harness and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated linearly between ranks; nan when there are none."""
    array = np.fromiter(values, dtype=np.float64)
    return float(np.percentile(array, q)) if array.size else math.nan


def median(values: Iterable[float]) -> float:
    """The 50th percentile: the mean of the two middle values when their number is even; nan when there are none."""
    return percentile(values, 50)


def interleaved(contenders: Mapping[str, Callable[[], T]], rounds: int, rotate: bool = False,
                after: Callable[[int, str, T], None] | None = None) -> dict[str, list[T]]:
    """Each contender once per round, in turn (each round starting one later when `rotate`), so that a busy moment
    on a shared machine falls on all alike; each one's results in round order. `after(round, name, result)` follows
    every run (progress)."""
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name]())
            if after:
                after(r, name, results[name][-1])
    return results
