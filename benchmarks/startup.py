"""Start-up time: from `torchserve --start` (production config, load_models=all) to the first successful
prediction, and when each start-up phase was reached according to TorchServe's log."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
from pathlib import Path

import requests

from harness.torchserve import TorchServe

# Log lines that mark the start-up phases, in order (ts_log.log holds the frontend's and the worker's).
STARTUP_MARKS = (
    ("frontend up (JVM, config, key file)", re.compile(r"Initializing plugins manager")),
    ("archive registered", re.compile(r"Model \S+ loaded\.")),
    ("worker process spawned", re.compile(r"Worker cmdline")),
    ("worker python up (ts imports)", re.compile(r"Torch worker started")),
    ("handler initialized (torch import, load, warm-up)", re.compile(r"ready on ")),
)
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d),(\d{3})")


def startup_phases(log: str, launched: float) -> dict[str, float]:
    """Seconds after launch at which each start-up mark first appears in the log (local wall clock)."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        for name, pattern in STARTUP_MARKS:
            if name not in out and pattern.search(line):
                stamp = dt.datetime.fromisoformat(m.group(1)).timestamp() + int(m.group(2)) / 1000
                out[name] = round(stamp - launched, 2)
    return out


def startup_time(mar: Path, work: Path) -> tuple[float, dict[str, float]]:
    """Seconds from launching `torchserve --start` (production config, load_models=all) to the first
    successful prediction of the default model, and when each start-up phase was reached."""
    store = work / "startup-store"
    store.mkdir()
    shutil.copy2(mar, store / mar.name)
    body = next((work / "inputs" / "digits").glob("*.jpg")).read_bytes()
    ts = TorchServe(work / "ts-startup", store)
    try:
        launched = time.time()
        t0 = time.monotonic()
        ts.start()
        deadline = t0 + 180
        while time.monotonic() < deadline:
            try:
                if ts.api.predict(mar.stem, body, content_type="image/jpeg", timeout=10).status_code == 200:
                    elapsed = time.monotonic() - t0
                    phases = startup_phases(ts.logs("ts_log.log"), launched)
                    return elapsed, {**phases, "first successful prediction": round(elapsed, 2)}
            except requests.RequestException:
                pass
            ts.check_alive()
            time.sleep(0.05)
        raise TimeoutError(f"no successful prediction within 180 s\n{ts.log_tail()}")
    finally:
        ts.stop()


