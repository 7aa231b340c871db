"""bf16 variant: weights and activations in bfloat16, float32 at the edges.

    python -m training.bf16 artifacts/resnet18                 # -> artifacts/resnet18/variants/bf16

The handler feeds float32 batches and reads float logits, so the model is wrapped in a module that
casts the input to bf16 and the logits back to float32 before it is scripted: the served interface
and the handler stay unchanged. bf16 pays off on hardware with bf16 units (AVX512-BF16/AMX CPUs,
recent GPUs); elsewhere it is emulated and can be slower than fp32. It runs on CPU and CUDA.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.optimization import fuse

from training import variant
from training.evaluate import splits_for
from training.export import check_parity, to_torchscript


class Bf16Model(torch.nn.Module):
    """float32 in, bf16 inside, float32 out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


def make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module,
         name: str = "bf16") -> tuple[dict[str, Any], torch.nn.Module]:
    # Fold BatchNorm into the convolutions in float32 first: folding after the cast (as torch.jit.freeze
    # would) rounds the folded weights differently from the eager bf16 model.
    wrapped = Bf16Model(fuse(copy.deepcopy(parent).eval())).eval()
    scripted = to_torchscript(wrapped, parent_meta["input_size"])
    # bf16 keeps 8 bits of mantissa: logits move by ~1e-2 vs fp32, so the check compares the export
    # with the bf16 model it came from (same rounding), and the gate judges top-1 vs fp32.
    parity = check_parity(wrapped, scripted, splits_for(parent_meta).test, parent_meta, atol=5e-2, rtol=5e-2)
    print(f"{name}: weights and activations in bfloat16, float32 input/output; "
          f"export matches the bf16 model (max |diff| {parity['max_abs_diff']:.2g})")
    recipe = {"technique": "bf16_cast", "args": {"dtype": "bfloat16", "io": "float32 in, float32 out"}}
    meta = variant.write_variant(parent_dir, name, scripted, recipe,
                                 export={"method": "torch.jit.script+freeze", "parity": parity})
    return meta, parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory")
    ap.add_argument("--name", default="bf16", help="variant name (directory under variants/)")
    args = ap.parse_args()
    variant.run_cli(args.parent_dir, lambda d, m, e: make(d, m, e, args.name))


if __name__ == "__main__":
    main()
