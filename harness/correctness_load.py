"""Correctness under load: every request is checked against the answer it must get, while N threads send them in a
closed loop (as fast as they go) or an open loop at a fixed rate. Loopback only. (Throughput is measured with wrk:
harness/wrk_throughput.py.)

Used by tests/test_reliability.py; also runnable against a local TorchServe to check by hand:

    python -m harness.correctness_load IMAGE.png [--url http://127.0.0.1:8080] [--model digits]
                                       [--token-file key_file.json] [--rate 40] [--seconds 30] [--concurrency 8]

Every run is bounded in time (seconds) and in count (max_requests), and the URL must be a loopback address.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from handlers.contract import KEY_FILE, KeyFileError, read_key
from packager.stats import percentile

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Outcome:
    """One request: what was sent, what came back, and whether that is what had to come back."""
    kind: str          # "good" or the bad-input name
    status: int        # HTTP status, 0 for no response
    ok: bool           # the response is the expected one (status, label or error code)
    latency_s: float
    started: float     # time.monotonic() at send
    detail: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed_s: float = 0.0
    target_rps: float | None = None

    @property
    def rps(self) -> float:
        return len(self.outcomes) / self.elapsed_s if self.elapsed_s else 0.0

    def errors(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok and (kind is None or o.kind == kind)]

    def latency_ms(self, q: float, kind: str = "good") -> float:
        """The q-th percentile (0..100) of the latency of correct `kind` requests."""
        return 1000 * percentile([o.latency_s for o in self.outcomes if o.kind == kind and o.ok], q)

    def summary(self) -> dict[str, object]:
        return {"requests": len(self.outcomes), "seconds": round(self.elapsed_s, 1), "rps": round(self.rps, 1),
                "target_rps": None if self.target_rps is None else round(self.target_rps, 1),
                "errors": len(self.errors()), "statuses": dict(Counter(o.status for o in self.outcomes)),
                "p50_ms": round(self.latency_ms(50), 1), "p99_ms": round(self.latency_ms(99), 1)}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"refusing to send load to {url}: only loopback addresses ({', '.join(sorted(LOOPBACK))}) "
                         "are allowed")


def drive(send: Callable[[int], Outcome], seconds: float, concurrency: int = 8, rate: float | None = None,
          max_requests: int = 1_000_000, stop: threading.Event | None = None) -> Run:
    """Call send(i) from `concurrency` threads for at most `seconds` and `max_requests` calls.

    rate=None: closed loop (each thread sends its next request when the last one answered), which measures the
    most the server sustains. rate=R: request i is due at start + i/R (open loop, no catch-up burst beyond the
    thread count), which holds a fixed load. `stop` ends the run early.
    """
    run = Run(target_rps=rate)
    lock = threading.Lock()
    counter = iter(range(max_requests))
    start = time.monotonic()
    deadline = start + seconds

    def worker() -> None:
        while not (stop and stop.is_set()):
            with lock:
                i = next(counter, None)
            if i is None:
                return
            due = start + i / rate if rate else time.monotonic()
            if due >= deadline:
                return
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            if stop and stop.is_set():
                return
            outcome = send(i)
            with lock:
                run.outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)  # a request has its own timeout; this only bounds a stuck thread
    run.elapsed_s = time.monotonic() - start
    return run


class Poster:
    """POST bodies to TorchServe with one session per thread (requests.Session is not thread-safe)."""

    def __init__(self, url: str, token: str | None, timeout: float = 60) -> None:
        check_loopback(url)
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.local = threading.local()

    def post(self, path: str, body: bytes | dict | list, content_type: str = "application/octet-stream"
             ) -> tuple[int, dict, float, float]:
        """(status, JSON body or {}, start time, latency in seconds); status 0 when nothing came back."""
        session = getattr(self.local, "session", None)
        if session is None:
            session = self.local.session = requests.Session()
        started = time.monotonic()
        try:
            if isinstance(body, (dict, list)):  # json.dumps writes NaN as the corpus needs; requests' json= refuses
                body, content_type = json.dumps(body).encode(), "application/json"
            r = session.post(self.url + path, data=body, timeout=self.timeout,
                             headers={**self.headers, "Content-Type": content_type})
        except requests.RequestException as e:
            return 0, {"error": {"message": f"{type(e).__name__}: {e}"}}, started, time.monotonic() - started
        try:
            data = r.json()
        except ValueError:
            data = {}
        return r.status_code, data if isinstance(data, dict) else {}, started, time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", type=Path)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="digits")
    ap.add_argument("--token-file", type=Path, default=Path(KEY_FILE))
    ap.add_argument("--rate", type=float, default=None, help="requests per second (default: closed loop)")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    try:
        token = read_key(args.token_file, "inference")
        body = args.image.read_bytes()
        poster = Poster(args.url, token)
    except (OSError, ValueError, KeyFileError) as e:
        sys.exit(f"error: {e}")

    def send(i: int) -> Outcome:
        status, data, started, latency = poster.post(f"/predictions/{args.model}", body)
        return Outcome("good", status, status == 200, latency, started, str(data.get("label", data))[:200])

    run = drive(send, args.seconds, args.concurrency, args.rate)
    print(json.dumps(run.summary(), indent=2))
    if run.errors():
        sys.exit(f"error: {len(run.errors())} of {len(run.outcomes)} requests failed, e.g. {run.errors()[0].detail}")


if __name__ == "__main__":
    main()
