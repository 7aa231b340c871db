"""Open-loop load: requests arrive at a constant rate whether or not earlier ones have been answered, so queueing
shows up in the latency (a closed loop such as wrk slows its own arrivals down instead).

    python -m harness.open_loop URL TOKEN LIST_FILE --rate 200 [-d 10] [--arrivals constant|poisson]

The generator is locust (PyPI, in its own venv harness/.locust, installed on demand from
harness/locust-requirements.txt), driven by harness/locustfile.py: a few users that hand every request to their
own gevent pool, so an arrival never waits for an earlier answer, and latency counts from the arrival. Arrivals
are evenly spaced by default (wrk2's constant rate: late slots fire at once and count from the slot), or a
Poisson process (random gaps, the harder and more realistic load: queues form even well below capacity).
wrk2 is not packaged here; `hey -q` fires all its workers on one aligned ticker (bursts); h2load's --rps and
locust's own constant_throughput pace each connection or user by its answers, so once answers are slow their
arrivals bunch up (measured: batches of 8 at 30% load).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packager.stats import percentile

HERE = Path(__file__).resolve().parent
VENV = HERE / ".locust"
REQUIREMENTS = HERE / "locust-requirements.txt"
LOCUSTFILE = HERE / "locustfile.py"
USERS = 2  # constant: slots interleaved evenly; Poisson: each at rate / USERS, and their sum is Poisson at `rate`
ARRIVALS = ("constant", "poisson")


@dataclass
class OpenLoopResult:
    target_rps: float
    arrivals: str
    achieved_rps: float
    users: int
    duration_s: float
    requests: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: int
    error_detail: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ensure_locust() -> Path:
    """The locust executable in harness/.locust, created with this Python when missing."""
    exe = VENV / "bin" / "locust"
    if exe.is_file():
        return exe
    print(f"installing locust into {VENV} ...", file=sys.stderr)
    for cmd in ([sys.executable, "-m", "venv", str(VENV)],
                [str(VENV / "bin" / "pip"), "install", "-q", "-r", str(REQUIREMENTS)]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: {' '.join(cmd)} failed ({result.stderr.strip()[-300:]}); run it by hand")
    return exe


def run(url: str, token: str, list_file: Path, rate: float, duration_s: float,
        content_type: str = "image/jpeg", arrivals: str = "constant") -> OpenLoopResult:
    """`rate` requests/s for `duration_s` seconds after a one-second spawn, measured from the moment all users run."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"benchmark traffic goes to 127.0.0.1 only, not {url}")
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, got {arrivals!r}")
    host, _, path = url[len("http://"):].partition("/")
    users = USERS
    with tempfile.TemporaryDirectory(prefix="open-loop-") as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "OPEN_LOOP_PATH": "/" + path, "OPEN_LOOP_TOKEN": token, "OPEN_LOOP_LIST": str(list_file),
               "OPEN_LOOP_CONTENT_TYPE": content_type, "OPEN_LOOP_RATE_PER_USER": str(rate / users),
               "OPEN_LOOP_USERS": str(users), "OPEN_LOOP_ARRIVALS": arrivals,
               "OPEN_LOOP_OUT": str(out)}
        env.pop("PYTHONPATH", None)
        cmd = [str(ensure_locust()), "-f", str(LOCUSTFILE), "--headless", "--host", f"http://{host}",
               "-u", str(users), "-r", str(users), "--run-time", f"{math.ceil(duration_s) + 1}s",
               "--stop-timeout", "60", "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=duration_s + 120)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"locust failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        record = json.loads(out.read_text())
    lat = sorted(record["latencies_ms"])
    secs = (record["stopped"] - record["started"]) if record["started"] else 0.0
    unanswered = record["arrived"] - len(lat) - sum(record["errors"].values())
    if unanswered > 0:  # still in flight when locust gave up waiting: failures, not silently dropped
        record["errors"]["unanswered"] = unanswered
    errors = sum(record["errors"].values())
    done = record["arrived"]
    lat = lat or [0.0]  # nothing answered: zeros, and `errors` says why
    return OpenLoopResult(target_rps=rate, arrivals=arrivals, achieved_rps=round(done / secs, 2) if secs else 0.0,
                          users=users,
                          duration_s=round(secs, 3), requests=done - errors, p50_ms=round(percentile(lat, 50), 3),
                          p90_ms=round(percentile(lat, 90), 3), p99_ms=round(percentile(lat, 99), 3),
                          mean_ms=round(sum(lat) / len(lat), 3), max_ms=round(lat[-1], 3), errors=errors,
                          error_detail=record["errors"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("token")
    ap.add_argument("list_file", type=Path)
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("-d", "--duration", type=float, default=10)
    ap.add_argument("--arrivals", choices=ARRIVALS, default="constant",
                    help="evenly spaced (default, wrk2's schedule) or a Poisson process")
    args = ap.parse_args()
    print(json.dumps(run(args.url, args.token, args.list_file, args.rate, args.duration,
                         arrivals=args.arrivals).to_dict(), indent=2))


if __name__ == "__main__":
    main()
