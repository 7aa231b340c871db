"""Write one optimized variant beside its fp32 parent: artifact, metadata, held-out evaluation.

Every technique module (prune, prune_structured, quantize, bf16, distill) ends here, so all
variants share one layout and one metadata schema:

    <parent_dir>/variants/<variant>/model.pt        frozen TorchScript (the served artifact)
    <parent_dir>/variants/<variant>/metadata.json   the parent's, plus variant, recipe, parent, metrics
    <parent_dir>/variants/<variant>/eval/test/      report.json + confusion_matrix.png
    <parent_dir>/variants/<variant>/model.pth       float weights, when they load into build_model(architecture)
"""

from __future__ import annotations

import copy
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.deprecations import known_deprecations
from handlers.loading import load_model, load_state_dict, model_from_state_dict
from training import metadata
from training.evaluate import classification_metrics, predict, splits_for, summary, write_report
from training.export import ParityError

VARIANTS_DIR = "variants"


def variant_dir(parent_dir: Path, variant: str) -> Path:
    return Path(parent_dir) / VARIANTS_DIR / variant


def parent_metadata(parent_dir: Path) -> dict[str, Any]:
    meta = metadata.read(parent_dir)
    # Older metadata has no "checkpoint" key; its state_dict is then the standard file name.
    meta.setdefault("checkpoint", metadata.STATE_DICT_FILE)
    return meta


def load_parent(parent_dir: Path) -> tuple[dict[str, Any], torch.nn.Module]:
    """The fp32 parent's metadata and its eager model (eval mode, channels_last) from its state_dict."""
    meta = parent_metadata(parent_dir)
    if meta.get("parent"):
        raise ValueError(f"{parent_dir} is itself a variant ({meta['variant']}); optimize its fp32 parent "
                         f"{meta['parent']['dir']} instead")
    if not (Path(parent_dir) / meta["checkpoint"]).is_file():
        raise FileNotFoundError(f"{parent_dir}/{meta['checkpoint']} (the fp32 state_dict) not found; "
                                f"train it with: python -m training.train --out {parent_dir}")
    state = load_state_dict(Path(parent_dir) / meta["checkpoint"])
    return meta, model_from_state_dict(meta["architecture"], meta["num_classes"], state)


def load_float_variant(parent_dir: Path, name: str) -> tuple[dict[str, Any], torch.nn.Module]:
    """A float variant (e.g. pruned) as an eager model, to stack another technique on it (e.g. int8)."""
    vdir = variant_dir(parent_dir, name)
    if not (vdir / metadata.METADATA_FILE).is_file():
        raise FileNotFoundError(f"variant {vdir} not found; build it first, e.g. "
                                f"python -m training.optimize {parent_dir} --variants {name}")
    meta = metadata.read(vdir)
    if not meta.get("checkpoint"):
        raise ValueError(f"variant {name} keeps no float checkpoint (model.pth), so nothing can be stacked on it")
    state = load_state_dict(vdir / meta["checkpoint"])
    return meta, model_from_state_dict(meta["architecture"], meta["num_classes"], state)


def parent_record(parent_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What a variant says about where it came from: the parent's dir, checkpoint hash and test metrics."""
    checkpoint = Path(parent_dir) / meta["checkpoint"]
    return {"dir": str(parent_dir), "checkpoint": meta["checkpoint"], "sha256": metadata.sha256(checkpoint),
            "variant": meta["variant"], "metrics": {"test": meta["metrics"]["test"]}}


def write_variant(
    parent_dir: Path,
    variant: str,
    scripted: torch.jit.ScriptModule,
    recipe: dict[str, Any],
    *,
    export: dict[str, Any],
    cpu_only: bool = False,
    architecture: str | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save `scripted` as the variant's artifact, evaluate the saved file on the test split, write metadata.

    `state_dict` is kept as the variant's checkpoint only if it loads into build_model(architecture), resized
    to its shapes (model_from_state_dict) where channels were pruned.
    """
    parent_dir = Path(parent_dir)
    parent_meta = parent_metadata(parent_dir)
    out = variant_dir(parent_dir, variant)
    if out.exists():
        shutil.rmtree(out)  # a variant is always rebuilt whole, never half-updated
    out.mkdir(parents=True)
    with known_deprecations():
        torch.jit.save(scripted, str(out / metadata.TORCHSCRIPT_FILE))

    meta = copy.deepcopy(parent_meta)
    meta.update(
        variant=variant,
        recipe=recipe,
        parent=parent_record(parent_dir, parent_meta),
        format="torchscript",
        artifact=metadata.TORCHSCRIPT_FILE,
        cpu_only=cpu_only,
        architecture=architecture or parent_meta["architecture"],
        export=export,
        git_commit=metadata.git_commit(),
        **(extra or {}),
    )
    meta.pop("checkpoint", None)
    if state_dict is not None:
        model_from_state_dict(meta["architecture"], meta["num_classes"], state_dict)  # raises: then no checkpoint
        torch.save({k: v.cpu() for k, v in state_dict.items()}, out / metadata.STATE_DICT_FILE)
        meta["checkpoint"] = metadata.STATE_DICT_FILE

    # Evaluate the artifact as it will be served: loaded back from disk, not the object in memory.
    model = load_model(out, meta)
    with known_deprecations():
        logits, labels = predict(model, splits_for(meta).test, meta["mean"], meta["std"])
    result = classification_metrics(logits, labels, meta["labels"])
    meta["metrics"] = {"test": summary(result)}
    title = f"{meta['architecture']} {variant} - test top-1 {100 * result['top1']:.2f}%"
    write_report(out / "eval" / "test", result, meta["labels"], title)
    metadata.write(out, meta)
    return meta


def run_cli(parent_dir: Path, make: Callable[[Path, dict[str, Any], torch.nn.Module], tuple[dict[str, Any], Any]]
            ) -> None:
    """The end of every technique's command line: load the parent, make the variant, report, or exit 1 with
    the reason (missing checkpoint, bad argument, failed export parity)."""
    try:
        parent_meta, parent = load_parent(parent_dir)
        meta, _ = make(parent_dir, parent_meta, parent)
    except (FileNotFoundError, ValueError, ParityError) as e:
        sys.exit(f"error: {e}")
    print(describe(meta))
    print(f"written: {variant_dir(parent_dir, meta['variant'])}")


def describe(meta: dict[str, Any]) -> str:
    """One line for the console after a variant is written."""
    top1 = 100 * meta["metrics"]["test"]["top1"]
    parent = 100 * meta["parent"]["metrics"]["test"]["top1"]
    return (f"{meta['variant']}: test top-1 {top1:.2f}% (parent {parent:.2f}%, {top1 - parent:+.2f} pt)"
            f"{', CPU-only' if meta.get('cpu_only') else ''}")
