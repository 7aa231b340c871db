"""Detection data: real handwritten digits pasted onto crops of real photos, with exact boxes; or a user's folder
in COCO or Pascal VOC format, read by the same loader.

    python -m training.detection_data --out data/digits-on-photos --size 320 --images 600   # writes COCO folders

The digits are scikit-learn's (1,797 scans from 43 writers, split by index); the photos are the ones scikit-learn
and scikit-image ship inside their wheels, each whole photo in one split only, so no source image is in two
splits. A label is the digit, and label 0 is the background, as torchvision's detectors count classes.

A COCO folder holds `annotations.json` (images, annotations with `bbox` [x, y, w, h], categories) beside its image
files; a VOC folder holds `Annotations/*.xml` and `JPEGImages/`. Both give `Sample`s with boxes [x1, y1, x2, y2]
in pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from handlers.contract import ModelCard
from handlers.imaging import decode_image

BACKGROUND = "__background__"
DIGITS = [str(d) for d in range(10)]
# Whole photos per split: (package, file in its data folder). motorcycle_left/right are one stereo scene, so both
# train.
PHOTOS = {
    "train": [("skimage", "astronaut.png"), ("skimage", "brick.png"), ("skimage", "camera.png"),
              ("skimage", "coffee.png"), ("skimage", "coins.png"), ("skimage", "grass.png"), ("skimage", "gravel.png"),
              ("skimage", "motorcycle_left.png"), ("skimage", "motorcycle_right.png"), ("skimage", "moon.png"),
              ("skimage", "page.png"), ("sklearn", "china.jpg")],
    "val": [("skimage", "hubble_deep_field.jpg"), ("skimage", "retina.jpg")],
    "test": [("skimage", "chelsea.png"), ("skimage", "rocket.jpg"), ("sklearn", "flower.jpg")],
}
FOLDERS = {"skimage": ("skimage", "data"), "sklearn": ("sklearn", "datasets", "images")}
DIGIT_SPLITS = {"train": (0.0, 0.7), "val": (0.7, 0.85), "test": (0.85, 1.0)}


@dataclass(frozen=True)
class Sample:
    """One image (uint8 [3, H, W]) and its objects: boxes [k, 4] as x1, y1, x2, y2 in pixels, labels [k]."""

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor


def photo(package: str, name: str) -> torch.Tensor:
    """A photo a package ships inside its wheel, as uint8 RGB [3, H, W] (grey photos on all three channels)."""
    top, *parts = FOLDERS[package]
    return decode_image(importlib.resources.files(top).joinpath(*parts, name).read_bytes())


def digit_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits of one split (by index, seeded), as 8x8 intensities 0..16 and their digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    lo, hi = DIGIT_SPLITS[split]
    chosen = order[int(lo * len(order)):int(hi * len(order))]
    return digits.images[chosen], digits.target[chosen]


def ink_box(alpha: torch.Tensor) -> tuple[int, int, int, int] | None:
    """The tight box (x1, y1, x2, y2, exclusive ends) of a digit's visible ink."""
    ys, xs = torch.nonzero(alpha > 0.25, as_tuple=True)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlaps(box: tuple[int, int, int, int], boxes: list[list[float]]) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)


def synthesize(split: str, n: int, size: int = 320, seed: int = 0, per_image: tuple[int, int] = (1, 4),
               scale: tuple[float, float] = (0.12, 0.35)) -> list[Sample]:
    """`n` images of `size` x `size`: a random crop of one of the split's photos, with 1-4 digits of the split
    pasted at random sides (`scale` of the image) and places, not overlapping, in random colours."""
    rng = np.random.default_rng([seed, list(DIGIT_SPLITS).index(split)])
    photos = [photo(*p) for p in PHOTOS[split]]
    pixels, digits = digit_split(split)
    samples = []
    for _ in range(n):
        source = photos[rng.integers(len(photos))]
        h, w = source.shape[1:]
        side = int(rng.uniform(0.4, 1.0) * min(h, w))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = source[:, y:y + side, x:x + side][None].float()
        image = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
            i = int(rng.integers(len(digits)))
            s = max(8, int(rng.uniform(*scale) * size))
            alpha = F.interpolate(torch.from_numpy(pixels[i]).float()[None, None] / 16, size=(s, s),
                                  mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
            ink = ink_box(alpha)
            for _attempt in range(20):
                top, left = int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1))
                if ink and not overlaps((left + ink[0], top + ink[1], left + ink[2], top + ink[3]), boxes):
                    break
            else:
                continue
            colour = torch.from_numpy(rng.integers(0, 256, 3)).float().view(3, 1, 1)
            region = image[:, top:top + s, left:left + s]
            image[:, top:top + s, left:left + s] = region * (1 - alpha) + colour * alpha
            boxes.append([float(left + ink[0]), float(top + ink[1]), float(left + ink[2]), float(top + ink[3])])
            labels.append(int(digits[i]) + 1)
        samples.append(Sample(image.round().clamp(0, 255).to(torch.uint8), torch.tensor(boxes).view(-1, 4),
                              torch.tensor(labels, dtype=torch.int64)))
    return samples


def fingerprint(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for s in samples:
        for t in (s.image, s.boxes, s.labels):
            digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_coco(samples: list[Sample], folder: Path, categories: list[str]) -> Path:
    """Samples -> `folder`/annotations.json and one PNG per image: the COCO layout users bring."""
    from training.golden import encode_png

    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, s in enumerate(samples):
        name = f"{i:05d}.png"
        (folder / name).write_bytes(encode_png(s.image))
        images.append({"id": i + 1, "file_name": name, "height": int(s.image.shape[1]),
                       "width": int(s.image.shape[2])})
        for box, label in zip(s.boxes.tolist(), s.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": label,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": i, "name": name} for i, name in enumerate(categories) if i > 0]
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return path


def read_folder(folder: Path) -> tuple[list[Sample], list[str]]:
    """A COCO folder (annotations.json) or a Pascal VOC folder (Annotations/, JPEGImages/) -> samples, and the
    labels with the background first."""
    folder = Path(folder)
    if (folder / "annotations.json").is_file():
        return read_coco(folder / "annotations.json")
    if (folder / "Annotations").is_dir():
        return read_voc(folder)
    raise FileNotFoundError(f"{folder} holds neither annotations.json (COCO) nor Annotations/ (Pascal VOC); "
                            "see python -m training.detection_data --help for both layouts")


def read_coco(path: Path) -> tuple[list[Sample], list[str]]:
    data = json.loads(Path(path).read_text())
    cats = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i + 1 for i, c in enumerate(cats)}  # contiguous labels, 0 kept for the background
    per_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd"):
            per_image.setdefault(a["image_id"], []).append(a)
    samples = []
    for im in sorted(data["images"], key=lambda i: i["id"]):
        found = per_image.get(im["id"], [])
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in found]
        samples.append(Sample(decode_image((path.parent / im["file_name"]).read_bytes()),
                              torch.tensor(boxes, dtype=torch.float32).view(-1, 4),
                              torch.tensor([index[a["category_id"]] for a in found], dtype=torch.int64)))
    return samples, [BACKGROUND, *(c["name"] for c in cats)]


def read_voc(folder: Path) -> tuple[list[Sample], list[str]]:
    parsed = []
    for xml in sorted((folder / "Annotations").glob("*.xml")):
        root = ET.parse(xml).getroot()
        objects = [(o.findtext("name", "").strip(), [float(o.find("bndbox").findtext(k)) for k in
                                                      ("xmin", "ymin", "xmax", "ymax")])
                   for o in root.iter("object") if o.findtext("difficult", "0") != "1"]
        parsed.append((folder / "JPEGImages" / root.findtext("filename", xml.stem + ".jpg"), objects))
    names = sorted({name for _, objects in parsed for name, _ in objects})
    labels = [BACKGROUND, *names]
    samples = [Sample(decode_image(path.read_bytes()),
                      # VOC pixels are 1-based and inclusive
                      torch.tensor([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b in objects]).view(-1, 4),
                      torch.tensor([labels.index(n) for n, _ in objects], dtype=torch.int64))
               for path, objects in parsed]
    return samples, labels


def test_samples(card: ModelCard) -> list[Sample]:
    """The test split a detector's card was evaluated on, rebuilt from its training recipe (its parent's, for a
    variant)."""
    args = (ModelCard.read(card.parent.dir) if card.parent else card).recipe.args
    if args.get("data_dir"):
        return read_folder(Path(args["data_dir"]) / "test")[0]
    return synthesize("test", max(8, args["images"] // 5), args["image_size"], args["seed"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/{train,val,test}/annotations.json + PNGs")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--images", type=int, default=600, help="training images; val and test get a fifth each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    labels = [BACKGROUND, *DIGITS]
    for split, n in (("train", args.images), ("val", args.images // 5), ("test", args.images // 5)):
        samples = synthesize(split, n, args.size, args.seed)
        path = write_coco(samples, args.out / split, labels)
        print(f"{split}: {len(samples)} images, {sum(len(s.labels) for s in samples)} digits -> {path}")


if __name__ == "__main__":
    main()
