"""Summary statistics of timings and latencies: one definition for training, the deploy canary and the harness."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated linearly between ranks; nan when there are none."""
    if len(values) == 0:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    """The 50th percentile: the mean of the two middle values when their number is even; nan when there are none."""
    return percentile(values, 50)
