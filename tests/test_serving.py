"""Integration: archives from build_mar.sh served by the real TorchServe (Java frontend + Python workers)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import shutil
from itertools import pairwise
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from benchmarks.served import parse_prometheus
from benchmarks.startup import STARTUP_MARKS
from handlers.contract import STATE_DICT_FILE, ModelCard
from handlers.cores import OPENMP_ENV
from handlers.deprecations import known_deprecations
from handlers.imaging import Normalizer, decode_image, resize_batch
from handlers.loading import build_model, load_state_dict
from handlers.runtimes import load_model
from harness.torchserve import TorchServe
from tests.bad_inputs import corpus
from tests.conftest import ROOT, build_mar, serve
from training.evaluate import predict
from training.technique import variant_dir

pytestmark = pytest.mark.server

BATCH_MAX_BYTES = 1_000_000  # handler limit in the batching archive, below the frontend's max_request_size


@pytest.fixture(scope="module")
def pruned_eager(pruned_parent: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The structured-pruned variant served from its float state_dict (eager runtime), not its TorchScript."""
    out = tmp_path_factory.mktemp("pruned_eager")
    source = variant_dir(pruned_parent, "pruned")
    card = ModelCard.read(source)
    shutil.copy(source / STATE_DICT_FILE, out / STATE_DICT_FILE)
    card.replace(name="digits_pruned", runtime="eager", artifact=STATE_DICT_FILE).write(out)
    return out


@pytest.fixture(scope="module")
def store(model_store: Path, tiny_model: Path, pruned_eager: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.mar (default config), digits_batched.mar (batches of 8 with a long enough delay to form), and
    digits_pruned.mar (a structured-pruned state_dict)."""
    cfg = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())
    cfg.update(batchSize=8, maxBatchDelay=200)
    cfg["handler"]["max_bytes"] = BATCH_MAX_BYTES
    path = tmp_path_factory.mktemp("cfg") / "batched.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path_factory.mktemp("serving_store")
    for archive in ("digits.mar",):
        shutil.copy(model_store / archive, store / archive)
    build_mar(tiny_model, store, "--name", "digits_batched", "--config", str(path), "--device", "cpu")
    # One fine-tune epoch costs the tiny pruned model a few points; this archive is about serving its state_dict.
    build_mar(pruned_eager, store, "--device", "cpu", "--budget", "20")
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve(store, tmp_path_factory.mktemp("ts"), ["digits", "digits_batched", "digits_pruned"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def offline(tiny_model: Path, tiny_card: ModelCard):
    model = build_model(tiny_card.architecture, tiny_card.num_classes)
    model.load_state_dict(load_state_dict(tiny_model / STATE_DICT_FILE))
    model.eval()
    normalize = Normalizer(tiny_card.input.mean, tiny_card.input.std)

    def predict(blobs: list[bytes]) -> list[str]:
        batch = normalize(resize_batch([decode_image(b) for b in blobs], tiny_card.input.image_size))
        with torch.inference_mode():
            return [tiny_card.labels[i] for i in model(batch).argmax(1).tolist()]

    return predict


def post_all(ts: TorchServe, model: str, bodies: list, workers: int = 8) -> list:
    with cf.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: ts.api.predict(model, b), bodies))


def test_served_predictions_equal_offline_eager_for_png_and_jpeg(server, offline, tiny_splits) -> None:
    images = [tiny_splits.test[i][0] for i in range(40)]
    for encode in (lambda im: encode_png(im), lambda im: encode_jpeg(im, quality=85)):
        blobs = [encode(im).numpy().tobytes() for im in images]
        responses = post_all(server, "digits", blobs)
        assert [r.status_code for r in responses] == [200] * len(blobs), responses[0].text
        assert [r.json()["label"] for r in responses] == offline(blobs)


def test_served_accuracy_on_the_held_out_set_equals_the_offline_figure(server, tiny_splits, tiny_card) -> None:
    pairs = [tiny_splits.test[i] for i in range(len(tiny_splits.test))]
    responses = post_all(server, "digits", [encode_png(im).numpy().tobytes() for im, _ in pairs])
    assert all(r.status_code == 200 for r in responses)
    correct = sum(r.json()["label"] == tiny_card.labels[y] for r, (_, y) in zip(responses, pairs, strict=True))
    assert round(correct / len(pairs), 6) == tiny_card.test.top1


def test_wrong_input_gets_4xx_json_and_the_worker_survives(server, tiny_splits) -> None:
    pids = server.api.worker_pids("digits")
    for body, content_type, status, code in ((b"", "application/octet-stream", 400, "empty_body"),
                                             (b"hello, not an image", "text/plain", 415, "unsupported_format")):
        r = server.api.predict("digits", body, content_type=content_type)
        assert r.status_code == status and r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == code
        good = server.api.predict("digits", encode_png(tiny_splits.test[0][0]).numpy().tobytes())
        assert good.status_code == 200
    assert server.api.worker_pids("digits") == pids


def test_bad_input_corpus_mixed_into_real_batches(server, tiny_splits, tiny_card, offline) -> None:
    pids = server.api.worker_pids("digits_batched")
    # A held-out digit the model gets right offline: which ones the tiny model misses depends on the machine that
    # trained it (an AVX2 VM's model called test[3] a 5).
    pairs = [tiny_splits.test[i] for i in range(20)]
    offline_labels = offline([encode_png(im).numpy().tobytes() for im, _ in pairs])
    image, label = next(p for p, got in zip(pairs, offline_labels, strict=True) if got == tiny_card.labels[p[1]])
    good = encode_png(image).numpy().tobytes()
    bad = corpus(image, tiny_card.input.image_size, BATCH_MAX_BYTES)
    jobs = [(b, True) for b in bad] + [(None, False)] * 3 * len(bad)
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(server.api.predict, "digits_batched", b.body, content_type=b.content_type) if is_bad
                   else pool.submit(server.api.predict, "digits_batched", good) for b, is_bad in jobs]
        responses = [f.result() for f in futures]
    for (b, is_bad), r in zip(jobs, responses, strict=True):
        if is_bad:
            assert (r.status_code, r.json()["error"]["code"]) == (b.status, b.code), (b.name, r.text[:200])
            assert r.json()["error"]["message"]
        else:
            assert r.status_code == 200 and r.json()["label"] == tiny_card.labels[label]
    assert server.api.worker_pids("digits_batched") == pids
    metrics = server.api.metrics()
    for name in ("PreprocessMs", "InferenceMs", "PostprocessMs", "RejectedInputs"):
        assert f"\n{name}{{" in metrics, f"{name} missing from /metrics"

    def series(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith(name + "{") and 'ModelName="digits_batched"' in line)

    items, batches = series("HandlerBatchSize_sum"), series("HandlerBatchSize_count")
    assert batches > 0 and items / batches > 1, f"no batching: {items} items in {batches} batches"


def test_describe_returns_the_model_card(server, tiny_card) -> None:
    r = server.api.manage("GET", "/models/digits?customized=true")
    assert r.status_code == 200, r.text
    described = r.json()[0]["customizedMetadata"]
    described = described if isinstance(described, dict) else json.loads(described)
    # The frontend drops JSON nulls on the way out; the card's defaults (None) restore them.
    assert ModelCard.from_dict(described["card"]) == tiny_card
    assert described["serving"]["version"] == "1.0" and described["serving"]["device"] == "cpu"


def test_workers_inherit_the_openmp_setting_the_core_lease_needs(server) -> None:
    for pid in server.api.worker_pids("digits"):
        environ = psutil.Process(pid).environ()
        assert {k: environ.get(k) for k in OPENMP_ENV} == OPENMP_ENV, f"worker {pid}"


def test_the_frontend_logs_a_request_once_and_keeps_start_up_and_metrics(server, tiny_splits) -> None:
    """deploy/log4j2.xml (config.properties' vmargs): one access-log line per request and no per-request lines in
    ts_log.log or model_log.log (the built-in config writes about ten), nothing written twice, and what people
    read the logs for is still there: the start-up phases and the handler's metrics on /metrics."""
    png, n = encode_png(tiny_splits.test[0][0]).numpy().tobytes(), 16
    names = ("access_log.log", "ts_log.log", "model_log.log")
    before = {name: len(server.logs(name).splitlines()) for name in names}
    batches = parse_prometheus(server.api.metrics(), "digits").get("HandlerBatchSize_count", 0.0)
    for _ in range(n):
        assert server.api.predict("digits", png).status_code == 200
    grown = {name: server.logs(name).splitlines()[before[name]:] for name in names}
    assert sum("POST /predictions/digits " in line for line in grown["access_log.log"]) == n
    assert len(grown["ts_log.log"]) < n // 2 and len(grown["model_log.log"]) < n // 2, grown
    ts_log = server.logs("ts_log.log").splitlines()
    assert not [a for a, b in pairwise(ts_log) if a == b], "ts_log.log holds lines written twice"
    assert [phase for phase, mark in STARTUP_MARKS if not any(mark.search(line) for line in ts_log)] == []
    assert parse_prometheus(server.api.metrics(), "digits")["HandlerBatchSize_count"] >= batches + n


def test_requests_without_the_token_are_refused(server, tiny_splits) -> None:
    png = encode_png(tiny_splits.test[0][0]).numpy().tobytes()
    r = requests.post(server.url("inference", "/predictions/digits"), data=png, timeout=30)
    assert r.status_code in (400, 401) and "token" in r.text.lower()
    r = requests.get(server.url("management", "/models"), timeout=30)
    assert r.status_code in (400, 401) and "token" in r.text.lower()


def test_kserve_v1_and_v2_bodies_through_the_real_frontend(server, tiny_splits, tiny_card, offline) -> None:
    """KServe bodies on /predictions and on the frontend's own KServe routes (/v1/models/{m}:predict and
    /v2/models/{m}/infer), which TorchServe 0.12 hands to the handler with the body as sent."""
    images = [tiny_splits.test[i][0] for i in range(4)]
    pngs = [encode_png(im).numpy().tobytes() for im in images]
    want = offline(pngs)
    v1 = {"instances": [{"data": base64.b64encode(p).decode()} for p in pngs]}
    tensor = Normalizer(tiny_card.input.mean, tiny_card.input.std)(images[0].unsqueeze(0))
    v2 = {"inputs": [{"name": "input-0", "shape": list(tensor.shape), "datatype": "FP32",
                      "data": tensor.flatten().tolist()}]}
    v2_bytes = {"inputs": [{"name": "input-0", "shape": [2], "datatype": "BYTES",
                            "data": [base64.b64encode(p).decode() for p in pngs[:2]]}]}
    for path in (None, "/v1/models/digits:predict"):
        r = server.api.predict("digits", v1, path=path)
        assert r.status_code == 200, (path, r.text[:300])
        assert [p["label"] for p in r.json()["predictions"]] == want
    for path in (None, "/v2/models/digits/infer"):
        r = server.api.predict("digits", v2, path=path)
        assert r.status_code == 200, (path, r.text[:300])
        body = r.json()
        assert body["model_name"] == "digits" and body["model_version"] == "1.0"
        assert body["outputs"][0]["name"] == "labels" and body["outputs"][0]["data"][0] == want[0]
        r = server.api.predict("digits", v2_bytes, path=path)
        labels = r.json()["outputs"][0]
        assert labels["shape"][0] == 2 and labels["data"][::labels["shape"][1]] == want[:2]
    bad = server.api.predict("digits", {"instances": "not a list"}, path="/v1/models/digits:predict")
    assert bad.status_code == 400 and bad.json()["error"].startswith("bad_request:")


def test_a_structured_pruned_state_dict_serves_the_labels_of_its_torchscript(server, pruned_parent: Path,
                                                                              pruned_eager: Path, tiny_splits) -> None:
    """The handler resizes torchvision's resnet18 to the pruned checkpoint's shapes (fit_shapes)."""
    described = server.api.describe("digits_pruned")[0]
    assert described["modelVersion"] == "1.0"
    images = [tiny_splits.test[i][0] for i in range(40)]
    responses = post_all(server, "digits_pruned", [encode_png(im).numpy().tobytes() for im in images])
    assert [r.status_code for r in responses] == [200] * 40, responses[0].text
    scripted_dir = variant_dir(pruned_parent, "pruned")
    card = ModelCard.read(scripted_dir)
    scripted = load_model(scripted_dir, card)
    with known_deprecations():
        logits, _ = predict(scripted, torch.utils.data.Subset(tiny_splits.test, range(40)), card.input.mean,
                            card.input.std)
    assert [r.json()["label"] for r in responses] == [card.labels[i] for i in logits.argmax(1).tolist()]
    assert {r.json()["model"]["variant"] for r in responses} == {"pruned"}
    assert ModelCard.read(pruned_eager).runtime == "eager"
