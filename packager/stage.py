"""Stage an archive's inputs: the model-config.yaml it packs, and its extra files (the model card, the handlers
package, the files the runtime reads beside the artifact, the golden set, the explainer's weights)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from handlers import machine
from handlers.contract import GOLDEN_FILE, Explainer, ModelCard
from packager import golden
from packager.config import serving_config

ROOT = Path(__file__).resolve().parent.parent
EXPLAIN_FILE = "explain.pth"


@dataclass(frozen=True)
class Staged:
    """What the archiver needs besides the staged files, and what the build reports."""

    name: str
    version: str
    artifact: Path
    device: str
    sources: list[Path]


def explainer_weights(model_dir: Path, card: ModelCard) -> tuple[Path, Explainer]:
    """The fp32 parent's checkpoint (the model's own, for a parent) that explanations run on."""
    parent_dir = Path(card.parent.dir) if card.parent else model_dir
    parent = ModelCard.read(parent_dir) if card.parent else card
    if parent.checkpoint is None or not (parent_dir / parent.checkpoint).is_file():
        raise FileNotFoundError(f"--explain needs the fp32 parent's float checkpoint, and {parent_dir} has none; "
                                f"train it with: python -m training.train --out {parent_dir}")
    return parent_dir / parent.checkpoint, Explainer(EXPLAIN_FILE, parent.architecture, parent.variant)


def handler_sources() -> list[tuple[Path, str]]:
    """The handlers package an archive carries (tasks included): (source file, path inside the archive)."""
    return [(src, src.relative_to(ROOT).as_posix()) for src in sorted((ROOT / "handlers").rglob("*.py"))]


def stage(model_dir: Path, out: Path, config: Path | None, device: str, version: str | None,
          explain: bool = False) -> Staged:
    """Write OUT/model-config.yaml and OUT/extra/{metadata.json, handlers/, ...}."""
    card = ModelCard.read(model_dir)
    artifact = model_dir / card.artifact
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact} not found; make it with: python -m training.export {model_dir}")
    cfg, sources = serving_config(model_dir, config)
    missing = [name for name in card.files[1:] if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir / missing[0]} ({card.runtime} reads it beside {card.artifact}) not "
                                f"found; rebuild the variant {card.variant}")
    if card.cpu_only:
        if device == "gpu":
            raise ValueError(f"variant {card.variant} ({card.runtime}, {card.precision}) is CPU-only; "
                             "build it with --device cpu or auto")
        device = "cpu"
        print(f"note: variant {card.variant} is CPU-only, packaged with deviceType: cpu", file=sys.stderr)
    if card.cuda_only:
        if device == "cpu":
            raise ValueError(f"variant {card.variant} ({card.runtime}) runs on CUDA only; build it with "
                             "--device gpu or auto")
        device = "gpu"
    elsewhere = machine.differences((card.metrics.speed or {}).get("machine", {}))
    if elsewhere:
        print(f"warning: variant {card.variant} was timed and picked on another machine ({'; '.join(elsewhere)}); "
              "the worker logs this again at start-up", file=sys.stderr)
    cfg["deviceType"] = "gpu" if device == "auto" else device
    if version:
        card = card.replace(version=version)
    extra = out / "extra"
    (extra / "handlers").mkdir(parents=True)
    if explain:
        weights, explainer = explainer_weights(model_dir, card)
        shutil.copy2(weights, extra / EXPLAIN_FILE)
        card = card.replace(explainer=explainer)
    for src, name in handler_sources():
        (extra / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, extra / name)
    card.write(extra)
    for name in card.files[1:]:  # the artifact itself is the archiver's --serialized-file
        (extra / name).parent.mkdir(parents=True, exist_ok=True)  # an ensemble's members keep their folders
        shutil.copy2(model_dir / name, extra / name)
    if card.data is not None or "dataset" in card.details:  # trained here: held-out images + build-time score
        (extra / GOLDEN_FILE).write_text(json.dumps(golden.build(model_dir, card), separators=(",", ":")) + "\n")
    (out / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Staged(card.name, card.version, artifact, cfg["deviceType"], sources)
