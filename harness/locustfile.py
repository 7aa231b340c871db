"""Locust user for harness/open_loop.py: POST the listed images round-robin at a constant rate (wrk2's schedule)
or as a Poisson process.

Runs inside locust (its own venv), configured by environment variables. A user's task only schedules a request
in its own gevent pool and returns, so arrivals never wait for answers (locust's usual user is a closed loop:
once answers take longer than its pacing, its users fire together). Constant arrivals follow a fixed schedule,
the users' slots interleaved evenly; a slot the generator reaches late fires at once and its latency still counts
from the slot (wrk2's correction for coordinated omission). Latency is measured from the arrival, so
time spent waiting for a free connection counts too. Every response time is kept exactly (locust's own
statistics round to whole milliseconds) and written out when the run stops.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from pathlib import Path

from gevent.pool import Pool
from locust import FastHttpUser, events, task

PATH = os.environ["OPEN_LOOP_PATH"]
HEADERS = {"Authorization": f"Bearer {os.environ['OPEN_LOOP_TOKEN']}",
           "Content-Type": os.environ.get("OPEN_LOOP_CONTENT_TYPE", "image/jpeg")}
BODIES = [Path(p).read_bytes() for p in Path(os.environ["OPEN_LOOP_LIST"]).read_text().split()]
RATE_PER_USER = float(os.environ["OPEN_LOOP_RATE_PER_USER"])
USERS = int(os.environ["OPEN_LOOP_USERS"])
POISSON = os.environ["OPEN_LOOP_ARRIVALS"] == "poisson"
NEXT = itertools.cycle(range(len(BODIES)))
USER_INDEX = itertools.count()
ANCHOR = time.monotonic()  # constant arrivals: user i's slots are ANCHOR + (k + i / USERS) / RATE_PER_USER
RECORD: dict = {"latencies_ms": [], "errors": {}, "arrived": 0, "started": None, "stopped": None}


@events.spawning_complete.add_listener
def _steady(user_count: int, **_: object) -> None:  # measure arrivals from here: every user is running
    RECORD.update(latencies_ms=[], errors={}, arrived=0, started=time.monotonic())


@events.test_stopping.add_listener
def _stopping(**_: object) -> None:  # arrivals end here; answers still in flight are waited for and kept
    RECORD["stopped"] = time.monotonic()


@events.test_stop.add_listener
def _write(**_: object) -> None:
    Path(os.environ["OPEN_LOOP_OUT"]).write_text(json.dumps(RECORD))


class Client(FastHttpUser):
    concurrency = 256  # connections one user may hold; arrivals beyond them wait for one, and that wait counts

    def wait_time(self) -> float:
        now = time.monotonic()
        if POISSON:
            gap = random.expovariate(RATE_PER_USER)
            self.slot = now + gap
            return gap
        self.slot = ANCHOR + (self.k + self.phase) / RATE_PER_USER
        self.k += 1
        return max(0.0, self.slot - now)

    def on_start(self) -> None:
        self.pool = Pool()
        self.phase = next(USER_INDEX) / USERS
        self.k = math.ceil((time.monotonic() - ANCHOR) * RATE_PER_USER - self.phase)  # the next slot from now
        self.slot = time.monotonic()  # the first task runs before any wait

    def on_stop(self) -> None:
        self.pool.join(timeout=60)

    @task
    def arrive(self) -> None:
        self.pool.spawn(self.send, min(self.slot, time.monotonic()), BODIES[next(NEXT)])

    def send(self, arrived: float, body: bytes) -> None:
        counted = RECORD["started"] is not None and arrived >= RECORD["started"] and RECORD["stopped"] is None
        RECORD["arrived"] += counted
        with self.client.post(PATH, data=body, headers=HEADERS, catch_response=True) as r:
            if not 200 <= r.status_code < 300:
                r.failure(f"status {r.status_code}")
        if not counted:
            return
        if 200 <= r.status_code < 300:
            RECORD["latencies_ms"].append((time.monotonic() - arrived) * 1000)
        else:
            key = f"status_{r.status_code}" if r.status_code else type(r.error).__name__
            RECORD["errors"][key] = RECORD["errors"].get(key, 0) + 1
