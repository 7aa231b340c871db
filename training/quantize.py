"""Int8 quantization: post-training static (conv models, x86) and dynamic (Linear/LSTM-heavy models).

    python -m training.quantize artifacts/resnet18                       # static int8 -> variants/int8
    python -m training.quantize artifacts/resnet18 --calibration-images 512
    python -m training.quantize artifacts/mylstm --mode dynamic          # -> variants/dynamic_int8
    python -m training.quantize artifacts/resnet18 --source pruned       # pruned, then int8 -> variants/pruned_int8

Static: FX graph mode (prepare_fx with the x86 qconfig mapping: per-channel int8 weights, histogram-
calibrated uint8 activations), calibrated on un-augmented training images, convert_fx, then
torch.jit.trace + freeze. The artifact is plain TorchScript with quantized ops, so TorchServe loads
it without any Python model code. Why FX and not torch.export/PT2E (torchao): on torch 2.14 the FX
path exports to TorchScript, the format our handler already serves, and it works for torchvision
CNNs; the PT2E path produces an ExportedProgram and failed here once with "Input partition has more
than one output node", so it stays a forward-looking option.

--source stacks quantization on a float variant (the structurally pruned model): the two compose, since
pruning removes MACs and int8 makes each remaining MAC cheaper. The gate still compares with the fp32 parent.

Dynamic: weights of nn.Linear / nn.LSTM / nn.GRU stored in int8, activations quantized on the fly.
It pays off where those layers dominate (transformers, RNNs); for a CNN it only touches the classifier.

Quantized kernels (fbgemm/oneDNN) run on CPU only: both variants are marked cpu_only and packaged
with deviceType: cpu.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from training import variant
from training.data import Splits
from training.evaluate import predict, splits_for
from training.export import check_parity, to_torchscript
from training.speed import any_algorithms

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


def static_int8(model: torch.nn.Module, calibration: Subset, meta: dict[str, Any],
                backend: str = "x86", progress: bool = False) -> torch.fx.GraphModule:
    """FX post-training static quantization of an eager float model (a copy; the input is untouched)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = backend
    size = meta["input_size"]
    example = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    with quantization_warnings():
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend), (example,))
        # Observers record activation ranges while the calibration images run through.
        predict(prepared, calibration, meta["mean"], meta["std"], batch_size=32, progress=progress)
        return convert_fx(prepared)


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Int8 weights for Linear/LSTM/GRU layers, activations quantized per batch at run time (a copy)."""
    with quantization_warnings():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), set(DYNAMIC_TYPES),
                                                      dtype=torch.qint8)


def int8_weights(module: torch.nn.Module) -> int:
    """How many int8 weight tensors a quantized model (eager, FX or TorchScript) holds."""
    count = 0
    state = module.state_dict()
    for value in state.values():
        tensors = value if isinstance(value, tuple | list) else (value,)
        count += sum(1 for t in tensors if isinstance(t, torch.Tensor) and t.dtype == torch.qint8)
    return count


def make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module, mode: str = "static",
         calibration_images: int = 512, seed: int = 0, name: str | None = None,
         backend: str = "x86", progress: bool = True,
         source: str | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """Quantize the parent (or the float variant `source`), export to TorchScript, check it against the
    quantized model, write the variant. Returns the float model it was made from."""
    stacked_on: dict[str, Any] = {}
    if source:
        source_meta, parent = variant.load_float_variant(parent_dir, source)
        stacked_on = {"source": {"variant": source, "recipe": source_meta["recipe"],
                                 "top1": source_meta["metrics"]["test"]["top1"]}}
    with any_algorithms():  # quantized kernels have no deterministic variants; they only warn
        meta = _make(parent_dir, parent_meta, parent, mode, calibration_images, seed,
                        name or "_".join(filter(None, (source, "int8" if mode == "static" else "dynamic_int8"))),
                        backend, progress, stacked_on)
    return meta, parent


def _make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module, mode: str,
          calibration_images: int, seed: int, name: str, backend: str,
          progress: bool, stacked_on: dict[str, Any]) -> dict[str, Any]:
    splits = splits_for(parent_meta)
    if mode == "static":
        calibration = calibration_subset(splits, calibration_images, seed)
        quantized = static_int8(parent, calibration, parent_meta, backend, progress)
        args = {"api": "torch.ao.quantization FX (prepare_fx/convert_fx)", "backend": backend,
                "qconfig_mapping": f"get_default_qconfig_mapping({backend!r})", "weights": "int8 per-channel",
                "activations": "uint8 per-tensor, histogram observer",
                "calibration": {"split": "train", "images": len(calibration), "seed": seed, "augment": False}}
        method = "trace"  # FX GraphModules trace cleanly; the graph is static after conversion
    elif mode == "dynamic":
        quantized = dynamic_int8(parent)
        args = {"api": "torch.ao.quantization.quantize_dynamic", "layers": [t.__name__ for t in DYNAMIC_TYPES],
                "weights": "int8", "activations": "quantized per batch at run time"}
        method = "script"
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; use static or dynamic")
    with quantization_warnings():
        scripted = to_torchscript(quantized, parent_meta["input_size"], method)
        # Same numerics on both sides (TorchScript runs the very same quantized kernels), so the
        # export must match the quantized model tightly; the accuracy cost vs fp32 is the gate's job.
        parity = check_parity(quantized, scripted, splits.test, parent_meta)
    n_int8 = int8_weights(quantized)
    print(f"{name}: {mode} int8 ({backend if mode == 'static' else 'dynamic'}), {n_int8} int8 weight tensors, "
          f"export matches the quantized model (max |diff| {parity['max_abs_diff']:.2g}); CPU-only")
    recipe = {"technique": f"{mode}_int8_quantization", "args": {**args, **stacked_on}}
    with quantization_warnings():
        meta = variant.write_variant(
            parent_dir, name, scripted, recipe, cpu_only=True,
            export={"method": f"torch.jit.{method}+freeze", "parity": parity, "int8_weight_tensors": n_int8},
            extra={"notes": "quantized kernels run on CPU only (x86 fbgemm/oneDNN); deviceType cpu"},
        )
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory")
    ap.add_argument("--mode", choices=("static", "dynamic"), default="static")
    ap.add_argument("--calibration-images", type=int, default=512, help="training images used to calibrate")
    ap.add_argument("--backend", default="x86", choices=("x86", "fbgemm", "onednn", "qnnpack"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", default=None, help="quantize this float variant (e.g. pruned) instead of the parent")
    ap.add_argument("--name", default=None, help="variant name (default [<source>_]int8 or dynamic_int8)")
    args = ap.parse_args()
    variant.run_cli(args.parent_dir, lambda d, m, e: make(
        d, m, e, args.mode, args.calibration_images, args.seed, args.name, args.backend, source=args.source))


if __name__ == "__main__":
    main()
