"""Load a model artifact named by its metadata: TorchScript, torch.export (.pt2) or a state_dict.

Shared by the served handler and by offline evaluation, so both run the same artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision

from handlers.deprecations import known_deprecations


def architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
    """A torchvision classification model by name, randomly initialised (nothing downloads)."""
    if arch not in architectures():
        raise ValueError(
            f"unknown architecture {arch!r}; choose a torchvision classification model such as "
            "resnet18, mobilenet_v3_small or resnet50"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """weights_only=True: a checkpoint that carries pickled objects is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; train one with: python -m training.train --out {path.parent}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe globals, RuntimeError for corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor state_dict (loaded with "
            f"weights_only=True, which never runs pickled code): {first}"
        ) from e


def load_model(model_dir: Path, meta: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """The artifact `meta["artifact"]` in `model_dir`, in eval mode on `device`."""
    path = Path(model_dir) / meta["artifact"]
    fmt = meta["format"]
    if not path.is_file():
        raise FileNotFoundError(f"model artifact {path} (format {fmt}) not found")
    if fmt == "torchscript":
        with known_deprecations():
            model = torch.jit.load(str(path), map_location=device)
    elif fmt == "export":
        # Exported programs are already in inference form; .eval() is not allowed on them.
        return torch.export.load(str(path)).module().to(device)
    elif fmt == "state_dict":
        model = build_model(meta["architecture"], meta["num_classes"])
        model.load_state_dict(load_state_dict(path))
        model = model.to(device, memory_format=torch.channels_last)
    else:
        raise ValueError(f"unknown artifact format {fmt!r} in metadata; expected torchscript, export or state_dict")
    model.eval()
    return model
