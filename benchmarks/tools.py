"""Benchmark-only tools, installed on demand: wrk (Debian package) and captum (a private target dir).

    python -m benchmarks.tools        # install both if missing and print where they are
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPTUM_DIR = HERE / ".captum"


def ensure_wrk() -> str:
    """Path of wrk; apt-get installs it when missing (apt-get update once first)."""
    path = shutil.which("wrk")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.exit("error: wrk is not installed; install it with: sudo apt-get update && sudo apt-get install -y wrk")
    print("installing wrk with apt-get ...", file=sys.stderr)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed ({result.stderr.strip()[-300:]}); install wrk by hand")
    path = shutil.which("wrk")
    if not path:
        sys.exit("error: apt-get installed wrk but it is not on PATH")
    return path


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
