"""Benchmark inputs: held-out digits as 224x224 JPEGs, and scikit-learn's two sample photos at 640x427.

    python -m benchmarks.inputs OUT_DIR [--model artifacts/resnet18] [--limit 64]

The digits are the test split of the model's own data spec (rebuilt and fingerprint-checked),
so no benchmark image was seen in training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import encode_jpeg

from handlers.contract import ModelCard
from handlers.deprecations import known_deprecations
from training.evaluate import splits_for

DIGIT_SIZE = 224
JPEG_QUALITY = 90


@dataclass
class InputSet:
    name: str  # "digits" | "photos"
    files: list[Path]
    list_file: Path  # one path per line, for wrk.lua
    description: str

    def bodies(self) -> list[bytes]:
        return [p.read_bytes() for p in self.files]


def jpeg(image: torch.Tensor) -> bytes:
    with known_deprecations():
        return encode_jpeg(image.contiguous(), quality=JPEG_QUALITY).numpy().tobytes()


def write_set(out: Path, name: str, blobs: list[bytes], description: str) -> InputSet:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, blob in enumerate(blobs):
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(blob)
        files.append(path)
    list_file = out / f"{name}.txt"
    list_file.write_text("".join(f"{p}\n" for p in files))
    return InputSet(name, files, list_file, description)


def digits(model_dir: Path, out: Path, limit: int | None = None) -> InputSet:
    """The model's held-out test digits, re-rendered at 224x224 and JPEG-encoded."""
    card = ModelCard.read(model_dir)
    if card.data is None or card.data.spec.source != "digits":
        raise ValueError(f"{model_dir} was not trained on the bundled digits")
    splits = splits_for(card, DIGIT_SIZE)
    n = len(splits.test) if limit is None else min(limit, len(splits.test))
    blobs = [jpeg(splits.test[i][0]) for i in range(n)]
    return write_set(out, "digits", blobs, f"{n} held-out test digits, {DIGIT_SIZE}x{DIGIT_SIZE} JPEG q{JPEG_QUALITY}")


def photos(out: Path) -> InputSet:
    """china.jpg and flower.jpg from sklearn.datasets.load_sample_images, at native 640x427."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    blobs = [jpeg(torch.from_numpy(np.array(im, copy=True)).permute(2, 0, 1)) for im in images]
    h, w = images[0].shape[:2]
    return write_set(out, "photos", blobs, f"scikit-learn sample photos china.jpg, flower.jpg, {w}x{h} JPEG")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", type=Path, default=Path("artifacts/resnet18"))
    ap.add_argument("--limit", type=int, default=None, help="at most this many digits")
    args = ap.parse_args()
    for s in (digits(args.model, args.out, args.limit), photos(args.out)):
        print(f"{s.name}: {s.description} -> {s.list_file}")


if __name__ == "__main__":
    main()
