"""Datasets: scikit-learn's bundled digits rendered as RGB images, or a user ImageFolder.

Every split is deterministic (seeded, stratified) and fingerprinted, so a model card
can say exactly which images a figure was measured on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from handlers.contract import DataSpec
from handlers.imaging import decode_image, resize_batch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def render_digits(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """8x8 digit intensities (0..16) -> uint8 RGB images [N, 3, size, size]."""
    x = pixels.float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


class DigitImages(Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, size: int) -> None:
        self.pixels = torch.from_numpy(pixels.astype(np.uint8))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return render_digits(self.pixels[i : i + 1], self.size)[0], int(self.labels[i])


class FolderImages(Dataset):
    def __init__(self, paths: list[Path], labels: list[int], size: int) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.paths[i].read_bytes())
        return resize_batch([image], self.size)[0], int(self.labels[i])


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    labels: list[str]
    fingerprint: str
    spec: DataSpec
    input_size: int

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def _split_indices(labels: np.ndarray, spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(len(labels))
    rest, test = train_test_split(
        idx, test_size=spec.test_fraction, stratify=labels, random_state=spec.seed
    )
    val_share = spec.val_fraction / (1.0 - spec.test_fraction)
    train, val = train_test_split(
        rest, test_size=val_share, stratify=labels[rest], random_state=spec.seed
    )
    return np.sort(train), np.sort(val), np.sort(test)


def _fingerprint(content: hashlib._Hash, *splits: np.ndarray) -> str:
    for s in splits:
        content.update(s.astype(np.int64).tobytes())
    return content.hexdigest()


def _scan_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; pass an ImageFolder root (one sub-folder per class)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for k, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(k)
    if len(classes) < 2 or not paths:
        raise ValueError(
            f"{root} is not an ImageFolder: expected at least two class sub-folders holding images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return paths, np.array(labels), classes


def load_splits(spec: DataSpec, input_size: int) -> Splits:
    """Build train/val/test from the spec, as images of `input_size`. The same spec always gives the same splits
    (and the same fingerprint) at any input size."""
    if spec.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = digits.images.astype(np.uint8)
        labels = digits.target.astype(np.int64)
        tr, va, te = _split_indices(labels, spec)
        h = hashlib.sha256(b"sklearn-digits")
        h.update(pixels.tobytes())
        h.update(labels.tobytes())
        return Splits(
            train=DigitImages(pixels[tr], labels[tr], input_size),
            val=DigitImages(pixels[va], labels[va], input_size),
            test=DigitImages(pixels[te], labels[te], input_size),
            labels=[str(int(c)) for c in digits.target_names],
            fingerprint=_fingerprint(h, tr, va, te),
            spec=spec,
            input_size=input_size,
        )

    root = Path(spec.source)
    paths, labels, classes = _scan_folder(root)
    tr, va, te = _split_indices(labels, spec)
    h = hashlib.sha256(b"imagefolder")
    for p, y in zip(paths, labels, strict=True):
        h.update(f"{p.relative_to(root)}:{y}:".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())

    def subset(ix: np.ndarray) -> FolderImages:
        return FolderImages([paths[i] for i in ix], [int(labels[i]) for i in ix], input_size)

    return Splits(subset(tr), subset(va), subset(te), classes, _fingerprint(h, tr, va, te), spec, input_size)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def channel_stats(dataset: Dataset, limit: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of (up to `limit`) training images, in [0, 1] units."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for images, _ in loader(dataset, batch_size=256):
        x = images[: max(0, limit - count)].double() / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0]
        if count >= limit:
            break
    pixels = count * dataset[0][0].shape[1] * dataset[0][0].shape[2]
    mean = total / pixels
    std = (total_sq / pixels - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]
