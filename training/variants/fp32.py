"""fp32: the parent itself as frozen TorchScript, the fp32 row that ships and the reference for the others.

    python -m training.variants.fp32 artifacts/resnet18      # -> artifacts/resnet18/variants/fp32
"""

from __future__ import annotations

import argparse

from training.technique import Source, Technique, Transformed, run_cli


class Fp32(Technique):
    name = "fp32"
    recipe = "export"

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        return Transformed(source.model, {"method": "torch.jit.script+freeze"}, source.model, keep_checkpoint=True)


FP32 = Fp32()

if __name__ == "__main__":
    run_cli([FP32], __doc__)
