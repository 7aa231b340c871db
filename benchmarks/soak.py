"""A long soak: one replica as Kubernetes runs it (deploy.pod: the gateway, TorchServe, key renewal) under Poisson
arrivals at 70% of its measured capacity, with a slice of hostile inputs, watched minute by minute.

Per window it records requests, failures (a good request that did not get the label the idle replica gave it, a
hostile one that did not get a 4xx JSON answer), latency p50/p99 from the arrival, the RSS of the frontend and the
workers, the frontend's retained heap (old generation + survivors, jstat), open file descriptors and threads, and
the bytes under TorchServe's logs. At the end: the targets (0 failures across at least one key expiry, RSS and heap flat
after warm-up, p99 drift, bounded logs), a JSON report and a plot.

    python -m benchmarks.soak model_store/digits-2.0.mar --hours 2                # the run docs/reliability.md cites
    python -m benchmarks.soak model_store/digits-2.0.mar --minutes 10 --token-expiration-min 2   # a short one
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from deploy.client import InferenceClient, PredictionError
from deploy.processes import torchserve_roles
from handlers.machine import cpu_label, fingerprint
from harness.cluster import Replica
from packager import golden
from packager.stats import median, percentile

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_S = 300  # growth is measured from the end of the first five minutes
CORRUPT_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@dataclass
class Outcome:
    at: float  # seconds since the load started (the arrival)
    latency_ms: float
    kind: str  # "good" or the hostile input's name
    ok: bool
    detail: str = ""


def hostile_inputs(png: bytes) -> dict[str, tuple[bytes, str]]:
    """Client mistakes the replica must answer with a 4xx JSON error: body, content type."""
    return {"corrupt_png": (CORRUPT_PNG, "image/png"),
            "deep_json": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
            "form_encoded": (png + b"%zz", "application/x-www-form-urlencoded"),
            "random_bytes": (random.Random(0).randbytes(4096), "application/octet-stream"),
            "tensor_wrong_shape": (json.dumps({"data": [[0.0] * 5] * 5}).encode(), "application/json")}


class Soak:
    def __init__(self, replica: Replica, token: str, images: list[bytes], hostile_share: float) -> None:
        self.replica, self.token = replica, token
        self.url = f"http://{replica.address}"
        self.hostile = hostile_inputs(images[0])
        self.hostile_share = hostile_share
        self.client = InferenceClient(self.url, token, retries=0, timeout=(3.0, 30.0), pool_size=64)
        # The answers of the idle replica, one request at a time: under load every answer must be the same.
        self.images = [(image, self.client.predict(image).label) for image in images]
        self.session = requests.Session()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.t0 = time.monotonic()

    def one(self, at: float, rng: random.Random) -> None:
        if rng.random() < self.hostile_share:
            name = rng.choice(sorted(self.hostile))
            body, content_type = self.hostile[name]
            try:
                r = self.session.post(f"{self.url}/predictions/digits", data=body, timeout=30,
                                      headers={"Authorization": f"Bearer {self.token}", "Content-Type": content_type})
                ok = 400 <= r.status_code < 500 and isinstance(r.json(), dict)
                detail = "" if ok else f"{r.status_code}: {r.text[:200]}"
            except (requests.RequestException, ValueError) as e:
                ok, detail = False, f"{type(e).__name__}: {e}"[:200]
            outcome = Outcome(at, (time.monotonic() - self.t0 - at) * 1000, name, ok, detail)
        else:
            image, label = rng.choice(self.images)
            try:
                p = self.client.predict(image)
                outcome = Outcome(at, (time.monotonic() - self.t0 - at) * 1000, "good", p.label == label,
                                  "" if p.label == label else f"label {p.label}, want {label}")
            except PredictionError as e:
                outcome = Outcome(at, (time.monotonic() - self.t0 - at) * 1000, "good", False,
                                  f"{type(e).__name__} ({e.status}): {e}"[:200])
        with self.lock:
            self.outcomes.append(outcome)

    def run(self, rate: float, seconds: float, on_window: Any, window_s: float) -> None:
        """Poisson arrivals at `rate`/s for `seconds`; latency counts from each arrival, queued or not."""
        rng = random.Random(1)
        self.t0 = time.monotonic()
        next_window = window_s
        with ThreadPoolExecutor(max_workers=64) as pool:
            at = 0.0
            while at < seconds:
                at += rng.expovariate(rate)
                delay = self.t0 + at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(self.one, at, random.Random(rng.random()))
                if at >= next_window:
                    on_window(next_window - window_s, next_window)
                    next_window += window_s
        if next_window - window_s < seconds:  # the last, partial window
            on_window(next_window - window_s, seconds)

    def window(self, start: float, end: float) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if start <= o.at < end]


def capacity(replica: Replica, token: str, images: list[bytes], seconds: float = 20.0) -> float:
    """Closed-loop requests/s with 8 connections: the replica's capacity for this model."""
    client = InferenceClient(f"http://{replica.address}", token, retries=0, pool_size=8)
    stop = time.monotonic() + seconds
    counts = [0] * 8

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            client.predict(images[i % len(images)])
            counts[i] += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(loop, range(8)))
    client.close()
    return sum(counts) / seconds


def retained_heap_mb(pid: int) -> float | None:
    """The frontend's old generation plus survivors (jstat -gc): what outlives young collections."""
    try:
        out = subprocess.run(["jstat", "-gc", str(pid)], capture_output=True, text=True, timeout=30).stdout.split("\n")
        cols = dict(zip(out[0].split(), out[1].split(), strict=False))
        return round((float(cols["S0U"]) + float(cols["S1U"]) + float(cols["OU"])) / 1024, 1)
    except (OSError, subprocess.SubprocessError, KeyError, IndexError, ValueError):
        return None


def sample(replica: Replica) -> dict[str, Any]:
    roles = torchserve_roles(replica.processes())
    out: dict[str, Any] = {}
    for role, procs in roles.items():
        rss = fds = threads = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                fds += p.num_fds()
                threads += p.num_threads()
            except psutil.Error:
                continue
        out[role] = {"rss_mb": round(rss / 2**20, 1), "fds": fds, "threads": threads, "processes": len(procs)}
    out["frontend"]["heap_retained_mb"] = retained_heap_mb(roles["frontend"][0].pid) if roles["frontend"] else None
    logs = replica.workdir / "logs"
    out["log_bytes"] = sum(f.stat().st_size for f in logs.rglob("*") if f.is_file()) if logs.is_dir() else 0
    out["home_bytes"] = sum(f.stat().st_size for f in replica.workdir.rglob("*") if f.is_file())
    return out


def summarize(outcomes: list[Outcome], start: float, end: float) -> dict[str, Any]:
    lat = sorted(o.latency_ms for o in outcomes if o.kind == "good" and o.ok) or [0.0]
    failed = [o for o in outcomes if not o.ok]
    return {"start_s": round(start), "end_s": round(end), "requests": len(outcomes),
            "hostile": sum(o.kind != "good" for o in outcomes), "failed": len(failed),
            "failures": [f"{o.kind}: {o.detail}" for o in failed[:5]],
            "p50_ms": round(percentile(lat, 50), 1), "p99_ms": round(percentile(lat, 99), 1)}


def growth(windows: list[dict[str, Any]], get: Any) -> float | None:
    """Relative change of a figure from the first window after warm-up to the last one."""
    values = [get(w) for w in windows if w["end_s"] > WARM_UP_S and get(w) is not None]
    if len(values) < 2 or not values[0]:
        return None
    return round(values[-1] / values[0] - 1, 4)


def verdict(windows: list[dict[str, Any]], seconds: float, expiry_min: float, rotation: bool) -> dict[str, Any]:
    after = [w for w in windows if w["end_s"] > WARM_UP_S] or windows
    third = max(1, len(after) // 3)
    p99_first = median([w["p99_ms"] for w in after[:third]])
    p99_last = median([w["p99_ms"] for w in after[-third:]])
    figures = {
        "failed": sum(w["failed"] for w in windows), "requests": sum(w["requests"] for w in windows),
        "key_expiries_crossed": int(seconds // (expiry_min * 60)),
        "frontend_rss_growth": growth(windows, lambda w: w["frontend"]["rss_mb"]),
        "worker_rss_growth": growth(windows, lambda w: w["workers"]["rss_mb"]),
        "heap_retained_growth": growth(windows, lambda w: w["frontend"]["heap_retained_mb"]),
        "p99_drift": round(p99_last / p99_first - 1, 4) if p99_first else None,
        "log_bytes": windows[-1]["log_bytes"] if windows else 0, "log_rotation_configured": rotation,
    }
    figures["targets"] = {
        "0 failed requests across a key expiry": figures["failed"] == 0 and figures["key_expiries_crossed"] >= 1,
        "RSS flat (<= +5% after warm-up)": all(g is not None and g <= 0.05 for g in
                                               (figures["frontend_rss_growth"], figures["worker_rss_growth"])),
        "heap flat (<= +5% after warm-up)": figures["heap_retained_growth"] is not None
                                            and figures["heap_retained_growth"] <= 0.05,
        "p99 drift <= 10%": figures["p99_drift"] is not None and abs(figures["p99_drift"]) <= 0.10,
        "logs bounded (rotation configured)": rotation,
    }
    return figures


def plot(windows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [w["end_s"] / 60 for w in windows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(minutes, [w["p50_ms"] for w in windows], label="p50")
    ax.plot(minutes, [w["p99_ms"] for w in windows], label="p99")
    ax.set_ylabel("latency from arrival (ms)")
    ax.legend()
    ax = axes[0][1]
    ax.plot(minutes, [w["frontend"]["rss_mb"] for w in windows], label="frontend RSS")
    ax.plot(minutes, [w["workers"]["rss_mb"] for w in windows], label="workers RSS")
    ax.plot(minutes, [w["frontend"]["heap_retained_mb"] or 0 for w in windows], label="frontend heap retained")
    ax.set_ylabel("MiB")
    ax.legend()
    ax = axes[1][0]
    ax.plot(minutes, [w["frontend"]["fds"] + w["workers"]["fds"] for w in windows], label="open fds")
    ax.plot(minutes, [w["frontend"]["threads"] + w["workers"]["threads"] for w in windows], label="threads")
    ax.set_ylabel("count")
    ax.set_xlabel("minutes")
    ax.legend()
    ax = axes[1][1]
    ax.plot(minutes, [w["log_bytes"] / 2**20 for w in windows], label="logs")
    ax.bar(minutes, [w["failed"] for w in windows], width=0.5, color="red", label="failed requests")
    ax.set_ylabel("MiB / count")
    ax.set_xlabel("minutes")
    ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archive", type=Path, help="the .mar to serve (the quick start's pick: model_store/digits-2.0.mar)")
    length = ap.add_mutually_exclusive_group(required=True)
    length.add_argument("--hours", type=float)
    length.add_argument("--minutes", type=float)
    ap.add_argument("--rate", type=float, default=None, help="arrivals/s (default: 70%% of a measured capacity)")
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured capacity (default 0.7)")
    ap.add_argument("--hostile", type=float, default=0.05, help="share of hostile inputs (default 0.05)")
    ap.add_argument("--token-expiration-min", type=float, default=None,
                    help="key lifetime for the replica (default: config.properties', 60)")
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        ap.error(f"archive {args.archive} not found: the quick start builds model_store/digits-2.0.mar")
    seconds = (args.hours or 0) * 3600 + (args.minutes or 0) * 60
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    store = work / "store"
    store.mkdir()
    shutil.copy(args.archive, store / "digits.mar")
    token = secrets.token_hex(16)
    (work / "token").write_text(token)
    pod_args = [] if args.token_expiration_min is None else ["--token-expiration-min", str(args.token_expiration_min)]
    replica = Replica("replica", "127.0.0.1", store, work, work / "token", pod_args=pod_args)
    images = [png for png, _ in golden.images(golden.from_archive(args.archive))]
    windows: list[dict[str, Any]] = []
    # kill (SIGTERM) stops the replica as Ctrl-C does, rather than leaving TorchServe running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        replica.start().wait_ready()
        props = dict(line.split("=", 1) for line in (replica.workdir / "config.properties").read_text().splitlines()
                     if "=" in line)
        expiry_min = float(props.get("token_expiration_min", 60))
        log_config = (ROOT / props["vmargs"].split("log4j.configurationFile=")[1].split()[0]).read_text() \
            if "log4j.configurationFile=" in props.get("vmargs", "") else ""
        rotation = "RollingFile" in log_config and "SizeBasedTriggeringPolicy" in log_config
        rate = args.rate or round(args.load * capacity(replica, token, images), 1)
        print(f"soak: {seconds / 60:g} min at {rate:g} arrivals/s (Poisson), {args.hostile:.0%} hostile, keys expire "
              f"every {expiry_min:g} min; {cpu_label(fingerprint())}", flush=True)
        soak = Soak(replica, token, images, args.hostile)

        def on_window(start: float, end: float) -> None:
            w = {**summarize(soak.window(start, end), start, end), **sample(replica)}
            windows.append(w)
            print(f"soak: {end / 60:6.1f} min  {w['requests']:6d} req  {w['failed']} failed  p50 {w['p50_ms']:6.1f}  "
                  f"p99 {w['p99_ms']:6.1f} ms  frontend {w['frontend']['rss_mb']:.0f} MiB "
                  f"(heap {w['frontend']['heap_retained_mb']})  workers {w['workers']['rss_mb']:.0f} MiB  "
                  f"fds {w['frontend']['fds'] + w['workers']['fds']}  logs {w['log_bytes'] / 2**20:.1f} MiB",
                  flush=True)

        soak.run(rate, seconds, on_window, args.window_s)
        time.sleep(2)  # the last answers
        soak.client.close()
    finally:
        replica.stop()
    figures = verdict(windows, seconds, expiry_min, rotation)
    report = {"command": "python -m benchmarks.soak " + " ".join(argv or sys.argv[1:]),
              "cpu": cpu_label(fingerprint()), "archive": str(args.archive), "seconds": seconds, "rate": rate,
              "hostile_share": args.hostile, "token_expiration_min": expiry_min, **figures, "windows": windows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(windows, args.out.with_suffix(".png"), f"soak: {rate:g}/s Poisson, {seconds / 60:g} min, {report['cpu']}")
    print(json.dumps({k: v for k, v in report.items() if k != "windows"}, indent=2))
    print(f"report: {args.out}  plot: {args.out.with_suffix('.png')}")
    return 0 if figures["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
