"""Bring a classifier trained elsewhere: a torchvision state_dict (with --arch), a TorchScript file or an ONNX file,
with its labels, input size and normalisation, or a Hugging Face text classifier directory, becomes a model
directory with a model card. build_mar.sh and the rollout then take it as they take a model trained here.

    python -m training.bring --weights theirs.pth --arch resnet18 --labels labels.txt --input-size 224 \\
        --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --eval-dir held_out/ --out artifacts/theirs
    python -m training.bring --torchscript theirs.pt --labels labels.txt --input-size 224 --out artifacts/theirs
    python -m training.bring --onnx theirs.onnx --labels labels.txt --input-size 224 --out artifacts/theirs
    python -m training.bring --hf-dir their_bert/ --eval-dir held_out.jsonl --out artifacts/theirs_text
    ./build_mar.sh artifacts/theirs --name theirs

--labels is a text file with one class name per line, in the order of the model's outputs. --eval-dir is a folder
with one sub-folder per class (named as in --labels) of held-out images: the model is scored on it, and the
figures go in the card, where the accuracy gate and the canary read them. --mean/--std are what the model was
trained with, in [0, 1] units (default: ImageNet's).

--hf-dir is a directory transformers' AutoModelForSequenceClassification loads (config.json with id2label,
model.safetensors) with its tokenizer.json; the labels come from config.json. It is exported to the TorchScript the
text task serves (token ids in, logits out) and checked against the Hugging Face model. Its --eval-dir is a CSV or
JSONL of text,label, or a folder per class of .txt files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from handlers.contract import (
    STATE_DICT_FILE,
    TOKENIZER_FILE,
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


PARITY_TEXTS = ["Hello, how are you?", "The weather is nice today.", "¿Dónde está la estación?", "Merci beaucoup.",
                "これはテストです。", "1234 5678"]  # for the export check when no held-out texts are given


def bring_text(args: argparse.Namespace) -> ModelCard:
    """A Hugging Face sequence classifier directory -> OUT: its files, the TorchScript of ids -> logits, the card."""
    from transformers import AutoConfig

    from training.text_data import Example
    from training.text_variants import HF_WEIGHTS, encoded, examples_in, export, hf_classifier, score

    source: Path = args.hf_dir
    for name in ("config.json", HF_WEIGHTS, TOKENIZER_FILE):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source / name} not found; --hf-dir takes a directory saved with "
                                    "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) (a fast tokenizer)")
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    labels = [config.id2label[i] for i in range(config.num_labels)]
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_FILE))
    max_tokens = args.max_tokens or min(512, int(getattr(config, "max_position_embeddings", 512)))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", HF_WEIGHTS):
        shutil.copy2(source / name, out / name)
    # The handler pads each batch with the id the model masks; many saved tokenizers set no padding.
    tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
    tokenizer.enable_truncation(max_tokens)
    tokenizer.save(str(out / TOKENIZER_FILE))
    card = ModelCard(
        name=args.name, version=args.version, architecture=(config.architectures or [type(config).__name__])[0],
        labels=labels, task="text", input=InputContract(shape=[max_tokens]), variant="fp32", runtime="torchscript",
        artifact=TORCHSCRIPT_FILE,
        recipe=Recipe("import", {"source": str(source.resolve()), "sha256": sha256(source / HF_WEIGHTS)}),
        details={"tokenizer": {"file": TOKENIZER_FILE, "pad_id": pad_id, "max_tokens": max_tokens},
                 "hugging_face": {"files": ["config.json", HF_WEIGHTS, TOKENIZER_FILE]}},
        git_commit=git_commit())
    examples = examples_in(args.eval_dir, labels) if args.eval_dir else [Example(text, 0) for text in PARITY_TEXTS]
    items, _ = encoded(out, card, examples)
    card, logits = export(out, out, hf_classifier(out, pad_id), card, items, pad_id)
    if args.eval_dir:
        test = score(logits, examples, card, out, f"{card.architecture} (imported)")
        card = card.replace(metrics=Metrics(test=test), details={**(card.details or {}),
                                                                  "held_out": str(Path(args.eval_dir).resolve())})
    card.write(out)
    return card


def bring(args: argparse.Namespace) -> ModelCard:
    if args.hf_dir:
        return bring_text(args)
    if args.labels is None or args.input_size is None:
        raise ValueError("--labels and --input-size are needed with --weights, --torchscript or --onnx")
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
    source.add_argument("--hf-dir", type=Path, help="a Hugging Face sequence classifier directory (config.json, "
                        "model.safetensors, tokenizer.json)")
    ap.add_argument("--arch", help="with --weights: the torchvision architecture, e.g. resnet18")
    ap.add_argument("--labels", type=Path, help="one class name per line, in output order (images)")
    ap.add_argument("--input-size", type=int, help="the side S of the square input the model takes (images)")
    ap.add_argument("--max-tokens", type=int, help="--hf-dir: the most tokens per text (default: the model's "
                    "max_position_embeddings, at most 512)")
    ap.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN)
    ap.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD)
    ap.add_argument("--eval-dir", type=Path, help="held-out images, one sub-folder per class; with --hf-dir, "
                    "held-out texts: a .csv or .jsonl of text,label, or a folder per class of .txt files")
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
              "compare optimized variants and the canary has no figure. Add --eval-dir (images: one sub-folder "
              "per label; texts: a .csv or .jsonl of text,label) to score it.")
    else:
        print(json.dumps(dataclasses.asdict(card.test)))
    print(f"model card: {args.out / 'metadata.json'}; next: ./build_mar.sh {args.out} --name {card.name}")


if __name__ == "__main__":
    main()
