"""Detection metrics with pycocotools (COCO mAP@[.5:.95], mAP@.5, AP per class), box parity between two
artifacts, and a plot of test images with their boxes.

    python -m training.detection_eval artifacts/detector            # evaluate a detector directory on its test split
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchvision.ops import box_iou

from handlers.contract import EvalSummary, ModelCard
from handlers.tasks.detection import detect
from training.detection_data import Sample

Detections = list[dict[str, torch.Tensor]]


def predict(model: Callable[[Any], Any], samples: list[Sample], batch: int = 4) -> Detections:
    """The model's raw detections (boxes, scores, labels) for each sample, in its pixels, as the server batches."""
    out: Detections = []
    with torch.inference_mode():
        for i in range(0, len(samples), batch):
            found = detect(model, [s.image.float() / 255 for s in samples[i:i + batch]])
            out.extend({k: v.detach().cpu() for k, v in d.items()} for d in found)
    return out


def coco_metrics(detections: Detections, samples: list[Sample], labels: list[str]) -> dict[str, Any]:
    """COCO mAP@[.5:.95], mAP@.5 and AP per class (labels[1:]; labels[0] is the background)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (s, d) in enumerate(zip(samples, detections, strict=True)):
        images.append({"id": i, "height": int(s.image.shape[1]), "width": int(s.image.shape[2])})
        for box, label in zip(s.boxes.tolist(), s.labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        for box, score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(), strict=True):
            results.append({"image_id": i, "category_id": int(label), "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": i, "name": n} for i, n in enumerate(labels) if i > 0]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and its table
        truth.createIndex()
        found = truth.loadRes(results) if results else COCO()
        evaluation = COCOeval(truth, found, "bbox")
        if results:
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
    if not results:
        return {"map": 0.0, "map50": 0.0, "per_class_ap": {n: 0.0 for n in labels[1:]}, "n": len(samples)}
    precision = evaluation.eval["precision"]  # [IoU thresholds, recall, classes, areas, max detections]
    per_class = {}
    for k, cat in enumerate(evaluation.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[labels[cat]] = round(float(p[p > -1].mean()), 4) if (p > -1).any() else 0.0
    return {"map": round(float(evaluation.stats[0]), 4), "map50": round(float(evaluation.stats[1]), 4),
            "per_class_ap": per_class, "n": len(samples)}


def summary(metrics: dict[str, Any]) -> EvalSummary:
    return EvalSummary(n=metrics["n"], map=metrics["map"], map50=metrics["map50"],
                       per_class_ap=metrics["per_class_ap"])


def box_parity(a: Detections, b: Detections, score_threshold: float = 0.3, score_atol: float = 1e-3,
               min_iou: float = 0.99) -> dict[str, Any]:
    """Two artifacts' detections over the threshold, image by image: as many boxes, each box of `a` matched to the
    same-label box of `b` it overlaps most (order aside), box IoU >= min_iou and scores within score_atol."""
    worst_iou, worst_score, mismatched = 1.0, 0.0, 0
    for x, y in zip(a, b, strict=True):
        kx, ky = x["scores"] >= score_threshold, y["scores"] >= score_threshold
        n = int(kx.sum())
        if n != int(ky.sum()):
            mismatched += 1
            continue
        if not n:
            continue
        same = x["labels"][kx][:, None] == y["labels"][ky][None, :]
        iou = torch.where(same, box_iou(x["boxes"][kx], y["boxes"][ky]), torch.tensor(-1.0))
        best, match = iou.max(1)
        if len(set(match.tolist())) != n or float(best.min()) < 0:
            mismatched += 1
            continue
        worst_iou = min(worst_iou, float(best.min()))
        worst_score = max(worst_score, float((x["scores"][kx] - y["scores"][ky][match]).abs().max()))
    return {"images": len(a), "mismatched_images": mismatched, "min_box_iou": round(worst_iou, 6),
            "max_score_diff": round(worst_score, 6), "score_threshold": score_threshold,
            "ok": mismatched == 0 and worst_iou >= min_iou and worst_score <= score_atol}


def plot(samples: list[Sample], detections: Detections, labels: list[str], path: Path, threshold: float = 0.5,
         n: int = 8) -> Path:
    """A grid of test images: true boxes in green, detections over `threshold` in red with label and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = min(n, len(samples))
    cols = 4
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s, d in zip(axes.flat, samples[:n], detections[:n], strict=False):
        ax.imshow(s.image.permute(1, 2, 0).numpy())
        for x1, y1, x2, y2 in s.boxes.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1))
        for (x1, y1, x2, y2), score, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist(),
                                                  strict=True):
            if score >= threshold:
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="red", linewidth=1))
                ax.text(x1, y1, f"{labels[label]} {score:.2f}", color="white", fontsize=7,
                        bbox={"facecolor": "red", "pad": 1, "linewidth": 0})
    fig.suptitle("test images: truth (green), detections (red)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    from handlers.runtimes import load_model
    from training.detection_data import test_samples

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    card = ModelCard.read(args.model_dir)
    samples = test_samples(card)
    detections = predict(load_model(args.model_dir, card), samples)
    metrics = coco_metrics(detections, samples, card.labels)
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_class_ap"}))
    print("AP per class:", " ".join(f"{k}={v:.3f}" for k, v in metrics["per_class_ap"].items()))
    print("plot:", plot(samples, detections, card.labels, args.model_dir / "eval" / "test" / "detections.png"))
    card.replace(metrics=dataclasses.replace(card.metrics, test=summary(metrics))).write(args.model_dir)


if __name__ == "__main__":
    main()
