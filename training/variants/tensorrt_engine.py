"""tensorrt: the float model compiled by Torch-TensorRT into TensorRT engines, fp16, for CUDA workers.

    pip install -r requirements-gpu.txt     # torch-tensorrt; deploy/setup.sh does this where nvidia-smi works
    python -m training.variants.tensorrt_engine artifacts/resnet18          # -> variants/tensorrt_fp16

The model is wrapped to compute in fp16 with float32 in and out (as the bf16 variant does), exported with a
dynamic batch (1..MAX_TRT_BATCH, optimized for OPT_BATCH) and compiled with explicit typing, then saved as
an ExportedProgram that the handler loads with torch.export.load once torch_tensorrt is imported. Engines
are built for one GPU model and TensorRT version: rebuild on the machine type that serves them. int8 needs
NVIDIA ModelOpt calibration and is not built here. A machine without CUDA or without torch-tensorrt refuses
the variant with the reason (training.optimize skips it and says why).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from handlers.contract import RUNTIMES
from training.technique import Exported, NotSupportedHere, RuntimeTechnique, Source, Transformed, run_cli

OPT_BATCH, MAX_TRT_BATCH = 8, 64


class Fp16Model(torch.nn.Module):
    """float32 in, fp16 inside, float32 out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


class TensorRTVariant(RuntimeTechnique):
    runtime = "tensorrt"
    cuda_only = True
    recipes = {"fp16": "torch_tensorrt"}

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        if not torch.cuda.is_available():
            raise NotSupportedHere(f"{self.name} builds TensorRT engines for a CUDA GPU, and this machine has none")
        try:
            import torch_tensorrt
        except ImportError as e:
            raise NotSupportedHere(f"{self.name} needs torch-tensorrt ({e}); install it with: "
                                   "pip install -r requirements-gpu.txt") from e
        size = source.parent.input.image_size
        spec = torch_tensorrt.Input(min_shape=(1, 3, size, size), opt_shape=(OPT_BATCH, 3, size, size),
                                    max_shape=(MAX_TRT_BATCH, 3, size, size), dtype=torch.float32)
        model = Fp16Model(t.model.to("cuda")).eval()
        with torch.no_grad():
            compiled = torch_tensorrt.compile(model, ir="dynamo", arg_inputs=[spec])
        artifact = RUNTIMES[self.runtime]
        torch_tensorrt.save(compiled, str(out / artifact), output_format="exported_program", arg_inputs=[spec])
        t.model.to("cpu").float()
        return Exported(artifact, self.runtime, f"torch_tensorrt.compile(dynamo, fp16, batch 1..{MAX_TRT_BATCH}, "
                        f"opt {OPT_BATCH}) + torch_tensorrt.save", {"gpu": torch.cuda.get_device_name(0)})


TENSORRT = [TensorRTVariant("tensorrt_fp16", precision="fp16")]

if __name__ == "__main__":
    run_cli(TENSORRT, __doc__)
