"""Summary statistics of timings and latencies: one definition for training, the deploy canary and the harness."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated linearly between ranks; nan when there are none."""
    array = np.fromiter(values, dtype=np.float64)
    return float(np.percentile(array, q)) if array.size else math.nan


def median(values: Iterable[float]) -> float:
    """The 50th percentile: the mean of the two middle values when their number is even; nan when there are none."""
    return percentile(values, 50)
