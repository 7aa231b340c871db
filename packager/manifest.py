"""The store's manifest.json: each archive's sha256 and where it came from, written by build_mar.sh and checked
by the deploy tool before it registers an archive."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from handlers.contract import MANIFEST_FILE, ModelCard, sha256


def read_manifest(store: Path) -> dict[str, dict[str, Any]]:
    """archive file name -> what build_mar.sh recorded for it (sha256, model, version, variant, ...)."""
    path = Path(store) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the archives with build_mar.sh") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a manifest (a JSON object of archives); rebuild it with build_mar.sh")
    return manifest


@contextlib.contextmanager
def manifest_lock(store: Path) -> Iterator[None]:
    """One read-modify-write of the store's manifest at a time: build_mar.sh may run in parallel into one store."""
    with open(Path(store) / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed builder's process ends
        yield


def write_manifest(store: Path, manifest: dict[str, dict[str, Any]]) -> Path:
    path = Path(store) / MANIFEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def record(mar: Path, model_dir: Path) -> dict[str, object]:
    """Add the archive's sha256 to the store's manifest.json (the deploy tool checks it)."""
    card = ModelCard.read(model_dir)
    entry = {
        "sha256": sha256(mar),
        "bytes": mar.stat().st_size,
        "model": card.name,
        "version": card.version,
        "variant": card.variant,
        "test": dict([card.metrics.test.headline]) if card.metrics.test else None,  # {"top-1" or "mAP": value}
        "source": str(model_dir),
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    with manifest_lock(mar.parent):
        manifest = read_manifest(mar.parent)
        manifest[mar.name] = entry
        write_manifest(mar.parent, manifest)
    return entry
