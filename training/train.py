"""Train a torchvision classifier on the bundled digits (or an ImageFolder) and evaluate it.

    python -m training.train --out artifacts/resnet18                       # resnet18 @ 224, digits
    python -m training.train --arch mobilenet_v3_small --out artifacts/mnv3
    python -m training.train --data-dir /path/to/imagefolder --out artifacts/mine

Writes OUT/model.pth (a state_dict, loads with weights_only=True), OUT/metadata.json
(the model card that travels into the .mar) and OUT/eval/test/{report.json,confusion_matrix.png}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from handlers.contract import (
    CARD_FILE,
    STATE_DICT_FILE,
    DataRecord,
    DataSpec,
    InputContract,
    Metrics,
    ModelCard,
    Recipe,
    git_commit,
)
from handlers.imaging import Normalizer
from handlers.loading import architectures, build_model
from training.data import Splits, channel_stats, load_splits, loader
from training.evaluate import classification_metrics, predict, summary, write_report


class Augmented(Dataset):
    """Small random affine jitter; draws from the global RNG, so a seed fixes it."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.jitter = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1))

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[i]
        return self.jitter(image), label


def bf16_autocast_helps(device: torch.device) -> bool:
    """bf16 autocast pays off on GPUs with bf16 and on CPUs with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class FitConfig:
    """The knobs of one training run; shared by training, pruning fine-tunes and distillation."""

    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    use_bf16: bool = False
    progress: bool = True


@dataclass
class FitResult:
    best_val: float
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float


# loss(normalized inputs, float32 logits, labels, *extra batch fields) -> scalar; distillation swaps this.
LossFn = Callable[..., torch.Tensor]


def fit(model: torch.nn.Module, splits: Splits, mean: list[float], std: list[float], cfg: FitConfig,
        device: torch.device, loss_fn: LossFn | None = None, desc: str = "epoch",
        wrap_train: Callable[[Dataset], Dataset] | None = None) -> FitResult:
    """AdamW + one-cycle on the training split; keeps (and loads back) the weights with the best val top-1.

    `wrap_train` may wrap the (augmented) training set to yield extra fields after the label; they are
    passed on to `loss_fn` (distillation uses it to look up cached teacher logits by index).
    """
    normalize = Normalizer(mean, std, device)
    if loss_fn is None:
        def loss_fn(_x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, *_extra: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    train_set = Augmented(splits.train) if cfg.augment else splits.train
    train_loader = loader(wrap_train(train_set) if wrap_train else train_set, cfg.batch_size, shuffle=True,
                          seed=cfg.seed)
    steps = cfg.epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, -1, {})
    history = []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stdout,
                   disable=not cfg.progress)
        for images, labels, *extra in bar:
            x, y = normalize(images), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.use_bf16):
                logits = model(x)
            loss = loss_fn(x, logits.float(), y, *(e.to(device) for e in extra))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        model.eval()
        val_logits, val_labels = predict(model, splits.val, mean, std)
        val_top1 = float((val_logits.argmax(1) == val_labels).float().mean())
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5),
                        "train_top1": round(correct / seen, 5), "val_top1": round(val_top1, 5)})
        print(f"{desc} {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f} train {correct / seen:.4f} "
              f"val {val_top1:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
        if val_top1 >= best[0]:
            best = (val_top1, epoch + 1, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(best[0], best[1], history, time.perf_counter() - started)


def train(args: argparse.Namespace) -> ModelCard:
    seed_everything(args.seed)
    device = torch.device(args.device)
    spec = DataSpec(
        source=str(args.data_dir) if args.data_dir else "digits",
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    splits = load_splits(spec, args.input_size, strict=args.strict, progress=args.progress)
    mean, std = channel_stats(splits.train)
    num_classes = len(splits.labels)
    print(f"data: {spec.source} {splits.sizes}, {num_classes} classes, fingerprint {splits.fingerprint[:12]}")
    if splits.scan_report:
        print(splits.scan_report)

    model = build_model(args.arch, num_classes).to(device, memory_format=torch.channels_last)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and bf16_autocast_helps(device))
    print(f"model: {args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"input {args.input_size}, autocast {'bf16' if use_bf16 else 'off'}, channels_last, device {device}")
    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    label_smoothing=args.label_smoothing, augment=args.augment, seed=args.seed,
                    use_bf16=use_bf16, progress=args.progress)
    fitted = fit(model, splits, mean, std, cfg, device)
    best = (fitted.best_val, fitted.best_epoch, model.state_dict())
    history, seconds = fitted.history, fitted.seconds

    cpu_state = {k: v.cpu() for k, v in best[2].items()}
    test_logits, test_labels = predict(model, splits.test, mean, std)
    result = classification_metrics(test_logits.cpu(), test_labels, splits.labels)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save(cpu_state, out / STATE_DICT_FILE)
    # Unset options (None) are left out: TorchServe's frontend drops JSON nulls from what describe returns.
    train_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None}
    card = ModelCard(
        name=args.name,
        version=args.version,
        architecture=args.arch,
        labels=splits.labels,
        input=InputContract(shape=[3, args.input_size, args.input_size], mean=mean, std=std),
        variant="fp32",
        runtime="eager",
        artifact=STATE_DICT_FILE,
        checkpoint=STATE_DICT_FILE,
        recipe=Recipe("train", train_args),
        data=DataRecord(spec, splits.fingerprint, splits.sizes, splits.skipped),
        training={
            "best_epoch": best[1],
            "seconds": round(seconds, 1),
            "autocast": "bf16" if use_bf16 else "off",
            "torch": torch.__version__,
            "history": history,
        },
        git_commit=git_commit(),
        metrics=Metrics(test=summary(result), val_top1=round(best[0], 6)),
    )
    card.write(out)
    title = f"{args.arch} fp32 - test top-1 {100 * result['top1']:.2f}%"
    write_report(out / "eval" / "test", result, splits.labels, title)
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    ap.add_argument("--arch", default="resnet18", help="torchvision model name (default resnet18)")
    ap.add_argument("--data-dir", type=Path, default=None, help="ImageFolder root; default: bundled digits")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                    help="bf16 autocast; auto enables it where the hardware has bf16 units")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="digits", help="model name used for serving")
    ap.add_argument("--version", default="1.0", help="model version recorded in metadata")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--strict", action="store_true",
                    help="stop when an image of --data-dir cannot be decoded (default: skip it and list it)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.arch not in architectures():
        sys.exit(f"error: unknown architecture {args.arch!r}; choose a torchvision classification model "
                 "such as resnet18, mobilenet_v3_small or resnet50")
    if args.data_dir is not None and not args.data_dir.is_dir():
        sys.exit(f"error: --data-dir {args.data_dir} does not exist; pass an ImageFolder root "
                 "(one sub-folder per class)")
    if args.out.exists() and any(args.out.iterdir()):
        if not args.overwrite:
            sys.exit(f"error: {args.out} already holds a checkpoint; pass --overwrite to replace it "
                     "or choose another --out")
        shutil.rmtree(args.out)
    try:
        card = train(args)
    except ValueError as e:  # e.g. an ImageFolder that is not one, or split fractions that leave nothing to train on
        sys.exit(f"error: {e}")
    print(json.dumps(dataclasses.asdict(card.metrics), indent=2))
    print(f"checkpoint: {args.out}/{STATE_DICT_FILE}, model card: {args.out}/{CARD_FILE}")


if __name__ == "__main__":
    main()
