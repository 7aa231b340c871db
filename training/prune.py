"""Unstructured magnitude pruning: zero the smallest weights, globally across all conv and linear layers.

    python -m training.prune artifacts/resnet18 --sparsity 0.5      # -> artifacts/resnet18/variants/sparse

torch.nn.utils.prune ranks every conv/linear weight by |w| in one global pool (global L1), zeroes the
smallest `sparsity` share, and prune.remove() makes the zeros permanent (plain tensors, no masks or hooks).

No speedup: the weights keep their dense shape and run through the same dense kernels, so latency,
MACs and the size of the (uncompressed) artifact are unchanged. It only helps with a sparse kernel
or a compressor; for real speed use structured pruning (training.prune_structured) or int8.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils import prune

from training import variant
from training.evaluate import splits_for
from training.export import check_parity, to_torchscript

PRUNABLE = (torch.nn.Conv2d, torch.nn.Linear)


def magnitude_prune(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Zero the `sparsity` share of conv/linear weights with the smallest |w|, in place, permanently."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be between 0 and 1 (a share of weights to zero), got {sparsity}")
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


def make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module, sparsity: float = 0.5,
         name: str = "sparse") -> tuple[dict[str, Any], torch.nn.Module]:
    """Prune a copy of the parent, export it and write the variant. Returns (metadata, pruned eager model)."""
    # global_unstructured flattens weights with .view(): needs contiguous (not channels_last) tensors.
    model = magnitude_prune(copy.deepcopy(parent).to(memory_format=torch.contiguous_format), sparsity)
    model = model.to(memory_format=torch.channels_last)
    report = sparsity_of(model)
    scripted = to_torchscript(model, parent_meta["input_size"])
    parity = check_parity(model, scripted, splits_for(parent_meta).test, parent_meta)
    print(f"{name}: global L1 unstructured pruning zeroed {report['zero_weights']:,} of {report['weights']:,} "
          f"conv/linear weights ({100 * report['global']:.1f}% sparse). Dense kernels run the zeros anyway: "
          "expect no speedup")
    recipe = {"technique": "unstructured_magnitude_prune",
              "args": {"sparsity": sparsity, "scope": "global", "norm": "L1", "layers": "Conv2d+Linear"}}
    meta = variant.write_variant(
        parent_dir, name, scripted, recipe,
        export={"method": "torch.jit.script+freeze", "parity": parity},
        state_dict=model.state_dict(),  # same shapes as the parent: loads into build_model(architecture)
        extra={"sparsity": {k: v for k, v in report.items() if k != "layers"},
               "notes": "unstructured zeros; dense kernels give no speedup"},
    )
    return meta, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory")
    ap.add_argument("--sparsity", type=float, default=0.5, help="share of conv/linear weights to zero (0..1)")
    ap.add_argument("--name", default="sparse", help="variant name (directory under variants/)")
    args = ap.parse_args()
    variant.run_cli(args.parent_dir, lambda d, m, e: make(d, m, e, args.sparsity, args.name))


if __name__ == "__main__":
    main()
