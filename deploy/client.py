"""Inference client for production services: pooled connections, timeouts, bounded retries, typed results.

    from deploy.client import InferenceClient
    client = InferenceClient("http://127.0.0.1:8080", token, model="digits", timeout=(1.0, 10.0))
    pred = client.predict(png_bytes)                 # the default version
    pred = client.predict(png_bytes, version="2.0")  # a specific version
    results = client.predict_many(images, concurrency=8)   # Prediction or PredictionError per image

    python -m deploy.client IMAGE [IMAGE ...] [--url URL] [--model digits] [--version V] [--token-file key_file.json]

Retries (with exponential backoff and full jitter) happen only where a request cannot have been
served: connection errors, 503 (no free worker / queue full) and 507 (worker out of memory).
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from handlers.contract import KEY_FILE, KeyFileError, read_key

RETRY_STATUS = frozenset({503, 507})
AUTH_HINT = ("send the 'inference' key from key_file.json (written by TorchServe in the directory it was "
             "started from) as the token")


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


class PredictionError(Exception):
    """Base of every error the client raises; carries the server's message where there was one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.attempts = attempts


class ClientError(PredictionError):
    """4xx: the request is wrong (bad image, unknown model/version, too large); never retried."""


class AuthError(ClientError):
    """The token is missing or wrong (TorchServe answers 400/401)."""


class ServerError(PredictionError):
    """5xx other than 503/507 (e.g. inference failed in the handler); not retried."""


class ServerBusy(PredictionError):
    """503/507 on every attempt: no free worker, queue full, or out of memory."""


class ServerUnavailable(PredictionError):
    """No connection on every attempt: TorchServe is down or the address is wrong."""


class RequestTimeout(PredictionError):
    """No answer within the read timeout; not retried, the server may still be working on it."""


def server_message(response: requests.Response) -> tuple[str, str | None]:
    """(message, code) from our handler's {"error": {...}} or TorchServe's {"code", "type", "message"}."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:300] or response.reason or f"HTTP {response.status_code}"), None
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            err = body["error"]
            return str(err.get("message", "")), err.get("code")
        if "message" in body:
            return str(body["message"]), body.get("type")
    return json.dumps(body)[:300], None


def error_for(response: requests.Response, attempts: int) -> PredictionError:
    message, code = server_message(response)
    status = response.status_code
    if status in RETRY_STATUS:
        return ServerBusy(message, status, code, attempts)
    if status == 401 or (status == 400 and "token" in message.lower()):
        return AuthError(f"{message} ({AUTH_HINT})", status, code, attempts)
    if 400 <= status < 500:
        return ClientError(message, status, code, attempts)
    return ServerError(message, status, code, attempts)


class InferenceClient:
    """One pooled session per client; safe to share between threads."""

    def __init__(self, base_url: str, token: str | None = None, timeout: tuple[float, float] = (3.0, 30.0),
                 retries: int = 3, backoff: float = 0.1, max_backoff: float = 5.0, model: str = "digits",
                 pool_size: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.model = model
        self.session = requests.Session()
        # Retries are ours (status- and error-aware); urllib3's own are off.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    @classmethod
    def from_key_file(cls, base_url: str, key_file: Path, **kwargs: Any) -> InferenceClient:
        return cls(base_url, read_key(key_file, "inference"), **kwargs)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def delay(self, attempt: int, response: requests.Response | None = None) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**attempt)], at least a Retry-After."""
        with self._rng_lock:
            wait = self._rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt))
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after and retry_after.isdigit():
            wait = max(wait, min(float(retry_after), self.max_backoff))
        return wait

    def predict(self, image: bytes, version: str | None = None, model: str | None = None) -> Prediction:
        """Classify one encoded image with `version` (default: the model's default version)."""
        path = f"/predictions/{model or self.model}" + (f"/{version}" if version else "")
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                r = self.session.post(self.base_url + path, data=image, headers=headers, timeout=self.timeout)
            except requests.ConnectionError as e:  # includes ConnectTimeout: nothing reached the server
                if attempt > self.retries:
                    raise ServerUnavailable(f"cannot connect to {self.base_url}: {type(e).__name__}: "
                                            f"{str(e)[:200]}", attempts=attempt) from e
                time.sleep(self.delay(attempt))
                continue
            except requests.Timeout as e:
                raise RequestTimeout(f"no answer from {self.base_url}{path} within {self.timeout[1]}s",
                                     attempts=attempt) from e
            latency_ms = (time.perf_counter() - started) * 1000
            if r.status_code in RETRY_STATUS and attempt <= self.retries:
                time.sleep(self.delay(attempt, r))
                continue
            if not r.ok:
                raise error_for(r, attempt)
            return self.parse(r, latency_ms, attempt)

    @staticmethod
    def parse(r: requests.Response, latency_ms: float, attempts: int) -> Prediction:
        try:
            body = r.json()
            info = body.get("model", {})
            return Prediction(label=str(body["label"]), probabilities=body.get("probabilities", {}),
                              model=info.get("name", ""), version=str(info.get("version", "")),
                              variant=info.get("variant", ""), latency_ms=latency_ms, attempts=attempts, raw=body)
        except (ValueError, KeyError, AttributeError) as e:
            raise ServerError(f"unexpected response body: {r.text[:200]}", r.status_code, attempts=attempts) from e

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
    ap.add_argument("--url", default=os.environ.get("TS_INFERENCE_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--model", default="digits")
    ap.add_argument("--version", default=None)
    ap.add_argument("--token-file", type=Path, default=Path(KEY_FILE))
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    token = os.environ.get("TS_INFERENCE_TOKEN")
    try:
        token = token or read_key(args.token_file, "inference")
        images = [p.read_bytes() for p in args.images]
    except (OSError, KeyFileError) as e:
        sys.exit(f"error: {e}")
    with InferenceClient(args.url, token, model=args.model) as client:
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
