"""The golden set: a held-out, stratified sample of the test split packed into every .mar for canary checks.

    python -m packager.golden model_store/digits.mar      # what an archive carries

Images are PNG (lossless), so the served handler decodes exactly the uint8 tensors the offline
evaluation used, and the recorded build-time accuracy is the figure the served model must reproduce.
training samples the images (held_out.json beside the trained model), `build` adds what the packed artifact
predicts for each, packager.stage packs the result and deploy.canary reads it from the archive. Reading it
stays light: torch is imported only to build.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

from handlers.contract import GOLDEN_FILE, HELD_OUT_FILE, ModelCard


def from_archive(mar: Path) -> dict[str, Any]:
    """The golden set packed in a .mar (a zip), without extracting it."""
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read(GOLDEN_FILE))
    except KeyError as e:
        raise ValueError(f"{mar} carries no {GOLDEN_FILE}; rebuild it with build_mar.sh") from e
    except zipfile.BadZipFile as e:
        raise ValueError(f"{mar} is not a readable .mar (zip) archive: {e}") from e


def held_out(model_dir: Path, card: ModelCard) -> dict[str, Any]:
    """The sampled images of `card`'s test split: beside the model, or beside the parent a variant was made from."""
    model_dir = Path(model_dir)
    places = [model_dir, *([Path(card.parent.dir)] if card.parent else []),
              *([model_dir.parent.parent] if model_dir.parent.name == "variants" else [])]
    path = next((d / HELD_OUT_FILE for d in places if (d / HELD_OUT_FILE).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {HELD_OUT_FILE} in {' or '.join(map(str, places))}; write it with: python -m "
                                f"training.golden {places[-1]}")
    sample = json.loads(path.read_text())
    if card.data is None or sample["fingerprint"] != card.data.fingerprint:
        raise ValueError(f"{path} was sampled from other data than {card.variant} was trained on; write it again "
                         f"with: python -m training.golden {path.parent}")
    return sample


def build(model_dir: Path, card: ModelCard, batch: int = 64) -> dict[str, Any]:
    """The golden set: the held-out sample, with what the artifact in `model_dir` predicts for each image."""
    import torch

    from handlers.imaging import Normalizer, decode_image, resize_batch
    from handlers.runtimes import load_model

    sample = held_out(model_dir, card)
    model = load_model(model_dir, card, repeatable=True)
    normalize, size = Normalizer(card.input.mean, card.input.std), card.input.image_size
    pictures = [decode_image(base64.b64decode(it["png"])) for it in sample["items"]]
    with torch.inference_mode():
        predicted = [int(i) for start in range(0, len(pictures), batch)
                     for i in model(normalize(resize_batch(pictures[start:start + batch], size))).argmax(1)]
    items = [{"label": it["label"], "build_label": card.labels[p], "png": it["png"]}
             for it, p in zip(sample["items"], predicted, strict=True)]
    return {**{k: sample[k] for k in ("source", "fingerprint", "indices")}, "n": len(items),
            "build_top1": round(sum(it["label"] == it["build_label"] for it in items) / len(items), 6),
            "artifact": card.artifact, "variant": card.variant,
            "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "items": items}


def images(golden: dict[str, Any]) -> list[tuple[bytes, str]]:
    """[(png bytes, expected label)]."""
    return [(base64.b64decode(it["png"]), it["label"]) for it in golden["items"]]


def build_top1(golden: dict[str, Any], limit: int | None = None) -> float:
    """The build-time accuracy on the first `limit` images (all by default)."""
    items = golden["items"][:limit]
    return sum(it["build_label"] == it["label"] for it in items) / len(items)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path, help="a .mar built by build_mar.sh")
    args = ap.parse_args()
    try:
        g = from_archive(args.archive)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    counts: dict[str, int] = {}
    for it in g["items"]:
        counts[it["label"]] = counts.get(it["label"], 0) + 1
    print(f"{g['n']} images ({g['source']}), build-time top-1 {100 * g['build_top1']:.2f}% ({g['variant']}), "
          f"per label {counts}")


if __name__ == "__main__":
    main()
