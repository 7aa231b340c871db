"""TorchServe's gRPC APIs against the real server, through stubs generated from its jar (deploy/grpc_stubs.py):
deploy/client.py over gRPC gives what it gives over REST (predictions, typed errors, retries), and the management
API answers over gRPC with the management key.

TorchServe's own gRPC inference API is the default (non-OIP) mode, which the repo's config.properties runs.
Retries are counted in TorchServe's access log, which records every gRPC call with its status code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from deploy.client import (
    AuthError,
    ClientError,
    InferenceClient,
    Prediction,
    PredictionError,
    RequestTimeout,
    ServerBusy,
    ServerUnavailable,
)
from deploy.grpc_stubs import generate, load
from deploy.processes import free_port
from handlers.contract import KEY_FILE
from harness.torchserve import TorchServe
from tests.conftest import ROOT, serve_scalable

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def ts(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with serve_scalable(model_store, tmp_path_factory.mktemp("ts_grpc"), ["digits"]) as server:
        yield server


def address(ts: TorchServe, api: str) -> str:
    # The launcher gives each server its own gRPC ports; they are in the config it wrote.
    return f"127.0.0.1:{ts.props[f'grpc_{api}_port']}"


def client(ts: TorchServe, **kwargs: object) -> InferenceClient:
    kwargs.setdefault("token", ts.api.keys["inference"])
    return InferenceClient(f"grpc://{address(ts, 'inference')}", **kwargs)  # type: ignore[arg-type]


def rest_client(ts: TorchServe) -> InferenceClient:
    return InferenceClient(ts.url("inference"), ts.api.keys["inference"])


def bearer(ts: TorchServe, api: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {ts.api.keys[api]}"),)


def outcome(c: InferenceClient, image: bytes, **kwargs: str) -> Prediction | PredictionError:
    try:
        return c.predict(image, **kwargs)
    except PredictionError as e:
        return e


def grpc_calls(ts: TorchServe, method: str, code: grpc.StatusCode) -> int:
    """Calls the frontend logged for `method` that ended with `code` (access_log.log, TorchServe's own record)."""
    pattern = re.compile(rf'"gRPC \S+/{method} HTTP/2\.0" {code.value[0]}\b')
    return sum(bool(pattern.search(line)) for line in ts.logs("access_log.log").splitlines())


def batched(ts: TorchServe) -> tuple[float, float]:
    """(requests, handler calls) for digits so far, from the handler's HandlerBatchSize histogram."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in ts.api.metrics().splitlines():
        for key in totals:
            if line.startswith(f"HandlerBatchSize_{key}{{") and 'ModelName="digits"' in line:
                totals[key] = float(line.rsplit(" ", 1)[1])
    return totals["sum"], totals["count"]


def test_stubs_are_generated_once_per_jar() -> None:
    stubs = load()
    assert generate() is False  # the stamp matches the installed jar and generator: nothing to do
    assert stubs.inference_pb2.DESCRIPTOR.package == "org.pytorch.serve.grpc.inference"
    assert stubs.management_pb2.DESCRIPTOR.package == "org.pytorch.serve.grpc.management"


def test_ping_and_predictions_equal_rest(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    stubs = load()
    with grpc.insecure_channel(address(ts, "inference")) as channel:
        ping = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(channel).Ping(
            empty_pb2.Empty(), metadata=bearer(ts, "inference"), timeout=10)
    assert json.loads(ping.health) == {"status": "Healthy"}

    batch = [data for data, _ in images[:16]]
    with client(ts) as c:
        via_grpc = c.predict_many(batch, concurrency=4)
        pinned = c.predict(batch[0], version="1.0")
    rest = [ts.api.predict("digits", data) for data in batch]
    labels = []
    for g, r in zip(via_grpc, rest, strict=True):
        assert isinstance(g, Prediction) and r.status_code == 200, (g, r.text[:200])
        body = r.json()
        assert (g.label, g.model, g.version, g.attempts) == (body["label"], "digits", "1.0", 1)
        assert g.probabilities == pytest.approx(body["probabilities"], abs=1e-5)
        assert list(g.probabilities) == list(body["probabilities"])  # the same top-k, in the same order
        labels.append(g.label)
    assert pinned.label == labels[0]
    assert sum(got == label for got, (_, label) in zip(labels, images, strict=False)) >= 13  # ~97% top-1


def test_errors_are_the_typed_errors_rest_gives(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    image = images[0][0]
    cases = [(image, {"version": "9.9"}), (image, {"model": "nope"}), (b"", {}), (b"not an image", {}),
             (image[: len(image) // 2], {})]  # a truncated PNG
    with client(ts, retries=3) as g, rest_client(ts) as r:
        for body, kwargs in cases:
            via_grpc, via_rest = outcome(g, body, **kwargs), outcome(r, body, **kwargs)
            assert isinstance(via_rest, ClientError), via_rest
            assert isinstance(via_grpc, ClientError) and type(via_grpc) is type(via_rest), (kwargs, via_grpc)
            assert (via_grpc.status, via_grpc.code, via_grpc.message, via_grpc.attempts) == \
                (via_rest.status, via_rest.code, via_rest.message, 1)
        # Over max_request_size the frontend resets the stream (CANCELLED) where REST answers 413.
        too_large = b"x" * (int(ts.props["max_request_size"]) + 1)
        with pytest.raises(ClientError) as err:
            g.predict(too_large)
        assert (err.value.status, err.value.code, err.value.attempts) == (413, "CANCELLED", 1)


def test_token_missing_or_wrong_is_the_typed_auth_error(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    for token in (None, "not-the-key", ts.api.keys["management"]):
        with client(ts, token=token, retries=3) as c, pytest.raises(AuthError) as err:
            c.predict(images[0][0])
        # TorchServe's interceptor answers PERMISSION_DENIED, whatever is wrong with the token.
        assert (err.value.status, err.value.code, err.value.attempts) == (401, "PERMISSION_DENIED", 1)
        assert "token" in err.value.message.lower() and KEY_FILE in err.value.message


def test_management_over_grpc_with_the_management_key(ts: TorchServe) -> None:
    stubs = load()
    pb = stubs.management_pb2
    with grpc.insecure_channel(address(ts, "management")) as channel:
        mgmt = stubs.management_pb2_grpc.ManagementAPIsServiceStub(channel)
        key = bearer(ts, "management")
        # proto3 sends limit=0 when it is not set, and TorchServe then lists no models at all: ask for a page.
        listed = json.loads(mgmt.ListModels(pb.ListModelsRequest(limit=100), metadata=key, timeout=10).msg)
        assert [m["modelName"] for m in listed["models"]] == ["digits"]
        described = json.loads(mgmt.DescribeModel(pb.DescribeModelRequest(model_name="digits"), metadata=key,
                                                  timeout=10).msg)
        assert [(d["modelName"], d["modelVersion"], d["batchSize"]) for d in described] == [("digits", "1.0", 8)]
        assert sorted(int(w["pid"]) for w in described[0]["workers"]) == ts.api.worker_pids("digits")
        with pytest.raises(grpc.RpcError) as missing:
            mgmt.DescribeModel(pb.DescribeModelRequest(model_name="nope"), metadata=key, timeout=10)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError) as wrong_key:
            mgmt.ListModels(pb.ListModelsRequest(limit=100), metadata=bearer(ts, "inference"), timeout=10)
        assert wrong_key.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_a_corrupt_image_in_a_concurrent_batch_fails_alone(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    """The model batches up to 8 requests (maxBatchDelay 10 ms): 8 threads put the corrupt image in a batch with
    good ones. It gets its own 4xx; the others are answered, and no worker is replaced."""
    pids = ts.api.worker_pids("digits")
    requests_before, calls_before = batched(ts)
    batch = [data for data, _ in images[:32]]
    batch[5] = batch[5][: len(batch[5]) // 2]  # a truncated PNG
    with client(ts) as c:
        results = c.predict_many(batch, concurrency=8)
    with rest_client(ts) as r:
        expected = outcome(r, batch[5])
    bad = results.pop(5)
    assert isinstance(bad, ClientError) and isinstance(expected, ClientError), (bad, expected)
    assert (bad.status, bad.code, bad.message) == (expected.status, expected.code, expected.message)
    assert bad.status is not None and 400 <= bad.status < 500
    good = [res for res in results if isinstance(res, Prediction)]
    assert len(good) == 31, [res for res in results if not isinstance(res, Prediction)]
    labels = [label for _, label in images[:32]]
    del labels[5]
    assert sum(res.label == label for res, label in zip(good, labels, strict=True)) >= 27  # ~97% top-1
    assert ts.api.worker_pids("digits") == pids
    deadline = time.monotonic() + 10  # the workers' metrics reach the frontend asynchronously
    while batched(ts)[0] < requests_before + 31 and time.monotonic() < deadline:
        time.sleep(0.2)
    requests, calls = batched(ts)
    assert requests - requests_before >= 31 and calls - calls_before < 31  # the requests did share batches


def test_no_worker_is_retried_then_server_busy(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    """With no worker the frontend answers INTERNAL ("has no worker"), which REST answers 503: retried."""
    workers = len(ts.api.worker_pids("digits"))
    before = grpc_calls(ts, "Predictions", grpc.StatusCode.INTERNAL)
    ts.api.scale("digits", 0)
    try:
        with client(ts, retries=2, backoff=0.05) as c, pytest.raises(ServerBusy) as err:
            c.predict(images[0][0])
    finally:
        ts.api.scale("digits", workers)
    assert (err.value.status, err.value.code, err.value.attempts) == (503, "ServiceUnavailableException", 3)
    assert "no worker" in err.value.message
    deadline = time.monotonic() + 10  # the access log is flushed asynchronously
    while grpc_calls(ts, "Predictions", grpc.StatusCode.INTERNAL) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert grpc_calls(ts, "Predictions", grpc.StatusCode.INTERNAL) == before + 3
    with client(ts) as c:
        assert c.predict(images[0][0]).version == "1.0"


def test_deadline_is_not_retried_and_no_server_is_retried(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    with client(ts, timeout=(2.0, 0.001), retries=4) as c, pytest.raises(RequestTimeout) as timeout:
        c.predict(images[0][0])
    assert timeout.value.attempts == 1
    with InferenceClient(f"grpc://127.0.0.1:{free_port()}", "k", retries=2, backoff=0.01) as c:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as down:
            c.predict(images[0][0])
    assert down.value.attempts == 3 and time.monotonic() - started < 10


def test_cli_transport_grpc(ts: TorchServe, images: list[tuple[bytes, str]], tmp_path: Path) -> None:
    png = tmp_path / "digit.png"
    png.write_bytes(images[0][0])
    cmd = [sys.executable, "-m", "deploy.client", str(png), "--token-file", str(ts.workdir / KEY_FILE)]
    ok = subprocess.run([*cmd, "--transport", "grpc", "--url", f"grpc://{address(ts, 'inference')}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0 and "from digits 1.0" in ok.stdout, ok.stdout + ok.stderr
    mismatch = subprocess.run([*cmd, "--transport", "http", "--url", f"grpc://{address(ts, 'inference')}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert mismatch.returncode == 2 and "does not match" in mismatch.stderr
