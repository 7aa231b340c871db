"""Train a torchvision classifier on the bundled digits (or an ImageFolder) and evaluate it.

    python -m training.train --out artifacts/resnet18                       # resnet18 @ 224, digits
    python -m training.train --arch mobilenet_v3_small --out artifacts/mnv3
    python -m training.train --data-dir /path/to/imagefolder --out artifacts/mine
    python -m training.train --data-dir /path/to/imagefolder --out artifacts/mine --init-from resnet18.pth \
        --freeze-backbone                                                 # fine-tune from a local checkpoint
    python -m training.train --out artifacts/r18 --lr-schedule cosine --warmup-epochs 1 --augment trivial \
        --label-smoothing 0.1 --clip-grad-norm 2
    torchrun --standalone --nproc_per_node=2 -m training.train --out artifacts/ddp   # DDP (training/distributed.py)
    python -m training.train --out artifacts/resnet18 --resume      # continue an interrupted run (training/resume.py)

Writes OUT/model.pth (a state_dict, loads with weights_only=True), OUT/metadata.json
(the model card that travels into the .mar) and OUT/eval/test/{report.json,confusion_matrix.png}.
While it runs, OUT/train_state.pt holds what --resume needs after each finished epoch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
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
from training import distributed, golden, recipe, resume, transfer
from training.data import Splits, channel_stats, load_splits, loader
from training.evaluate import classification_metrics, predict, summary, write_report


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
    batch_size: int = 32  # per process under torchrun
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    augment: str = "affine"  # one of recipe.AUGMENTS
    lr_schedule: str = "onecycle"  # one of recipe.SCHEDULES
    warmup_epochs: float | None = None
    step_size: int = 3  # epochs between StepLR's drops
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    seed: int = 0
    use_bf16: bool = False
    progress: bool = True
    head: tuple[str, ...] = ()  # the classifier head's state_dict keys, when the backbone is treated apart
    freeze_backbone: bool = False
    backbone_lr_scale: float = 1.0


@dataclass
class FitResult:
    best_val: float
    best_epoch: int
    history: list[dict[str, float]]
    seconds: float


# loss(normalized inputs, float32 logits, labels, *extra batch fields) -> scalar; distillation swaps this.
LossFn = Callable[..., torch.Tensor]


def val_top1(model: torch.nn.Module, dataset: Dataset, mean: list[float], std: list[float],
             device: torch.device) -> float:
    """Top-1 on `dataset`; under torchrun each rank scores its share and the counts are summed."""
    logits, labels = predict(lambda x: model(x.to(device)).cpu(), distributed.shard(dataset), mean, std)
    correct, n = distributed.total(float((logits.argmax(1) == labels).sum()), float(len(labels)))
    return correct / n


def fit(model: torch.nn.Module, splits: Splits, mean: list[float], std: list[float], cfg: FitConfig,
        device: torch.device, loss_fn: LossFn | None = None, desc: str = "epoch",
        wrap_train: Callable[[Dataset], Dataset] | None = None, state: resume.EpochState | None = None) -> FitResult:
    """AdamW + the configured schedule on the training split; keeps (and loads back) the weights with the best val
    top-1. Under torchrun it trains through DistributedDataParallel on this rank's share of each epoch.

    `wrap_train` may wrap the (augmented) training set to yield extra fields after the label; they are
    passed on to `loss_fn` (distillation uses it to look up cached teacher logits by index).
    With `state`, everything needed to continue is saved after each epoch, and a saved state is continued from.
    """
    recipe.check(cfg.lr_schedule, cfg.epochs, cfg.warmup_epochs, cfg.step_size, cfg.gamma, cfg.clip_grad_norm,
                 cfg.label_smoothing)
    normalize = Normalizer(mean, std, device)
    if loss_fn is None:
        def loss_fn(_x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, *_extra: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)

    transform = recipe.augmentation(cfg.augment)
    train_set = recipe.Augmented(splits.train, transform) if transform else splits.train
    train_set = wrap_train(train_set) if wrap_train else train_set
    world, rank = distributed.world_size(), distributed.rank()
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    if sampler:
        train_loader = DataLoader(train_set, cfg.batch_size, sampler=sampler)
        torch.manual_seed(cfg.seed + rank)  # each rank its own augmentation draws; DDP starts all from rank 0's weights
    else:
        train_loader = loader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed)
    groups = transfer.param_groups(model, cfg.head, cfg.lr, cfg.backbone_lr_scale, cfg.freeze_backbone)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = recipe.lr_schedule(optimizer, cfg.lr_schedule, cfg.epochs, len(train_loader), cfg.warmup_epochs,
                                  cfg.step_size, cfg.gamma)
    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, -1, {})
    history: list[dict[str, float]] = []
    first, spent = 0, 0.0
    saved = state.load() if state else None
    if saved:  # before DDP wraps the model: it broadcasts rank 0's weights from then on
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        best = (saved["best_val"], saved["best_epoch"], saved["best_model"])
        history, first, spent = saved["history"], saved["epoch"], saved["seconds"]
        if sampler:  # only rank 0's random stream was saved: each rank draws afresh (not bit-identical)
            torch.manual_seed(cfg.seed + rank + world * first)
        else:
            torch.set_rng_state(saved["rng"])
            train_loader.generator.set_state(saved["shuffle"])
        print(f"resumed {state.path}: {resume.describe(saved)} done, best val {best[0]:.4f} at epoch {best[1]}",
              flush=True)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    started = time.perf_counter() - spent
    for epoch in range(first, cfg.epochs):
        if sampler:
            sampler.set_epoch(epoch)
        net.train()
        if cfg.freeze_backbone:
            transfer.freeze_norms(model)
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(train_loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stdout,
                   disable=not cfg.progress)
        for images, labels, *extra in bar:
            x, y = normalize(images), labels.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.use_bf16):
                logits = net(x)
            loss = loss_fn(x, logits.float(), y, *(e.to(device) for e in extra))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            optimizer.step()
            schedule.step()
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"training diverged (loss {loss.item()}) at epoch {epoch + 1}; lower --lr")
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        model.eval()
        distributed.sync_buffers(model)
        seen, correct, loss_sum = distributed.total(seen, correct, loss_sum)
        val = val_top1(model, splits.val, mean, std, device)
        history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 5),
                        "train_top1": round(correct / seen, 5), "val_top1": round(val, 5),
                        "lr": float(f"{optimizer.param_groups[-1]['lr']:.4g}")})
        print(f"{desc} {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f} train {correct / seen:.4f} "
              f"val {val:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
        if val >= best[0]:
            best = (val, epoch + 1, copy.deepcopy(model.state_dict()))
        if state and distributed.is_main():
            state.save(epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                       schedule=schedule.state_dict(), best_val=best[0], best_epoch=best[1], best_model=best[2],
                       history=history, seconds=time.perf_counter() - started, rng=torch.get_rng_state(),
                       shuffle=train_loader.generator.get_state() if train_loader.generator else None)
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(best[0], best[1], history, time.perf_counter() - started)


def train(args: argparse.Namespace) -> ModelCard | None:
    """Train, evaluate on the test split and write the model directory; under torchrun only rank 0 writes (and
    returns the card), the other ranks return None."""
    seed_everything(args.seed)
    device = distributed.local_device(args.device)
    spec = DataSpec(
        source=str(args.data_dir) if args.data_dir else "digits",
        seed=args.seed,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    splits = load_splits(spec, args.input_size, strict=args.strict, progress=args.progress)
    mean, std = channel_stats(splits.train)
    distributed.check_same("the data (fingerprint, channel mean/std)", (splits.fingerprint, mean, std))
    num_classes = len(splits.labels)
    print(f"data: {spec.source} {splits.sizes}, {num_classes} classes, fingerprint {splits.fingerprint[:12]}")
    if splits.scan_report:
        print(splits.scan_report)

    model = build_model(args.arch, num_classes, args.input_size)
    init = None
    if args.init_from is not None:
        init = transfer.initialize(model, args.init_from, args.arch,
                                   lambda n: build_model(args.arch, n, args.input_size), num_classes)
        print(f"init: {init.checkpoint} (sha256 {init.sha256[:12]}), head {', '.join(init.head)} "
              f"{'reinitialised' if init.reinitialized else 'loaded'}"
              f"{', backbone frozen' if args.freeze_backbone else ''}")
    recipe.short_run_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and bf16_autocast_helps(device))
    print(f"model: {args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"input {args.input_size}, autocast {'bf16' if use_bf16 else 'off'}, channels_last, device {device}")
    cfg = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                    label_smoothing=args.label_smoothing, augment=args.augment, lr_schedule=args.lr_schedule,
                    warmup_epochs=args.warmup_epochs, step_size=args.step_size, gamma=args.gamma,
                    clip_grad_norm=args.clip_grad_norm, seed=args.seed, use_bf16=use_bf16, progress=args.progress,
                    head=init.head if init else (), freeze_backbone=args.freeze_backbone,
                    backbone_lr_scale=args.backbone_lr_scale)
    state = resume.EpochState(args.out, resume_key(args, splits.fingerprint))
    fitted = fit(model, splits, mean, std, cfg, device, state=state)
    if not distributed.is_main():
        return None
    best = (fitted.best_val, fitted.best_epoch, model.state_dict())
    history, seconds = fitted.history, fitted.seconds

    cpu_state = {k: v.cpu() for k, v in best[2].items()}
    test_logits, test_labels = predict(lambda x: model(x.to(device)).cpu(), splits.test, mean, std)
    result = classification_metrics(test_logits, test_labels, splits.labels)

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
            "lr_schedule": recipe.describe(cfg.lr_schedule, cfg.epochs, cfg.warmup_epochs, cfg.step_size, cfg.gamma),
            "augment": repr(recipe.augmentation(cfg.augment)),
            "world_size": distributed.world_size(),
            **({"backend": distributed.backend(), "global_batch_size": cfg.batch_size * distributed.world_size()}
               if distributed.world_size() > 1 else {}),
            **({"init": init.record(cfg.freeze_backbone, cfg.backbone_lr_scale)} if init else {}),
            "history": history,
        },
        git_commit=git_commit(),
        metrics=Metrics(test=summary(result), val_top1=round(best[0], 6)),
    )
    card.write(out)
    golden.write(out)  # the held-out sample build_mar.sh packs, with each artifact's predictions, for the canary
    state.finish()
    title = f"{args.arch} fp32 - test top-1 {100 * result['top1']:.2f}%"
    write_report(out / "eval" / "test", result, splits.labels, title)
    return card


def resume_key(args: argparse.Namespace, fingerprint: str) -> dict[str, object]:
    """What a resumed run must share with the one it continues: every option that shapes training, and the data."""
    cosmetic = {"out", "progress", "resume", "overwrite", "name", "version", "device", "strict"}
    key = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in cosmetic}
    return {**key, "data": fingerprint, "world_size": distributed.world_size()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    ap.add_argument("--arch", default="resnet18", help="torchvision model name (default resnet18)")
    ap.add_argument("--data-dir", type=Path, default=None, help="ImageFolder root; default: bundled digits")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32, help="per process under torchrun (default 32)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--lr-schedule", choices=recipe.SCHEDULES, default="onecycle",
                    help="onecycle (default), cosine (after --warmup-epochs) or step (x --gamma every --step-size "
                         "epochs)")
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="cosine and step: linear warm-up length (default none; onecycle has its own)")
    ap.add_argument("--step-size", type=int, default=3, help="step schedule: epochs between drops (default 3)")
    ap.add_argument("--gamma", type=float, default=0.1, help="step schedule: factor per drop (default 0.1)")
    ap.add_argument("--clip-grad-norm", type=float, default=None, help="clip the gradients' total L2 norm to this")
    ap.add_argument("--augment", choices=recipe.AUGMENTS, default="affine",
                    help="affine jitter (default), TrivialAugmentWide, RandAugment or none")
    ap.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="same as --augment none")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from a local checkpoint: a state_dict .pth (e.g. torchvision weights) or a model "
                         "directory of the same --arch; the classifier head is replaced for the new labels")
    ap.add_argument("--freeze-backbone", action="store_true", help="with --init-from: train only the head")
    ap.add_argument("--backbone-lr-scale", type=float, default=1.0,
                    help="with --init-from: the backbone's learning rate is --lr times this (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.15)
    ap.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto",
                    help="bf16 autocast; auto enables it where the hardware has bf16 units")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="digits", help="model name used for serving")
    ap.add_argument("--version", default="1.0", help="model version recorded in metadata")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--resume", action="store_true",
                    help=f"continue an interrupted run in --out from its last finished epoch ({resume.STATE_FILE}); "
                         "starts afresh when --out does not exist yet")
    ap.add_argument("--strict", action="store_true",
                    help="stop when an image of --data-dir cannot be decoded (default: skip it and list it)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Refuse option combinations that cannot work, before any data is read."""
    if args.arch not in architectures():
        raise ValueError(f"unknown architecture {args.arch!r}; choose a torchvision classification model "
                         "such as resnet18, mobilenet_v3_small or resnet50")
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {args.data_dir} does not exist; pass an ImageFolder root "
                         "(one sub-folder per class)")
    if args.init_from is None and (args.freeze_backbone or args.backbone_lr_scale != 1.0):
        raise ValueError("--freeze-backbone and --backbone-lr-scale need --init-from (a backbone worth keeping)")
    if args.init_from is not None:  # a missing or mismatched checkpoint fails before any data is read
        transfer.resolve(args.init_from, args.arch)
    if args.backbone_lr_scale <= 0:
        raise ValueError(f"--backbone-lr-scale must be positive, got {args.backbone_lr_scale}; "
                         "use --freeze-backbone to keep the backbone fixed")
    recipe.check(args.lr_schedule, args.epochs, args.warmup_epochs, args.step_size, args.gamma, args.clip_grad_norm,
                 args.label_smoothing)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues what is in --out and --overwrite deletes it; choose one")


def out_dir_problem(out: Path, resuming: bool) -> str | None:
    """Why --out cannot be trained into as asked, or None."""
    if not out.exists() or not any(out.iterdir()):
        return None
    interrupted = (out / resume.STATE_FILE).exists()
    if resuming and interrupted:
        return None
    if interrupted:
        return (f"{out} holds an interrupted training run ({resume.STATE_FILE}); pass --resume to continue it "
                "or --overwrite to start over")
    if resuming:
        return (f"{out} holds no interrupted run to resume (no {resume.STATE_FILE}"
                f"{'; its training finished' if (out / CARD_FILE).exists() else ''}); pass --overwrite to retrain "
                "or choose another --out")
    return f"{out} already holds a checkpoint; pass --overwrite to replace it or choose another --out"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        check_args(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    distributed.start(args.device)
    try:
        if distributed.is_main():
            if args.overwrite and args.out.exists():
                shutil.rmtree(args.out)
            elif problem := out_dir_problem(args.out, args.resume):
                sys.exit(f"error: {problem}")
        else:  # only rank 0 reports; the other ranks' progress would interleave with it
            args.progress = False
            sys.stdout = open(os.devnull, "w")  # for the life of the process
        distributed.barrier()
        try:
            card = train(args)
        except (ValueError, FileNotFoundError) as e:  # an ImageFolder that is not one, a checkpoint that does not fit
            sys.exit(f"error: {e}")
    finally:
        distributed.stop()
    if card is not None:
        print(json.dumps(dataclasses.asdict(card.metrics), indent=2))
        print(f"checkpoint: {args.out}/{STATE_DICT_FILE}, model card: {args.out}/{CARD_FILE}")


if __name__ == "__main__":
    main()
