"""The in-process ceiling: this project's handler called directly, no TorchServe, no HTTP.

    python -m benchmarks.inprocess artifacts/resnet18 [--variants artifacts/resnet18/variants] [--only a,b] [--quick]

For each variant, at batch 1 and 8: images/s of `ModelHandler.handle` on JPEG bodies (decode,
resize, normalize, forward, respond: the served path minus TorchServe) and of `forward` alone on
an already-normalized batch. Medians of repeated timings at a fixed torch thread count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from ts.context import Context

from handlers.contract import CardError, ModelCard
from handlers.cores import restart_with_openmp_env
from handlers.handler import ModelHandler
from harness.context import call, make_context
from training.speed import median_seconds

BATCHES = (1, 8)


def load_handler(model_dir: Path, name: str = "bench", batch_size: int = 8, options: dict[str, Any] | None = None,
                 gpu: bool = False) -> tuple[ModelHandler, Context]:
    handler = ModelHandler()
    ctx = make_context(model_dir, batch_size, 0 if gpu else None, name=name, config={"handler": options or {}})
    handler.initialize(ctx)
    return handler, ctx


def measure_variant(model_dir: Path, bodies: list[bytes], min_time: float, options: dict[str, Any] | None = None,
                    gpu: bool = False, batches: list[int] | tuple[int, ...] = BATCHES) -> list[dict[str, Any]]:
    """Rows {variant, batch, decode, ms_per_batch, images_per_s} for one model directory."""
    handler, ctx = load_handler(model_dir, options=options, gpu=gpu)
    variant = handler.card.variant
    statuses: set[int] = set()
    rows = []
    for batch in batches:
        requests = [{"body": bodies[i % len(bodies)]} for i in range(batch)]
        tensors = torch.stack([handler.task.decode(r["body"]) for r in requests])
        normalized = handler.task.batch(list(tensors))

        def with_decode(requests: list[dict[str, Any]] = requests) -> None:
            headers = [{"Content-Type": "image/jpeg"}] * len(requests)
            statuses.update(status for status, _ in call(handler, ctx, requests, headers))

        def model_only(x: torch.Tensor = normalized) -> None:
            out = handler._predict(x)
            if out.is_cuda:
                torch.cuda.synchronize()

        for decode, fn in ((True, with_decode), (False, model_only)):
            secs = median_seconds(fn, min_time)
            rows.append({"variant": variant, "dir": str(model_dir), "batch": batch, "decode": decode,
                         "ms_per_batch": round(secs * 1000, 3), "images_per_s": round(batch / secs, 2)})
    if statuses != {200}:
        raise RuntimeError(f"the handler answered benchmark inputs with statuses {sorted(statuses)}")
    return rows


def model_dirs(model_dir: Path, variants_dir: Path | None, only: list[str] | None = None) -> list[Path]:
    """fp32 first, then every variant under variants_dir (default MODEL/variants) that has a model card and
    its artifact, one directory per variant name. training.optimize writes its own variants/fp32 (the
    TorchScript export of the parent); when present it stands for fp32, else the parent does."""
    found: dict[str, Path] = {}
    parent = variants_dir if variants_dir is not None else model_dir / "variants"
    if parent.is_dir():
        for d in sorted(parent.iterdir()):
            try:
                card = ModelCard.read(d)
            except (FileNotFoundError, CardError):
                continue
            if (d / card.artifact).is_file():
                found.setdefault(card.variant, d)
    if "fp32" not in found:
        found["fp32"] = model_dir
    names = ["fp32", *sorted(n for n in found if n != "fp32")]
    if only:
        missing = sorted(set(only) - set(found))
        if missing:
            raise ValueError(f"variants {missing} not found; available: {', '.join(names)}")
        names = [n for n in names if n in only]
    return [found[n] for n in names]


def main() -> None:
    from benchmarks.inputs import digits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--variants", type=Path, default=None)
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, help="variant names, comma-separated")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        bodies = digits(args.model_dir, Path(tmp), limit=16).bodies()
    print(f"torch threads: {torch.get_num_threads()}")
    for d in model_dirs(args.model_dir, args.variants, args.only):
        for row in measure_variant(d, bodies, 0.5 if args.quick else 3.0):
            print(json.dumps(row))


if __name__ == "__main__":
    restart_with_openmp_env()
    main()
