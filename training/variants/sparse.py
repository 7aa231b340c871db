"""sparse: unstructured magnitude pruning, zeroing the smallest weights globally across all conv and linear layers.

    python -m training.variants.sparse artifacts/resnet18 --sparsity 0.5   # -> artifacts/resnet18/variants/sparse

torch.nn.utils.prune ranks every conv/linear weight by |w| in one global pool (global L1), zeroes the
smallest `sparsity` share, and prune.remove() makes the zeros permanent (plain tensors, no masks or hooks).

No speedup: the weights keep their dense shape and run through the same dense kernels, so latency,
MACs and the size of the (uncompressed) artifact are unchanged. It only helps with a sparse kernel
or a compressor; for real speed use structured pruning (pruned) or int8.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch.nn.utils import prune

from training.technique import Option, Source, Technique, Transformed, run_cli

PRUNABLE = (torch.nn.Conv2d, torch.nn.Linear)


def magnitude_prune(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Zero the `sparsity` share of conv/linear weights with the smallest |w|, in place, permanently."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"--sparsity must be between 0 and 1 (a share of weights to zero), got {sparsity}")
    targets = [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)  # bake weight = weight_orig * mask into a plain parameter
    return model


def sparsity_of(model: torch.nn.Module) -> dict[str, Any]:
    """Share of exactly-zero weights over all conv/linear layers, and per layer."""
    zeros = total = 0
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):
            z, n = int((m.weight == 0).sum()), m.weight.numel()
            zeros, total = zeros + z, total + n
            layers[name] = round(z / n, 4)
    return {"global": round(zeros / total, 6), "zero_weights": zeros, "weights": total, "layers": layers}


class Sparse(Technique):
    name = "sparse"
    recipe = "unstructured_magnitude_prune"
    options = (Option("--sparsity", 0.5, "sparse: share of conv/linear weights zeroed (0..1)"),)

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        # global_unstructured flattens weights with .view(): needs contiguous (not channels_last) tensors.
        model = magnitude_prune(copy.deepcopy(source.model).to(memory_format=torch.contiguous_format), args.sparsity)
        model = model.to(memory_format=torch.channels_last)
        report = sparsity_of(model)
        print(f"{self.name}: global L1 unstructured pruning zeroed {report['zero_weights']:,} of "
              f"{report['weights']:,} conv/linear weights ({100 * report['global']:.1f}% sparse). Dense kernels run "
              "the zeros anyway: expect no speedup")
        return Transformed(
            model, {"sparsity": args.sparsity, "scope": "global", "norm": "L1", "layers": "Conv2d+Linear"}, model,
            keep_checkpoint=True,  # same shapes as the parent: loads into build_model(architecture)
            details={"sparsity": {k: v for k, v in report.items() if k != "layers"},
                     "notes": "unstructured zeros; dense kernels give no speedup"})


SPARSE = Sparse()

if __name__ == "__main__":
    run_cli([SPARSE], __doc__)
