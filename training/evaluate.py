"""Held-out evaluation: top-1, macro precision/recall/F1, per-class report, confusion matrix (JSON + PNG).

    python -m training.evaluate artifacts/resnet18            # the artifact named in metadata
    python -m training.evaluate artifacts/resnet18 --split val
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix, precision_recall_fscore_support
from torch.utils.data import Dataset
from tqdm import tqdm

from handlers.contract import EvalSummary, ModelCard
from handlers.imaging import Normalizer
from handlers.runtimes import load_model
from training.data import Splits, load_splits, loader


def splits_for(card: ModelCard, input_size: int | None = None) -> Splits:
    """Rebuild the exact splits a model was trained on (at its input size unless given), refusing if the data
    changed."""
    if card.data is None:
        raise ValueError(f"the model card of {card.name} {card.variant} records no dataset (a model trained "
                         "elsewhere); its held-out split cannot be rebuilt here")
    splits = load_splits(card.data.spec, input_size or card.input.image_size)
    if splits.fingerprint != card.data.fingerprint:
        raise ValueError(
            f"the dataset at {card.data.spec.source} no longer matches the one this model was "
            f"trained on (fingerprint {splits.fingerprint[:12]} != {card.data.fingerprint[:12]}); "
            "evaluate on the original data or retrain"
        )
    return splits


@torch.inference_mode()
def predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    mean: list[float] | None,
    std: list[float] | None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, CPU) and labels [N] for a dataset of uint8 images."""
    normalize = Normalizer(mean, std)
    logits, labels = [], []
    batches = loader(dataset, batch_size)
    for images, y in tqdm(batches, desc="evaluate", leave=False, disable=not progress):
        logits.append(model(normalize(images)).float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict[str, Any]:
    y_true = labels.numpy()
    y_pred = logits.argmax(1).numpy()
    ids = list(range(len(names)))
    p, r, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    return {
        "n": int(len(y_true)),
        "top1": round(float((y_true == y_pred).mean()), 6),
        "macro_precision": round(float(p), 6),
        "macro_recall": round(float(r), 6),
        "macro_f1": round(float(f1), 6),
        "per_class": classification_report(
            y_true, y_pred, labels=ids, target_names=names, output_dict=True, zero_division=0
        ),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
    }


def plot_confusion(matrix: list[list[int]], names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(names), 0.8 + 0.5 * len(names)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45 if max(map(len, names)) > 2 else 0)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, result: dict[str, Any], names: list[str], title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_confusion(result["confusion_matrix"], names, title, out_dir / "confusion_matrix.png")


def summary(result: dict[str, Any]) -> EvalSummary:
    """The headline figures that go into the model card (the full report stays beside it)."""
    return EvalSummary(n=result["n"], top1=result["top1"], macro_precision=result["macro_precision"],
                       macro_recall=result["macro_recall"], macro_f1=result["macro_f1"])


def evaluate_artifact(model_dir: Path, card: ModelCard, dataset: Dataset, split: str = "test",
                      progress: bool = False, model: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[str, Any]:
    """The artifact the card names, loaded from disk as it will be served (or `model`, already loaded from there),
    on `dataset`; report written beside it."""
    model = load_model(model_dir, card, repeatable=True) if model is None else model
    logits, labels = predict(model, dataset, card.input.mean, card.input.std, progress=progress)
    result = classification_metrics(logits, labels, card.labels)
    title = f"{card.architecture} {card.variant} - {split} top-1 {100 * result['top1']:.2f}%"
    write_report(Path(model_dir) / "eval" / split, result, card.labels, title)
    return result


def evaluate_dir(model_dir: Path, split: str = "test", progress: bool = True) -> dict[str, Any]:
    """Evaluate the artifact named in `model_dir`'s model card and write its report beside it."""
    card = ModelCard.read(model_dir)
    return evaluate_artifact(model_dir, card, getattr(splits_for(card), split), split, progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--split", choices=("val", "test"), default="test")
    args = ap.parse_args()
    try:
        result = evaluate_dir(args.model_dir, args.split)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(dataclasses.asdict(summary(result)), indent=2))
    print(f"report: {args.model_dir / 'eval' / args.split}/report.json, confusion_matrix.png")


if __name__ == "__main__":
    main()
