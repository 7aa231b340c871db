"""Datasets: scikit-learn's bundled digits rendered as RGB images, or a user ImageFolder.

Every split is deterministic (seeded, stratified) and fingerprinted, so a model card
can say exactly which images a figure was measured on.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from tqdm.contrib.concurrent import thread_map

from handlers.contract import DataSpec
from handlers.errors import InputError
from handlers.imaging import decode_image, resize_batch

# What handlers.imaging decodes, so every format that serves can train.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


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
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable files (path in the folder -> why), not used
    ignored: dict[str, int] = field(default_factory=dict)  # files without an image suffix, counted by suffix

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    @property
    def scan_report(self) -> str:
        """What the folder scan left out, for the training output ("" when nothing was)."""
        lines = []
        if self.ignored:
            counts = ", ".join(f"{suffix or '(none)'}: {n}" for suffix, n in sorted(self.ignored.items()))
            lines.append(f"data: ignored {sum(self.ignored.values())} file(s) without an image suffix ({counts}); "
                         f"images are {', '.join(sorted(IMAGE_SUFFIXES))}")
        if self.skipped:
            lines.append(f"data: skipped {len(self.skipped)} unreadable file(s), recorded in the model card's "
                         f"data.skipped (--strict stops instead):\n{format_skipped(self.skipped)}")
        return "\n".join(lines)


def format_skipped(skipped: dict[str, str]) -> str:
    return "\n".join(f"  {path}: {reason}" for path, reason in skipped.items())


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


@dataclass
class Scan:
    """An ImageFolder's readable images in sorted order, with each file's sha256, and what was left out."""

    paths: list[Path]
    labels: np.ndarray
    digests: list[bytes]
    classes: list[str]
    skipped: dict[str, str]
    ignored: dict[str, int]


def _check_image(path: Path) -> tuple[bytes, str | None]:
    """(sha256 of the file, why it cannot be used or None), decoded as the served handler decodes it."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return b"", f"cannot be read: {e.strerror or e}"
    if not data:
        return b"", "empty file (0 bytes)"
    try:
        decode_image(data)
    except InputError as e:
        return b"", e.message
    return hashlib.sha256(data).digest(), None


def _scan_folder(root: Path, strict: bool = False, progress: bool = False) -> Scan:
    """Decode every image before training starts, so a broken file is found here, not by a DataLoader mid-epoch."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"data directory {root} does not exist; pass an ImageFolder root (one sub-folder per class)"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        found = f"one class sub-folder ('{classes[0]}')" if classes else "no class sub-folders"
        raise ValueError(f"{root} is not an ImageFolder: it has {found}; a classifier needs at least two, "
                         f"one sub-folder of images per class ({root}/<class>/...)")
    candidates: list[tuple[Path, int]] = []
    ignored: Counter[str] = Counter()
    for k, name in enumerate(classes):
        for p in sorted((root / name).rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMAGE_SUFFIXES:
                candidates.append((p, k))
            else:
                ignored[p.suffix.lower()] += 1
    present = {y for _, y in candidates}
    empty = [name for k, name in enumerate(classes) if k not in present]
    if empty:
        raise ValueError(f"class folder(s) {', '.join(repr(n) for n in empty)} in {root} hold no images "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder(s)")

    checked = thread_map(_check_image, [p for p, _ in candidates], max_workers=os.cpu_count() or 1,
                         chunksize=16, desc=f"scanning {root.name}", unit="file", leave=False, file=sys.stdout,
                         disable=not progress)
    skipped = {p.relative_to(root).as_posix(): reason for (p, _), (_, reason) in zip(candidates, checked, strict=True)
               if reason is not None}
    if skipped and strict:
        raise ValueError(f"{len(skipped)} file(s) in {root} cannot be decoded:\n{format_skipped(skipped)}\n"
                         "fix or remove them, or drop --strict to train without them (they are then listed in "
                         "the model card)")
    kept = [(p, y, digest) for (p, y), (digest, reason) in zip(candidates, checked, strict=True) if reason is None]
    return Scan(paths=[p for p, _, _ in kept], labels=np.array([y for _, y, _ in kept], dtype=np.int64),
                digests=[d for _, _, d in kept], classes=classes, skipped=skipped, ignored=dict(ignored))


def _check_class_sizes(scan: Scan, spec: DataSpec) -> None:
    """Each class needs enough images to expect one in each split; fewer would break the stratified split."""
    shares = (1 - spec.val_fraction - spec.test_fraction, spec.val_fraction, spec.test_fraction)
    need = max(2, math.ceil(1 / min(shares) - 1e-9))
    counts = np.bincount(scan.labels, minlength=len(scan.classes))
    short = [(name, int(n)) for name, n in zip(scan.classes, counts, strict=True) if n < need]
    if short:
        skipped = Counter(path.split("/", 1)[0] for path in scan.skipped)
        listed = ", ".join(f"'{name}' has {n}" + (f" ({skipped[name]} unreadable skipped)" if skipped[name] else "")
                           for name, n in short)
        raise ValueError(f"too few images to split {spec.source} into train/val/test "
                         f"({', '.join(f'{s:.0%}' for s in shares)}): class {listed}; each class needs at least "
                         f"{need}. Add images to the class, remove its folder, or change --val-fraction/"
                         "--test-fraction")


def load_splits(spec: DataSpec, input_size: int, strict: bool = False, progress: bool = False) -> Splits:
    """Build train/val/test from the spec, as images of `input_size`. The same spec always gives the same splits
    (and the same fingerprint) at any input size. An ImageFolder's unreadable files are skipped and listed in
    `Splits.skipped`, or with `strict` raise a ValueError that lists them."""
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
    scan = _scan_folder(root, strict, progress)
    _check_class_sizes(scan, spec)
    try:
        tr, va, te = _split_indices(scan.labels, spec)
    except ValueError as e:  # sklearn's rounding can still leave a split short of one image per class
        raise ValueError(f"cannot split {root} into stratified train/val/test ({e}); add images or change "
                         "--val-fraction/--test-fraction") from e
    # Only the images used enter the fingerprint: the same folder, broken files and all, gives the same one.
    h = hashlib.sha256(b"imagefolder")
    for p, y, digest in zip(scan.paths, scan.labels, scan.digests, strict=True):
        h.update(f"{p.relative_to(root)}:{y}:".encode())
        h.update(digest)

    def subset(ix: np.ndarray) -> FolderImages:
        return FolderImages([scan.paths[i] for i in ix], [int(scan.labels[i]) for i in ix], input_size)

    return Splits(subset(tr), subset(va), subset(te), scan.classes, _fingerprint(h, tr, va, te), spec, input_size,
                  scan.skipped, scan.ignored)


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
