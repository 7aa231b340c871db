"""GPU workers: the handler on cuda:{gpu_id} under the real TorchServe, AMP, channels_last, batched nvjpeg decode
and pinned copies. They skip without CUDA. `bash benchmarks/gpu_check.sh` runs them on a GPU machine, and its
`--dry-run` (CI) runs the same bodies on the CPU with GPU_CHECK_DEVICE=cpu, so a broken test is found here."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg

from handlers.handler import ModelHandler
from harness.context import call, make_context
from tests.conftest import copy_store, serve

DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA and not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU; this machine has none")]


def jpegs(splits, n: int) -> list[bytes]:
    return [encode_jpeg(splits.test[i][0], quality=90).numpy().tobytes() for i in range(n)]


def on_device(model_dir: Path, options: dict | None = None) -> tuple[ModelHandler, object]:
    h = ModelHandler()
    ctx = make_context(model_dir, gpu=0 if CUDA else None, config={"handler": options or {}})
    h.initialize(ctx)
    assert h.device.type == DEVICE
    return h, ctx


def labels(h: ModelHandler, ctx, bodies: list[bytes]) -> list[str]:
    results = call(h, ctx, [{"body": bytearray(b)} for b in bodies])
    assert [s for s, _ in results] == [200] * len(bodies), results
    return [b["label"] for _, b in results]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_agrees_with_fp32(tiny_model: Path, tiny_splits, amp: str) -> None:
    bodies = jpegs(tiny_splits, 32)
    fp32 = labels(*on_device(tiny_model), bodies)
    h, ctx = on_device(tiny_model, {"amp": amp})
    assert sum(a == b for a, b in zip(labels(h, ctx, bodies), fp32, strict=True)) >= 31


def test_channels_last_and_pinned_copies(tiny_model: Path, tiny_splits) -> None:
    """A batch reaches the model channels_last on the worker's device, and a CPU batch gets to the GPU through
    pinned memory as an asynchronous copy (the profiler names the copy's source)."""
    h, ctx = on_device(tiny_model)
    batch = torch.stack([tiny_splits.test[i][0] for i in range(8)])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.profiler.profile(activities=activities) as prof:
        x = h.task.normalize(batch)
        if CUDA:
            torch.cuda.synchronize()
    assert x.device.type == DEVICE and x.is_contiguous(memory_format=torch.channels_last)
    names = {e.name for e in prof.events()}
    if CUDA:
        assert any("Pinned -> Device" in n for n in names), sorted(n for n in names if "Memcpy" in n)
    else:
        assert not any("Memcpy" in n for n in names)
    assert labels(h, ctx, jpegs(tiny_splits, 4))


def test_two_workers_share_one_gpu_under_torchserve(model_store: Path, tiny_model: Path, tiny_splits,
                                                    tmp_path: Path) -> None:
    """TorchServe puts both workers of the archive (minWorkers 2) on the one GPU (gpu_id 0); 64 concurrent requests
    get the labels the handler gives in this process."""
    store = copy_store(model_store, tmp_path / "store", "digits.mar")
    bodies = jpegs(tiny_splits, 64)
    expected = labels(*on_device(tiny_model), bodies)
    with serve(store, tmp_path / "ts", ["digits"], {"number_of_gpu": "1" if CUDA else "0"}) as ts:
        workers = ts.api.describe("digits")[0]["workers"]
        assert len(workers) == 2 and all(w["gpu"] == CUDA for w in workers), workers
        r = ts.api.manage("GET", "/models/digits?customized=true")
        meta = r.json()[0]["customizedMetadata"]
        meta = meta if isinstance(meta, dict) else json.loads(meta)
        assert meta["serving"]["device"] == ("cuda:0" if CUDA else "cpu")
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda b: ts.api.predict("digits", b, content_type="image/jpeg"), bodies))
        assert [a.status_code for a in answers] == [200] * len(bodies), [a.text[:200] for a in answers if not a.ok]
        served = [a.json()["label"] for a in answers]
        assert sum(a == b for a, b in zip(served, expected, strict=True)) >= 63
