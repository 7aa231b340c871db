"""Build a torchvision model and load a float state_dict into it, weights only; shared by training and the
handler's eager runtimes."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
import torchvision


def architectures() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def detectors() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


def family(arch: str) -> str:
    """The architecture's torchvision module (resnet, mobilenetv3, vision_transformer, ...): its family."""
    return torchvision.models.get_model_builder(arch).__module__.rpartition(".")[2]


def build_model(arch: str, num_classes: int, image_size: int | None = None) -> torch.nn.Module:
    """A torchvision classification or detection model by name, randomly initialised (nothing downloads).

    A vision transformer's positional embedding has one entry per patch, so it is built for `image_size`
    (torchvision's default, 224, when None); the other families take any input size. A detector's classes
    include the background, as torchvision counts them.
    """
    if arch in detectors():
        return torchvision.models.get_model(arch, weights=None, weights_backbone=None, num_classes=num_classes)
    if arch not in architectures():
        raise ValueError(
            f"unknown architecture {arch!r}; choose a torchvision classification model such as resnet18, "
            "mobilenet_v3_small or resnet50, or a detector such as fasterrcnn_mobilenet_v3_large_320_fpn"
        )
    sized = {"image_size": image_size} if image_size is not None and family(arch) == "vision_transformer" else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **sized)


def vit_image_size(state_dict: dict[str, torch.Tensor]) -> int | None:
    """The input side a torchvision ViT checkpoint was built for: patch side x patches per side (None if not one)."""
    pos, proj = state_dict.get("encoder.pos_embedding"), state_dict.get("conv_proj.weight")
    if pos is None or proj is None:
        return None
    patches = pos.shape[1] - 1  # one class token, then one entry per patch
    return proj.shape[-1] * round(patches ** 0.5)


def fit_shapes(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Resize conv, linear and batch-norm layers in place to the checkpoint's shapes.

    Structured pruning keeps the architecture's graph and only removes channels, so a pruned
    state_dict loads into its torchvision architecture once each layer has the pruned width.
    """
    for name, module in list(model.named_modules()):
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not isinstance(module, torch.nn.Conv2d | torch.nn.Linear | torch.nn.BatchNorm2d):
            continue
        if weight.shape == module.weight.shape:
            continue
        if isinstance(module, torch.nn.Conv2d):
            depthwise = module.groups == module.in_channels and module.groups > 1
            out_ch, in_per_group = weight.shape[:2]
            groups = out_ch if depthwise else module.groups
            new: torch.nn.Module = torch.nn.Conv2d(
                in_per_group * groups, out_ch, module.kernel_size, module.stride, module.padding, module.dilation,
                groups, module.bias is not None, module.padding_mode)
        elif isinstance(module, torch.nn.Linear):
            new = torch.nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None)
        else:
            new = torch.nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum, module.affine,
                                       module.track_running_stats)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def model_from_state_dict(arch: str, num_classes: int, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """build_model(arch) resized to the checkpoint's shapes, with its weights; eval mode, channels_last, CPU."""
    model = fit_shapes(build_model(arch, num_classes, vit_image_size(state)), state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # the graph itself differs: another architecture or class count
        first = str(e).strip().splitlines()
        raise ValueError(f"the checkpoint does not fit torchvision's {arch} with {num_classes} outputs "
                         f"({' '.join(line.strip() for line in first[:3])[:400]}); check 'architecture' and "
                         "'labels' in the model card") from e
    return model.to(memory_format=torch.channels_last).eval()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """weights_only=True: a checkpoint that carries pickled objects is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; train one with: python -m training.train --out {path.parent}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only=True raises for anything but tensors and containers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"refusing to load {path}: it carries pickled objects, not only tensors (loaded with "
                         f"weights_only=True, which never runs pickled code): {first}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path}: the file is truncated or not a torch.save file "
                         f"({type(e).__name__}: {str(e).strip()[:200]}); save it again with torch.save") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors; save "
                         "model.state_dict() rather than the model or a training checkpoint")
    return state
