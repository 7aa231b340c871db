"""The golden set: a held-out, stratified sample of the test split packed into every .mar for canary checks.

    python -m packager.golden model_store/digits.mar      # what an archive carries

Images are PNG (lossless), so the served handler decodes exactly the uint8 tensors the offline
evaluation used, and the recorded build-time score is the figure the served model must reproduce: top-1 for a
classifier (of images or of texts, which are kept as UTF-8 text); for a detector, F1 of its boxes scoring >= 0.5
against the true boxes (same label, IoU >= 0.5).
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


DETECTION_IOU = DETECTION_SCORE = 0.5  # a detection is a hit when it scores this, and overlaps a true box of its label
Tally = tuple[int, int, int]  # hits, false alarms, misses


def task(gold: dict[str, Any]) -> str:
    return gold.get("task", "classification")


def metric(gold: dict[str, Any]) -> str:
    return "F1@.5" if task(gold) == "detection" else "top-1"


def truth(item: dict[str, Any]) -> Any:
    """A classifier's label, or a detector's true boxes [(label, [x1, y1, x2, y2])]."""
    return list(zip(item["labels"], item["boxes"], strict=True)) if "boxes" in item else item["label"]


def iou(a: list[float], b: list[float]) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def tally(answer: Any, expected: Any) -> Tally:
    """One answer against its truth: a label is a hit or a miss; detections [(label, score, box)] are matched
    best score first, each true box once."""
    if not isinstance(expected, list):
        return (1, 0, 0) if answer == expected else (0, 0, 1)
    free, hits, false = list(expected), 0, 0
    for label, _, box in sorted((d for d in answer if d[1] >= DETECTION_SCORE), key=lambda d: -d[1]):
        overlaps = [(iou(box, b), i) for i, (lab, b) in enumerate(free) if lab == label]
        best = max(overlaps, default=(0.0, -1))
        if best[0] >= DETECTION_IOU:
            free.pop(best[1])
            hits += 1
        else:
            false += 1
    return hits, false, len(free)


def missed(expected: Any) -> Tally:
    """The tally of an image that got no answer."""
    return 0, 0, len(expected) if isinstance(expected, list) else 1


def score(gold: dict[str, Any], tallies: list[Tally]) -> float:
    """top-1 (hits over images), or the detections' F1."""
    hits, false, misses = (sum(t[i] for t in tallies) for i in range(3))
    if task(gold) != "detection":
        return hits / len(tallies) if tallies else 0.0
    return 2 * hits / (2 * hits + false + misses) if hits + false + misses else 1.0


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
    fingerprint = card.data.fingerprint if card.data else card.details.get("dataset", {}).get("fingerprint")
    if sample["fingerprint"] != fingerprint:
        raise ValueError(f"{path} was sampled from other data than {card.variant} was trained on; write it again "
                         f"with: python -m training.golden {path.parent}")
    return sample


def build(model_dir: Path, card: ModelCard, batch: int = 64) -> dict[str, Any]:
    """The golden set: the held-out sample, with what the artifact in `model_dir` answers for each image."""
    import torch

    from handlers.imaging import Normalizer, decode_image, resize_batch
    from handlers.runtimes import load_model
    from handlers.tasks import task_class
    from handlers.tasks.detection import detect

    sample = held_out(model_dir, card)
    model = load_model(model_dir, card, repeatable=True)
    pictures = [decode_image(base64.b64decode(it["png"])) for it in sample["items"] if "png" in it]
    with torch.inference_mode():
        if sample.get("task") == "text":
            # Tokenized by the task that serves it, one text per call as a client sends them: int8 quantizes
            # activations over the whole batch, so its answers can move with what shares a batch.
            kind = task_class(card)
            text = kind(card, dict(kind.defaults), torch.device("cpu"), Path(model_dir))
            text.setup()
            answers = [card.labels[int(text.predict(model, text.batch([text.decode(it["text"])])).argmax())]
                       for it in sample["items"]]
            items = [{**it, "build_label": a} for it, a in zip(sample["items"], answers, strict=True)]
        elif sample.get("task") == "detection":
            found = detect(model, [p.float() / 255 for p in pictures])
            answers: list[Any] = [[(card.labels[int(k)], round(float(s), 4), [round(float(x), 2) for x in b])
                                   for b, s, k in zip(d["boxes"], d["scores"], d["labels"], strict=True)
                                   if s >= DETECTION_SCORE] for d in found]
            items = [{**it, "build": a} for it, a in zip(sample["items"], answers, strict=True)]
        else:
            normalize, size = Normalizer(card.input.mean, card.input.std), card.input.image_size
            answers = [card.labels[int(i)] for start in range(0, len(pictures), batch)
                       for i in model(normalize(resize_batch(pictures[start:start + batch], size))).argmax(1)]
            items = [{"label": it["label"], "build_label": a, "png": it["png"]}
                     for it, a in zip(sample["items"], answers, strict=True)]
    gold = {**{k: sample[k] for k in ("source", "fingerprint", "indices")}, "task": card.task, "n": len(items),
            "artifact": card.artifact, "variant": card.variant,
            "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "items": items}
    gold["build_score"] = round(build_score(gold), 6)
    return gold


def images(golden: dict[str, Any]) -> list[tuple[bytes, Any]]:
    """[(png bytes, or a text's UTF-8 bytes; truth)]: the label, or a detector's true boxes."""
    return [(it["text"].encode() if "text" in it else base64.b64decode(it["png"]), truth(it))
            for it in golden["items"]]


def build_score(golden: dict[str, Any], limit: int | None = None) -> float:
    """The build-time score on the first `limit` images (all by default)."""
    items = golden["items"][:limit]
    return score(golden, [tally(it["build"] if "build" in it else it["build_label"], truth(it)) for it in items])


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
        for label in it.get("labels", [it.get("label")]):
            counts[label] = counts.get(label, 0) + 1
    what = "texts" if task(g) == "text" else "images"
    print(f"{g['n']} {what} ({g['source']}), build-time {metric(g)} {100 * build_score(g):.2f}% ({g['variant']}), "
          f"per label {counts}")


if __name__ == "__main__":
    main()
