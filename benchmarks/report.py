"""Write a benchmark run as JSON (every figure), Markdown (tables with ratios) and a PNG.

    python -m benchmarks.report benchmarks/results/report.json     # re-render report.md and the PNG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from handlers.machine import cpu_label  # noqa: E402

PLOT = "throughput_vs_p99.png"


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def handler_ms(m: dict[str, Any]) -> str:
    """Stock reports HandlerTime; ours reports its own stages (and the batch size they covered)."""
    if "last_HandlerTime" in m:
        return fmt(m["last_HandlerTime"])
    stages = [m.get(f"last_{k}") for k in ("PreprocessMs", "InferenceMs", "PostprocessMs")]
    if None in stages:
        return "-"
    batch = m.get("mean_batch", m.get("last_HandlerBatchSize"))
    return f"{sum(stages):.1f}" + (f" (mean batch {batch:.1f})" if batch is not None else "")


def served_table(rows: list[dict[str, Any]], input_name: str) -> list[str]:
    out = [
        "| server | variant | workers × threads | conc. | req/s | p50 ms | p90 ms | p99 ms | errors | queue ms "
        "| in-server ms | handler ms (last batch) | vs stock | vs in-process |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["input"] != input_name:
            continue
        m = r["server_metrics"]
        out.append(
            f"| {r['server']} | {r['variant']} | {r.get('workers', 1)} × {r.get('threads', 'default')} | "
            f"{r['concurrency']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {fmt(m.get('queue_ms'))} | "
            f"{fmt(m.get('server_ms'))} | {handler_ms(m)} | {ratio(r.get('vs_stock'))} | "
            f"{ratio(r.get('vs_inprocess'))} |")
    return out


def light_table(light: dict[str, Any]) -> list[str]:
    """benchmarks.light_load: each server's median over rounds at 1 connection, and ours ÷ best stock per round."""
    if not light.get("summary"):
        return []
    out = ["", f"## Light load, side by side (1 connection, {light['rounds']} rounds of {light['duration_s']:g} s)",
           "", "Every server runs at once with its one model; each round measures them in turn (the order rotates), "
           "so each round's ratio compares points taken seconds apart. Medians over the rounds; the acceptance's "
           "1-connection lines use them.", "",
           "| input | server | workers × threads | median req/s | median p50 ms | errors | ours ÷ best stock req/s, "
           "per round: min / median / max | best stock p50 ÷ ours: min / median / max |",
           "|---|---|---|---:|---:|---:|---|---|"]
    for name, s in light["summary"].items():
        for label, v in s["servers"].items():
            server, setting = label.split(" ", 1)
            ours = server == "ours"
            out.append(f"| {name} | {server} | {setting} | {v['rps']:.1f} | {v['p50_ms']:.1f} | {v['errors']} | "
                       + (f"{s['rps_ratio_min']:.2f} / **{s['rps_ratio']:.2f}** / {s['rps_ratio_max']:.2f} | "
                          f"{s['p50_ratio_min']:.2f} / **{s['p50_ratio']:.2f}** / {s['p50_ratio_max']:.2f} |"
                          if ours else "| |"))
    return out


def cpu_table(result: dict[str, Any]) -> list[str]:
    """Per-process CPU time per request at each server's highest concurrency on the digits, next to what the
    same variant costs in-process (its threads x wall time per image, batch as served, decode included)."""
    rows = [r for r in result["served"] if r["input"] == "digits" and r["server_metrics"].get("cpu_ms_per_request")]
    if not rows:
        return []
    top = max(r["concurrency"] for r in rows)
    threads = result["machine"]["torch_threads"]
    inproc = {(r["variant"], r["batch"]): r for r in result["inprocess"] if r["decode"]}
    out = ["", f"## Where the CPU goes (digits, {top} connections)", "",
           "CPU ms per answered request, from each process's user+system time over the run (psutil; wrk from "
           "getrusage). In-process: the handler alone, threads × wall ms per image.", "",
           "| server | variant | workers × threads | frontend (Java) | workers (Python) | wrk | total "
           "| cores busy | in-process |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["concurrency"] != top:
            continue
        c = r["server_metrics"]["cpu_ms_per_request"]
        ip = inproc.get((r["variant"], r["batch_size"])) if r["server"] == "ours" else None
        out.append(f"| {r['server']} | {r['variant']} | {r.get('workers', 1)} × {r.get('threads', 'default')} | "
                   f"{c['frontend']:.2f} | {c['workers']:.2f} | {c['load_generator']:.2f} | "
                   f"{sum(c.values()):.2f} | {100 * r['server_metrics']['cpu_busy_share']:.0f}% | "
                   f"{fmt(threads * 1000 / ip['images_per_s'], 2) if ip else '-'} |")
    return out


def markdown(result: dict[str, Any]) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        f"# Benchmark ({result['mode']} mode, {result['device']})",
        "",
        f"Machine: {cpu_label(m)}, {m['cpus']} CPUs, {m['memory_gb']} GB; torch threads {m['torch_threads']}. "
        f"torch {v['torch']}, torchvision {v['torchvision']}, TorchServe {v['torchserve']}, {v['wrk']}, "
        f"captum {v['captum']} (stock only). Commit {result['git_commit']}, {result['started']}.",
        f"Command: `{result['command']}`",
        "",
        "Load: wrk, one thread, keep-alive, closed loop at each concurrency for "
        f"{result['settings']['duration_s']} s. Stock uses TorchServe defaults (batch 1) with one worker, and in "
        "full mode also one single-threaded worker per core; vs stock divides by the better stock row. Our "
        "archives' configs: " + "; ".join(
            f"{v} batch {c['batchSize']}, {c['maxBatchDelay']} ms, {c['minWorkers']} workers, {c['threads']} "
            f"(from {c['from']})" for v, c in result["settings"]["ours_config"].items()) + ".",
        "",
        "## Acceptance",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for a in result["acceptance"]:
        lines.append(f"| {a['target']} | {a['measured']} | {'yes' if a['met'] else '**no**'} |")
    for name, title in (("digits", "Served: held-out digits"), ("photos", "Served: sample photos")):
        desc = next((i["description"] for i in result["inputs"] if i["name"] == name), name)
        lines += ["", f"## {title} ({desc})", "", *served_table(result["served"], name)]
    lines += ["", "vs stock: req/s over stock's at the same input and concurrency. vs in-process: req/s over the "
              "in-process images/s of the same variant at the served batch size, decode included. queue and "
              "in-server ms are per-request means from TorchServe's counters over the run (in-server includes "
              "queue); handler ms is the last batch's gauge (stock: HandlerTime; ours: preprocess + inference + "
              "postprocess)."]
    lines += light_table(result.get("light") or {})
    lines += cpu_table(result)
    lines += ["", "## In-process ceiling (handler called directly, digits)", "",
              "| variant | batch | decode+preprocess | ms/batch | images/s |", "|---|---:|---|---:|---:|"]
    for r in result["inprocess"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {'yes' if r['decode'] else 'no'} | "
                     f"{r['ms_per_batch']:.2f} | {r['images_per_s']:.1f} |")
    lines += ["", "## Preprocessing: ours vs stock PIL path (one process)", "",
              "| input | torch threads | ours ms/image | stock ms/image | speedup |", "|---|---:|---:|---:|---:|"]
    for r in result["preprocess"]:
        lines.append(f"| {r['input']} | {r['threads']} | {r['ours_ms_per_image']:.3f} | "
                     f"{r['stock_ms_per_image']:.3f} | {r['speedup']:.2f}x |")
    if result.get("open_loop"):
        lines += ["", "## Open loop: latency at a constant arrival rate", "",
                  "locust (harness/open_loop.py): requests arrive at the rate whether or not earlier ones are "
                  "answered, so queueing shows in the latency. Rates are shares of the same server's best "
                  "closed-loop req/s on the digits above. Arrivals are evenly spaced (constant, wrk2's schedule) "
                  "or a Poisson process (random gaps: queues form well below capacity).", "",
                  "| server | variant | workers × threads | arrivals | offered | target req/s | achieved req/s | "
                  "p50 ms | p90 ms | p99 ms | p99/p50 | errors | mean batch |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["open_loop"]:
            lines.append(f"| {r['server']} | {r['variant']} | {r['workers']} × {r['threads']} | {r['arrivals']} | "
                         f"{r['fraction']:.0%} | {r['target_rps']:.1f} | {r['achieved_rps']:.1f} | "
                         f"{r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {fmt(r['p99_over_p50'], 2)} | "
                         f"{r['errors']} | {fmt(r['server_metrics'].get('mean_batch'), 2)} |")
    lines += ["", f"Startup: `torchserve --start` to first successful prediction (default fp32 model): "
              f"{fmt(result.get('startup_s'), 2)} s.", ""]
    if result.get("startup_phases_s"):
        lines += ["| start-up phase reached | s after launch |", "|---|---:|",
                  *[f"| {k} | {v:.2f} |" for k, v in result["startup_phases_s"].items()], ""]
    if result.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in result["notes"]], ""]
    lines += [f"![throughput vs p99]({PLOT})", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: req/s against p99 on the digits, one point per concurrency. Right: p50 and p99 against the
    open-loop arrival rate."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in result["served"]:
        if r["input"] == "digits":
            series.setdefault(label_of(r), []).append(r)
    closed_loop(ax, series, f"Closed loop, held-out digits, {result['mode']} mode, {result['machine']['cpus']} CPUs")
    looped: dict[str, list[dict[str, Any]]] = {}
    for r in result.get("open_loop") or []:
        looped.setdefault(f"{label_of(r)}, {r['arrivals']}", []).append(r)
    for label, rows in looped.items():
        rows = sorted(rows, key=lambda r: r["fraction"])
        line = ax2.plot([r["achieved_rps"] for r in rows], [r["p99_ms"] for r in rows], marker="o",
                        label=f"{label} p99", linestyle="--" if label.startswith("stock") else "-")
        ax2.plot([r["achieved_rps"] for r in rows], [r["p50_ms"] for r in rows], marker=".", alpha=0.6,
                 color=line[0].get_color(), linestyle=":", label=f"{label} p50")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("arrival rate (req/s, log scale): 30/50/70/90% of each server's max")
    ax2.set_ylabel("latency (ms, log scale)")
    ax2.set_title("Open loop (locust), held-out digits")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def closed_loop(ax: Any, series: dict[str, list[dict[str, Any]]], title: str) -> None:
    """req/s against p99 on log axes, a line per server through its points (each with its `concurrency`), stock
    dashed."""
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["concurrency"])
        ax.plot([r["p99_ms"] for r in rows], [r["rps"] for r in rows], marker="o", label=label,
                linestyle="--" if label.startswith("stock") else "-")
        for r in rows:
            ax.annotate(f"c{r['concurrency']}", (r["p99_ms"], r["rps"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("p99 latency (ms, log scale)")
    ax.set_ylabel("throughput (req/s, log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def label_of(r: dict[str, Any]) -> str:
    label = f"{r['server']} {r['variant']}"
    return label + (f" ({r.get('workers', 1)} × {r.get('threads', 'default')})" if r["server"] == "stock" else "")


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(markdown(result))
    plot(result, out / PLOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report_json", type=Path)
    args = ap.parse_args()
    write(json.loads(args.report_json.read_text()), args.report_json.parent)
    print(f"wrote {args.report_json.parent / 'report.md'} and {PLOT}")


if __name__ == "__main__":
    main()
