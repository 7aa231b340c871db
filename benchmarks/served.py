"""A TorchServe under load: register one archive at a time, drive it with wrk, read its metrics.

Used by benchmarks/run.py and benchmarks/tune.py. Real TorchServe (harness.torchserve.TorchServe) on
free loopback ports with token auth on; the management API's model registration is enabled for the
benchmark instance only, so each configuration is loaded, measured alone and unloaded.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from deploy.processes import cpu_seconds, process_group, torchserve_roles
from harness import open_loop, wrk_throughput
from harness.torchserve import TorchServe
from packager.stats import percentile

PROM_LINE = re.compile(r"^(\w+)\{([^}]*)\}\s+([-+0-9.eE]+|NaN)$")
LABEL = re.compile(r'(\w+)="([^"]*)"')
COUNTERS = ("ts_inference_requests_total", "ts_queue_latency_microseconds", "ts_inference_latency_microseconds")
GAUGES = ("HandlerTime", "PreprocessMs", "InferenceMs", "PostprocessMs", "HandlerBatchSize")
# TorchServe's access log: `"POST /predictions/<model>[/<version>] HTTP/1.1" <status> <ms>`, the ms from the
# request's arrival at the frontend to its response.
ACCESS_LINE = re.compile(r'"POST /predictions/([^/ "]+)\S* HTTP/[\d.]+" \d{3} (\d+)$')


def frontend_latency(lines: list[str], model: str) -> dict[str, float]:
    """p50 and p99 of `model`'s predictions as the frontend logged them in access-log lines: a client-side tail
    that is not here is the generator's."""
    ms = [float(m.group(2)) for line in lines if (m := ACCESS_LINE.search(line)) and m.group(1) == model]
    if not ms:
        return {}
    return {"frontend_p50_ms": round(percentile(ms, 50), 1), "frontend_p99_ms": round(percentile(ms, 99), 1)}


def parse_prometheus(text: str, model: str) -> dict[str, float]:
    """Prometheus text -> {metric: value} for one model (summed over label sets)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = PROM_LINE.match(line.strip())
        if not m or m.group(3) == "NaN":
            continue
        labels = dict(LABEL.findall(m.group(2)))
        if model not in (labels.get("model_name"), labels.get("ModelName")):
            continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


Load = TypeVar("Load", wrk_throughput.LoadResult, open_loop.OpenLoopResult)

PRIME_S = 3.0  # seconds of unreported load per archive (Bench.prime)
SETTLE_S = 90.0  # at most this much more for a fresh frontend's JIT to go quiet (Bench.prime)
SETTLE_STEP_S = 2.0
SETTLED_SHARE = 0.05  # quiet: the compiler threads used under 5% of a core over a step
COMPILER_THREADS = ("C1 CompilerThre", "C2 CompilerThre")  # HotSpot's names, cut to 15 characters by Linux


class Bench:
    """One TorchServe instance for a series of measurements; always stopped by `close`."""

    def __init__(self, workdir: Path, store: Path, env: dict[str, str] | None = None,
                 builtin_logging: bool = False) -> None:
        overrides = {"enable_model_api": "true", "load_models": "", "job_queue_size": "1000"}
        self.ts = TorchServe(workdir, store, overrides, env=env, builtin_logging=builtin_logging)

    def __enter__(self) -> Bench:
        try:
            self.ts.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.ts.stop()

    def register(self, name: str, mar: str, timeout: float = 180, workers: int = 1) -> float:
        """Load an archive from the store; seconds until its workers are READY. An archive's model-config.yaml
        (minWorkers) takes precedence over `workers`."""
        t0 = time.monotonic()
        try:
            self.ts.api.register(mar, name=name, workers=workers, timeout=timeout)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.ts.log_tail()}") from None
        self.ts.wait([name], timeout)
        return time.monotonic() - t0

    def unregister(self, name: str) -> None:
        self.ts.api.unregister(name)

    def warm(self, name: str, body: bytes, n: int = 3) -> None:
        for _ in range(n):
            r = self.ts.api.predict(name, body, content_type="image/jpeg")
            if not r.ok:
                raise RuntimeError(f"{name} answered {r.status_code} to a warm-up request: {r.text[:300]}\n"
                                   f"{self.ts.log_tail()}")

    def prime(self, name: str, body: bytes, list_file: Path, seconds: float = PRIME_S, concurrency: int = 4,
              settle_s: float = 0.0) -> None:
        """Once per archive and input set, before its first measured point: warm-up requests (a failure stops
        here, unmeasured), then a short closed loop that is not reported, so the workers run their batch shapes.
        With `settle_s`, the loop goes on in SETTLE_STEP_S steps until the frontend's JIT compilers are quiet over
        one (at most `settle_s`). A fresh frontend's C2 keeps compiling the request path under load, and its first
        points run slower (figures: docs/experiments.md); bigger bodies (the photos) take paths of their own."""
        self.warm(name, body)
        url, key = self.ts.api.url("inference", f"/predictions/{name}"), self.ts.api.keys["inference"]
        wrk_throughput.run(url, key, list_file, concurrency, seconds)
        if settle_s <= 0:
            return
        deadline, pid = time.monotonic() + settle_s, self.frontend_pid()
        while time.monotonic() < deadline:
            before = compiler_cpu_seconds(pid)
            wrk_throughput.run(url, key, list_file, concurrency, SETTLE_STEP_S)
            if compiler_cpu_seconds(pid) - before < SETTLED_SHARE * SETTLE_STEP_S:
                break

    def group(self) -> int:
        """The launcher's process group: the Java frontend and the workers."""
        return self.ts.proc.pid if self.ts.proc else os.getpgid(0)

    def frontend_pid(self) -> int:
        """The Java frontend's pid."""
        group = self.group()
        frontends = torchserve_roles(process_group(group))["frontend"]
        if not frontends:
            raise RuntimeError(f"no Java frontend in process group {group}\n{self.ts.log_tail()}")
        return frontends[0].pid

    def measure(self, name: str, list_file: Path, concurrency: int, duration_s: float
                ) -> tuple[wrk_throughput.LoadResult, dict[str, Any]]:
        """wrk against /predictions/<name>, plus the server-side queue/handler time of those requests and
        the CPU time each process spent on them."""
        api = self.ts.api
        return self.profiled(name, lambda: wrk_throughput.run(api.url("inference", f"/predictions/{name}"),
                                                              api.keys["inference"], list_file, concurrency,
                                                              duration_s))

    def measure_open(self, name: str, list_file: Path, rate: float, duration_s: float, arrivals: str = "constant"
                     ) -> tuple[open_loop.OpenLoopResult, dict[str, Any]]:
        """Open-loop load at `rate` req/s (harness.open_loop), plus the server-side queue and handler time and the
        CPU time each process spent (the generator's includes locust's start-up)."""
        api = self.ts.api
        return self.profiled(name, lambda: open_loop.run(api.url("inference", f"/predictions/{name}"),
                                                         api.keys["inference"], list_file, rate, duration_s,
                                                         arrivals=arrivals))

    def profiled(self, name: str, load: Callable[[], Load]) -> tuple[Load, dict[str, Any]]:
        """Run `load` (a load generator this process waits for) and return its result with TorchServe's counters
        for `name`, the frontend's own p50/p99 from its access log, and the CPU seconds of the frontend, the
        workers and the generator over it."""
        api = self.ts.api
        before = parse_prometheus(api.metrics(), name)
        logged = len(self.ts.logs("access_log.log").splitlines())
        group = self.group()
        cpu_before, gen_before, t0 = torchserve_cpu_seconds(group), children_cpu_seconds(), time.monotonic()
        result = load()
        wall = time.monotonic() - t0
        cpu = {k: v - cpu_before.get(k, 0.0) for k, v in torchserve_cpu_seconds(group).items()}
        cpu["load_generator"] = children_cpu_seconds() - gen_before
        after = parse_prometheus(api.metrics(), name)
        frontend = frontend_latency(self.ts.logs("access_log.log").splitlines()[logged:], name)
        return result, {**server_side(before, after), **frontend, **cpu_profile(cpu, result.requests, wall)}


def torchserve_cpu_seconds(group: int) -> dict[str, float]:
    """User+system CPU seconds so far of TorchServe's processes in a process group: the Java frontend and the
    Python workers."""
    return {role: sum(cpu_seconds(ps).values()) for role, ps in torchserve_roles(process_group(group)).items()}


def compiler_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds so far of a JVM's JIT compiler threads."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip().startswith(COMPILER_THREADS):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (wrk runs as one, and is waited for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_profile(cpu: dict[str, float], requests: int, wall_s: float) -> dict[str, Any]:
    """Where the machine's CPU went during one run: ms per request by process, and the share of all cores
    in use. Workers' time covers decode, preprocessing, the model and TorchServe's Python protocol code."""
    if requests <= 0 or wall_s <= 0:
        return {}
    cores = len(os.sched_getaffinity(0))
    return {"cpu_ms_per_request": {k: round(1000 * v / requests, 3) for k, v in cpu.items()},
            "cpu_busy_share": round(sum(cpu.values()) / (wall_s * cores), 3)}


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Per-request means from TorchServe's counters; the handler gauges are the last batch's values."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    n = delta["ts_inference_requests_total"]
    out: dict[str, Any] = {"requests": int(n)}
    if n > 0:
        out["queue_ms"] = round(delta["ts_queue_latency_microseconds"] / n / 1000, 3)
        out["server_ms"] = round(delta["ts_inference_latency_microseconds"] / n / 1000, 3)
    # HandlerBatchSize is a histogram in handlers/metrics.yaml: mean batch over the run from _sum/_count
    count = after.get("HandlerBatchSize_count", 0.0) - before.get("HandlerBatchSize_count", 0.0)
    if count > 0:
        out["mean_batch"] = round((after["HandlerBatchSize_sum"] - before.get("HandlerBatchSize_sum", 0.0)) / count, 2)
    for g in GAUGES:
        if g in after:
            out[f"last_{g}"] = after[g]
    return out
