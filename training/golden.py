"""Build a model's golden set: a stratified sample of the test split it was trained with, and what its own
artifact predicts for each image (the build-time accuracy the served model must reproduce).

    python -m training.golden artifacts/resnet18 OUT_DIR [--size 200]     # writes OUT_DIR/golden.json

build_mar.sh runs it while staging an image model trained here (packager.stage); packager.golden reads it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset

from handlers.contract import GOLDEN_FILE, ModelCard
from handlers.runtimes import load_model
from training.evaluate import predict, splits_for

DEFAULT_SIZE = 200


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG bytes; grey images (equal channels) as 8-bit grey, which decodes to the same RGB."""
    array = image.permute(1, 2, 0).contiguous().numpy()
    grey = bool((array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all())
    pil = Image.fromarray(array[..., 0], mode="L") if grey else Image.fromarray(array, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sample_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified sample of `size` items (all of them when the split is smaller)."""
    idx = np.arange(len(labels))
    if size >= len(labels):
        return idx
    # Stratifying needs at least one item per class in the sample; fall back to a plain sample otherwise.
    classes = len(np.unique(labels))
    stratify = labels if size >= classes else None
    chosen, _ = train_test_split(idx, train_size=size, stratify=stratify, random_state=seed)
    return np.sort(chosen)


def dataset_labels(ds: Dataset) -> np.ndarray:
    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.array([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def build(model_dir: Path, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    """The golden set for `model_dir`, with the accuracy its own artifact scores on exactly these images."""
    card = ModelCard.read(model_dir)
    splits = splits_for(card)
    assert card.data is not None  # splits_for refuses a card without data
    chosen = sample_indices(dataset_labels(splits.test), size, card.data.spec.seed)
    subset = Subset(splits.test, chosen.tolist())
    model = load_model(model_dir, card, repeatable=True)
    logits, labels = predict(model, subset, card.input.mean, card.input.std)
    preds = logits.argmax(1)
    top1 = float((preds == labels).float().mean())
    items = []
    for i in range(len(subset)):
        image, label = subset[i]
        # build_label: what the artifact predicted offline, so any subset's build-time accuracy is exact.
        items.append({"label": card.labels[int(label)], "build_label": card.labels[int(preds[i])],
                      "png": base64.b64encode(encode_png(image)).decode()})
    return {
        "source": f"test split of {card.data.spec.source}, stratified sample",
        "fingerprint": card.data.fingerprint,
        "indices": chosen.tolist(),
        "n": len(items),
        "build_top1": round(top1, 6),
        "artifact": card.artifact,
        "variant": card.variant,
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "items": items,
    }


def write(model_dir: Path, out_dir: Path, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    golden = build(model_dir, size)
    (out_dir / GOLDEN_FILE).write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    return golden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = ap.parse_args()
    try:
        g = write(args.model_dir, args.out_dir, args.size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir / GOLDEN_FILE}: {g['n']} images, build-time top-1 {100 * g['build_top1']:.2f}%")


if __name__ == "__main__":
    main()
