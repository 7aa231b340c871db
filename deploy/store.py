"""The model store as the deploy tool sees it: archives checked against the build manifest, and the state file
that remembers what TorchServe forgets (earlier defaults, which archive holds each version, canary results)."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.management import DeployError
from handlers.contract import MANIFEST_FILE, sha256
from packager import golden
from packager.manifest import read_manifest

STATE_FILE = "deploy_state.json"


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Archive:
    path: Path
    model: str
    version: str
    config: dict[str, Any]
    sha256: str

    @property
    def file(self) -> str:
        return self.path.name

    def golden(self) -> dict[str, Any]:
        try:
            return golden.from_archive(self.path)
        except ValueError as e:  # an archive built before golden sets, or for a model without image data
            raise DeployError(f"no canary possible: {e}") from e


def open_archive(store: Path, name: str) -> Archive:
    """An archive in the model store, after checking its sha256 against the manifest written at build time."""
    given = Path(name)
    file = given.name if given.name.endswith(".mar") else given.name + ".mar"
    if given.parent != Path(".") and given.parent.resolve() != store.resolve():
        raise DeployError(f"{name} is outside the model store {store}; TorchServe loads archives from there only "
                          "(build into it with build_mar.sh --store, or pass --store)")
    path = store / file
    if not path.is_file():
        raise DeployError(f"archive {path} not found; build it with: ./build_mar.sh MODEL_DIR --version V "
                          f"--archive {file.removesuffix('.mar')} --store {store}")
    manifest_path = store / MANIFEST_FILE
    try:
        manifest = read_manifest(store)
    except ValueError as e:
        raise DeployError(str(e)) from None
    if file not in manifest:
        raise DeployError(f"no checksum recorded for {file} in {manifest_path}; rebuild it with build_mar.sh, "
                          "which records one")
    digest = sha256(path)
    if digest != manifest[file]["sha256"]:
        raise DeployError(f"checksum mismatch for {path}: sha256 {digest[:16]}... but {manifest_path} recorded "
                          f"{manifest[file]['sha256'][:16]}... at build time; the archive changed since, do not "
                          "register it: rebuild it with build_mar.sh")
    try:
        with zipfile.ZipFile(path) as z:
            info = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            config_file = info.get("configFile")
            config = yaml.safe_load(z.read(config_file)) if config_file else {}
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DeployError(f"{path} is not a readable .mar: {e}; rebuild it with build_mar.sh") from e
    return Archive(path, info["modelName"], str(info["modelVersion"]), config or {}, digest)


class State:
    """What TorchServe forgets: earlier defaults, which archive holds each version, canary results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def model(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {"archives": {}, "defaults": [], "canary": {}})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


