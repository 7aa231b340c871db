"""Training recipes: learning-rate schedules and data augmentation, built from torch's and torchvision's own parts.

Schedules step once per batch. onecycle (the default) rises over its first 15% of the steps and anneals to ~0;
cosine and step warm up linearly from 1% of the learning rate over --warmup-epochs (none by default).
Augmentations work on the uint8 RGB images [3, H, W] the datasets yield and draw from torch's global RNG, so the
seed fixes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)
from torch.utils.data import Dataset
from torchvision.transforms import v2

SCHEDULES = ("onecycle", "cosine", "step")
AUGMENTS = ("affine", "trivial", "randaugment", "none")
WARMUP_START = 0.01  # linear warm-up starts at this share of the learning rate
ONECYCLE_WARMUP = 0.15  # share of the steps onecycle rises over

Transform = Callable[[torch.Tensor], torch.Tensor]


SHORT_RUN_BN_MOMENTUM = 0.1  # torch's default


def short_run_batchnorm(model: torch.nn.Module) -> int:
    """Raise BatchNorm momenta set for long ImageNet runs (mobilenet_v3 0.01, mnasnet 3e-4) to torch's 0.1; returns
    how many layers changed. With 0.01, the running statistics of a few hundred steps still hold much of their
    starting values, and evaluation sees another network: a mobilenet_v3_large at 94% train top-1 scored 10% on val
    until its statistics were recomputed (96%). The momentum is not saved with the weights."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.momentum is not None and m.momentum < SHORT_RUN_BN_MOMENTUM]
    for m in layers:
        m.momentum = SHORT_RUN_BN_MOMENTUM
    return len(layers)


def augmentation(name: str) -> Transform | None:
    """The training-time augmentation by name; None for "none"."""
    if name == "affine":  # small geometric jitter: what digits and other centred objects tolerate
        return v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))
    if name == "trivial":
        return v2.TrivialAugmentWide()
    if name == "randaugment":
        return v2.RandAugment()
    if name == "none":
        return None
    raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTS)}")


class Augmented(Dataset):
    """A dataset of (uint8 image, label, ...) with `transform` applied to each image."""

    def __init__(self, base: Dataset, transform: Transform) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.transform(image), label


def check(schedule: str, epochs: int, warmup_epochs: float | None, step_size: int, gamma: float,
          clip_grad_norm: float | None, label_smoothing: float) -> None:
    """Refuse settings that would train nonsense, naming the option to change."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {epochs}")
    if warmup_epochs is not None and schedule == "onecycle":
        raise ValueError(f"--warmup-epochs applies to the cosine and step schedules; onecycle rises over its first "
                         f"{ONECYCLE_WARMUP:.0%} of the steps (pass --lr-schedule cosine to choose the warm-up)")
    if warmup_epochs is not None and not 0 <= warmup_epochs < epochs:
        raise ValueError(f"--warmup-epochs must be at least 0 and below --epochs ({epochs}), got {warmup_epochs}")
    if step_size < 1 or not 0 < gamma <= 1:
        raise ValueError(f"--step-size must be at least 1 epoch and --gamma in (0, 1], got {step_size} and {gamma}")
    if clip_grad_norm is not None and clip_grad_norm <= 0:
        raise ValueError(f"--clip-grad-norm must be positive (the largest gradient L2 norm), got {clip_grad_norm}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, epochs: int, steps_per_epoch: int,
                warmup_epochs: float | None = None, step_size: int = 3, gamma: float = 0.1) -> LRScheduler:
    """A scheduler stepped after every batch; each parameter group's initial lr is its peak."""
    total = epochs * steps_per_epoch
    warmup = round((warmup_epochs or 0) * steps_per_epoch)
    if schedule == "onecycle":
        return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
                          pct_start=ONECYCLE_WARMUP)
    if schedule == "cosine":
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=total - warmup)
    elif schedule == "step":
        main = StepLR(optimizer, step_size=step_size * steps_per_epoch, gamma=gamma)
    else:
        raise ValueError(f"unknown --lr-schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup == 0:
        return main
    rise = LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup)
    return SequentialLR(optimizer, [rise, main], milestones=[warmup])


def describe(schedule: str, epochs: int, warmup_epochs: float | None, step_size: int, gamma: float) -> str:
    """One line for the model card: what the schedule did, in epochs."""
    warmup = f"linear warm-up from {WARMUP_START:g}x over {warmup_epochs:g} epochs, then " if warmup_epochs else ""
    if schedule == "onecycle":
        return (f"OneCycleLR: rise over {ONECYCLE_WARMUP:.0%} of the steps, cosine anneal to ~0 by epoch {epochs}, "
                "stepped per batch")
    if schedule == "cosine":
        return f"{warmup}CosineAnnealingLR to 0 by epoch {epochs}, stepped per batch"
    return f"{warmup}StepLR: x{gamma:g} every {step_size} epochs, stepped per batch"
