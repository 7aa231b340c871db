"""bf16: weights and activations in bfloat16, float32 at the edges.

    python -m training.variants.bf16 artifacts/resnet18                 # -> artifacts/resnet18/variants/bf16

The handler feeds float32 batches and reads float logits, so the model is wrapped in a module that
casts the input to bf16 and the logits back to float32 before it is scripted: the served interface
and the handler stay unchanged. bf16 pays off on hardware with bf16 units (AVX512-BF16/AMX CPUs,
recent GPUs); elsewhere it is emulated and can be slower than fp32. It runs on CPU and CUDA.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.fx.experimental.optimization import fuse

from training.export import Tolerance
from training.technique import Source, Technique, Transformed, run_cli


class Bf16Model(torch.nn.Module):
    """float32 in, bf16 inside, float32 out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16)).float()


class Bf16(Technique):
    name = "bf16"
    recipe = "bf16_cast"

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        # Fold BatchNorm into the convolutions in float32 first: folding after the cast (as torch.jit.freeze
        # would) rounds the folded weights differently from the eager bf16 model.
        wrapped = Bf16Model(fuse(copy.deepcopy(source.model).eval())).eval()
        print(f"{self.name}: weights and activations in bfloat16, float32 input/output")
        # bf16 keeps 8 bits of mantissa: logits move by ~1e-2 vs fp32, so the export is compared with the bf16
        # model it came from (same rounding) at a bf16 tolerance, and the gate judges top-1 vs fp32.
        return Transformed(wrapped, {"dtype": "bfloat16", "io": "float32 in, float32 out"}, source.model,
                           precision="bf16", tolerance=Tolerance(5e-2, 5e-2))


BF16 = Bf16()

if __name__ == "__main__":
    run_cli([BF16], __doc__)
