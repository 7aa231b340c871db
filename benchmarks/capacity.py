"""Capacity planning on paper, from a served benchmark's measured figures (benchmarks.run's report.json): how many
replicas and cores a req/s target needs, per served variant, keeping each replica at the load where its p99 was
measured to hold.

    python -m benchmarks.capacity docs/served_pick.json --out docs/capacity.md [--utilization 0.6]

A replica here is the benchmarked machine: its cores, TorchServe and our handler at 16 connections. Its ceiling
is the measured req/s; planned load per replica is `--utilization` of that (the open-loop p99 figure of the
report says what p99 that load gave). The gateway's and the balancer's own CPU are not in the per-request cost.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

TARGETS = (1_000, 10_000, 100_000)


def plan(report: dict[str, Any], utilization: float) -> list[dict[str, Any]]:
    cores = report["machine"]["cpus"]
    rows = []
    for r in report["served"]:
        if r["server"] != "ours" or r["input"] != "digits" or r["concurrency"] != 16:
            continue
        cpu = r["server_metrics"]["cpu_ms_per_request"]
        per_request_ms = cpu["frontend"] + cpu["workers"]
        per_replica = r["rps"] * utilization
        rows.append({
            "variant": r["variant"], "ceiling_rps": r["rps"], "p99_ms_at_ceiling": r["p99_ms"],
            "cpu_ms_per_request": round(per_request_ms, 2), "cpu_busy_share": r["server_metrics"]["cpu_busy_share"],
            "planned_rps_per_replica": round(per_replica, 1),
            "replicas": {t: math.ceil(t / per_replica) for t in TARGETS},
            "cores": {t: cores * math.ceil(t / per_replica) for t in TARGETS},
            "cores_if_fully_busy": {t: math.ceil(t * per_request_ms / 1000) for t in TARGETS},
        })
    return rows


def markdown(report: dict[str, Any], rows: list[dict[str, Any]], utilization: float, source: Path) -> str:
    m = report["machine"]
    lines = [f"# Capacity plan\n\nFrom `{source}` ({report['command']}; {m['cpu']}, {m['cpus']} CPUs, "
             f"{report['device']}). Command: `python -m benchmarks.capacity {source} --utilization {utilization}`.\n",
             f"One replica = that machine ({m['cpus']} cores). Planned load per replica = {utilization:.0%} of its "
             "measured ceiling at 16 connections.\n",
             "| variant | ceiling req/s per replica | CPU ms / request | planned req/s per replica | "
             + " | ".join(f"{t // 1000}k req/s: replicas (cores)" for t in TARGETS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(TARGETS)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ceiling_rps']} | {r['cpu_ms_per_request']} | "
                     f"{r['planned_rps_per_replica']} | "
                     + " | ".join(f"{r['replicas'][t]} ({r['cores'][t]})" for t in TARGETS) + " |")
    load70 = report.get("load_70") or {}
    if load70:
        lines.append(f"\nLatency at that load: {load70['variant']} served {load70['rps']} req/s "
                     f"({load70['fraction']:.0%} of its ceiling) with p50 {load70['p50_ms']:.1f} ms and p99 "
                     f"{load70['p99_ms']:.1f} ms in the same run; a tighter p99 target needs a lower utilization.")
    lines.append("\nCores if every core were fully busy (CPU ms per request × req/s): "
                 + "; ".join(f"{r['variant']}: " + ", ".join(f"{t // 1000}k → {r['cores_if_fully_busy'][t]}"
                                                             for t in TARGETS) for r in rows) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", type=Path, help="a benchmarks.run report.json")
    p.add_argument("--utilization", type=float, default=0.6, help="planned share of a replica's ceiling (0..1)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print it)")
    args = p.parse_args(argv)
    if not 0 < args.utilization <= 1:
        p.error("--utilization must be in (0, 1]")
    try:
        report = json.loads(args.report.read_text())
    except (OSError, ValueError) as e:
        p.error(f"cannot read {args.report} ({e}); run python -m benchmarks.run --full first")
    text = markdown(report, plan(report, args.utilization), args.utilization, args.report)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
