"""Structured channel pruning: remove whole conv channels (Torch-Pruning), then fine-tune briefly.

    python -m training.prune_structured artifacts/resnet18                      # 50% channels, 3 epochs
    python -m training.prune_structured artifacts/resnet18 --ratio 0.6 --epochs 4 --name pruned60

Torch-Pruning traces the model and groups every layer coupled to a channel (the conv, its BatchNorm,
the next conv's input, residual adds that tie several convs together), so removing a channel keeps
the network consistent. Channels are ranked by group L1 magnitude. The classifier's output layer
is never pruned (it must keep one logit per class). Pruning `ratio` of the channels of each layer
removes about 1 - (1 - ratio)^2 of the MACs (75% at 0.5), and the smaller tensors run faster on
ordinary dense kernels. A short fine-tune on the training split (training.train.fit) recovers accuracy.

The served artifact is frozen TorchScript, which carries the pruned shapes with it. The float weights are
kept too (model.pth): handlers.loading.model_from_state_dict resizes the torchvision architecture to them, so other
techniques can be stacked on the pruned model (python -m training.quantize --source pruned).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp

from training import variant
from training.evaluate import splits_for
from training.export import check_parity, to_torchscript
from training.speed import count_macs, count_params
from training.train import FitConfig, bf16_autocast_helps, fit, seed_everything


def output_layers(model: torch.nn.Module, num_classes: int) -> list[torch.nn.Module]:
    """The classifier's output layer(s): Linear (or 1x1 conv) producing one value per class."""
    found = [m for m in model.modules()
             if (isinstance(m, torch.nn.Linear) and m.out_features == num_classes)
             or (isinstance(m, torch.nn.Conv2d) and m.out_channels == num_classes)]
    if not found:
        raise ValueError(f"cannot find the classifier output layer ({num_classes} outputs) to protect from pruning")
    return found


def prune_channels(model: torch.nn.Module, input_size: int, num_classes: int, ratio: float = 0.5,
                   round_to: int | None = 8) -> torch.nn.Module:
    """Remove `ratio` of the channels of every prunable layer group, in place. Returns the model."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be between 0 and 1 (share of channels to remove), got {ratio}")
    example = torch.randn(1, 3, input_size, input_size)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=output_layers(model, num_classes),
        round_to=round_to,  # multiples of 8 keep the SIMD kernels' vector lanes full
    )
    pruner.step()
    return model


def channels_of(model: torch.nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def make(parent_dir: Path, parent_meta: dict[str, Any], parent: torch.nn.Module, ratio: float = 0.5,
         epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, seed: int = 0, name: str = "pruned",
         progress: bool = True) -> tuple[dict[str, Any], torch.nn.Module]:
    """Prune a copy of the parent, fine-tune, export and write the variant. Returns (metadata, eager model)."""
    size, n = parent_meta["input_size"], parent_meta["num_classes"]
    model = copy.deepcopy(parent).float().eval()
    before = {"params": count_params(model), "macs": count_macs(model, size), "conv_channels": channels_of(model)}
    prune_channels(model, size, n, ratio)
    model = model.to(memory_format=torch.channels_last)
    after = {"params": count_params(model), "macs": count_macs(model, size), "conv_channels": channels_of(model)}
    print(f"{name}: removed {before['conv_channels'] - after['conv_channels']:,} of {before['conv_channels']:,} "
          f"conv channels; params {before['params'] / 1e6:.2f}M -> {after['params'] / 1e6:.2f}M, "
          f"MACs {before['macs'] / 1e9:.3f}G -> {after['macs'] / 1e9:.3f}G "
          f"(-{100 * (1 - after['macs'] / before['macs']):.1f}%)")

    splits = splits_for(parent_meta)
    device = torch.device("cpu")
    seed_everything(seed)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                    use_bf16=bf16_autocast_helps(device), progress=progress)
    fitted = fit(model, splits, parent_meta["mean"], parent_meta["std"], cfg, device, desc=f"{name} fine-tune")

    scripted = to_torchscript(model, size)
    parity = check_parity(model, scripted, splits.test, parent_meta)
    recipe = {"technique": "structured_channel_prune",
              "args": {"library": f"torch-pruning {tp.__version__}", "importance": "GroupMagnitudeImportance(p=1)",
                       "ratio": ratio, "round_to": 8, "ignored": "classifier output layer",
                       "finetune": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                                    "autocast": "bf16" if cfg.use_bf16 else "off"}}}
    meta = variant.write_variant(
        parent_dir, name, scripted, recipe,
        export={"method": "torch.jit.script+freeze", "parity": parity}, state_dict=model.state_dict(),
        extra={"pruning": {"before": before, "after": after,
                           "macs_removed": round(1 - after["macs"] / before["macs"], 4),
                           "params_removed": round(1 - after["params"] / before["params"], 4)},
               "finetune": {"best_epoch": fitted.best_epoch, "val_top1": round(fitted.best_val, 6),
                            "seconds": round(fitted.seconds, 1), "history": fitted.history}},
    )
    return meta, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent_dir", type=Path, help="trained fp32 model directory")
    ap.add_argument("--ratio", type=float, default=0.5, help="share of channels removed per layer (0..1)")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tune epochs after pruning")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="pruned", help="variant name (directory under variants/)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args()
    variant.run_cli(args.parent_dir, lambda d, m, e: make(
        d, m, e, args.ratio, args.epochs, args.lr, args.batch_size, args.seed, args.name, args.progress))


if __name__ == "__main__":
    main()
