"""pruned: structured channel pruning (Torch-Pruning) that removes whole conv channels, then a short fine-tune.

    python -m training.variants.pruned artifacts/resnet18                         # 50% channels, 3 epochs
    python -m training.variants.pruned artifacts/resnet18 --prune-ratio 0.6 --prune-epochs 4 --name pruned60

Torch-Pruning traces the model and groups every layer coupled to a channel (the conv, its BatchNorm,
the next conv's input, residual adds that tie several convs together), so removing a channel keeps
the network consistent. Channels are ranked by group L1 magnitude. The classifier's output layer
is never pruned (it must keep one logit per class). Pruning `ratio` of the channels of each layer
removes about 1 - (1 - ratio)^2 of the MACs (75% at 0.5), and the smaller tensors run faster on
ordinary dense kernels. A short fine-tune on the training split (training.train.fit) recovers accuracy.

The served artifact is frozen TorchScript, which carries the pruned shapes with it. The float weights are
kept too (model.pth): handlers.loading.model_from_state_dict resizes the torchvision architecture to them, so other
techniques can be stacked on the pruned model (pruned_int8).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch_pruning as tp

from training.speed import count_macs, count_params
from training.technique import Option, Source, Technique, Transformed, run_cli
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
        raise ValueError(f"--prune-ratio must be between 0 and 1 (share of channels to remove), got {ratio}")
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


class Pruned(Technique):
    name = "pruned"
    recipe = "structured_channel_prune"
    options = (
        Option("--prune-ratio", 0.5, "pruned: share of channels removed per layer (0..1)"),
        Option("--prune-epochs", 3, "pruned: fine-tune epochs after pruning"),
        Option("--prune-lr", 1e-3, "pruned: fine-tune learning rate"),
    )
    batch_size = 32

    def transform(self, source: Source, args: argparse.Namespace) -> Transformed:
        size, n = source.parent.input.image_size, source.parent.num_classes
        model = copy.deepcopy(source.model).float().eval()
        before = {"params": count_params(model), "macs": count_macs(model, size), "conv_channels": channels_of(model)}
        prune_channels(model, size, n, args.prune_ratio)
        model = model.to(memory_format=torch.channels_last)
        after = {"params": count_params(model), "macs": count_macs(model, size), "conv_channels": channels_of(model)}
        print(f"{self.name}: removed {before['conv_channels'] - after['conv_channels']:,} of "
              f"{before['conv_channels']:,} conv channels; params {before['params'] / 1e6:.2f}M -> "
              f"{after['params'] / 1e6:.2f}M, MACs {before['macs'] / 1e9:.3f}G -> {after['macs'] / 1e9:.3f}G "
              f"(-{100 * (1 - after['macs'] / before['macs']):.1f}%)")
        device = torch.device("cpu")
        seed_everything(args.seed)
        cfg = FitConfig(epochs=args.prune_epochs, batch_size=self.batch_size, lr=args.prune_lr, seed=args.seed,
                        use_bf16=bf16_autocast_helps(device), progress=args.progress)
        fitted = fit(model, source.splits, source.parent.input.mean, source.parent.input.std, cfg, device,
                     desc=f"{self.name} fine-tune")
        recipe = {"library": f"torch-pruning {tp.__version__}", "importance": "GroupMagnitudeImportance(p=1)",
                  "ratio": args.prune_ratio, "round_to": 8, "ignored": "classifier output layer",
                  "finetune": {"epochs": args.prune_epochs, "lr": args.prune_lr, "batch_size": self.batch_size,
                               "seed": args.seed, "autocast": "bf16" if cfg.use_bf16 else "off"}}
        return Transformed(
            model, recipe, model, keep_checkpoint=True,
            training={"best_epoch": fitted.best_epoch, "val_top1": round(fitted.best_val, 6),
                      "seconds": round(fitted.seconds, 1), "history": fitted.history},
            details={"pruning": {"before": before, "after": after,
                                 "macs_removed": round(1 - after["macs"] / before["macs"], 4),
                                 "params_removed": round(1 - after["params"] / before["params"], 4)}})


PRUNED = Pruned()

if __name__ == "__main__":
    run_cli([PRUNED], __doc__)
