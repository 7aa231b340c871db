"""Train a torchvision detector by name from scratch (nothing downloads), evaluate it with COCO mAP, and export
a TorchScript variant checked box for box against it.

    python -m training.detect --out artifacts/detector                                  # digits on real photos
    python -m training.detect --out artifacts/ssd --arch ssdlite320_mobilenet_v3_large
    python -m training.detect --out artifacts/mine --data-dir my_coco_or_voc_root      # train/, val/, test/ inside
    python -m training.detect --out artifacts/detector --init-from artifacts/mobilenet  # backbone from a classifier
    ./build_mar.sh artifacts/detector/variants/torchscript --name detector               # gate (mAP) + archive

Writes OUT/model.pth (state_dict), OUT/metadata.json (task detection, labels with the background first, test
mAP@[.5:.95], mAP@.5 and AP per class), OUT/eval/test/detections.png, and OUT/variants/torchscript.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from handlers.contract import (
    HELD_OUT_FILE,
    STATE_DICT_FILE,
    InputContract,
    Metrics,
    ModelCard,
    Recipe,
    git_commit,
)
from handlers.loading import build_model, detectors, load_state_dict
from training import detection_variants
from training.detection_data import BACKGROUND, DIGITS, Sample, fingerprint, read_folder, synthesize
from training.detection_eval import coco_metrics, plot, predict, summary
from training.golden import encode_png
from training.recipe import short_run_batchnorm
from training.variant_report import BASELINE


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[Sample]], list[str]]:
    """train/val/test samples and the labels (background first): a user's folders, or digits on photos."""
    if args.data_dir is not None:
        splits, labels = {}, None
        for split in ("train", "val", "test"):
            splits[split], found = read_folder(args.data_dir / split)
            if labels is not None and found != labels:
                sys.exit(f"error: {args.data_dir / split} has labels {found[1:]}, train has {labels[1:]}; every "
                         "split needs the same categories")
            labels = found
        return splits, labels  # type: ignore[return-value]
    n = args.images
    return ({split: synthesize(split, count, args.image_size, args.seed)
             for split, count in (("train", n), ("val", max(8, n // 5)), ("test", max(8, n // 5)))},
            [BACKGROUND, *DIGITS])


def init_backbone(model: torch.nn.Module, classifier_dir: Path) -> int:
    """Copy a classifier's `features.*` weights (a torchvision MobileNet, say, trained here) into the detector's
    backbone where names and shapes match; returns how many tensors were copied."""
    state = {k: v for k, v in load_state_dict(classifier_dir / STATE_DICT_FILE).items() if k.startswith("features.")}
    own = model.state_dict()
    copied = {}
    for key, value in state.items():
        target = "backbone.body." + key.removeprefix("features.")
        if target in own and own[target].shape == value.shape:
            copied[target] = value
    if not copied:  # SSDlite regroups the same layers (features.0 up to its first head, features.1 after): in order
        # while the shapes agree, up to the tail it narrows
        theirs = [k for k in own if k.startswith("backbone.features.")]
        for value, target in zip(state.values(), theirs, strict=False):
            if own[target].shape != value.shape:
                break
            copied[target] = value
    if not copied:
        sys.exit(f"error: no weights of {classifier_dir} fit the detector's backbone; --init-from takes a "
                 "classifier of the detector's backbone family (e.g. mobilenet_v3_large)")
    model.load_state_dict(copied, strict=False)
    return len(copied)


def fit(model: torch.nn.Module, train: list[Sample], val: list[Sample], labels: list[str],
        args: argparse.Namespace) -> list[dict[str, float]]:
    """SGD with momentum and a cosine schedule after a linear warm-up; val mAP after each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    warmup = min(100, steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total, started = 0.0, time.perf_counter()
        batches = range(0, len(order), args.batch_size)
        for i in tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not args.progress, leave=False):
            chunk = [train[j] for j in order[i:i + args.batch_size]]
            losses = model([s.image.float() / 255 for s in chunk],
                           [{"boxes": s.boxes, "labels": s.labels} for s in chunk])
            loss = sum(losses.values())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            opt.step()
            schedule.step()
            total += loss.item() * len(chunk)
        model.eval()
        val_map = coco_metrics(predict(model, val), val, labels)["map"]
        history.append({"epoch": epoch + 1, "loss": round(total / len(train), 4), "val_map": val_map,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {history[-1]['loss']:.4f}, val mAP {val_map:.4f} "
              f"({history[-1]['seconds']} s)", flush=True)
    return history


def write_held_out(out: Path, test: list[Sample], labels: list[str], data_fingerprint: str, size: int = 50
                   ) -> dict[str, Any]:
    """OUT/held_out.json: the first `size` test images with their true boxes, the golden set build_mar.sh packs
    (packager.golden adds what the packed detector finds in each, for the canary)."""
    items = [{"png": base64.b64encode(encode_png(s.image)).decode(), "boxes": s.boxes.tolist(),
              "labels": [labels[int(k)] for k in s.labels]} for s in test[:size]]
    sample = {"task": "detection", "source": "test split, first images", "fingerprint": data_fingerprint,
              "indices": list(range(len(items))), "items": items}
    (out / HELD_OUT_FILE).write_text(json.dumps(sample, separators=(",", ":")) + "\n")
    return sample


def train(args: argparse.Namespace) -> ModelCard:
    torch.manual_seed(args.seed)
    splits, labels = load_splits(args)
    sizes = {k: len(v) for k, v in splits.items()}
    print(f"data: {sizes} images, {len(labels) - 1} classes, "
          f"{sum(len(s.labels) for s in splits['train'])} training boxes", flush=True)
    model = build_model(args.arch, len(labels))
    init = init_backbone(model, args.init_from) if args.init_from else 0
    short_run_batchnorm(model)
    if hasattr(model, "roi_heads"):  # two-stage: 512 sampled regions per image suit COCO's crowded images; with 1-4
        # objects here nearly all are background, the classifier learns "background", and each step costs 4x more
        model.roi_heads.fg_bg_sampler.batch_size_per_image = args.rois_per_image
    if init:
        print(f"init: {init} backbone tensors from {args.init_from}")
    started = time.perf_counter()
    history = fit(model, splits["train"], splits["val"], labels, args)
    seconds = time.perf_counter() - started
    test = splits["test"]
    eager = predict(model, test)
    metrics = coco_metrics(eager, test, labels)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / STATE_DICT_FILE)
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if v is not None}
    card = ModelCard(
        name=args.name, version=args.version, architecture=args.arch, labels=labels, task="detection",
        input=InputContract(shape=[3, args.image_size, args.image_size]), variant="fp32", runtime="eager",
        artifact=STATE_DICT_FILE, checkpoint=STATE_DICT_FILE, recipe=Recipe("train", recipe),
        training={"seconds": round(seconds, 1), "torch": torch.__version__, "history": history,
                  **({"init": {"from": str(args.init_from), "tensors": init}} if init else {})},
        details={"dataset": {"source": str(args.data_dir or "digits-on-photos"), "sizes": sizes,
                             "fingerprint": fingerprint([s for split in splits.values() for s in split])}},
        metrics=Metrics(test=summary(metrics)), git_commit=git_commit())
    card.write(out)
    write_held_out(out, test, labels, card.details["dataset"]["fingerprint"])
    plot(test, eager, labels, out / "eval" / "test" / "detections.png")
    (out / "eval" / "test" / "report.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"test: mAP {metrics['map']:.4f}, mAP@.5 {metrics['map50']:.4f} on {len(test)} images -> {out}")
    variant = detection_variants.export(out, BASELINE, model, test, {})
    print(f"torchscript: mAP {variant.test.map:.4f}, boxes {variant.export['parity']} -> "
          f"{out / 'variants' / 'torchscript'}")
    print(f"optimize it: python -m training.detection_variants {out}")
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="fasterrcnn_mobilenet_v3_large_320_fpn", choices=detectors(),
                    metavar="ARCH", help="a torchvision detector (default fasterrcnn_mobilenet_v3_large_320_fpn)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="a folder with train/, val/ and test/, each COCO or Pascal VOC (default: digits on photos)")
    ap.add_argument("--images", type=int, default=600, help="digits on photos: training images (val, test: a fifth)")
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--rois-per-image", type=int, default=64,
                    help="two-stage detectors: regions sampled per training image (torchvision: 512)")
    ap.add_argument("--init-from", type=Path, default=None, help="a classifier directory trained here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="detector")
    ap.add_argument("--version", default="1.0")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for name in ("images", "image_size", "epochs", "batch_size", "rois_per_image", "lr"):
        if getattr(args, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
