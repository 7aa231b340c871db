from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from handlers.contract import CardError, DataSpec, ModelCard
from harness.imagefolder import corrupt_jpeg, write_imagefolder
from tests.conftest import train_tiny
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


EVEN_ODD = {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9]}


def test_imagefolder_is_loaded_resized_and_split(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, {"zero": [0], "one": [1], "two": [2]}, per_class=12, photos=False)
    splits = load_splits(DataSpec(str(tmp_path), seed=0, val_fraction=0.25, test_fraction=0.25), 32)
    assert splits.labels == ["one", "two", "zero"]
    assert sum(splits.sizes.values()) == 36 and splits.skipped == {} and splits.ignored == {}
    image, label = splits.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < 3
    assert sorted(set(labels_of(splits.test))) == [0, 1, 2]
    # the fingerprint follows the content: change one file and it changes
    first = next(tmp_path.rglob("*.png"))
    first.write_bytes(encode_png(torch.zeros(3, 24, 24, dtype=torch.uint8)).numpy().tobytes())
    assert load_splits(splits.spec, 32).fingerprint != splits.fingerprint


def broken_folder(root: Path, per_class: int = 10) -> Path:
    """Even/odd digits and the photos in nested folders, with an undecodable JPEG, an empty PNG and a note."""
    write_imagefolder(root, EVEN_ODD, per_class=per_class)
    corrupt_jpeg(root / "odd" / "batch_1" / "nested" / "broken.jpg")
    (root / "even" / "batch_0" / "empty.png").write_bytes(b"")
    (root / "even" / "notes.txt").write_text("taken with my phone\n")
    return root


def test_unreadable_files_are_found_by_the_scan_and_left_out(tmp_path: Path) -> None:
    folder = broken_folder(tmp_path / "mine")
    splits = load_splits(DataSpec(str(folder)), 32)
    assert splits.labels == ["even", "odd"]
    assert sorted(splits.skipped) == ["even/batch_0/empty.png", "odd/batch_1/nested/broken.jpg"]
    assert splits.skipped["even/batch_0/empty.png"] == "empty file (0 bytes)"
    assert "JPEG image is truncated or corrupt" in splits.skipped["odd/batch_1/nested/broken.jpg"]
    assert splits.ignored == {".txt": 1}
    assert sum(splits.sizes.values()) == 22  # 10 + 2 photos even, 10 odd: nothing unreadable is in a split
    for ds in (splits.train, splits.val, splits.test):  # every image of every split decodes
        assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))
    report = splits.scan_report
    assert "skipped 2 unreadable file(s)" in report and "odd/batch_1/nested/broken.jpg: the JPEG" in report
    assert "ignored 1 file(s) without an image suffix (.txt: 1)" in report

    # The same folder gives the same fingerprint, and skipped files do not enter it: a copy without them matches.
    assert load_splits(DataSpec(str(folder)), 48).fingerprint == splits.fingerprint
    clean = tmp_path / "clean"
    shutil.copytree(folder, clean)
    for path in splits.skipped:
        (clean / path).unlink()
    assert load_splits(DataSpec(str(clean)), 32).fingerprint == splits.fingerprint

    with pytest.raises(ValueError, match="2 file\\(s\\) in .* cannot be decoded") as err:
        load_splits(DataSpec(str(folder)), 32, strict=True)
    assert "odd/batch_1/nested/broken.jpg" in str(err.value) and "drop --strict" in str(err.value)


def test_training_skips_and_records_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = broken_folder(tmp_path / "mine")
    card = ModelCard.read(train_tiny(tmp_path / "model", "--data-dir", str(folder)))
    assert card.labels == ["even", "odd"] and card.data is not None
    assert sorted(card.data.skipped) == ["even/batch_0/empty.png", "odd/batch_1/nested/broken.jpg"]
    assert sum(card.data.sizes.values()) == 22
    out = capsys.readouterr().out
    assert "skipped 2 unreadable file(s)" in out and "  odd/batch_1/nested/broken.jpg: the JPEG image" in out

    # --strict stops before any training, with the list.
    with pytest.raises(SystemExit, match="cannot be decoded") as err:
        train_tiny(tmp_path / "strict", "--data-dir", str(folder), "--strict")
    assert "even/batch_0/empty.png: empty file" in str(err.value) and "drop --strict" in str(err.value)
    assert not (tmp_path / "strict").exists()

    # A card written before data.skipped existed still reads; a skipped path outside the folder is refused.
    data = card.to_dict()
    del data["data"]["skipped"]
    assert ModelCard.from_dict(data).data.skipped == {}
    data["data"]["skipped"] = {"../elsewhere.jpg": "truncated"}
    with pytest.raises(CardError, match="field 'data.skipped'"):
        ModelCard.from_dict(data)


def test_bad_data_dirs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_splits(DataSpec(str(tmp_path / "missing")), 32)

    none = tmp_path / "none"
    none.mkdir()
    (none / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="not an ImageFolder: it has no class sub-folders"):
        load_splits(DataSpec(str(none)), 32)

    one = tmp_path / "one"
    write_imagefolder(one, {"cats": [3]}, per_class=10, photos=False)
    with pytest.raises(ValueError, match="it has one class sub-folder \\('cats'\\); a classifier needs at least two"):
        load_splits(DataSpec(str(one)), 32)

    # Classes with no images at all are named before any decoding.
    (one / "dogs" / "raw").mkdir(parents=True)
    (one / "dogs" / "raw" / "list.csv").write_text("a,b\n")
    (one / "birds").mkdir()
    with pytest.raises(ValueError, match="class folder\\(s\\) 'birds', 'dogs' in .* hold no images"):
        load_splits(DataSpec(str(one)), 32)

    # Too few images to stratify, or none readable: named with the count and the minimum.
    few = tmp_path / "few"
    write_imagefolder(few, {"cats": [3], "dogs": [5]}, per_class=10, photos=False)
    for p in sorted((few / "dogs").rglob("*.*"))[3:]:
        p.unlink()
    with pytest.raises(ValueError, match="class 'dogs' has 3; each class needs at least 7"):
        load_splits(DataSpec(str(few)), 32)
    for p in (few / "dogs").rglob("*.*"):
        corrupt_jpeg(p)
    with pytest.raises(ValueError, match="class 'dogs' has 0 \\(3 unreadable skipped\\)"):
        load_splits(DataSpec(str(few)), 32)
    # Enough per class, but sklearn's rounding leaves the 10% training split short of one image per class.
    thin = tmp_path / "thin"
    write_imagefolder(thin, {"a": [1], "b": [2], "c": [3]}, per_class=10, photos=False)
    with pytest.raises(ValueError, match="cannot split .* train_size = 2 should be greater or equal"):
        load_splits(DataSpec(str(thin), val_fraction=0.45, test_fraction=0.45), 32)


def test_digits_split_is_independent_of_input_size() -> None:
    small = load_splits(DataSpec("digits"), 16)
    large = load_splits(DataSpec("digits"), 48)
    assert np.array_equal(small.test.labels.numpy(), large.test.labels.numpy())
    assert small.fingerprint == large.fingerprint
    assert small.test[0][0].shape == (3, 16, 16) and large.test[0][0].shape == (3, 48, 48)
