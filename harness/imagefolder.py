"""A user-style ImageFolder built from real, offline images: held-out digits and scikit-learn's sample photos.

    python -m harness.imagefolder OUT [--classes even=0,2,4,6,8 odd=1,3,5,7,9] [--per-class 40]

Each class folder holds nested sub-folders and a mix of PNG, JPEG, BMP and WebP at different sizes, as a
folder copied from phones and scanners would. `corrupt_jpeg` adds a file that is named and starts like a
JPEG but cannot be decoded. Shared by tests and benchmarks, never imported by product code.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("webp", "WEBP"))
SIZES = (24, 40, 64, 96)


def digit_image(pixels: np.ndarray, size: int, rgb: bool) -> Image.Image:
    """An 8x8 digit (0..16) as a `size` x `size` image, grey or RGB."""
    grey = Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L")
    grey = grey.resize((size, size), Image.Resampling.BILINEAR)
    return grey.convert("RGB") if rgb else grey


def write_imagefolder(root: Path, classes: dict[str, list[int]] | None = None, per_class: int = 40,
                      photos: bool = True, seed: int = 0) -> dict[str, int]:
    """Write `per_class` digits per class into root/<class>/<sub>/... and return the count per class.

    `classes` maps a folder name to the digits it holds (default: one class per digit). The digits come from
    scikit-learn's bundled set in a seeded order. With `photos`, china.jpg and flower.jpg (cropped, resized)
    are added to the first class as large RGB JPEGs, so sizes and content vary like real uploads.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = classes or {str(d): [d] for d in range(10)}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    counts: dict[str, int] = {}
    for k, (name, members) in enumerate(classes.items()):
        picked = [i for i in order if int(digits.target[i]) in members][:per_class]
        for j, i in enumerate(picked):
            ext, fmt = FORMATS[(j + k) % len(FORMATS)]
            folder = root / name / f"batch_{j % 3}" / ("nested" if j % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            digit_image(digits.images[i], SIZES[j % len(SIZES)], rgb=j % 3 != 0).save(folder / f"{j:04d}.{ext}",
                                                                                      format=fmt)
        counts[name] = len(picked)
    if photos:
        from sklearn.datasets import load_sample_images

        first = next(iter(classes))
        for n, photo in enumerate(load_sample_images().images):
            image = Image.fromarray(photo).crop((100, 50, 500, 400)).resize((320, 280))
            image.save(root / first / f"photo_{n}.jpeg", format="JPEG", quality=85)
            counts[first] += 1
    return counts


def corrupt_jpeg(path: Path) -> Path:
    """A file with a JPEG name and header whose data is cut off: undecodable, as a broken upload is."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[:120])
    return path


def parse_classes(specs: list[str]) -> dict[str, list[int]]:
    return {name: [int(d) for d in digits.split(",")] for name, digits in (s.split("=", 1) for s in specs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--classes", nargs="*", default=None, help="NAME=DIGITS, e.g. even=0,2,4,6,8")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--corrupt", action="store_true", help="add one undecodable JPEG to the first class")
    args = ap.parse_args()
    classes = parse_classes(args.classes) if args.classes else None
    counts = write_imagefolder(args.out, classes, args.per_class)
    if args.corrupt:
        corrupt_jpeg(args.out / next(iter(counts)) / "broken.jpg")
    print(counts)


if __name__ == "__main__":
    main()
