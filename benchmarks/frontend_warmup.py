"""How long a fresh TorchServe frontend keeps compiling, and what that costs: one new server, one archive, closed-loop
windows back to back from the first request on, each with its req/s and the CPU its JIT compiler threads used.

    python -m benchmarks.frontend_warmup artifacts/resnet18 [--variant pruned_openvino_int8] [--windows 12] [-d 5]
        [-c 64]

The figure: req/s in the first window against the median of the quiet windows (the compilers under
SETTLED_SHARE of a core), and the compilers' share of a core per window (benchmarks/results/frontend_warmup.json
and .png). Bench.prime waits for the quiet (at most SETTLE_S) before points that are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import matplotlib
from tqdm import tqdm

from benchmarks import inputs
from benchmarks.archives import ROOT, build_ours
from benchmarks.served import SETTLED_SHARE, Bench, compiler_cpu_seconds
from benchmarks.thread_switch import read_variant
from handlers import machine

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def windows(directory: Path, work: Path, count: int, duration_s: float, connections: int) -> list[dict[str, Any]]:
    """`count` closed-loop windows on a fresh server, from its first request on."""
    digits = inputs.digits(directory, work / "inputs")
    mar = build_ours(directory, work / "store", "model", None)
    rows = []
    with Bench(work / "ts", work / "store") as bench:
        bench.register("model", mar.name)
        bench.warm("model", digits.files[0].read_bytes(), n=1)
        pid, t = bench.frontend_pid(), 0.0
        for i in tqdm(range(count), desc="windows"):
            before = compiler_cpu_seconds(pid)
            result, server = bench.measure("model", digits.list_file, connections, duration_s)
            compiled = compiler_cpu_seconds(pid) - before
            rows.append({"window": i, "start_s": round(t, 1), "rps": result.rps, "p50_ms": result.p50_ms,
                         "p99_ms": result.p99_ms, "errors": result.errors,
                         "compiler_core_share": round(compiled / duration_s, 3),
                         "frontend_cpu_ms": server.get("cpu_ms_per_request", {}).get("frontend")})
            t += duration_s
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = [r["start_s"] for r in rows]
    ax.plot(x, [r["rps"] for r in rows], "o-", label="req/s")
    ax.set_xlabel("seconds of load since the server's first request")
    ax.set_ylabel(f"req/s at {report['connections']} connections")
    share = ax.twinx()
    share.bar(x, [100 * r["compiler_core_share"] for r in rows], width=0.6 * report["duration_s"], alpha=0.3,
              color="tab:red", label="JIT compilers, % of a core")
    share.set_ylabel("JIT compilers, % of a core")
    ax.set_title(f"A fresh TorchServe frontend: {report['variant']} on {report['cpu']}", fontsize=9)
    ax.set_zorder(share.get_zorder() + 1)  # the line over the bars
    ax.patch.set_visible(False)
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), share.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--variant", default=None, help="a variant under MODEL_DIR/variants (default: the fp32 model)")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per window")
    ap.add_argument("-c", "--connections", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    directory, card = read_variant(args.model_dir, args.variant)
    with tempfile.TemporaryDirectory(prefix="frontend-warmup-") as tmp:
        rows = windows(directory, Path(tmp), args.windows, args.duration, args.connections)
    quiet = [r["rps"] for r in rows[1:] if r["compiler_core_share"] < SETTLED_SHARE]
    settled = median(quiet) if quiet else None
    report = {"command": f"python -m benchmarks.frontend_warmup {' '.join(argv if argv is not None else sys.argv[1:])}",
              "variant": card.variant, "runtime": card.runtime, "cpu": machine.cpu_model(),
              "connections": args.connections, "duration_s": args.duration,
              "quiet_windows": len(quiet), "first_over_quiet": round(rows[0]["rps"] / settled, 3) if settled else None,
              "quiet_from_s": next((r["start_s"] for r in rows if r["compiler_core_share"] < SETTLED_SHARE), None),
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontend_warmup.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "frontend_warmup.png")
    for r in rows:
        print(f"{r['start_s']:6.1f} s: {r['rps']:7.1f} req/s, p99 {r['p99_ms']:.1f} ms, JIT compilers "
              f"{100 * r['compiler_core_share']:.0f}% of a core", file=sys.stderr)
    print(f"first window / median of the {len(quiet)} quiet ones: {report['first_over_quiet']}; compilers quiet "
          f"(under {SETTLED_SHARE:.0%} of a core) from {report['quiet_from_s']} s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
