"""The cluster rehearsal on one machine, for docs/: scenarios (a)-(e) of harness/rehearsal.py against real
replicas behind haproxy, v1 = the fp32 model and v2 = the variant training.optimize --pick chose.

    python -m benchmarks.cluster                                  # artifacts/resnet18, all five scenarios
    python -m benchmarks.cluster --model artifacts/resnet18 --scenarios a,b --out /tmp/cluster

Writes OUT/cluster.{json,md,png}. Every replica is `python -m deploy.pod`, the container's command; (d) pins
each replica to one core, as a pod's CPU limit would, so adding a replica adds capacity on a 2-core machine;
(e) measures the CPU per request of the balancer and the gateway, which benchmarks.capacity adds to a replica's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from handlers.machine import cpu_model
from harness.rehearsal import canary, cluster, cpu_cost, replica_loss, rolling_update, scale_out
from harness.torchserve import ROOT
from packager import golden
from packager.pick import PICK_KINDS, read_pick

SCENARIOS = {"a": "replica loss (kill -9 under load)", "b": "rolling update v1 -> v2", "c": "canary 10% -> decision",
             "d": "scale out 1 -> 2 one-core replicas", "e": "CPU per request by part, v2 on 3 replicas"}


def build(model: Path, store: Path, version: str, *args: str) -> Path:
    cmd = ["bash", str(ROOT / "build_mar.sh"), str(model), "--store", str(store), "--name", "digits",
           "--version", version, "--archive", "digits", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: build_mar.sh failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return store


def plot(path: Path, results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.2 * len(results)), squeeze=False)
    for ax, (key, r) in zip(axes[:, 0], results.items(), strict=True):
        series = sorted({k for row in r["timeline"] for k in row if k != "t"})
        t = [row["t"] for row in r["timeline"]]
        for name in series:
            ax.plot(t, [row.get(name, 0) for row in r["timeline"]], label="failed" if name == "failed" else f"v{name}",
                    color="tab:red" if name == "failed" else None)
        for mark, at in r.get("marks", {}).items():
            ax.axvline(at, color="0.5", ls="--", lw=0.8)
            ax.annotate(mark, (at, ax.get_ylim()[1]), fontsize=7, rotation=90, va="top", ha="right")
        ax.set_title(f"({key}) {SCENARIOS[key]}: {r['all']['requests']} requests, {r['all']['failed']} failed",
                     fontsize=9)
        ax.set_ylabel("answers/s")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    out = [f"# Cluster rehearsal\n\n{report['machine']}. Command: `{report['command']}`.\n",
           "Replicas: `python -m deploy.pod` (TorchServe + the gateway, as the container runs them) on 127.0.0.2-4, "
           "behind haproxy (`deploy/balancer.py`, health checks on `/v2/health/ready` every 500 ms, retries on "
           "another replica for refused, reset or 503). Load: the production client (`deploy.client`, 3 retries "
           f"with jittered backoff on connection errors and 503), closed loop. v1 = {report['v1']}, "
           f"v2 = {report['v2']}.\n",
           "| scenario | requests | failed | retried by the client | req/s | p50 ms | p99 ms | key figures |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, r in report["results"].items():
        a = r["all"]
        if key == "a":
            extra = (f"down detected in {r['detect_s']} s; restart to back in rotation "
                     f"{r['restart_to_in_rotation_s']} s; req/s before {r['before']['rps']}, while down "
                     f"{r['while_down']['rps']}, after {r['after']['rps']}")
        elif key == "b":
            extra = (f"{len(r['steps'])} replicas replaced in {r['duration_s']} s, exit codes "
                     f"{[s['exit_code'] for s in r['steps']]}; versions after: {r['after']['versions']}")
        elif key == "c":
            extra = (f"canary share {r['measured_share']:.1%} (target {r['target_share']:.0%}); decision "
                     f"**{r['decision']}** {r['reasons'] or ''}; by version: " + "; ".join(
                         f"v{v} {s['requests']} req, acc {s['accuracy']}, p99 {s['p99_ms']} ms"
                         for v, s in r["by_version"].items()))
        elif key == "e":
            extra = (f"{r['concurrency']} connections, {r['window_s']} s window, CPU ms per answered request: "
                     + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items())
                     + f" (the load generator: {r['client_cpu_ms_per_request']})")
        else:
            extra = (f"{r['replicas_before']} -> {r['replicas_after']} replicas: req/s {r['before']['rps']} -> "
                     f"{r['after']['rps']} (**{r['rps_ratio']}x**), p50 {r['before']['p50_ms']} -> "
                     f"{r['after']['p50_ms']} ms")
        out.append(f"| ({key}) {SCENARIOS[key]} | {a['requests']} | {a['failed']} | {a['retried']} | {a['rps']} | "
                   f"{a['p50_ms']} | {a['p99_ms']} | {extra} |")
    out.append("\n![cluster timelines](cluster.png)\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "artifacts" / "resnet18", help="fp32 model dir (v1)")
    p.add_argument("--pick", default="throughput", choices=PICK_KINDS,
                   help="the pick packaged as v2 (training.optimize --pick)")
    p.add_argument("--scenarios", default="a,b,c,d,e")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the clusters' finally blocks stop every replica
    keys = [k for k in args.scenarios.split(",") if k]
    if unknown := set(keys) - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {','.join(SCENARIOS)}")
    try:
        picked = read_pick(args.model, args.pick).name
    except (OSError, ValueError) as e:
        p.error(str(e))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cluster-") as tmp:
        work = Path(tmp)
        v1 = build(args.model, work / "v1", "1.0")
        v2 = build(args.model, work / "v2", "2.0", "--pick", args.pick)
        images = golden.images(golden.from_archive(v1 / "digits.mar"))
        results: dict[str, dict[str, Any]] = {}
        for key in keys:
            print(f"({key}) {SCENARIOS[key]} ...", flush=True)
            if key == "d":
                cores = [[i % os.cpu_count()] for i in range(2)] if (os.cpu_count() or 1) > 1 else None
                with cluster(work / key, [v1, v1], images, cpus=cores, start=1) as c:
                    results[key] = scale_out(c, concurrency=2 * args.concurrency)
            elif key == "e":
                with cluster(work / key, [v2] * 3, images) as c:
                    results[key] = cpu_cost(c, concurrency=4 * args.concurrency)
            else:
                with cluster(work / key, [v1] * 3, images) as c:
                    if key == "a":
                        results[key] = replica_loss(c, concurrency=args.concurrency, before_s=10, after_s=10)
                    elif key == "b":
                        results[key] = rolling_update(c, v2, concurrency=args.concurrency, before_s=5, after_s=5)
                    else:
                        results[key] = canary(c, v2, v1, concurrency=args.concurrency, observe_s=30)
            print(f"({key}) {json.dumps(results[key]['all'])}", flush=True)
    command = " ".join(["python -m benchmarks.cluster", *(sys.argv[1:] if argv is None else argv)])
    report = {"machine": f"{cpu_model()}, {os.cpu_count()} CPUs", "command": command,
              "v1": f"{args.model.name} fp32", "v2": picked, "results": results,
              "seconds": round(time.monotonic() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cluster.json").write_text(json.dumps(report, indent=2))
    (args.out / "cluster.md").write_text(markdown(report))
    plot(args.out / "cluster.png", results)
    print(f"wrote {args.out}/cluster.{{json,md,png}} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
