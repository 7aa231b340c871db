"""This project's archives for the benchmarks, built by the real build_mar.sh into a temporary store."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BuildError(RuntimeError):
    """build_mar.sh refused (e.g. the accuracy gate) or failed; the message is its last error line."""


def build_ours(model_dir: Path, store: Path, name: str, config: Path | None, device: str = "cpu") -> Path:
    """STORE/NAME.mar from MODEL_DIR with the given model-config.yaml (None: build_mar.sh's default, the variant's
    tuned keys over handlers/model-config.yaml), never into model_store/."""
    cmd = ["bash", str(ROOT / "build_mar.sh"), str(model_dir), "--name", name, "--archive", name,
           *(["--config", str(config)] if config else []), "--device", device, "--store", str(store), "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise BuildError(lines[-1] if lines else f"build_mar.sh exited {result.returncode}")
    return store / f"{name}.mar"
