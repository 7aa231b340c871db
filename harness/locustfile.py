"""Locust user for harness/open_loop.py: POST the listed images round-robin at a constant rate per user.

Runs inside locust (its own venv), configured by environment variables; it records every response time
exactly (locust's own statistics round them to whole milliseconds) and writes them out when the run stops.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from locust import FastHttpUser, constant_throughput, events, task

PATH = os.environ["OPEN_LOOP_PATH"]
HEADERS = {"Authorization": f"Bearer {os.environ['OPEN_LOOP_TOKEN']}",
           "Content-Type": os.environ.get("OPEN_LOOP_CONTENT_TYPE", "image/jpeg")}
BODIES = [Path(p).read_bytes() for p in Path(os.environ["OPEN_LOOP_LIST"]).read_text().split()]
NEXT = itertools.cycle(range(len(BODIES)))
RECORD: dict = {"latencies_ms": [], "errors": {}, "started": None, "stopped": None}


@events.spawning_complete.add_listener
def _steady(user_count: int, **_: object) -> None:  # measure from here: every user is running
    RECORD.update(latencies_ms=[], errors={}, started=time.monotonic())


@events.request.add_listener
def _record(response_time: float, exception: BaseException | None, response: object, **_: object) -> None:
    if RECORD["started"] is None:
        return
    status = getattr(response, "status_code", 0)
    if exception is not None or not 200 <= status < 300:
        key = f"status_{status}" if status else type(exception).__name__
        RECORD["errors"][key] = RECORD["errors"].get(key, 0) + 1
    else:
        RECORD["latencies_ms"].append(response_time)


@events.test_stopping.add_listener
def _stopping(**_: object) -> None:  # arrivals end here; answers still in flight are waited for and kept
    RECORD["stopped"] = time.monotonic()


@events.test_stop.add_listener
def _write(**_: object) -> None:
    Path(os.environ["OPEN_LOOP_OUT"]).write_text(json.dumps(RECORD))


class Client(FastHttpUser):
    wait_time = constant_throughput(float(os.environ["OPEN_LOOP_RATE_PER_USER"]))

    @task
    def predict(self) -> None:
        with self.client.post(PATH, data=BODIES[next(NEXT)], headers=HEADERS, catch_response=True) as r:
            if not 200 <= r.status_code < 300:
                r.failure(f"status {r.status_code}")
