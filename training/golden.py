"""The golden set: a held-out, stratified sample of the test split packed into every .mar for canary checks.

    python -m training.golden artifacts/resnet18 OUT_DIR [--size 200]     # writes OUT_DIR/golden.json
    python -m training.golden --show model_store/digits.mar               # what an archive carries

Images are PNG (lossless), so the served handler decodes exactly the uint8 tensors the offline
evaluation used, and the recorded build-time accuracy is the figure the served model must reproduce.
build_mar.sh writes it through training/package.py stage(); deploy/deploy.py reads it from the archive.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handlers.contract import GOLDEN_FILE, ModelCard

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch.utils.data import Dataset

# Reading a golden set (deploy.py) must stay light; torch, sklearn and PIL are imported only to build one.

DEFAULT_SIZE = 200


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 [3, H, W] -> PNG bytes; grey images (equal channels) as 8-bit grey, which decodes to the same RGB."""
    from PIL import Image

    array = image.permute(1, 2, 0).contiguous().numpy()
    grey = bool((array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all())
    pil = Image.fromarray(array[..., 0], mode="L") if grey else Image.fromarray(array, mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def sample_indices(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A stratified sample of `size` items (all of them when the split is smaller)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if size >= len(labels):
        return idx
    # Stratifying needs at least one item per class in the sample; fall back to a plain sample otherwise.
    classes = len(np.unique(labels))
    stratify = labels if size >= classes else None
    chosen, _ = train_test_split(idx, train_size=size, stratify=stratify, random_state=seed)
    return np.sort(chosen)


def dataset_labels(ds: Dataset) -> np.ndarray:
    import numpy as np

    labels = getattr(ds, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.array([int(ds[i][1]) for i in range(len(ds))])  # type: ignore[arg-type]


def build(model_dir: Path, size: int = DEFAULT_SIZE) -> dict[str, Any]:
    """The golden set for `model_dir`, with the accuracy its own artifact scores on exactly these images."""
    from torch.utils.data import Subset

    from handlers.runtimes import load_model
    from training.evaluate import predict, splits_for

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


def from_archive(mar: Path) -> dict[str, Any]:
    """The golden set packed in a .mar (a zip), without extracting it."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(GOLDEN_FILE))
    except KeyError as e:
        raise ValueError(f"{mar} carries no {GOLDEN_FILE}; rebuild it with build_mar.sh") from e
    except zipfile.BadZipFile as e:
        raise ValueError(f"{mar} is not a readable .mar (zip) archive: {e}") from e


def images(golden: dict[str, Any]) -> list[tuple[bytes, str]]:
    """[(png bytes, expected label)]."""
    return [(base64.b64decode(it["png"]), it["label"]) for it in golden["items"]]


def build_top1(golden: dict[str, Any], limit: int | None = None) -> float:
    """The build-time accuracy on the first `limit` images (all by default)."""
    items = golden["items"][:limit]
    return sum(it["build_label"] == it["label"] for it in items) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="MODEL_DIR OUT_DIR, or with --show: ARCHIVE.mar")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE)
    ap.add_argument("--show", action="store_true", help="summarise the golden set inside an archive")
    args = ap.parse_args()
    try:
        if args.show:
            g = from_archive(args.paths[0])
            counts: dict[str, int] = {}
            for it in g["items"]:
                counts[it["label"]] = counts.get(it["label"], 0) + 1
            print(f"{g['n']} images ({g['source']}), build-time top-1 {100 * g['build_top1']:.2f}% "
                  f"({g['variant']}), per label {counts}")
        else:
            if len(args.paths) != 2:
                sys.exit("error: give MODEL_DIR and OUT_DIR (or --show ARCHIVE.mar)")
            g = write(args.paths[0], args.paths[1], args.size)
            print(f"wrote {args.paths[1] / GOLDEN_FILE}: {g['n']} images, build-time top-1 "
                  f"{100 * g['build_top1']:.2f}%")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
