"""Capacity planning on paper, from a served benchmark's measured figures (benchmarks.run's report.json): how many
replicas and cores a req/s target needs, per served variant, keeping each replica at the load where its p99 was
measured to hold.

    python -m benchmarks.capacity docs/served_pick.json --cluster docs/cluster.json --out docs/capacity.md

A replica here is the benchmarked machine: its cores, TorchServe and our handler at 16 connections, plus the
gateway in front of it. The served benchmark measured TorchServe alone; scenario (e) of benchmarks.cluster
measured the gateway's and the balancer's CPU per request. The replica's ceiling is scaled down by the gateway's
share of the CPU (the pick is CPU-bound there), and planned load per replica is `--utilization` of that (the
open-loop p99 figure of the report says what p99 that load gave). The balancer is shared, so it is planned apart.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from handlers.machine import cpu_label

TARGETS = (1_000, 10_000, 100_000)


def shared_costs(cluster: dict[str, Any]) -> dict[str, float]:
    """CPU ms per request of the gateway and the balancer, from benchmarks.cluster's scenario (e)."""
    try:
        ms = cluster["results"]["e"]["cpu_ms_per_request"]
        return {"gateway": ms["gateway"], "balancer": ms["balancer"]}
    except KeyError as e:
        raise ValueError(f"the cluster report has no CPU cost by part ({e} missing)") from e


def plan(report: dict[str, Any], shared: dict[str, float], utilization: float) -> list[dict[str, Any]]:
    cores = report["machine"]["cpus"]
    rows = []
    for r in report["served"]:
        if r["server"] != "ours" or r["input"] != "digits" or r["concurrency"] != 16:
            continue
        cpu = r["server_metrics"]["cpu_ms_per_request"]
        served_ms = cpu["frontend"] + cpu["workers"]
        per_request_ms = served_ms + shared["gateway"]
        ceiling = r["rps"] * served_ms / per_request_ms
        per_replica = ceiling * utilization
        rows.append({
            "variant": r["variant"], "served_rps": r["rps"], "ceiling_rps": round(ceiling, 1),
            "p99_ms_at_ceiling": r["p99_ms"], "cpu_ms_per_request": round(per_request_ms, 2),
            "cpu_busy_share": r["server_metrics"]["cpu_busy_share"], "planned_rps_per_replica": round(per_replica, 1),
            "replicas": {t: math.ceil(t / per_replica) for t in TARGETS},
            "cores": {t: cores * math.ceil(t / per_replica) for t in TARGETS},
            "cores_if_fully_busy": {t: math.ceil(t * per_request_ms / 1000) for t in TARGETS},
        })
    return rows


def markdown(report: dict[str, Any], cluster: dict[str, Any], rows: list[dict[str, Any]], utilization: float,
             sources: tuple[Path, Path]) -> str:
    m = report["machine"]
    shared = shared_costs(cluster)
    lines = [f"# Capacity plan\n\nFrom `{sources[0]}` ({report['command']}; {cpu_label(m)}, {m['cpus']} CPUs, "
             f"{report['device']}) and `{sources[1]}` ({cluster['command']}; {cluster['machine']}). Command: "
             f"`python -m benchmarks.capacity {sources[0]} --cluster {sources[1]} --utilization {utilization}`.\n",
             f"One replica = that machine ({m['cpus']} cores) running TorchServe and the gateway. CPU ms per request "
             f"= TorchServe's frontend and workers (served benchmark, 16 connections) + the gateway's "
             f"{shared['gateway']} ms (cluster scenario e); the ceiling is the served req/s scaled by that ratio. "
             f"Planned load per replica = {utilization:.0%} of the ceiling.\n",
             "| variant | ceiling req/s per replica | CPU ms / request | planned req/s per replica | "
             + " | ".join(f"{t // 1000}k req/s: replicas (cores)" for t in TARGETS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(TARGETS)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ceiling_rps']} | {r['cpu_ms_per_request']} | "
                     f"{r['planned_rps_per_replica']} | "
                     + " | ".join(f"{r['replicas'][t]} ({r['cores'][t]})" for t in TARGETS) + " |")
    at70 = [r for r in report.get("open_loop") or []
            if r["server"] == "ours" and r["fraction"] == 0.7 and r.get("arrivals", "constant") == "constant"]
    for r in at70:
        lines.append(f"\nLatency at 70% load: {r['variant']} took {r['achieved_rps']} req/s arriving open-loop "
                     f"(70% of its ceiling without the gateway) with p50 {r['p50_ms']:.1f} ms and p99 "
                     f"{r['p99_ms']:.1f} ms in the same run; a tighter p99 target needs a lower utilization.")
    lines.append(f"\nThe balancer (haproxy) used {shared['balancer']} ms of CPU per request, so one haproxy core "
                 f"carries about {1000 / shared['balancer']:.0f} req/s fully busy: "
                 + ", ".join(f"{t // 1000}k req/s → {math.ceil(t * shared['balancer'] / 1000 / utilization)} "
                             f"cores at {utilization:.0%}" for t in TARGETS) + ".")
    lines.append("\nCores if every core were fully busy (CPU ms per request × req/s): "
                 + "; ".join(f"{r['variant']}: " + ", ".join(f"{t // 1000}k → {r['cores_if_fully_busy'][t]}"
                                                             for t in TARGETS) for r in rows) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="a benchmarks.run report.json")
    p.add_argument("--cluster", type=Path, default=Path("docs/cluster.json"),
                   help="a benchmarks.cluster report with scenario (e): the gateway's and balancer's CPU")
    p.add_argument("--utilization", type=float, default=0.6, help="planned share of a replica's ceiling (0..1)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    if not 0 < args.utilization <= 1:
        p.error("--utilization must be in (0, 1]")
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {args.report} ({e}); run python -m benchmarks.run --full first")
    try:
        cluster = json.loads(args.cluster.read_text())
        rows = plan(report, shared_costs(cluster), args.utilization)
    except (OSError, ValueError) as e:
        p.error(f"cannot use {args.cluster} ({e}); run python -m benchmarks.cluster --scenarios e first")
    text = markdown(report, cluster, rows, args.utilization, (args.report, args.cluster))
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
