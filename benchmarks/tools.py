"""Benchmark-only tools, installed on demand: captum (a private target dir, for stock TorchServe only) and wrk
(harness.wrk_throughput.ensure_wrk).

    python -m benchmarks.tools        # install both if missing and print where they are
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness.wrk_throughput import ensure_wrk

HERE = Path(__file__).resolve().parent
CAPTUM_DIR = HERE / ".captum"


def ensure_captum() -> Path:
    """A directory holding captum, for PYTHONPATH of the stock TorchServe only (never .venv)."""
    if (CAPTUM_DIR / "captum" / "__init__.py").is_file():
        return CAPTUM_DIR
    print(f"installing captum into {CAPTUM_DIR} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(CAPTUM_DIR),
           "-r", str(HERE / "requirements.txt")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: could not install captum ({result.stderr.strip()[-300:]}); "
                 f"run by hand: {' '.join(cmd)}")
    return CAPTUM_DIR


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


if __name__ == "__main__":
    print(f"wrk: {ensure_wrk()} ({version(['wrk', '--version'])})")
    print(f"captum: {ensure_captum()}")
