"""The soak command (benchmarks/soak.py), bounded: a replica through several key expiries under Poisson arrivals
with hostile inputs mixed in, every request answered as it should be, and the report and plot written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_a_bounded_soak_crosses_key_expiries_without_a_failed_request(model_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", str(model_store / "digits.mar"), "--minutes", "1", "--rate", "15",
         "--hostile", "0.1", "--token-expiration-min", "0.25", "--window-s", "15", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == 0 and report["key_expiries_crossed"] >= 3, {k: v for k, v in report.items()
                                                                           if k != "windows"}
    windows = report["windows"]
    assert len(windows) >= 4 and sum(w["hostile"] for w in windows) > 5 and report["requests"] > 600
    assert all(w["frontend"]["rss_mb"] > 0 and w["workers"]["processes"] >= 1 for w in windows), windows[0]
    assert windows[-1]["frontend"]["heap_retained_mb"] is not None and report["log_rotation_configured"]
    assert out.with_suffix(".png").stat().st_size > 10_000
