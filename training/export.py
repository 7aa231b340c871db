"""Export a trained checkpoint to frozen TorchScript and prove it matches eager on the test split.

    python -m training.export artifacts/resnet18                 # torch.jit.script + freeze
    python -m training.export artifacts/resnet18 --method trace

The exported logits must match eager within |exported - eager| <= atol + rtol * |eager|
(defaults 1e-3 each; freezing folds BatchNorm into convolutions, which moves logits by ~1e-5)
and agree on every top-1 label, or the export fails and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from handlers.deprecations import known_deprecations
from handlers.loading import load_state_dict, model_from_state_dict
from training import metadata
from training.evaluate import predict, splits_for


class ParityError(RuntimeError):
    pass


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
    reference: torch.nn.Module,
    exported: torch.nn.Module,
    dataset: Dataset,
    meta: dict[str, Any],
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Compare logits on every image of `dataset`; raise ParityError past the tolerance."""
    ref, _ = predict(reference, dataset, meta["mean"], meta["std"])
    with known_deprecations():
        out, _ = predict(exported, dataset, meta["mean"], meta["std"])
    excess = ((out - ref).abs() - (atol + rtol * ref.abs())).max().item()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    report = {
        "images": len(ref),
        "max_abs_diff": round((out - ref).abs().max().item(), 8),
        "top1_agreement": round(agree, 6),
        "atol": atol,
        "rtol": rtol,
    }
    if excess > 0 or agree < 1.0:
        raise ParityError(
            f"exported model does not match eager on the test split: max |diff| {report['max_abs_diff']:.3g} "
            f"(allowed {atol} + {rtol}*|eager|), top-1 agreement {100 * agree:.2f}% (required 100%). "
            "Try --method trace, or report the architecture as unsupported for TorchScript"
        )
    return report


def export_dir(model_dir: Path, method: str = "script", atol: float = 1e-3, rtol: float = 1e-3) -> dict[str, Any]:
    meta = metadata.read(model_dir)
    eager = model_from_state_dict(meta["architecture"], meta["num_classes"],
                                  load_state_dict(model_dir / meta["checkpoint"]))
    scripted = to_torchscript(eager, meta["input_size"], method)
    parity = check_parity(eager, scripted, splits_for(meta).test, meta, atol, rtol)
    with known_deprecations():
        torch.jit.save(scripted, str(model_dir / metadata.TORCHSCRIPT_FILE))
    meta.update(format="torchscript", artifact=metadata.TORCHSCRIPT_FILE,
                export={"method": f"torch.jit.{method}+freeze", "parity": parity})
    metadata.write(model_dir, meta)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--method", choices=("script", "trace"), default="script")
    ap.add_argument("--atol", type=float, default=1e-3)
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    try:
        meta = export_dir(args.model_dir, args.method, args.atol, args.rtol)
    except (ParityError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(meta["export"], indent=2))
    print(f"exported: {args.model_dir / metadata.TORCHSCRIPT_FILE}")


if __name__ == "__main__":
    main()
