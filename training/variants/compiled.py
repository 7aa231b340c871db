"""compile: the float model's state_dict, run through torch.compile (Inductor, C++/OpenMP kernels on CPU) by the
handler, which pays the compile at start-up during its warm-up.

    python -m training.variants.compiled artifacts/resnet18          # -> artifacts/resnet18/variants/compile

The artifact is the float state_dict (model.pth) with runtime "compile": the graph is compiled where it runs,
for that machine, with freezing on (weights folded and pre-packed for oneDNN) and a dynamic batch dimension
(one graph for batch 1, one for every larger batch). Start-up cost is recorded by the handler (describe:
serving.startup) and by training.optimize (startup_s column); speed is timed after the warm-up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from handlers.contract import STATE_DICT_FILE
from training.technique import Exported, RuntimeTechnique, Source, Transformed, run_cli, stacked


class CompiledVariant(RuntimeTechnique):
    runtime = "compile"
    recipes = {"fp32": "torch_compile"}

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        torch.save({k: v.detach().cpu() for k, v in t.model.state_dict().items()}, out / STATE_DICT_FILE)
        return Exported(STATE_DICT_FILE, self.runtime, "state_dict; torch.compile(dynamic=True, freezing) at load")


COMPILED = stacked(CompiledVariant, ("fp32",), (None,))

if __name__ == "__main__":
    run_cli(COMPILED, __doc__)
