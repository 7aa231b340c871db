"""What TorchServe's built-in frontend logging costs: the same archive behind two servers up at once, one with the
built-in log4j2.xml (DEBUG, each line twice in ts_log.log and again on stdout) and one with deploy/log4j2.xml
(what config.properties ships), measured in rounds taken in turn.

    python -m benchmarks.frontend_logging artifacts/resnet18 [--variant pruned_openvino_int8] [--rounds 5] [-d 5]
        [--loads 1,64]

Each round gives both servers a closed-loop point at each load, in alternating order; each round's ratio compares
points taken seconds apart and the median round is the figure. Reported per server: req/s, p50/p99, the
frontend's CPU time per request and the log lines written per request (every file under its logs/).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

from tqdm import tqdm

from benchmarks import inputs
from benchmarks.archives import build_ours
from benchmarks.served import PRIME_S, SETTLE_S, Bench
from benchmarks.thread_switch import read_variant, variant_parser, write_report
from handlers import machine

SERVERS = {"built-in": True, "ours": False}  # name: builtin_logging


def logged(bench: Bench) -> tuple[int, int]:
    """Lines and bytes in every log file the server has written, stdout included."""
    home = bench.ts.workdir
    texts = [p.read_bytes() for p in [*(home / "logs").glob("*.log"), home / "stdout.log"] if p.is_file()]
    return sum(len(t.splitlines()) for t in texts), sum(len(t) for t in texts)


def measure(directory: Path, work: Path, loads: list[int], rounds: int, duration_s: float,
            settle_s: float) -> list[dict[str, Any]]:
    """Rows of (round, load, server) from both servers, up at once and measured in turn."""
    digits = inputs.digits(directory, work / "inputs")
    mar = build_ours(directory, work / "store", "model", None)
    body = digits.files[0].read_bytes()
    rows = []
    with contextlib.ExitStack() as stack:
        benches = {name: stack.enter_context(Bench(work / f"ts-{name}", work / "store", builtin_logging=builtin))
                   for name, builtin in SERVERS.items()}
        for bench in benches.values():
            bench.register("model", mar.name)
            bench.prime("model", body, digits.list_file, PRIME_S, settle_s=settle_s)
        order = list(benches)
        with tqdm(total=rounds * len(loads) * len(order), desc="logging, in turn") as progress:
            for r in range(rounds):
                for c in loads:
                    for name in order if r % 2 == 0 else order[::-1]:
                        bench = benches[name]
                        bench.warm("model", body, n=1)
                        lines, size = logged(bench)
                        result, server = bench.measure("model", digits.list_file, c, duration_s)
                        n, (lines_after, size_after) = max(result.requests, 1), logged(bench)
                        per_request = (lines_after - lines) / n
                        rows.append({"round": r, "connections": c, "server": name, **result.to_dict(),
                                     "frontend_cpu_ms": server.get("cpu_ms_per_request", {}).get("frontend"),
                                     "log_lines_per_request": round(per_request, 2),
                                     "log_bytes_per_request": round((size_after - size) / n)})
                        progress.update(1)
                        progress.set_postfix_str(f"round {r + 1} c{c} {name}: {result.rps:.1f} req/s, "
                                                 f"{per_request:.1f} log lines/request")
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per load: each server's medians, and ours ÷ built-in req/s per round (median, spread)."""
    out = []
    for c in dict.fromkeys(r["connections"] for r in rows):
        at = [r for r in rows if r["connections"] == c]
        row: dict[str, Any] = {"connections": c}
        for name in SERVERS:
            own = [r for r in at if r["server"] == name]
            row[name] = {k: round(median(r[k] for r in own), 3)
                         for k in ("rps", "p50_ms", "p99_ms", "frontend_cpu_ms", "log_lines_per_request",
                                   "log_bytes_per_request")}
            row[name]["errors"] = sum(r["errors"] for r in own)
        ratios = []
        for r in sorted({r["round"] for r in at}):
            pair = {x["server"]: x["rps"] for x in at if x["round"] == r}
            if pair.get("built-in"):
                ratios.append(pair["ours"] / pair["built-in"])
        row["rps_ratio"] = round(median(ratios), 3)
        row["rps_ratio_min"], row["rps_ratio_max"] = round(min(ratios), 3), round(max(ratios), 3)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = variant_parser(__doc__, "frontend_logging.json", rounds=5)
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per point")
    ap.add_argument("--loads", default="1,64", help="connections, comma-separated")
    ap.add_argument("--settle-s", type=float, default=SETTLE_S,
                    help="at most this long for each fresh frontend's JIT to go quiet before the first round")
    args = ap.parse_args(argv)
    directory, card = read_variant(args.model_dir, args.variant)
    loads = [int(v) for v in args.loads.split(",")]
    with tempfile.TemporaryDirectory(prefix="frontend-logging-") as tmp:
        rows = measure(directory, Path(tmp), loads, args.rounds, args.duration, args.settle_s)
    report = {"variant": card.variant, "runtime": card.runtime, "cpu": machine.cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "duration_s": args.duration, "rounds": args.rounds,
              "summary": summary(rows), "rows": rows}
    for s in report["summary"]:
        print(f"c{s['connections']}: ours {s['ours']['rps']:.1f} vs built-in {s['built-in']['rps']:.1f} req/s "
              f"(x{s['rps_ratio']:.2f}, rounds {s['rps_ratio_min']:.2f}-{s['rps_ratio_max']:.2f}); frontend CPU "
              f"{s['ours']['frontend_cpu_ms']} vs {s['built-in']['frontend_cpu_ms']} ms/request; log lines "
              f"{s['ours']['log_lines_per_request']} vs {s['built-in']['log_lines_per_request']} "
              f"({s['ours']['log_bytes_per_request']:.0f} vs {s['built-in']['log_bytes_per_request']:.0f} bytes) "
              "per request",
              file=sys.stderr)
    return write_report("benchmarks.frontend_logging", args, report)


if __name__ == "__main__":
    main()
