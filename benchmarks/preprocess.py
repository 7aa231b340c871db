"""Preprocessing, side by side in one process: this handler's path vs stock TorchServe's PIL path.

    python -m benchmarks.preprocess [--model artifacts/resnet18] [--out benchmarks/results] [--quick]

Ours: ImageClassifier.decode per body (torchvision.io/libjpeg-turbo decode) + ImageClassifier.collate
(one batched resize when needed, one fused normalize, channels_last) - the handler's own methods.
Stock: ts.torch_handler.image_classifier.ImageClassifier.preprocess (PIL open, Resize(256),
CenterCrop(224), ToTensor, Normalize per image, then stack). Both get the same JPEG bodies.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import inputs
from benchmarks.inprocess import load_handler, median_seconds
from benchmarks.tools import ensure_captum
from handlers.contract import CARD_FILE

BATCH = 8


def stock_handler() -> Any:
    """The stock image_classifier, importable only with captum (benchmark-only) on sys.path."""
    captum = str(ensure_captum())
    if captum not in sys.path:
        sys.path.insert(0, captum)
    from ts.torch_handler.image_classifier import ImageClassifier as Stock

    handler = Stock()
    handler.device = torch.device("cpu")
    return handler


def thread_counts() -> list[int]:
    """1 and the default (what a TorchServe worker uses): on a busy machine, per-image torch ops with
    several OpenMP threads wait on each other, so the two can differ by an order of magnitude."""
    return sorted({1, torch.get_num_threads()})


def compare(model_dir: Path, sets: list[inputs.InputSet], min_time: float) -> list[dict[str, Any]]:
    ours, _ = load_handler(model_dir)
    stock = stock_handler()
    default = torch.get_num_threads()
    try:
        return [row for n in thread_counts() for row in _compare(ours, stock, sets, min_time, n)]
    finally:
        torch.set_num_threads(default)


def _compare(ours: Any, stock: Any, sets: list[inputs.InputSet], min_time: float, threads: int
             ) -> list[dict[str, Any]]:
    torch.set_num_threads(threads)
    rows = []
    for s in sets:
        bodies = s.bodies()
        batch = [bodies[i % len(bodies)] for i in range(BATCH)]
        stock_rows = [{"body": b} for b in batch]

        def ours_fn(batch: list[bytes] = batch) -> torch.Tensor:
            return ours.task.batch([ours.task.decode(b) for b in batch])

        def stock_fn(rows: list[dict[str, bytes]] = stock_rows) -> torch.Tensor:
            return stock.preprocess(rows)

        out_ours, out_stock = ours_fn(), stock_fn()
        t_ours = median_seconds(ours_fn, min_time)
        t_stock = median_seconds(stock_fn, min_time)
        rows.append({
            "input": s.name, "description": s.description, "batch": BATCH, "threads": threads,
            "ours_ms_per_image": round(t_ours * 1000 / BATCH, 4),
            "stock_ms_per_image": round(t_stock * 1000 / BATCH, 4),
            "speedup": round(t_stock / t_ours, 2),
            "ours_output": list(out_ours.shape), "stock_output": list(out_stock.shape),
        })
    return rows


def markdown(rows: list[dict[str, Any]], threads: int) -> str:
    lines = [
        "| input | torch threads | ours ms/image | stock PIL ms/image | speedup (stock/ours) | ours out | stock out |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['input']} ({r['description']}) | {r['threads']} | {r['ours_ms_per_image']:.3f} | "
                     f"{r['stock_ms_per_image']:.3f} | **{r['speedup']:.2f}x** | "
                     f"{'x'.join(map(str, r['ours_output']))} | {'x'.join(map(str, r['stock_output']))} |")
    lines.append(f"\nBatch of {BATCH} bodies per call, median of repeats, one process (default torch threads "
                 f"{threads}). Ours resizes to the model's input size; stock to 256 then crops 224.")
    return "\n".join(lines) + "\n"


def run(model_dir: Path, out: Path | None, quick: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        sets = [inputs.digits(model_dir, Path(tmp), limit=32), inputs.photos(Path(tmp))]
        rows = compare(model_dir, sets, 0.5 if quick else 3.0)
    result = {"model": str(model_dir), "threads": torch.get_num_threads(), "rows": rows}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "preprocess.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "preprocess.md").write_text(markdown(rows, result["threads"]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("artifacts/resnet18"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="shorter timings")
    args = ap.parse_args()
    if not (args.model / CARD_FILE).is_file():
        sys.exit(f"error: {args.model}/{CARD_FILE} not found; train and export a model first, or pass --model")
    result = run(args.model, args.out, args.quick)
    print(markdown(result["rows"], result["threads"]))


if __name__ == "__main__":
    main()
