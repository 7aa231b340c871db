"""Cluster scenarios on one machine (harness/cluster.py's real replicas, haproxy and client), each bounded in time
and traffic, each returning its figures. benchmarks/cluster.py runs them for docs/; tests/test_cluster.py runs
(a) and (b) in CI.

    (a) replica_loss    kill -9 a whole replica under load; haproxy routes around it; it restarts and rejoins
    (b) rolling_update  replace the replicas one at a time with a new archive version, under load
    (c) canary          a share of traffic to v2 on one replica, then promote or roll back from its figures
    (d) scale_out       add a replica under load
    cpu_cost            CPU per answered request of each part (balancer, gateway, frontend, workers) at steady load
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from deploy.processes import cpu_seconds, process_tree, torchserve_role
from harness.cluster import Balancer, Load, Outcome, Replica
from packager.stats import percentile


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: Balancer
    token: str
    images: Sequence[tuple[bytes, str]]

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def load(self, concurrency: int) -> Load:
        return Load(self.balancer.url, self.token, self.images, concurrency).start()


@contextlib.contextmanager
def cluster(workdir: Path, stores: Sequence[Path], images: Sequence[tuple[bytes, str]], drain_s: float = 3.0,
            cpus: Sequence[Sequence[int] | None] | None = None, start: int | None = None) -> Iterator[Cluster]:
    """Replicas r1..rN at 127.0.0.2.. (replica i serves stores[i]) behind haproxy; the first `start` of them
    (default all) started and in rotation. Everything is stopped on the way out, failure or not."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    token_file = workdir / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    cpus = cpus or [None] * len(stores)
    replicas = [Replica(f"r{i + 1}", f"127.0.0.{i + 2}", store, workdir, token_file, drain_s, cpus[i])
                for i, store in enumerate(stores)]
    balancer = Balancer(workdir, replicas)
    try:
        balancer.start()
        first = replicas[: len(replicas) if start is None else start]
        for r in first:
            r.start()
        for r in first:
            r.wait_ready()
            balancer.wait_state(r.name, "UP")
        yield Cluster(replicas, balancer, token, images)
    finally:
        for r in replicas:
            r.stop()
        balancer.stop()


def summary(outcomes: Sequence[Outcome], seconds: float) -> dict[str, Any]:
    """Throughput, latency and failures of one window of the load."""
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency_ms for o in ok]
    return {
        "requests": len(outcomes), "failed": len(outcomes) - len(ok),
        "retried": sum(o.attempts > 1 for o in outcomes),
        "rps": round(len(ok) / seconds, 2) if seconds > 0 else 0.0,
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "accuracy": round(sum(o.correct for o in ok) / len(ok), 4) if ok else None,
        "versions": dict(Counter(o.version for o in ok)),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
    }


def timeline(outcomes: Sequence[Outcome], step_s: float = 1.0) -> list[dict[str, Any]]:
    """Per `step_s` bucket: answers per second by version, and failures (for the plots)."""
    if not outcomes:
        return []
    buckets: dict[int, Counter[str]] = {}
    for o in outcomes:
        buckets.setdefault(int(o.started // step_s), Counter())[o.version if o.ok else "failed"] += 1
    return [{"t": round(k * step_s, 1), **{v: round(n / step_s, 1) for v, n in sorted(buckets.get(k, {}).items())}}
            for k in range(max(buckets) + 1)]


def wind_down(load: Load, since: float, after_s: float) -> dict[str, Any]:
    """Keep the load on `after_s` more seconds, stop it, and sum up: the whole run, the window from `since`, and
    the timeline."""
    time.sleep(after_s)
    outcomes = load.stop()
    end = load.now()
    return {"all": summary(outcomes, end), "after": summary(load.window(since, end), end - since),
            "timeline": timeline(outcomes)}


def replica_loss(c: Cluster, victim: str = "r2", concurrency: int = 4, before_s: float = 5.0,
                 restart_after_s: float = 3.0, after_s: float = 5.0) -> dict[str, Any]:
    """(a) SIGKILL every process of one replica under load; the restart comes `restart_after_s` later, as a
    kubelet's would, and the replica rejoins once its readiness passes."""
    r = c.replica(victim)
    load = c.load(concurrency)
    time.sleep(before_s)
    t_kill = load.now()
    killed = r.kill9()
    detect_s = c.balancer.wait_state(victim, "DOWN", timeout=30)
    time.sleep(max(0.0, restart_after_s - detect_s))
    t_restart = load.now()
    r.start()
    ready_s = r.wait_ready()
    rejoin_s = ready_s + c.balancer.wait_state(victim, "UP", timeout=30)
    t_back = load.now()
    return {
        "scenario": "replica_loss", "replicas": len(c.replicas), "victim": victim, "processes_killed": killed,
        "concurrency": concurrency, "detect_s": round(detect_s, 2), "restart_to_in_rotation_s": round(rejoin_s, 2),
        "before": summary(load.window(0, t_kill), t_kill),
        "while_down": summary(load.window(t_kill, t_back), t_back - t_kill),
        "marks": {"kill": round(t_kill, 2), "restart": round(t_restart, 2), "back": round(t_back, 2)},
        **wind_down(load, t_back, after_s),
    }


def roll(c: Cluster, load: Load, names: Sequence[str], store: Path) -> list[dict[str, Any]]:
    """Replace `names` one at a time: SIGTERM (drain), start on `store`, wait until haproxy has it back."""
    steps = []
    for name in names:
        r = c.replica(name)
        t0 = load.now()
        code = r.stop()
        r.start(store)
        ready_s = r.wait_ready()
        c.balancer.wait_state(name, "UP", timeout=30)
        steps.append({"replica": name, "exit_code": code, "started": round(t0, 2),
                      "ready_s": round(ready_s, 2), "in_rotation": round(load.now(), 2)})
    return steps


def rolling_update(c: Cluster, new_store: Path, concurrency: int = 4, before_s: float = 3.0,
                   after_s: float = 4.0) -> dict[str, Any]:
    """(b) Every replica onto `new_store`, one at a time (maxUnavailable 1), under load."""
    load = c.load(concurrency)
    time.sleep(before_s)
    t_start = load.now()
    steps = roll(c, load, [r.name for r in c.replicas], new_store)
    t_done = load.now()
    return {
        "scenario": "rolling_update", "replicas": len(c.replicas), "concurrency": concurrency, "steps": steps,
        "duration_s": round(t_done - t_start, 2),
        "during": summary(load.window(t_start, t_done), t_done - t_start),
        "marks": {"start": round(t_start, 2), "done": round(t_done, 2)},
        **wind_down(load, t_done, after_s),
    }


def canary_verdict(base: dict[str, Any], canary: dict[str, Any], max_drop_pt: float,
                   max_p99_ratio: float) -> tuple[bool, list[str]]:
    """Promote only if the canary failed nothing, lost at most `max_drop_pt` accuracy on what it answered and
    kept p99 within `max_p99_ratio` of the serving version's. Returns (promote, reasons)."""
    reasons = []
    if not canary["requests"]:
        reasons.append("the canary answered no request")
    if canary["failed"]:
        reasons.append(f"{canary['failed']} failed requests")
    if canary["accuracy"] is not None and base["accuracy"] is not None and \
            100 * (base["accuracy"] - canary["accuracy"]) > max_drop_pt:
        reasons.append(f"accuracy {canary['accuracy']:.2%} vs {base['accuracy']:.2%}")
    if canary["p99_ms"] and base["p99_ms"] and canary["p99_ms"] > max_p99_ratio * base["p99_ms"]:
        reasons.append(f"p99 {canary['p99_ms']} ms vs {base['p99_ms']} ms")
    return not reasons, reasons


def canary(c: Cluster, v2_store: Path, v1_store: Path, share: float = 0.10, concurrency: int = 4,
           observe_s: float = 20.0, max_drop_pt: float = 1.0, max_p99_ratio: float = 1.5) -> dict[str, Any]:
    """(c) The last replica serves v2 with `share` of the traffic (haproxy weights); from what it served, promote
    (roll the rest onto v2) or roll it back onto v1."""
    canary_replica, others = c.replicas[-1], c.replicas[:-1]
    weight = max(1, round(256 * share))  # haproxy weights are 0..256 and, with roundrobin, traffic shares
    c.balancer.set_weight(canary_replica.name, weight)
    for r in others:
        c.balancer.set_weight(r.name, round((256 - weight) / len(others)))
    load = c.load(concurrency)
    steps = roll(c, load, [canary_replica.name], v2_store)
    t_obs = load.now()
    time.sleep(observe_s)
    t_end = load.now()
    observed = load.window(t_obs, t_end)
    by_version = {v: summary([o for o in observed if o.version == v], t_end - t_obs)
                  for v in sorted({o.version for o in observed if o.ok})}
    versions = sorted(by_version)
    base_v, canary_v = (versions[0], versions[-1]) if len(versions) > 1 else (versions[0], "")
    canary_figures = by_version.get(canary_v, summary([], t_end - t_obs))
    promote, reasons = canary_verdict(by_version[base_v], canary_figures, max_drop_pt, max_p99_ratio)
    decision_steps = roll(c, load, [r.name for r in others], v2_store) if promote else \
        roll(c, load, [canary_replica.name], v1_store)
    for r in c.replicas:
        c.balancer.set_weight(r.name, 100)
    t_done = load.now()
    answered = sum(by_version[v]["requests"] for v in by_version)
    return {
        "scenario": "canary", "replicas": len(c.replicas), "concurrency": concurrency, "target_share": share,
        "measured_share": round(canary_figures["requests"] / answered, 4) if answered else 0.0,
        "by_version": by_version, "decision": "promote" if promote else "rollback", "reasons": reasons,
        "canary_steps": steps, "decision_steps": decision_steps,
        "marks": {"observe": round(t_obs, 2), "decided": round(t_end, 2), "done": round(t_done, 2)},
        **wind_down(load, t_done, 3.0),
    }


def scale_out(c: Cluster, concurrency: int = 8, window_s: float = 15.0) -> dict[str, Any]:
    """(d) Under steady load on the started replicas, start the next one and compare the windows before and
    after haproxy has it in rotation."""
    new = next(r for r in c.replicas if r.proc is None)
    load = c.load(concurrency)
    time.sleep(2.0)  # connections and batching settle
    t0 = load.now()
    time.sleep(window_s)
    t_add = load.now()
    new.start()
    new.wait_ready()
    c.balancer.wait_state(new.name, "UP", timeout=30)
    t_in = load.now()
    time.sleep(2.0)
    t1 = load.now()
    time.sleep(window_s)
    t_end = load.now()
    outcomes = load.stop()
    before, after = summary(load.window(t0, t_add), t_add - t0), summary(load.window(t1, t_end), t_end - t1)
    return {
        "scenario": "scale_out", "replicas_before": sum(r is not new for r in c.replicas),
        "replicas_after": len(c.replicas), "concurrency": concurrency, "before": before, "after": after,
        "rps_ratio": round(after["rps"] / before["rps"], 2) if before["rps"] else None,
        "p50_ratio": round(after["p50_ms"] / before["p50_ms"], 2) if before["p50_ms"] else None,
        "all": summary(outcomes, t_end), "marks": {"add": round(t_add, 2), "in_rotation": round(t_in, 2)},
        "timeline": timeline(outcomes),
    }


def part(p: psutil.Process) -> str:
    """Which part of a replica (or the balancer) a process is, from its command line."""
    role = torchserve_role(p)  # "frontend" or "workers"
    if role is not None:
        return role
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(p.cmdline())
        for needle, name in (("haproxy", "balancer"), ("oip_gateway", "gateway"), ("deploy.pod", "supervisor")):
            if needle in cmd:
                return name
    return "other"


def cpu_cost(c: Cluster, concurrency: int = 16, window_s: float = 20.0, settle_s: float = 3.0) -> dict[str, Any]:
    """Steady load on every started replica; CPU ms per answered request of each part over one window. The
    client's share is this process's CPU (the load threads), for scale: a real client runs elsewhere."""
    load = c.load(concurrency)
    time.sleep(settle_s)  # connections and batching settle
    processes = [p for r in c.replicas for p in r.processes()]
    if c.balancer.proc is not None:
        processes += process_tree(c.balancer.proc.pid)
    parts = {p.pid: part(p) for p in processes}
    me = psutil.Process(os.getpid())
    t0, before, client0 = load.now(), cpu_seconds(processes), sum(me.cpu_times()[:2])
    time.sleep(window_s)
    t1, after, client1 = load.now(), cpu_seconds(processes), sum(me.cpu_times()[:2])
    outcomes = load.stop()
    window = summary(load.window(t0, t1), t1 - t0)
    answered = window["requests"] - window["failed"]
    by_part: Counter[str] = Counter()
    for pid, seconds in after.items():
        by_part[parts[pid]] += seconds - before.get(pid, 0.0)
    ms = {name: round(1000 * s / answered, 3) for name, s in sorted(by_part.items())} if answered else {}
    return {
        "scenario": "cpu_cost", "replicas": sum(r.proc is not None for r in c.replicas), "concurrency": concurrency,
        "window_s": round(t1 - t0, 2), "window": window, "cpu_ms_per_request": ms,
        "client_cpu_ms_per_request": round(1000 * (client1 - client0) / answered, 3) if answered else None,
        "all": summary(outcomes, load.now()), "timeline": timeline(outcomes),
    }
