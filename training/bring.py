"""Bring a classifier trained elsewhere: a torchvision state_dict (with --arch), a TorchScript file or an ONNX file,
with its labels, input size and normalisation, becomes a model directory with a model card. build_mar.sh and the
rollout then take it as they take a model trained here.

    python -m training.bring --weights theirs.pth --arch resnet18 --labels labels.txt --input-size 224 \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --eval-dir held_out/ --out artifacts/theirs
    python -m training.bring --torchscript theirs.pt --labels labels.txt --input-size 224 --out artifacts/theirs
    python -m training.bring --onnx theirs.onnx --labels labels.txt --input-size 224 --out artifacts/theirs
    ./build_mar.sh artifacts/theirs --name theirs

--labels is a text file with one class name per line, in the order of the model's outputs. --eval-dir is a folder
with one sub-folder per class (named as in --labels) of held-out images: the model is scored on it, and the
figures go in the card, where the accuracy gate and the canary read them. --mean/--std are what the model was
trained with, in [0, 1] units (default: ImageNet's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

from handlers.contract import (
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    InputContract,
    Metrics,
    ModelCard,
    Recipe,
    git_commit,
    sha256,
)
from handlers.loading import load_state_dict, model_from_state_dict
from handlers.runtimes import load_model
from training.data import IMAGE_SUFFIXES, FolderImages
from training.evaluate import evaluate_artifact, summary

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ONNX_FILE = "model.onnx"


def read_labels(path: Path) -> list[str]:
    labels = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path} must list each class name once, one per line, in the model's output order")
    return labels


def held_out(folder: Path, labels: list[str], size: int) -> FolderImages:
    """A folder of class sub-folders named as the labels -> the images and their label indices."""
    paths, targets = [], []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        if sub.name not in labels:
            raise ValueError(f"{sub} is not one of the labels ({', '.join(labels[:10])}...); name each held-out "
                             "class folder exactly as its line in --labels")
        for f in sorted(sub.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                targets.append(labels.index(sub.name))
    if not paths:
        raise ValueError(f"{folder} holds no images in class sub-folders")
    return FolderImages(paths, targets, size)


def bring(args: argparse.Namespace) -> ModelCard:
    labels = read_labels(args.labels)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.weights:
        if not args.arch:
            raise ValueError("--weights needs --arch, the torchvision architecture the state_dict is for")
        # Another architecture fails here; a wrong class count, at the output check below.
        model_from_state_dict(args.arch, len(labels), load_state_dict(args.weights))
        source, runtime, artifact, arch = args.weights, "eager", STATE_DICT_FILE, args.arch
    elif args.torchscript:
        source, runtime, artifact, arch = args.torchscript, "torchscript", TORCHSCRIPT_FILE, "imported-torchscript"
    else:
        source, runtime, artifact, arch = args.onnx, "onnxruntime", ONNX_FILE, "imported-onnx"
    shutil.copy2(source, out / artifact)
    card = ModelCard(
        name=args.name, version=args.version, architecture=arch, labels=labels,
        input=InputContract(shape=[3, args.input_size, args.input_size], mean=args.mean, std=args.std),
        variant="fp32", runtime=runtime, artifact=artifact, checkpoint=STATE_DICT_FILE if args.weights else None,
        cpu_only=runtime == "onnxruntime",
        recipe=Recipe("import", {"source": str(Path(source).resolve()), "sha256": sha256(source)}),
        git_commit=git_commit())
    outputs = load_model(out, card)(torch.zeros(2, 3, args.input_size, args.input_size))
    if tuple(outputs.shape) != (2, len(labels)):
        raise ValueError(f"the model answers shape {list(outputs.shape)} for a batch of 2, but {args.labels} lists "
                         f"{len(labels)} labels; it must answer [batch, {len(labels)}] logits")
    if args.eval_dir:
        result = evaluate_artifact(out, card, held_out(args.eval_dir, labels, args.input_size))
        card = card.replace(metrics=Metrics(test=summary(result)),
                            details={"held_out": str(Path(args.eval_dir).resolve())})
    card.write(out)
    return card


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="a torchvision state_dict (torch.save(model.state_dict()))")
    source.add_argument("--torchscript", type=Path, help="a TorchScript file (torch.jit.save)")
    source.add_argument("--onnx", type=Path, help="an ONNX file with one input [batch, 3, S, S]")
    ap.add_argument("--arch", help="with --weights: the torchvision architecture, e.g. resnet18")
    ap.add_argument("--labels", type=Path, required=True, help="one class name per line, in output order")
    ap.add_argument("--input-size", type=int, required=True, help="the side S of the square input the model takes")
    ap.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    ap.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    ap.add_argument("--eval-dir", type=Path, help="held-out images, one sub-folder per class")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", default="imported", help="the model name to serve under")
    ap.add_argument("--version", default="1.0")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        card = bring(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if card.metrics.test is None:
        print("note: no held-out evaluation; the archive can be built and served, but the accuracy gate cannot "
              "compare optimized variants and the canary has no figure. Add --eval-dir FOLDER (one sub-folder of "
              "held-out images per label) to score it.")
    else:
        print(json.dumps(dataclasses.asdict(card.test)))
    print(f"model card: {args.out / 'metadata.json'}; next: ./build_mar.sh {args.out} --name {card.name}")


if __name__ == "__main__":
    main()
