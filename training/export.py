"""Export a float model to each runtime's artifact, and prove the saved artifact matches eager on the test split.

    python -m training.export artifacts/resnet18                 # torch.jit.script + freeze
    python -m training.export artifacts/resnet18 --method trace

Writers: frozen TorchScript (`to_torchscript`), a torch.export program with a dynamic batch dimension
(`exported_program`), ONNX through the torch.export-based exporter (`to_onnx`), an OpenVINO IR converted from
that ONNX file (`to_openvino`) and an AOTInductor package (`to_aoti`). The exported logits must match eager
within |exported - eager| <= atol + rtol * |eager| (defaults 1e-3 each; freezing folds BatchNorm into
convolutions, which moves logits by ~1e-5) and agree on the stated share of top-1 labels (all of them, unless
the artifact computes in a lower precision), or the export fails and nothing is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from handlers.contract import TORCHSCRIPT_FILE, ModelCard
from handlers.deprecations import known_deprecations
from handlers.loading import load_state_dict, model_from_state_dict
from training.evaluate import predict, splits_for


class ParityError(RuntimeError):
    pass


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact's logits must stay to the model it was made from."""

    atol: float = 1e-3
    rtol: float = 1e-3
    agreement: float = 1.0  # share of test images whose top-1 label must be the same


# Largest batch an exported graph accepts; TorchServe batches are far smaller.
MAX_BATCH = 1024


def example_batch(input_size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)


def dynamic_batch() -> dict[int, torch.export.Dim]:
    """The dynamic_shapes entry of the one input: its batch dimension, 1..MAX_BATCH."""
    return {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}


def exported_program(model: torch.nn.Module, input_size: int, device: str = "cpu") -> torch.export.ExportedProgram:
    """torch.export with the batch dimension dynamic (1..MAX_BATCH), so one graph serves every batch size."""
    with torch.no_grad():
        return torch.export.export(model.eval().to(device), (example_batch(input_size).to(device),),
                                   dynamic_shapes=(dynamic_batch(),))


def to_onnx(model: torch.nn.Module, input_size: int, path: Path) -> Path:
    """ONNX (the torch.export-based exporter, weights inside the file) with a dynamic batch dimension."""
    with torch.no_grad():
        program = torch.onnx.export(model.eval(), (example_batch(input_size),), dynamo=True, verbose=False,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=(dynamic_batch(),), external_data=False)
    program.save(str(path), external_data=False)
    return path


def to_openvino(onnx_path: Path, path: Path) -> Path:
    """An OpenVINO IR (path.xml + path.bin) from an ONNX file, weights kept in fp32."""
    import openvino

    # save_model compresses weights to fp16 unless told not to; precision is the runtime's choice, not the file's.
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)
    return path


def to_aoti(model: torch.nn.Module, input_size: int, path: Path, device: str = "cpu") -> Path:
    """An AOTInductor package (.pt2): the model compiled ahead of time to a shared library for `device`."""
    from torch._inductor import aoti_compile_and_package

    program = exported_program(model, input_size, device)
    # freezing turns weights into constants so Inductor can pre-pack them (oneDNN on CPU).
    return Path(aoti_compile_and_package(program, package_path=str(path), inductor_configs={"freezing": True}))


def to_torchscript(model: torch.nn.Module, input_size: int, method: str = "script") -> torch.jit.ScriptModule:
    """Frozen TorchScript: loads in TorchServe without the Python model class."""
    model.eval()
    example = torch.randn(2, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    with known_deprecations(), torch.no_grad():
        if method == "script":
            scripted = torch.jit.script(model)
        elif method == "trace":
            scripted = torch.jit.trace(model, example)
        else:
            raise ValueError(f"unknown export method {method!r}; use script or trace")
        return torch.jit.freeze(scripted)


def check_parity(
    reference: Callable[[torch.Tensor], torch.Tensor],
    exported: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    card: ModelCard,
    tolerance: Tolerance = Tolerance(),
    hint: str = "try --method trace, or report the architecture as unsupported for TorchScript",
) -> dict[str, Any]:
    """Compare logits on every image of `dataset`; raise ParityError past the tolerance."""
    ref, _ = predict(reference, dataset, card.input.mean, card.input.std)
    with known_deprecations():
        out, _ = predict(exported, dataset, card.input.mean, card.input.std)
    excess = ((out - ref).abs() - (tolerance.atol + tolerance.rtol * ref.abs())).max().item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    report = {
        "images": len(ref),
        "max_abs_diff": round((out - ref).abs().max().item(), 8),
        "mean_abs_diff": round((out - ref).abs().mean().item(), 8),
        "top1_agreement": round(agree, 6),
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
        "min_agreement": tolerance.agreement,
    }
    if excess > 0 or agree < tolerance.agreement - 1e-9:
        raise ParityError(
            f"exported model does not match the model it was made from on the test split: max |diff| "
            f"{report['max_abs_diff']:.3g} (allowed {tolerance.atol} + {tolerance.rtol}*|reference|), top-1 "
            f"agreement {100 * agree:.2f}% (required {100 * tolerance.agreement:.2f}%); {hint}"
        )
    return report


def export_dir(model_dir: Path, method: str = "script", atol: float = 1e-3, rtol: float = 1e-3) -> ModelCard:
    """Export the checkpoint in `model_dir` beside it; the card then names the TorchScript file as the artifact."""
    card = ModelCard.read(model_dir)
    if card.checkpoint is None:
        raise ValueError(f"{model_dir} keeps no float checkpoint to export (its artifact is {card.artifact}, "
                         f"runtime {card.runtime})")
    eager = model_from_state_dict(card.architecture, card.num_classes, load_state_dict(model_dir / card.checkpoint))
    scripted = to_torchscript(eager, card.input.image_size, method)
    parity = check_parity(eager, scripted, splits_for(card).test, card, Tolerance(atol, rtol))
    with known_deprecations():
        torch.jit.save(scripted, str(model_dir / TORCHSCRIPT_FILE))
    card = card.replace(runtime="torchscript", artifact=TORCHSCRIPT_FILE,
                        export={"method": f"torch.jit.{method}+freeze", "parity": parity})
    card.write(model_dir)
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--method", choices=("script", "trace"), default="script")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    try:
        card = export_dir(args.model_dir, args.method, args.atol, args.rtol)
    except (ParityError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(card.export, indent=2))
    print(f"exported: {args.model_dir / TORCHSCRIPT_FILE}")


if __name__ == "__main__":
    main()
