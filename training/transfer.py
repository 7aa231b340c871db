"""Transfer learning: start from a local checkpoint, replace the classifier head, optionally freeze the backbone.

    python -m training.train --data-dir my_photos --out artifacts/mine --init-from resnet18-f37072fd.pth
    python -m training.train --data-dir my_photos --out artifacts/mine --init-from artifacts/resnet18 --freeze-backbone

--init-from takes a state_dict file (a torchvision weights file downloaded elsewhere is one) or one of our model
directories (model.pth + metadata.json, whose architecture must be --arch). It loads with weights_only=True and
nothing downloads. The head is every state_dict entry whose shape follows the number of classes (resnet's `fc`,
mobilenet's `classifier.3`, ViT's `heads.head`, inception's auxiliary `fc` too): entries of another shape there
start fresh; every other entry must match the architecture exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handlers.contract import CARD_FILE, ModelCard, sha256
from handlers.loading import load_state_dict


@dataclass(frozen=True)
class Init:
    """Where a model's starting weights came from, for the model card."""

    checkpoint: Path  # the state_dict file read
    sha256: str
    head: tuple[str, ...]  # the new model's head entries (state_dict keys)
    reinitialized: tuple[str, ...]  # head entries that start fresh (their shape follows the old label set)
    source: dict[str, Any]  # architecture and labels when the checkpoint is one of our model directories

    def record(self, freeze_backbone: bool, backbone_lr_scale: float) -> dict[str, Any]:
        return {"from": str(self.checkpoint), "sha256": self.sha256, "reinitialized": list(self.reinitialized),
                "head": list(self.head), "frozen_backbone": freeze_backbone,
                "backbone_lr_scale": 0.0 if freeze_backbone else backbone_lr_scale, **self.source}


def head_keys(model: torch.nn.Module, build: Callable[[int], torch.nn.Module], num_classes: int) -> tuple[str, ...]:
    """The keys of `model`'s state_dict whose shape follows the number of classes: the architecture is built for
    one class more (on the meta device: no memory, no init cost) and the shapes compared."""
    try:
        with torch.device("meta"):
            one_more = build(num_classes + 1).state_dict()
    except NotImplementedError:  # an init that copies real data (regnet's) cannot run on meta tensors
        one_more = build(num_classes + 1).state_dict()
    return tuple(k for k, v in model.state_dict().items() if one_more[k].shape != v.shape)


def resolve(path: Path, arch: str) -> tuple[Path, dict[str, Any]]:
    """The state_dict file behind --init-from, and what a model directory's card says about it."""
    if path.is_dir():
        if not (path / CARD_FILE).is_file():
            raise FileNotFoundError(f"--init-from {path} is a directory without {CARD_FILE}; pass a state_dict "
                                    "file (.pth) or a model directory made by python -m training.train")
        card = ModelCard.read(path)
        if card.architecture != arch:
            raise ValueError(f"--init-from {path} holds a {card.architecture} model, not a {arch}; pass "
                             f"--arch {card.architecture}, or a checkpoint of {arch}")
        if card.checkpoint is None:
            raise ValueError(f"--init-from {path} ({card.variant}, runtime {card.runtime}) keeps no state_dict "
                             "checkpoint; pass its fp32 parent directory instead")
        return path / card.checkpoint, {"source_architecture": card.architecture, "source_variant": card.variant,
                                        "source_labels": card.labels}
    if not path.is_file():
        raise FileNotFoundError(f"--init-from {path} not found; pass a local state_dict file (such as torchvision "
                                "weights downloaded elsewhere) or a model directory made by python -m training.train")
    return path, {}


def initialize(model: torch.nn.Module, path: Path, arch: str, build: Callable[[int], torch.nn.Module],
               num_classes: int) -> Init:
    """Load the checkpoint at `path` into `model` (built by `build(num_classes)`), all but a head of another
    shape; anything else that does not match is an error naming the keys."""
    file, source = resolve(path, arch)
    state = load_state_dict(file)
    target = model.state_dict()
    head = head_keys(model, build, num_classes)
    # num_batches_tracked is a counter, not a weight: torchvision's older weight files predate it.
    missing = [k for k in target if k not in state and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in target
                  if k in state and k not in head and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        found = "; ".join(f"{what} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                          for what, keys in (("missing", missing), ("unexpected", unexpected),
                                             ("shape checkpoint vs model", mismatched)) if keys)
        raise ValueError(f"--init-from {file} does not fit torchvision's {arch} beyond its classifier head "
                         f"({', '.join(head)}): {found}. It is a checkpoint of another architecture (or a pruned "
                         "one); pass the matching --arch or a checkpoint of this one")
    reinitialized = tuple(k for k in head if k not in state or state[k].shape != target[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in reinitialized}, strict=False)
    return Init(file, sha256(file), head, reinitialized, source)


def param_groups(model: torch.nn.Module, head: tuple[str, ...], lr: float, backbone_lr_scale: float = 1.0,
                 freeze_backbone: bool = False) -> list[dict[str, Any]]:
    """AdamW parameter groups: the head at `lr`, the backbone at lr x scale, or frozen (requires_grad off)."""
    if not head:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    named = dict(model.named_parameters())
    heads = [p for n, p in named.items() if n in head]
    backbone = [p for n, p in named.items() if n not in head]
    if freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
        return [{"params": heads, "lr": lr}]
    return [{"params": backbone, "lr": lr * backbone_lr_scale}, {"params": heads, "lr": lr}]


def freeze_norms(model: torch.nn.Module) -> None:
    """Batch norms with no trainable parameter (those of a frozen backbone) to eval mode, after model.train():
    their running statistics stay the checkpoint's."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()
