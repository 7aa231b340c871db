"""Which technique fails for which torchvision family: the known gaps, each with its reason and what to use instead.

    python -m benchmarks.support_matrix        # the full table, every cell, -> docs/support.{json,md}

The support matrix runs training, export and every technique on the smallest architecture of each family. What
failed there outright (an error, not a parity miss: how far int8 or bf16 moves the logits depends on the weights,
and every build refuses an artifact past its bound, whatever the architecture) is listed here, so that the commands
refuse it before any work runs: training.optimize skips it when
it builds its default list and stops with the reason when the variant is asked for by name (--variants), and each
technique's own command stops with it. A family is the torchvision module an architecture is defined in
(handlers.loading.family): vit_b_16 and vit_l_32 share vision_transformer's code, so they share its gaps; only
TESTED[family] was run. tests/test_architectures.py keeps this table and docs/support.json in agreement.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from handlers.loading import family

if TYPE_CHECKING:
    from training.technique import Technique


@dataclass(frozen=True)
class Gap:
    reason: str  # what fails, in the words of the error the matrix met
    instead: tuple[str, ...]  # techniques that worked for the same architecture in the matrix


# The architecture the matrix ran for each family (benchmarks.support_matrix.ARCHS).
TESTED = {"resnet": "resnet18", "mobilenetv2": "mobilenet_v2", "mobilenetv3": "mobilenet_v3_small",
          "efficientnet": "efficientnet_b0", "regnet": "regnet_y_400mf", "convnext": "convnext_tiny",
          "vision_transformer": "vit_b_16"}

# family -> technique -> gap, from docs/support.json's failed cells.
GAPS: dict[str, dict[str, Gap]] = {
    "convnext": {
        "pruned": Gap("Torch-Pruning narrows ConvNeXt's LayerNorm2d and layer-scale tensors too, and the pruned "
                      "checkpoint then does not load back into torchvision's ConvNeXt (handlers.loading.fit_shapes "
                      "resizes Conv2d, Linear and BatchNorm2d layers only)",
                      ("sparse", "int8", "onnxruntime_int8")),
    },
    "vision_transformer": {
        "pruned": Gap("Torch-Pruning narrows the patch embedding, which torchvision's VisionTransformer reshapes by "
                      "its fixed hidden_dim (\"shape '[1, 768, 4]' is invalid for input of size 1536\")",
                      ("dynamic_int8", "int8", "sparse")),
    },
}


class Unsupported(ValueError):
    """A technique the support matrix found to fail for the architecture's family."""


def gap(arch: str, technique: str) -> Gap | None:
    return GAPS.get(family(arch), {}).get(technique)


def check(arch: str, technique: str) -> None:
    """Raise Unsupported, naming the combination and what to use instead, when the matrix found it fails."""
    if found := gap(arch, technique):
        raise Unsupported(f"{technique} does not support {arch} ({family(arch)} family, docs/support.md): "
                          f"{found.reason}; use {' or '.join(found.instead)} instead")


def check_technique(arch: str, technique: Technique, args: argparse.Namespace) -> None:
    """check() a technique on the parent's architecture; a stacked one (pruned_onnxruntime_int8) also for the
    variant it stacks on and for its runtime on that variant's architecture (a distilled variant is the student)."""
    check(arch, technique.name)
    if technique.stacks_on:
        check(arch, technique.stacks_on)
        model_arch = getattr(args, "student", None) if technique.stacks_on == "distilled" else arch
        if model_arch is not None:  # a technique's own command has no --student; its build finds out
            check(model_arch, technique.name.removeprefix(f"{technique.stacks_on}_"))


def gaps_table() -> list[tuple[str, str, Gap]]:
    """(family, technique, gap) rows, for docs/support.md."""
    return [(fam, technique, g) for fam, gaps in GAPS.items() for technique, g in gaps.items()]
