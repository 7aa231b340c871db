"""A small steady load through the production client while something changes the server (a rollout).

    with Watch(client, images, rate=5) as watch:
        cmd_rollout(...)
    print(watch.summary())   # requests, failures by kind, answers per version

Each request goes to the model's default version, as production traffic does, so the counts per version
show the switch. A failure is any request the client gave up on after its retries.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from deploy.client import InferenceClient, PredictionError


class Watch:
    """Sends `rate` requests per second (round-robin over `images`) from a small pool until the block ends."""

    def __init__(self, client: InferenceClient, images: Sequence[bytes], rate: float = 5.0,
                 concurrency: int = 4) -> None:
        if not images:
            raise ValueError("a watch needs at least one image to send")
        self.client = client
        self.images = list(images)
        self.interval = 1.0 / rate
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.versions: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.first_failure: str | None = None
        self.thread = threading.Thread(target=self._drive, name="watch", daemon=True)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop.set()
        self.thread.join()
        self.pool.shutdown(wait=True)  # every request sent is answered (or failed) before the counts are read

    def _drive(self) -> None:
        # Arrivals on a fixed schedule, independent of answers, so a slow server is not offered less load.
        due = time.monotonic()
        n = 0
        while not self.stop.is_set():
            self.pool.submit(self._one, self.images[n % len(self.images)])
            n += 1
            due += self.interval
            self.stop.wait(max(0.0, due - time.monotonic()))

    def _one(self, image: bytes) -> None:
        try:
            version = self.client.predict(image).version
        except PredictionError as e:
            with self.lock:
                self.failures[type(e).__name__] += 1
                self.first_failure = self.first_failure or f"{type(e).__name__}: {e.message}"
            return
        with self.lock:
            self.versions[version] += 1

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> str:
        total = self.failed + sum(self.versions.values())
        per_version = ", ".join(f"{v}: {n}" for v, n in sorted(self.versions.items())) or "none"
        line = f"load during the change: {total} requests, {self.failed} failed; answered by version {per_version}"
        return line if not self.failed else f"{line}; first failure: {self.first_failure}"
