"""The GPU check's CPU dry run: the carry is prepared as for a GPU machine (wheels for Python 3.12, a jlinked Java
runtime, wrk), unpacked, and every step runs on the CPU with tiny sizes, TorchServe on the carried Java runtime.
A broken script is found here, not in the middle of a GPU lease."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_dry_run_prepares_the_carry_and_runs_every_step(tmp_path: Path) -> None:
    prepared = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--prepare"], capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert "with the tree" in prepared.stdout and "carry ['.gpu']" in prepared.stdout

    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OUT": str(out)}, timeout=1800)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else ""
    assert run.returncode == 0, run.stdout + log[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["environment", "install", "model", "variants", "serve", "tests", "ddp"]
    assert {s["status"] for s in steps.values()} == {"ok"}
    assert report["dry_run"] and "acceptance" not in report  # CPU figures judge nothing about a GPU

    carried = Path(steps["install"]["result"]["home"])
    assert Path(steps["install"]["result"]["wrk_path"]).is_relative_to(carried)
    assert Path(steps["serve"]["result"]["java"]).is_relative_to(carried / "jre")  # TorchServe ran on the carried JRE
    wheels = steps["install"]["result"]["wheels"]
    assert any(w.startswith("torchserve-0.12.0") for w in wheels) and any("cp312" in w for w in wheels)

    for variant in ("tensorrt_fp16", "aoti_cuda"):
        row = steps["variants"]["result"][variant]
        assert row["status"] == "refused" and "CUDA GPU" in row["reason"], row

    points = steps["serve"]["result"]["points"]
    assert {(p["server"], p["connections"]) for p in points} == {(s, c) for s in ("stock", "fp32") for c in (1, 4)}
    assert all(p["errors"] == 0 and p["rps"] > 0 for p in points), points

    tests = steps["tests"]["result"]
    gpu_tests = {k: v for k, v in tests["cases"].items() if k.startswith("tests.test_gpu::")}
    assert len(gpu_tests) == 4 and set(gpu_tests.values()) == {"passed"}, tests["cases"]
    assert tests["exit"] == 0 and tests["failure"] == tests["error"] == 0

    ddp = steps["ddp"]["result"]
    assert (ddp["backend"], ddp["world_size"], ddp["all_reduce"]) == ("gloo", 1, 1.0)
