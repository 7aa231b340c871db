"""deploy/client.py against the real TorchServe (production profile): typed results, token, timeouts, retries.

Requests are counted in TorchServe's own access log, so "retried" and "not retried" are what the
server saw, not what the client says about itself.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.client import (
    AuthError,
    ClientError,
    InferenceClient,
    Prediction,
    Reply,
    RequestTimeout,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    error_for,
    retryable,
)
from deploy.processes import free_port
from harness.torchserve import TorchServe
from tests.conftest import serve_scalable

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def ts(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with serve_scalable(model_store, tmp_path_factory.mktemp("ts_client"), ["digits"]) as server:
        yield server


def client(ts: TorchServe, **kwargs: object) -> InferenceClient:
    kwargs.setdefault("token", ts.api.keys["inference"])
    return InferenceClient(ts.url("inference"), **kwargs)  # type: ignore[arg-type]


def served(ts: TorchServe, path: str, status: int) -> int:
    """Requests the frontend logged for `path` with `status` (access_log.log is TorchServe's own record)."""
    pattern = re.compile(rf'"POST {re.escape(path)} HTTP/1\.1" {status}\b')
    return sum(bool(pattern.search(line)) for line in ts.logs("access_log.log").splitlines())


def settled_count(ts: TorchServe, path: str, status: int, expected: int, timeout: float = 10) -> int:
    """The access-log count once it reaches `expected` (log lines are flushed asynchronously), plus a moment
    more, so that a late extra request would be seen too."""
    deadline = time.monotonic() + timeout
    while served(ts, path, status) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    return served(ts, path, status)


def test_predict_typed_results_default_and_version(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    with client(ts) as c:
        started = time.perf_counter()
        pred = c.predict(images[0][0])
        wall_ms = (time.perf_counter() - started) * 1000
        assert isinstance(pred, Prediction)
        assert (pred.model, pred.version, pred.attempts) == ("digits", "1.0", 1)
        assert pred.label in pred.probabilities and 0 < pred.latency_ms <= wall_ms
        assert c.predict(images[0][0], version="1.0").label == pred.label
        with pytest.raises(ClientError) as missing:
            c.predict(images[0][0], version="9.9")
        assert missing.value.status == 404 and "9.9" in missing.value.message

        batch = [data for data, _ in images[:24]]
        batch[5] = b"this is not an image"
        results = c.predict_many(batch, concurrency=4)
    assert len(results) == 24
    bad = results[5]
    assert isinstance(bad, ClientError) and bad.status == 415 and bad.code == "unsupported_format"
    assert "not a readable image" in bad.message
    good = [(r, label) for r, (_, label) in zip(results, images[:24], strict=True) if r is not bad]
    assert all(isinstance(r, Prediction) for r, _ in good)
    # The tiny model scores ~97% on held-out digits; the order of results must match the order of images.
    assert sum(r.label == label for r, label in good) >= 20  # type: ignore[union-attr]


def test_token_missing_or_wrong_is_a_typed_error(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    for token in (None, "not-the-key", ts.api.keys["management"]):
        with client(ts, token=token, retries=3) as c, pytest.raises(AuthError) as err:
            c.predict(images[0][0])
        assert err.value.status in (400, 401) and err.value.attempts == 1
        assert "token" in err.value.message.lower() and "key_file.json" in err.value.message
    with client(ts) as c:
        assert c.predict(images[0][0]).version == "1.0"


def test_no_retry_on_400(ts: TorchServe) -> None:
    path = "/predictions/digits/1.0"
    before = served(ts, path, 400)
    with client(ts, retries=4, backoff=0.05) as c, pytest.raises(ClientError) as err:
        c.predict(b"", version="1.0")
    assert err.value.status == 400 and err.value.attempts == 1
    assert "empty" in err.value.message
    assert settled_count(ts, path, 400, before + 1) == before + 1


def test_read_timeout_is_not_retried(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    # 1 ms cannot cover a real inference (the frontend alone waits up to maxBatchDelay=5 ms to fill a batch).
    with client(ts, timeout=(2.0, 0.001), retries=4) as c, pytest.raises(RequestTimeout) as err:
        c.predict(images[0][0])
    assert err.value.attempts == 1


def test_a_request_whose_worker_died_is_retried_whatever_status_torchserve_gave() -> None:
    """TorchServe's body for the batch of a worker that died: 500 or 507, depending on a race in its frontend."""
    died = json.dumps({"code": 500, "type": "InternalServerException", "message": "Worker died."}).encode()
    failed = json.dumps({"code": 500, "type": "InternalServerException", "message": "Prediction failed"}).encode()
    assert retryable(Reply(500, died)) and retryable(Reply(507, died)) and retryable(Reply(503, failed))
    assert not retryable(Reply(500, failed)) and not retryable(Reply(400, died))
    assert isinstance(error_for(Reply(500, died), 4), ServerBusy)
    assert type(error_for(Reply(500, failed), 1)) is ServerError


def test_connection_refused_is_retried_then_typed() -> None:
    port = free_port()  # nothing listens there
    with InferenceClient(f"http://127.0.0.1:{port}", "k", retries=2, backoff=0.01) as c:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable) as err:
            c.predict(b"x")
    assert err.value.attempts == 3 and time.monotonic() - started < 10


def test_retry_on_503_until_a_worker_is_back(ts: TorchServe, images: list[tuple[bytes, str]]) -> None:
    """With no worker the real frontend answers 503; the client retries with backoff and succeeds once a
    worker is back, and gives ServerBusy (with the server's message) when retries run out."""
    path = "/predictions/digits"
    workers = len(ts.api.worker_pids("digits"))
    ts.api.scale("digits", 0)
    try:
        before = served(ts, path, 503)
        with client(ts, retries=2, backoff=0.05) as c, pytest.raises(ServerBusy) as err:
            c.predict(images[0][0])
        assert err.value.status == 503 and err.value.attempts == 3
        assert "worker" in err.value.message
        assert settled_count(ts, path, 503, before + 3) == before + 3

        result: dict[str, object] = {}

        def call() -> None:
            with client(ts, retries=60, backoff=0.2, max_backoff=1.0) as c:
                try:
                    result["pred"] = c.predict(images[0][0])
                except Exception as e:  # reported by the assertion below
                    result["error"] = e

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(1.0)  # let it meet a few 503s first
        ts.api.scale("digits", workers)
        worker.join(timeout=120)
    finally:
        ts.api.scale("digits", workers)
    pred = result.get("pred")
    assert isinstance(pred, Prediction), result
    assert pred.attempts > 1 and pred.version == "1.0"
