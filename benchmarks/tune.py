"""Batching tuner: sweep batchSize x maxBatchDelay x workers for one variant, keep the fastest setting
whose p99 stays under a bound, and write it into the model-config.yaml that build_mar.sh packs.

    python -m benchmarks.tune artifacts/resnet18/variants/int8 [--config handlers/model-config.yaml] \
        [--p99-ms 100] [--batch 1,4,8,16] [--delay 2,10] [--workers 1,2] [-c 16] [-d 8] [--quick] [--dry-run]

Each setting is a real archive (build_mar.sh --config <setting>) loaded alone into a real TorchServe
and driven by wrk with the held-out digit JPEGs. Only the four lines batchSize, maxBatchDelay,
minWorkers and maxWorkers of the config change; comments and other keys stay as they are.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from benchmarks import inputs
from benchmarks.archives import ROOT, BuildError, build_ours
from benchmarks.served import Bench
from handlers.contract import CARD_FILE

DEFAULT_CONFIG = ROOT / "handlers" / "model-config.yaml"


def set_keys(text: str, values: dict[str, int]) -> str:
    """Replace top-level `key: value` lines in YAML text, keeping each trailing comment in its column."""
    lines = text.splitlines(keepends=True)
    for key, value in values.items():
        pattern = re.compile(rf"^({re.escape(key)}:[ \t]*)([^#]*?)([ \t]*#.*)?$")
        for i, line in enumerate(lines):
            body = line.rstrip("\r\n")
            m = pattern.match(body)
            if not m:
                continue
            eol = line[len(body):]
            prefix, old, tail = m.group(1), m.group(2), m.group(3) or ""
            comment = tail.strip()
            new = f"{prefix}{value}"
            if comment:
                column = len(prefix) + len(old) + len(tail) - len(comment)
                new += " " * max(1, column - len(new)) + comment
            lines[i] = new + eol
            break
        else:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(f"{key}: {value}\n")
    return "".join(lines)


def setting_values(s: dict[str, int]) -> dict[str, int]:
    return {"batchSize": s["batch_size"], "maxBatchDelay": s["max_batch_delay"],
            "minWorkers": s["workers"], "maxWorkers": s["workers"]}


def pick(results: list[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """Highest req/s among settings that completed requests with zero errors and p99 under the bound."""
    ok = [r for r in results if r["requests"] > 0 and r["errors"] == 0 and r["p99_ms"] <= p99_ms]
    return max(ok, key=lambda r: r["rps"]) if ok else None


def sweep(variant_dir: Path, base_config: Path, grid: list[dict[str, int]], concurrency: int, duration: float,
          work: Path, digits: inputs.InputSet, device: str = "cpu") -> list[dict[str, Any]]:
    """Build, load and measure each setting; returns one row per setting."""
    store = work / "store"
    base = yaml.safe_load(base_config.read_text()) or {}
    archives = []
    for i, s in enumerate(tqdm(grid, desc="building archives", leave=False)):
        cfg_path = work / f"config-{i}.yaml"
        cfg_path.write_text(set_keys(base_config.read_text(), setting_values(s)))
        assert (yaml.safe_load(cfg_path.read_text()) or {}).keys() >= base.keys()
        archives.append(build_ours(variant_dir, store, f"t{i}", cfg_path, device))
    rows = []
    body = digits.files[0].read_bytes()
    with Bench(work / "ts", store) as bench:
        for i, (s, mar) in enumerate(zip(tqdm(grid, desc="measuring settings", leave=False), archives, strict=True)):
            name = f"t{i}"
            load_s = bench.register(name, mar.name)
            try:
                bench.warm(name, body)
                result, server = bench.measure(name, digits.list_file, concurrency, duration)
            finally:
                bench.unregister(name)
            rows.append({**s, **result.to_dict(), "server_metrics": server, "load_s": round(load_s, 2)})
    return rows


def grid_of(batches: list[int], delays: list[int], workers: list[int]) -> list[dict[str, int]]:
    return [{"batch_size": b, "max_batch_delay": d, "workers": w}
            for b, d, w in itertools.product(batches, delays, workers)]


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant_dir", type=Path)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model-config.yaml to update")
    ap.add_argument("--p99-ms", type=float, default=100.0, help="latency bound on p99, in ms")
    ap.add_argument("--batch", type=ints, default=None, help="batch sizes (default 1,4,8,16; quick 1,8)")
    ap.add_argument("--delay", type=ints, default=None, help="maxBatchDelay ms (default 2,10; quick 5)")
    ap.add_argument("--workers", type=ints, default=None, help="workers (default 1,2; quick 1)")
    ap.add_argument("-c", "--concurrency", type=int, default=None, help="wrk connections (default 16; quick 8)")
    ap.add_argument("-d", "--duration", type=float, default=None, help="seconds per setting (default 8; quick 2)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="a two-setting sweep for CI")
    ap.add_argument("--dry-run", action="store_true", help="measure and report, but leave the config alone")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="where tune.json goes")
    args = ap.parse_args(argv)

    card_file = args.variant_dir / CARD_FILE
    if not card_file.is_file():
        sys.exit(f"error: {card_file} not found; pass a model or variant directory (e.g. artifacts/resnet18)")
    if not args.config.is_file():
        sys.exit(f"error: config {args.config} not found; start from handlers/model-config.yaml")
    q = args.quick
    grid = grid_of(args.batch or ([1, 8] if q else [1, 4, 8, 16]), args.delay or ([5] if q else [2, 10]),
                   args.workers or ([1] if q else [1, 2]))
    concurrency = args.concurrency or (8 if q else 16)
    duration = args.duration or (2 if q else 8)
    work = Path(tempfile.mkdtemp(prefix="tune-"))
    try:
        digits = inputs.digits(args.variant_dir, work / "inputs", limit=32 if q else None)
        rows = sweep(args.variant_dir, args.config, grid, concurrency, duration, work, digits, args.device)
    except BuildError as e:
        sys.exit(f"error: could not build the variant's archive: {e}")
    except ValueError as e:  # a card that names no digits split
        sys.exit(f"error: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'batch':>5} {'delay':>5} {'workers':>7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['max_batch_delay']:>5} {r['workers']:>7} {r['rps']:>8.1f} "
              f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}")
    best = pick(rows, args.p99_ms)
    report = {"variant_dir": str(args.variant_dir), "config": str(args.config), "p99_bound_ms": args.p99_ms,
              "concurrency": concurrency, "duration_s": duration, "results": rows, "winner": best, "changed": False}
    args.out.mkdir(parents=True, exist_ok=True)
    if best is None:
        (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
        lowest = min(rows, key=lambda r: r["p99_ms"])
        sys.exit(f"error: no setting kept p99 under {args.p99_ms:g} ms with zero errors (lowest p99 "
                 f"{lowest['p99_ms']:.1f} ms at batch {lowest['batch_size']}); raise --p99-ms or lower -c")
    old = args.config.read_text()
    new = set_keys(old, setting_values(best))
    print(f"\nwinner: batchSize {best['batch_size']}, maxBatchDelay {best['max_batch_delay']} ms, "
          f"workers {best['workers']}: {best['rps']:.1f} req/s, p99 {best['p99_ms']:.1f} ms "
          f"(bound {args.p99_ms:g} ms, {concurrency} connections)")
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(args.config),
                                        str(args.config)))
    if args.dry_run:
        print(f"--dry-run: {args.config} left unchanged; the change would be:\n{diff or '(none)'}")
    elif new == old:
        print(f"{args.config} already holds these values; nothing changed")
    else:
        args.config.write_text(new)
        report["changed"] = True
        print(f"updated {args.config}; rebuild the archive with build_mar.sh to use it:\n{diff}")
    report["diff"] = diff
    (args.out / "tune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
