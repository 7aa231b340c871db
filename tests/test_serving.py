"""Integration: archives from build_mar.sh served by the real TorchServe (Java frontend + Python workers)."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from handlers.imaging import Normalizer, decode_image, resize_batch
from handlers.loading import build_model, load_state_dict
from tests.bad_inputs import corpus
from tests.conftest import ROOT, build_mar, serve
from tests.torchserve import TorchServe

pytestmark = pytest.mark.server

BATCH_MAX_BYTES = 1_000_000  # handler limit in the batching archive, below the frontend's max_request_size


@pytest.fixture(scope="module")
def store(model_store: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.mar (default config) plus digits_batched.mar: batches of 8 with a long enough delay to form."""
    cfg = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())
    cfg.update(batchSize=8, maxBatchDelay=200)
    cfg["handler"]["max_bytes"] = BATCH_MAX_BYTES
    path = tmp_path_factory.mktemp("cfg") / "batched.yaml"
    path.write_text(yaml.safe_dump(cfg))
    build_mar(tiny_model, model_store, "--name", "digits_batched", "--config", str(path), "--device", "cpu")
    return model_store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve(store, tmp_path_factory.mktemp("ts"), ["digits", "digits_batched"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def offline(tiny_model: Path, tiny_meta: dict):
    model = build_model(tiny_meta["architecture"], tiny_meta["num_classes"])
    model.load_state_dict(load_state_dict(tiny_model / tiny_meta["checkpoint"]))
    model.eval()
    normalize = Normalizer(tiny_meta["mean"], tiny_meta["std"])

    def predict(blobs: list[bytes]) -> list[str]:
        batch = normalize(resize_batch([decode_image(b) for b in blobs], tiny_meta["input_size"]))
        with torch.inference_mode():
            return [tiny_meta["labels"][i] for i in model(batch).argmax(1).tolist()]

    return predict


def post_all(ts: TorchServe, model: str, bodies: list, workers: int = 8) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: ts.predict(model, b), bodies))


def test_served_predictions_equal_offline_eager_for_png_and_jpeg(server, offline, tiny_splits) -> None:
    images = [tiny_splits.test[i][0] for i in range(40)]
    for encode in (lambda im: encode_png(im), lambda im: encode_jpeg(im, quality=85)):
        blobs = [encode(im).numpy().tobytes() for im in images]
        responses = post_all(server, "digits", blobs)
        assert [r.status_code for r in responses] == [200] * len(blobs), responses[0].text
        assert [r.json()["label"] for r in responses] == offline(blobs)


def test_served_accuracy_on_the_held_out_set_equals_the_offline_figure(server, tiny_splits, tiny_meta) -> None:
    pairs = [tiny_splits.test[i] for i in range(len(tiny_splits.test))]
    responses = post_all(server, "digits", [encode_png(im).numpy().tobytes() for im, _ in pairs])
    assert all(r.status_code == 200 for r in responses)
    correct = sum(r.json()["label"] == tiny_meta["labels"][y] for r, (_, y) in zip(responses, pairs, strict=True))
    assert round(correct / len(pairs), 6) == tiny_meta["metrics"]["test"]["top1"]


def test_wrong_input_gets_4xx_json_and_the_worker_survives(server, tiny_splits) -> None:
    pids = server.worker_pids("digits")
    for body, content_type in ((b"", "application/octet-stream"), (b"hello, not an image", "text/plain")):
        r = server.predict("digits", body, content_type=content_type)
        assert 400 <= r.status_code < 500
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] in {"empty_body", "unsupported_format"}
        good = server.predict("digits", encode_png(tiny_splits.test[0][0]).numpy().tobytes())
        assert good.status_code == 200
    assert server.worker_pids("digits") == pids


def test_bad_input_corpus_mixed_into_real_batches(server, tiny_splits, tiny_meta) -> None:
    pids = server.worker_pids("digits_batched")
    image, label = tiny_splits.test[3]
    good = encode_png(image).numpy().tobytes()
    bad = corpus(image, tiny_meta["input_size"], BATCH_MAX_BYTES)
    jobs = [(b, True) for b in bad] + [(None, False)] * 3 * len(bad)
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(server.predict, "digits_batched", b.body, content_type=b.content_type) if is_bad
                   else pool.submit(server.predict, "digits_batched", good) for b, is_bad in jobs]
        responses = [f.result() for f in futures]
    for (b, is_bad), r in zip(jobs, responses, strict=True):
        if is_bad:
            assert (r.status_code, r.json()["error"]["code"]) == (b.status, b.code), (b.name, r.text[:200])
            assert r.json()["error"]["message"]
        else:
            assert r.status_code == 200 and r.json()["label"] == tiny_meta["labels"][label]
    assert server.worker_pids("digits_batched") == pids
    metrics = server.metrics()
    for name in ("PreprocessMs", "InferenceMs", "PostprocessMs", "RejectedInputs"):
        assert f"\n{name}{{" in metrics, f"{name} missing from /metrics"

    def series(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith(name + "{") and 'ModelName="digits_batched"' in line)

    items, batches = series("HandlerBatchSize_sum"), series("HandlerBatchSize_count")
    assert batches > 0 and items / batches > 1, f"no batching: {items} items in {batches} batches"


def test_describe_returns_the_model_card(server, tiny_meta) -> None:
    r = server.manage("GET", "/models/digits?customized=true")
    assert r.status_code == 200, r.text
    card = r.json()[0]["customizedMetadata"]
    card = card if isinstance(card, dict) else json.loads(card)
    assert card["variant"] == "fp32" and card["metrics"]["test"] == tiny_meta["metrics"]["test"]
    assert card["version"] == "1.0" and card["labels"] == tiny_meta["labels"]


def test_requests_without_the_token_are_refused(server, tiny_splits) -> None:
    png = encode_png(tiny_splits.test[0][0]).numpy().tobytes()
    r = server.session.post(server.url("inference", "/predictions/digits"), data=png)
    assert r.status_code in (400, 401) and "token" in r.text.lower()
    r = server.session.get(server.url("management", "/models"))
    assert r.status_code in (400, 401) and "token" in r.text.lower()
