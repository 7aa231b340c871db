"""Light load, side by side: every stock setting and ours up at once, 1 connection, in rounds taken in turn.

A 10 s point at 1 connection moves by about ±10% on a shared VM: as much as the difference being measured, and
the stock and ours points of benchmarks.run's closed-loop sweep lie minutes apart. Here all the servers run at
once (idle ones cost nothing), each gets a short point per round, the order rotates every round, and each
round's ratio compares points taken seconds apart. The median round's ratio is the figure; the per-round
spread shows the noise.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import inputs, stock
from benchmarks.served import PRIME_S, Bench
from packager.stats import interleaved, median


@dataclass(frozen=True)
class Server:
    """One running TorchServe with one model loaded, as the report labels it."""
    bench: Bench
    model: str
    server: str  # "stock" | "ours"
    workers: int
    threads: str


def measure(work: Path, store: Path, stock_mar: Path, ours_mar: Path, ours_workers: int, ours_threads: str,
            sets: list[inputs.InputSet], rounds: int, duration_s: float, full: bool = True, settle_s: float = 0.0
            ) -> list[dict[str, Any]]:
    """Rows of (round, input, server) at 1 connection, from the stock settings (`full`: all of them, else its
    default) and ours served at once."""
    with contextlib.ExitStack() as stack:
        servers = []
        for workers, threads in stock.settings(full):
            bench = stack.enter_context(stock.server(work / f"ts-light-stock-{workers}", store, threads))
            servers.append(Server(bench, "stock", "stock", workers, threads))
        bench = stack.enter_context(Bench(work / "ts-light-ours", store))
        servers.append(Server(bench, "ours_fp32", "ours", ours_workers, ours_threads))
        for s, mar in zip(servers, [stock_mar] * (len(servers) - 1) + [ours_mar], strict=True):
            s.bench.register(s.model, mar.name, workers=s.workers)
            for input_set in sets:
                s.bench.prime(s.model, input_set.files[0].read_bytes(), input_set.list_file,
                              min(PRIME_S, duration_s), settle_s=settle_s)
        def points(s: Server) -> list[dict[str, Any]]:
            """One point per input set for server `s`."""
            out = []
            for input_set in sets:
                s.bench.warm(s.model, input_set.files[0].read_bytes(), n=1)
                result, _ = s.bench.measure(s.model, input_set.list_file, 1, duration_s)
                out.append({"input": input_set.name, "server": s.server, "workers": s.workers, "threads": s.threads,
                            **result.to_dict()})
                progress.update(1)
                progress.set_postfix_str(f"{input_set.name} {s.server} {s.workers}w: {result.rps:.1f} req/s")
            return out

        with tqdm(total=rounds * len(sets) * len(servers), desc="light load, in turn", leave=False) as progress:
            runs = interleaved({str(i): functools.partial(points, s) for i, s in enumerate(servers)}, rounds,
                               rotate=True)
    return [{"round": r, **row} for per_round in runs.values() for r, rows in enumerate(per_round) for row in rows]


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per input: each round's ours ÷ best stock (req/s, and stock's p50 ÷ ours), their medians and spread, and
    each server's median req/s and p50."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["input"] for r in rows):
        mine = [r for r in rows if r["input"] == name]
        rps, p50 = [], []
        for rnd in sorted({r["round"] for r in mine}):
            at = [r for r in mine if r["round"] == rnd]
            ours = [r for r in at if r["server"] == "ours"]
            stocks = [r for r in at if r["server"] == "stock"]
            if not ours or not stocks or ours[0]["rps"] <= 0:
                continue
            rps.append(ours[0]["rps"] / max(r["rps"] for r in stocks))
            p50.append(min(r["p50_ms"] for r in stocks) / ours[0]["p50_ms"])
        servers = {}
        for key in dict.fromkeys((r["server"], r["workers"], r["threads"]) for r in mine):
            own = [r for r in mine if (r["server"], r["workers"], r["threads"]) == key]
            servers[f"{key[0]} {key[1]} × {key[2]}"] = {
                "rps": median(r["rps"] for r in own), "p50_ms": median(r["p50_ms"] for r in own),
                "errors": sum(r["errors"] for r in own), "rounds": len(own)}
        if rps:
            out[name] = {"rounds": len(rps), "rps_ratio": median(rps), "rps_ratio_min": min(rps),
                         "rps_ratio_max": max(rps), "p50_ratio": median(p50), "p50_ratio_min": min(p50),
                         "p50_ratio_max": max(p50), "errors": sum(r["errors"] for r in mine), "servers": servers}
    return out
