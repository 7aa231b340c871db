"""Inference client for production services: pooled connections, timeouts, bounded retries, typed results.

    from deploy.client import InferenceClient
    client = InferenceClient("http://127.0.0.1:8080", token, model="digits", timeout=(1.0, 10.0))
    pred = client.predict(png_bytes)                 # the default version
    pred = client.predict(png_bytes, version="2.0")  # a specific version
    results = client.predict_many(images, concurrency=8)   # Prediction or PredictionError per image
    client = InferenceClient("grpc://127.0.0.1:7070", token)   # the same over TorchServe's gRPC inference API

    python -m deploy.client IMAGE [IMAGE ...] [--transport http|grpc] [--url URL] [--model digits] [--version V]
                            [--token-file key_file.json]

The URL's scheme picks the transport: http(s):// is the REST API, grpc:// TorchServe's own gRPC inference API
(InferenceAPIsService; stubs from deploy/grpc_stubs.py). A transport turns one request into a Reply in HTTP terms
(over gRPC: the status TorchServe's REST API gives for the same failure), and everything else is shared, so both
give the same predictions and the same typed errors.

Retries (with exponential backoff and full jitter) happen only where a request cannot have been
served: connection errors, 503 (no free worker / queue full), 507 (worker out of memory) and TorchServe's
"Worker died." for the batch a worker was running when it died.
A 4xx is the caller's mistake and a read timeout may already have been processed: neither is retried.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import grpc
import requests
from requests.adapters import HTTPAdapter

from deploy.grpc_stubs import StubsError, load
from deploy.keys import fresh_key
from handlers.contract import KEY_FILE, KeyFileError, read_key

RETRY_STATUS = frozenset({503, 507})
# TorchServe's answer to every request of the batch a worker was running when it died: 507 when the frontend has
# already seen the exit code 137 (kill -9, the OOM killer), 500 when it has not yet (a race in WorkerThread).
# Never answered by the model, and a prediction has no side effects, so it is retried like 503.
WORKER_DIED = "Worker died."
AUTH_HINT = ("send the 'inference' key from key_file.json (written by TorchServe in the directory it was "
             "started from) as the token")
T = TypeVar("T")
DEFAULT_URLS = {"http": "http://127.0.0.1:8080", "grpc": "grpc://127.0.0.1:7070"}


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    model: str
    version: str
    variant: str
    latency_ms: float  # wall time of the successful attempt
    attempts: int = 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Box:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the pixels of the image as displayed


@dataclass(frozen=True)
class Detections:
    boxes: list[Box]
    image_size: tuple[int, int]  # width, height
    model: str
    version: str
    variant: str
    latency_ms: float
    attempts: int = 1
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def prediction_of(body: dict[str, Any], latency_ms: float, attempts: int) -> Prediction:
    info = body.get("model", {})
    return Prediction(label=str(body["label"]), probabilities=body.get("probabilities", {}),
                      model=info.get("name", ""), version=str(info.get("version", "")),
                      variant=info.get("variant", ""), latency_ms=latency_ms, attempts=attempts, raw=body)


def detections_of(body: dict[str, Any], latency_ms: float, attempts: int) -> Detections:
    info = body.get("model", {})
    boxes = [Box(str(d["label"]), float(d["score"]), (*map(float, d["box"]),)) for d in body["detections"]]
    return Detections(boxes, (int(body["image_size"][0]), int(body["image_size"][1])), model=info.get("name", ""),
                      version=str(info.get("version", "")), variant=info.get("variant", ""),
                      latency_ms=latency_ms, attempts=attempts, raw=body)


class PredictionError(Exception):
    """Base of every error the client raises; carries the server's message where there was one.
    `status` is the HTTP status (over gRPC, the one the REST API gives for the same failure); `code` is our
    handler's error code, TorchServe's exception type, or the gRPC status name."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.attempts = attempts


class ClientError(PredictionError):
    """4xx: the request is wrong (bad image, unknown model/version, too large); never retried."""


class AuthError(ClientError):
    """The token is missing or wrong (TorchServe answers 400/401, over gRPC PERMISSION_DENIED)."""


class ServerError(PredictionError):
    """5xx other than 503/507 and a worker's death (e.g. inference failed in the handler); not retried."""


class ServerBusy(PredictionError):
    """503/507 or a worker's death on every attempt: no free worker, queue full, or out of memory."""


class ServerUnavailable(PredictionError):
    """No connection on every attempt: TorchServe is down or the address is wrong."""


class RequestTimeout(PredictionError):
    """No answer within the read timeout; not retried, the server may still be working on it."""


@dataclass(frozen=True)
class Reply:
    """One attempt's answer in HTTP terms, whichever transport carried it."""

    status: int
    body: bytes
    reason: str = ""  # the message when the body has none
    retry_after: str | None = None


class Unreachable(Exception):
    """The transport reached no server: retried."""


class NoAnswer(Exception):
    """The transport got no answer in time: not retried."""


class Transport(Protocol):
    def send(self, model: str, version: str | None, image: bytes) -> Reply:
        """One request; raises Unreachable or NoAnswer where there is no Reply."""

    def set_token(self, token: str) -> None:
        """Send `token` from now on (TorchServe renewed its key)."""

    def close(self) -> None: ...


def body_message(body: bytes, fallback: str) -> tuple[str, str | None]:
    """(message, code) from our handler's {"error": {...}} or TorchServe's {"code", "type", "message"}."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return (body.decode(errors="replace").strip()[:300] or fallback), None
    if isinstance(parsed, dict):
        if isinstance(parsed.get("error"), dict):
            err = parsed["error"]
            return str(err.get("message", "")), err.get("code")
        if "message" in parsed:
            return str(parsed["message"]), parsed.get("type")
    return json.dumps(parsed)[:300], None


def server_message(response: requests.Response) -> tuple[str, str | None]:
    return body_message(response.content, response.reason or f"HTTP {response.status_code}")


def retryable(reply: Reply) -> bool:
    """The request cannot have been served: 503, 507, or its worker died under it."""
    return reply.status in RETRY_STATUS or (reply.status >= 500 and body_message(reply.body, "")[0] == WORKER_DIED)


def refused_token(reply: Reply) -> bool:
    """TorchServe refused the token: REST answers 400 InvalidKeyException, gRPC PERMISSION_DENIED (401 here)."""
    return reply.status == 401 or (reply.status == 400 and "token" in body_message(reply.body, "")[0].lower())


def error_for(reply: Reply, attempts: int) -> PredictionError:
    message, code = body_message(reply.body, reply.reason or f"HTTP {reply.status}")
    status = reply.status
    if retryable(reply):
        return ServerBusy(message, status, code, attempts)
    if refused_token(reply):
        return AuthError(f"{message} ({AUTH_HINT})", status, code, attempts)
    if 400 <= status < 500:
        return ClientError(message, status, code, attempts)
    return ServerError(message, status, code, attempts)


class HttpTransport:
    """TorchServe's REST inference API over one pooled session."""

    def __init__(self, base_url: str, token: str | None, timeout: tuple[float, float], pool_size: int) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.session = requests.Session()
        # Retries are the client's (status- and error-aware); urllib3's own are off.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def send(self, model: str, version: str | None, image: bytes) -> Reply:
        url = f"{self.base_url}/predictions/{model}" + (f"/{version}" if version else "")
        try:
            r = self.session.post(url, data=image, headers=self.headers, timeout=self.timeout)
        except requests.ConnectionError as e:  # includes ConnectTimeout: nothing reached the server
            raise Unreachable(f"cannot connect to {self.base_url}: {type(e).__name__}: {str(e)[:200]}") from e
        except requests.Timeout as e:
            raise NoAnswer(f"no answer from {url} within {self.timeout[1]}s") from e
        return Reply(r.status_code, r.content, r.reason or "", r.headers.get("Retry-After"))

    def set_token(self, token: str) -> None:
        self.headers = {**self.headers, "Authorization": f"Bearer {token}"}  # one swap: threads share it

    def close(self) -> None:
        self.session.close()


# HTTP status for a gRPC status code: the inverse of TorchServe's GRPCUtils.getGRPCStatusCode, in the REST API's
# terms; anything else (INTERNAL, UNKNOWN, DATA_LOSS) is 500.
GRPC_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # the frontend's code for a 4xx it has no other code for
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 401,  # the interceptor's answer to a missing or wrong token
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    # The frontend resets the stream of a request over max_request_size (REST: 413).
    grpc.StatusCode.CANCELLED: 413,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    # TorchServe's internal 413 means "worker out of memory": REST sends it as 507 (RestJob), gRPC as this.
    grpc.StatusCode.RESOURCE_EXHAUSTED: 507,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# InferenceImpl answers INTERNAL where the REST API answers 4xx or 503; the last line of the description names
# the cause, here with the REST API's status and error type (GRPCJob.sendError's errors end in
# org.pytorch.serve.http.InternalServerException and carry the mapped code instead).
GRPC_INTERNAL_CAUSES = {
    "org.pytorch.serve.archive.model.ModelNotFoundException": (404, "ModelNotFoundException"),
    "org.pytorch.serve.archive.model.ModelVersionNotFoundException": (404, "ModelVersionNotFoundException"),
    "BadRequestException.()": (400, "BadRequestException"),  # no model name
    "InternalServerException.()": (503, "ServiceUnavailableException"),  # no free worker, or the queue is full
}
# TorchServe's Netty server allows client pings every 5 minutes at most and drops a connection that pings
# more often (GOAWAY too_many_pings).
GRPC_KEEPALIVE_MS = 300_000


def split_description(details: str) -> tuple[str, str]:
    """(message, cause): TorchServe's descriptions are "message\\n<exception>"; gRPC's own (no connection) have no
    second line."""
    message, newline, cause = details.rpartition("\n")
    return (message, cause) if newline else (details, "")


def item_status(body: bytes) -> int:
    """The status our handler set for this request. The gRPC frontend sends every prediction as OK (GRPCJob.response
    ignores the per-request status), so it is read back from the handler's {"error": {"status": ...}} body."""
    try:
        status = json.loads(body)["error"]["status"]
    except (ValueError, KeyError, TypeError):
        return 200
    return status if isinstance(status, int) and 400 <= status < 600 else 200


class GrpcTransport:
    """TorchServe's gRPC inference API (InferenceAPIsService.Predictions) over one channel, shared by all threads."""

    def __init__(self, target: str, token: str | None, timeout: tuple[float, float], backoff: float,
                 max_backoff: float) -> None:
        stubs = load()  # generated on first use
        self.target = target
        self.deadline = timeout[1]  # one per call; it covers connecting too where the channel must (re)connect
        self.request_type = stubs.inference_pb2.PredictionsRequest
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target, options=[
            # Despite its name, the timeout of each connection attempt (gRPC's default is 20 s).
            ("grpc.min_reconnect_backoff_ms", max(100, int(timeout[0] * 1000))),
            # Reconnect on the client's own retry schedule, not gRPC's (1 s growing to 120 s), so that a retry
            # after a restart does not fail fast on a channel still backing off.
            ("grpc.initial_reconnect_backoff_ms", max(100, int(backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(max_backoff * 1000))),
            ("grpc.keepalive_time_ms", GRPC_KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", 20_000),
        ])
        self.predictions = stubs.inference_pb2_grpc.InferenceAPIsServiceStub(self.channel).Predictions

    def send(self, model: str, version: str | None, image: bytes) -> Reply:
        request = self.request_type(model_name=model, model_version=version or "", input={"data": image})
        try:
            response = self.predictions(request, timeout=self.deadline, metadata=self.metadata)
        except grpc.RpcError as e:
            return self.error_reply(e, model)
        return Reply(item_status(response.prediction), response.prediction)

    def set_token(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def error_reply(self, error: grpc.RpcError, model: str) -> Reply:
        """What the REST API would have answered; raises NoAnswer or Unreachable where it would have raised."""
        call = cast(grpc.Call, error)  # what a call raises is also a grpc.Call, which has the status
        code = call.code()
        details = call.details() or ""
        message, cause = split_description(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise NoAnswer(f"no answer from grpc://{self.target} ({model}) within {self.deadline}s") from error
        if code == grpc.StatusCode.UNAVAILABLE and not cause:
            raise Unreachable(f"cannot connect to grpc://{self.target}: {details[:200]}") from error
        status = GRPC_HTTP_STATUS.get(code, 500)
        # The exception's class name where TorchServe named one, as its REST API's error type does.
        kind = cause.removesuffix(".()").rsplit(".", 1)[-1] if cause else code.name
        if code == grpc.StatusCode.INTERNAL:
            status, kind = GRPC_INTERNAL_CAUSES.get(cause, (500, kind))
        if code == grpc.StatusCode.CANCELLED:
            message += " (the server cancelled the call, as TorchServe does for a request over max_request_size)"
        # The REST API's error body, so that the shared code reads both transports alike.
        return Reply(status, json.dumps({"code": status, "type": kind, "message": message}).encode())

    def close(self) -> None:
        self.channel.close()


def transport_of(url: str) -> str:
    return "grpc" if urlsplit(url).scheme == "grpc" else "http"


class InferenceClient:
    """One pooled session (REST) or one channel (gRPC) per client; safe to share between threads."""

    def __init__(self, base_url: str, token: str | None = None, timeout: tuple[float, float] = (3.0, 30.0),
                 retries: int = 3, backoff: float = 0.1, max_backoff: float = 5.0, model: str = "digits",
                 pool_size: int = 16, key_file: Path | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        # With `key_file` (TorchServe's key_file.json), the token is read from it, and read again when TorchServe
        # refuses it: its keys expire and are renewed (deploy/keys.py).
        self.key_file = key_file
        if token is None and key_file is not None:
            token = read_key(key_file, "inference")
        self.token = token
        self._token_lock = threading.Lock()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.model = model
        url = urlsplit(self.base_url)
        self.transport: Transport
        if url.scheme == "grpc" and url.netloc:  # HTTP/2 multiplexes every call on one connection: no pool
            self.transport = GrpcTransport(url.netloc, token, timeout, backoff, max_backoff)
        elif url.scheme in ("http", "https") and url.netloc:
            self.transport = HttpTransport(self.base_url, token, timeout, pool_size)
        else:
            raise ValueError(f"unsupported URL {base_url!r}: use http(s)://HOST:PORT for the REST API or "
                             "grpc://HOST:PORT for TorchServe's gRPC inference API")
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    @classmethod
    def from_key_file(cls, base_url: str, key_file: Path, **kwargs: Any) -> InferenceClient:
        return cls(base_url, key_file=key_file, **kwargs)

    def renewed_token(self, sent: str | None) -> bool:
        """After TorchServe refused `sent`: True once the key file holds a newer key, which is sent from now on."""
        if self.key_file is None or sent is None:
            return False
        with self._token_lock:
            if self.token != sent:  # another thread has already picked up the new key
                return True
            key = fresh_key(self.key_file, "inference", sent)
            if key is None:
                return False
            self.token = key
            self.transport.set_token(key)
            return True

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**attempt)], at least a Retry-After."""
        with self._rng_lock:
            wait = self._rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt))
        if retry_after and retry_after.isdigit():
            wait = max(wait, min(float(retry_after), self.max_backoff))
        return wait

    def predict(self, image: bytes, version: str | None = None, model: str | None = None) -> Prediction:
        """Classify one encoded image with `version` (default: the model's default version)."""
        return self.answer(image, version, model, prediction_of)

    def detect(self, image: bytes, version: str | None = None, model: str | None = None) -> Detections:
        """The objects a detector finds in one encoded image (the model's default score threshold)."""
        return self.answer(image, version, model, detections_of)

    def answer(self, image: bytes, version: str | None, model: str | None, parse: Callable[..., T]) -> T:
        """One image's answer, with retries and one key renewal, read by `parse(body, latency_ms, attempts)`."""
        attempt = 0
        renewed = False
        while True:
            attempt += 1
            started = time.perf_counter()
            sent = self.token
            try:
                reply = self.transport.send(model or self.model, version, image)
            except Unreachable as e:
                if attempt > self.retries:
                    raise ServerUnavailable(str(e), attempts=attempt) from e
                time.sleep(self.delay(attempt))
                continue
            except NoAnswer as e:
                raise RequestTimeout(str(e), attempts=attempt) from e
            latency_ms = (time.perf_counter() - started) * 1000
            if refused_token(reply) and not renewed and self.renewed_token(sent):
                renewed = True  # once: a token the server still refuses is wrong, not renewed
                continue
            if retryable(reply) and attempt <= self.retries:
                time.sleep(self.delay(attempt, reply.retry_after))
                continue
            if not 200 <= reply.status < 300:
                raise error_for(reply, attempt)
            try:
                return parse(json.loads(reply.body), latency_ms, attempt)
            except (ValueError, KeyError, AttributeError, TypeError) as e:
                raise ServerError(f"unexpected response body: {reply.body[:200]!r}", reply.status,
                                  attempts=attempt) from e

    def predict_many(self, images: Sequence[bytes], concurrency: int = 8, version: str | None = None,
                     model: str | None = None) -> list[Prediction | PredictionError]:
        """One result per image, in order; a failed image gives its error instead of failing the batch."""

        def one(image: bytes) -> Prediction | PredictionError:
            try:
                return self.predict(image, version, model)
            except PredictionError as e:
                return e

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--transport", choices=sorted(DEFAULT_URLS), default=None,
                    help="http (REST) or grpc (TorchServe's gRPC inference API); default: --url's scheme, else http")
    ap.add_argument("--url", default=None,
                    help=f"http(s)://HOST:PORT or grpc://HOST:PORT; default by transport: $TS_INFERENCE_URL or "
                         f"{DEFAULT_URLS['http']}, {DEFAULT_URLS['grpc']}")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--version", default=None)
    ap.add_argument("--token-file", type=Path, default=Path(KEY_FILE))
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    url = args.url or (os.environ.get("TS_INFERENCE_URL", DEFAULT_URLS["http"]) if args.transport != "grpc"
                       else DEFAULT_URLS["grpc"])
    if args.transport and transport_of(url) != args.transport:
        ap.error(f"--transport {args.transport} does not match the URL {url}")
    token = os.environ.get("TS_INFERENCE_TOKEN")
    try:
        images = [p.read_bytes() for p in args.images]
        client = InferenceClient(url, token, model=args.model, key_file=None if token else args.token_file)
    except (OSError, KeyFileError, ValueError, StubsError) as e:
        sys.exit(f"error: {e}")
    with client:
        results = client.predict_many(images, args.concurrency, args.version)
    failed = 0
    for path, res in zip(args.images, results, strict=True):
        if isinstance(res, Prediction):
            print(f"{path}: {res.label} ({res.probabilities.get(res.label, 0):.3f}) from {res.model} {res.version} "
                  f"in {res.latency_ms:.1f} ms")
        else:
            failed += 1
            print(f"{path}: {type(res).__name__} (HTTP {res.status}): {res.message}", file=sys.stderr)
    if failed:
        sys.exit(f"error: {failed} of {len(results)} images failed")


if __name__ == "__main__":
    main()
