"""aoti: the float model compiled ahead of time by AOTInductor into a .pt2 package, for CPU (aoti) or CUDA
(aoti_cuda, on a machine with a GPU).

    python -m training.variants.aot_inductor artifacts/resnet18                       # -> variants/aoti
    python -m training.variants.aot_inductor artifacts/resnet18 --variant aoti_cuda   # needs a GPU

torch.export (dynamic batch 1..1024) -> aoti_compile_and_package with freezing. The package holds a shared
library built for this CPU's ISA (or this GPU) and this torch version; the handler loads it with
aoti_load_package, since TorchServe 0.12 only knows the older AOTInductor .so route. Nothing compiles at
start-up, unlike the compile runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from handlers.contract import RUNTIMES
from training.export import to_aoti
from training.technique import Exported, NotSupportedHere, RuntimeTechnique, Source, Transformed, run_cli


class AOTIVariant(RuntimeTechnique):
    runtime = "aoti"
    recipes = {"fp32": "aot_inductor"}

    def __init__(self, name: str, device: str) -> None:
        super().__init__(name)
        self.device = device
        self.cuda_only = device == "cuda"
        self.cpu_only = device == "cpu"

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise NotSupportedHere(f"{self.name} compiles for a CUDA GPU, and this machine has none; build aoti "
                                   "(CPU) here, or run this on a GPU host")
        artifact = RUNTIMES[self.runtime]
        to_aoti(t.model, source.parent.input.image_size, out / artifact, self.device)
        t.model.to("cpu")
        return Exported(artifact, self.runtime, f"torch.export + aoti_compile_and_package ({self.device}, freezing)")


AOTI = [AOTIVariant("aoti", "cpu"), AOTIVariant("aoti_cuda", "cuda")]

if __name__ == "__main__":
    run_cli(AOTI, __doc__)
