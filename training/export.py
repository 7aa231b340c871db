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

from handlers.contract import TORCHSCRIPT_FILE, ModelCard
from handlers.deprecations import known_deprecations
from handlers.loading import load_state_dict, model_from_state_dict
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
    card: ModelCard,
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict[str, Any]:
    """Compare logits on every image of `dataset`; raise ParityError past the tolerance."""
    ref, _ = predict(reference, dataset, card.input.mean, card.input.std)
    with known_deprecations():
        out, _ = predict(exported, dataset, card.input.mean, card.input.std)
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


def export_dir(model_dir: Path, method: str = "script", atol: float = 1e-3, rtol: float = 1e-3) -> ModelCard:
    """Export the checkpoint in `model_dir` beside it; the card then names the TorchScript file as the artifact."""
    card = ModelCard.read(model_dir)
    if card.checkpoint is None:
        raise ValueError(f"{model_dir} keeps no float checkpoint to export (its artifact is {card.artifact}, "
                         f"runtime {card.runtime})")
    eager = model_from_state_dict(card.architecture, card.num_classes, load_state_dict(model_dir / card.checkpoint))
    scripted = to_torchscript(eager, card.input.image_size, method)
    parity = check_parity(eager, scripted, splits_for(card).test, card, atol, rtol)
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
