"""Sample a model's golden set: a stratified sample of the test split it was trained with, as PNGs with labels.

    python -m training.golden artifacts/resnet18 [--size 200]     # writes artifacts/resnet18/held_out.json

training.train writes it beside every model it trains; build_mar.sh (packager.golden) adds what the packed
artifact predicts for each image, the build-time accuracy the served model must reproduce. Run it by hand only
for a model directory trained before this file existed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from handlers.contract import HELD_OUT_FILE, ModelCard
from training.evaluate import splits_for

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


def sample(model_dir: Path, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    """A stratified sample of the test split `model_dir` was trained with, as PNGs with their labels."""
    card = ModelCard.read(model_dir)
    splits = splits_for(card)
    assert card.data is not None  # splits_for refuses a card without data
    chosen = sample_indices(dataset_labels(splits.test), size, card.data.spec.seed)
    items = []
    for i in chosen.tolist():
        image, label = splits.test[i]
        items.append({"label": card.labels[int(label)], "png": base64.b64encode(encode_png(image)).decode()})
    return {"source": f"test split of {card.data.spec.source}, stratified sample",
            "fingerprint": card.data.fingerprint, "indices": chosen.tolist(), "items": items}


def write(model_dir: Path, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    card = ModelCard.read(model_dir)
    if card.task == "detection":  # its test split is rebuilt by training.detect, which imports this module
        from training import detect
        from training.detection_data import test_samples

        return detect.write_held_out(Path(model_dir), test_samples(card), card.labels,
                                     card.details["dataset"]["fingerprint"])
    if card.task == "text":  # likewise training.text and its splits
        from training import text
        from training.text_data import from_record

        return text.write_held_out(Path(model_dir), from_record(card.details["dataset"]), size)
    held_out = sample(model_dir, size)
    (Path(model_dir) / HELD_OUT_FILE).write_text(json.dumps(held_out, separators=(",", ":")) + "\n")
    return held_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE)
    args = ap.parse_args()
    try:
        held_out = write(args.model_dir, args.size)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.model_dir / HELD_OUT_FILE}: {len(held_out['items'])} images")


if __name__ == "__main__":
    main()
