from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from handlers.contract import DataSpec
from training.data import DigitImages, _split_indices, load_splits, render_digits


def labels_of(ds) -> list[int]:
    return [int(ds[i][1]) for i in range(len(ds))]


def test_digits_splits_are_seeded_stratified_and_disjoint() -> None:
    a = load_splits(DataSpec("digits", seed=3), 16)
    b = load_splits(DataSpec("digits", seed=3), 16)
    c = load_splits(DataSpec("digits", seed=4), 16)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.sizes == {"train": 1257, "val": 270, "test": 270}
    assert a.labels == [str(i) for i in range(10)]
    assert isinstance(a.test, DigitImages)
    # same images in the same order for the same seed
    assert torch.equal(a.test.pixels, b.test.pixels) and not torch.equal(a.test.pixels, c.test.pixels)
    # stratified: each split holds every class in its overall proportion, to within one image
    overall = Counter(labels_of(a.train) + labels_of(a.val) + labels_of(a.test))
    for split in (a.train, a.val, a.test):
        counts = Counter(labels_of(split))
        expected = {k: overall[k] * len(split) / 1797 for k in range(10)}
        assert all(abs(counts[k] - expected[k]) <= 1.0 for k in range(10)), (counts, expected)
    tr, va, te = _split_indices(np.repeat(np.arange(10), 50), DataSpec("digits", seed=3))
    assert not (set(tr) & set(va)) and not (set(tr) & set(te)) and not (set(va) & set(te))
    assert len(tr) + len(va) + len(te) == 500


def test_render_digits_is_rgb_uint8_at_input_size() -> None:
    pixels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    pixels[:, 2:6, 2:6] = 16
    images = render_digits(pixels, 64)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert images.max() == 255 and images.min() == 0
    assert torch.equal(images[:, 0], images[:, 1])


def write_imagefolder(root: Path, per_class: int = 12) -> None:
    digits = load_splits(DataSpec("digits"), 24).train
    seen: Counter[int] = Counter()
    for i in range(len(digits)):
        image, label = digits[i]
        if label < 3 and seen[label] < per_class:
            folder = root / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(encode_png(image).numpy().tobytes())
            seen[label] += 1


def test_imagefolder_is_loaded_resized_and_split(tmp_path: Path) -> None:
    write_imagefolder(tmp_path)
    splits = load_splits(DataSpec(str(tmp_path), seed=0, val_fraction=0.25, test_fraction=0.25), 32)
    assert splits.labels == ["class_0", "class_1", "class_2"]
    assert sum(splits.sizes.values()) == 36
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < 3
    assert sorted(set(labels_of(splits.test))) == [0, 1, 2]
    # the fingerprint follows the content: change one file and it changes
    first = next(tmp_path.rglob("*.png"))
    first.write_bytes(encode_png(torch.zeros(3, 24, 24, dtype=torch.uint8)).numpy().tobytes())
    assert load_splits(splits.spec, 32).fingerprint != splits.fingerprint


def test_bad_data_dirs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(DataSpec(str(tmp_path / "missing")), 32)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an ImageFolder"):
        load_splits(DataSpec(str(tmp_path)), 32)


def test_digits_split_is_independent_of_input_size() -> None:
    small = load_splits(DataSpec("digits"), 16)
    large = load_splits(DataSpec("digits"), 48)
    assert np.array_equal(small.test.labels.numpy(), large.test.labels.numpy())
    assert small.fingerprint == large.fingerprint
    assert small.test[0][0].shape == (3, 16, 16) and large.test[0][0].shape == (3, 48, 48)
