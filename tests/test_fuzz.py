"""The fuzzer (benchmarks/fuzz.py) as the tests run it: every saved finding replayed through the real handler, and
a bounded coverage-guided campaign over every body parser and decoder that must end with no finding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
FINDINGS = ROOT / "tests" / "fuzz_findings"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# Both allow 3 CPU s per input, not the full campaign's 1 s (docs/reliability.md): CI's CPU may be slower than the
# one the campaign ran on. What the tests pin is the answer, 4xx or 200, never a 500 or a dead worker.
def fuzz(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.fuzz", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_every_saved_finding_now_gets_a_4xx_or_its_answer(model_store: Path) -> None:
    saved = sorted(FINDINGS.iterdir())
    assert saved, f"no findings in {FINDINGS}: the regression inputs are missing"
    result = fuzz(str(model_store / "digits.mar"), "--replay", str(FINDINGS), "--timeout", "3", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"replayed {len(saved)} inputs" in result.stdout and "0 failing" in result.stdout, result.stdout


def test_a_bounded_campaign_finds_nothing(model_store: Path, tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    result = fuzz(str(model_store / "digits.mar"), "--seconds", "45", "--timeout", "3", "--findings",
                  str(tmp_path / "findings"), "--out", str(report), timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    figures = json.loads(report.read_text())
    assert figures["findings"] == [] and figures["exit_codes"] == [0], figures
    assert figures["inputs"] > 500 and figures["coverage_edges"] > 100, figures
