"""int8: post-training static quantization (conv models, x86), stacked on pruned as pruned_int8, and dynamic.

    python -m training.variants.int8 artifacts/resnet18                           # static int8 -> variants/int8
    python -m training.variants.int8 artifacts/resnet18 --calibration-images 512
    python -m training.variants.int8 artifacts/resnet18 --variant pruned_int8     # pruned, then int8
    python -m training.variants.int8 artifacts/mylstm --variant dynamic_int8

Static: FX graph mode (prepare_fx with the x86 qconfig mapping: per-channel int8 weights, histogram-
calibrated uint8 activations), calibrated on un-augmented training images, convert_fx, then
torch.jit.trace + freeze. The artifact is plain TorchScript with quantized ops, so TorchServe loads
it without any Python model code. Why FX and not torch.export/PT2E (torchao): on torch 2.14 the FX
path exports to TorchScript, the format our handler already serves, and it works for torchvision
CNNs; the PT2E path produces an ExportedProgram and failed here once with "Input partition has more
than one output node", so it stays a forward-looking option.

pruned_int8 stacks quantization on the structurally pruned variant: the two compose, since pruning removes
MACs and int8 makes each remaining MAC cheaper. The gate still compares with the fp32 parent.

Dynamic: weights of nn.Linear / nn.LSTM / nn.GRU stored in int8, activations quantized on the fly.
It pays off where those layers dominate (transformers, RNNs); for a CNN it only touches the classifier.

Quantized kernels (fbgemm/oneDNN) run on CPU only: every int8 variant is marked cpu_only and packaged
with deviceType: cpu.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Subset

from handlers.imaging import Normalizer
from training.data import Splits, loader
from training.evaluate import predict
from training.speed import any_algorithms
from training.technique import Option, Source, Technique, Transformed, run_cli

DYNAMIC_TYPES = (torch.nn.Linear, torch.nn.LSTM, torch.nn.GRU)


@contextlib.contextmanager
def quantization_warnings() -> Iterator[None]:
    """torch 2.14 deprecates torch.ao.quantization in favour of torchao's PT2E flow (see module docstring for
    why we stay on FX). We silence exactly its deprecation notices, printed on every call and observer, and
    the tracer's note that scales/zero-points become constants (they are constants after calibration)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python",
                                category=torch.jit.TracerWarning)
        yield


def calibration_subset(splits: Splits, images: int, seed: int = 0) -> Subset:
    """A seeded random sample of the training split (never val/test: those judge the result)."""
    n = len(splits.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(images, n)]
    return Subset(splits.train, sorted(order.tolist()))


CALIBRATION = Option("--calibration-images", 512, "int8: training images to calibrate activation ranges on")


def calibration_batches(source: Source, args: argparse.Namespace, batch_size: int = 1) -> list[Any]:
    """Normalized float32 numpy batches of the calibration images, for runtimes that quantize their own graph."""
    normalize = Normalizer(source.parent.input.mean, source.parent.input.std)
    subset = calibration_subset(source.splits, args.calibration_images, args.seed)
    return [normalize(images).contiguous().numpy() for images, _ in loader(subset, batch_size)]


def calibration_record(args: argparse.Namespace, images: int) -> dict[str, Any]:
    return {"split": "train", "images": images, "seed": args.seed, "augment": False}


def static_int8(model: torch.nn.Module, calibration: Subset, input_size: int, mean: list[float] | None,
                std: list[float] | None, backend: str = "x86", progress: bool = False) -> torch.fx.GraphModule:
    """FX post-training static quantization of an eager float model (a copy; the input is untouched)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    example = torch.randn(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    with quantization_warnings():
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (example,))
        # Observers record activation ranges while the calibration images run through.
        predict(prepared, calibration, mean, std, batch_size=32, progress=progress)
        return convert_fx(prepared)


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Int8 weights for Linear/LSTM/GRU layers, activations quantized per batch at run time (a copy)."""
    with quantization_warnings():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), set(DYNAMIC_TYPES),
                                                      dtype=torch.qint8)


def int8_weights(module: torch.nn.Module) -> int:
    """How many int8 weight tensors a quantized model (eager, FX or TorchScript) holds."""
    count = 0
    for value in module.state_dict().values():
        tensors = value if isinstance(value, tuple | list) else (value,)
        count += sum(1 for t in tensors if isinstance(t, torch.Tensor) and t.dtype == torch.qint8)
    return count


class Int8(Technique):
    recipe = "static_int8_quantization"
    cpu_only = True
    options = (
        CALIBRATION,
        Option("--int8-backend", "x86", "int8: quantized engine", ("x86", "fbgemm", "onednn", "qnnpack")),
    )

    def __init__(self, name: str, stacks_on: str | None = None, dynamic: bool = False) -> None:
        self.name = name
        self.stacks_on = stacks_on
        self.dynamic = dynamic
        if dynamic:
            self.recipe = "dynamic_int8_quantization"

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        # Quantized kernels have no deterministic variants (they only warn), and their APIs are deprecated.
        with any_algorithms(), quantization_warnings():
            yield

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        parent = source.parent
        if self.dynamic:
            quantized = dynamic_int8(source.model)
            recipe: dict[str, Any] = {"api": "torch.ao.quantization.quantize_dynamic",
                                      "layers": [t.__name__ for t in DYNAMIC_TYPES], "weights": "int8",
                                      "activations": "quantized per batch at run time"}
            method = "script"
        else:
            calibration = calibration_subset(source.splits, args.calibration_images, args.seed)
            quantized = static_int8(source.model, calibration, parent.input.image_size, parent.input.mean,
                                    parent.input.std, args.int8_backend, args.progress)
            recipe = {"api": "torch.ao.quantization FX (prepare_fx/convert_fx)", "backend": args.int8_backend,
                      "qconfig_mapping": f"get_default_qconfig_mapping({args.int8_backend!r})",
                      "weights": "int8 per-channel", "activations": "uint8 per-tensor, histogram observer",
                      "calibration": calibration_record(args, len(calibration))}
            method = "trace"  # FX GraphModules trace cleanly; the graph is static after conversion
        n_int8 = int8_weights(quantized)
        print(f"{self.name}: {'dynamic' if self.dynamic else 'static'} int8, {n_int8} int8 weight tensors; CPU-only")
        # The export runs the very same quantized kernels, so it must match the quantized model tightly (the
        # default tolerance); the accuracy cost against fp32 is the gate's job.
        return Transformed(quantized, recipe, source.model, export_method=method, precision="int8",
                           details={"int8_weight_tensors": n_int8,
                                    "notes": "quantized kernels run on CPU only (x86 fbgemm/oneDNN); deviceType cpu"})


INT8 = Int8("int8")
PRUNED_INT8 = Int8("pruned_int8", stacks_on="pruned")
DYNAMIC_INT8 = Int8("dynamic_int8", dynamic=True)

if __name__ == "__main__":
    run_cli([INT8, PRUNED_INT8, DYNAMIC_INT8], __doc__)
