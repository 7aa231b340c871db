"""The one metadata file that travels from training through export into the .mar and the handler."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

METADATA_FILE = "metadata.json"
STATE_DICT_FILE = "model.pth"
TORCHSCRIPT_FILE = "model.pt"


def read(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; create it with: python -m training.train --out {model_dir}"
        )
    return json.loads(path.read_text())


def write(model_dir: Path, meta: dict[str, Any]) -> Path:
    path = Path(model_dir) / METADATA_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
