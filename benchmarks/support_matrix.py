"""The support matrix: which torchvision families train, export, and take each technique and runtime.

    python -m benchmarks.support_matrix                                   # every family -> docs/support.{json,md}
    python -m benchmarks.support_matrix --archs vit_b_16 --cells train,export,int8 --out /tmp/m
    python -m benchmarks.support_matrix --render docs/support.json        # rewrite support.md from the json

One architecture per torchvision family (its smallest), trained on the bundled digits at --input-size for
--epochs, then each cell run through the function its command calls: training.train.main, training.export.export_dir
and training.technique.build (what training.optimize and each technique's own command run, with optimize's flags
and defaults). A cell is

    ok        it finished; a variant's build includes its export, the parity check against the model it was made
              from, and the held-out evaluation of the saved artifact loaded back by its serving runtime
    parity    it built, but the artifact missed the parity bound against the model it was made from (a
              training.export.ParityError): how far a lower precision moves the logits depends on the weights, so
              this is a finding about this model; the build refuses such an artifact, whatever the architecture
    fails     it raised anything else (or its process died, or it ran past --cell-timeout): the combination does
              not work; the first line of the error is kept, and training/support.py lists it
    untested  the technique says this machine cannot run it (training.technique.NotSupportedHere: no CUDA GPU,
              no bf16 units): nothing is claimed either way
    n/a       what it is made from (the trained parent, the pruned variant) did not build

Each architecture runs in a child process, so a native crash fails only the cell it happened in and the
remaining cells go on in a new child. The failures found here are training/support.py's table of known gaps,
which the commands check before any work runs; tests/test_architectures.py checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torchvision

from benchmarks.environment import machine
from handlers.contract import ModelCard
from handlers.loading import architectures, family
from handlers.machine import cpu_label
from training import export, optimize, support, train
from training.export import ParityError
from training.technique import NotSupportedHere, build

ROOT = Path(__file__).resolve().parent.parent
# The smallest torchvision model of each family the issue names; other families are welcome through --archs.
ARCHS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny",
         "vit_b_16")
# train and export, then training.optimize's techniques: on TorchScript, then each runtime on its own, then the
# GPU-only ones (untested on a CPU host). NOT_CELLS says why the others are left out.
CELLS = ("train", "export", "fp32", "sparse", "pruned", "int8", "pruned_int8", "dynamic_int8", "bf16",
         "onnxruntime", "onnxruntime_int8", "openvino", "openvino_bf16", "openvino_int8", "aoti", "compile",
         "aoti_cuda", "tensorrt_fp16")
NOT_CELLS = {
    "distilled": "the student is --student (mobilenet_v3_small, its row) whatever the parent; the parent only gives "
                 "its logits on the training images, which the train cell's evaluation runs already",
    "stacked runtimes (pruned_onnxruntime_int8, distilled_openvino_int8, ...)": "the runtime's cell on the model it "
                 "stacks on: the pruned cell of the same row, the student's row for distilled",
    "ensemble, cascade": "they fuse variants already built, whatever their architecture: they work where their "
                         "members do",
}
MARKS = {"ok": "✓", "parity": "≠", "fails": "✗", "untested": "?", "n/a": "–"}


def settings_args(s: argparse.Namespace) -> list[str]:
    """The technique flags of every cell: short fine-tunes and calibrations, since only support is in question."""
    return ["--calibration-images", str(s.calibration_images), "--prune-epochs", "1", "--kd-epochs", "1",
            "--no-progress"]


def reason(error: BaseException) -> str:
    """Type and first non-empty line of an error: what the table says about a failed cell."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"[:300]


def run_cell(arch: str, cell: str, parent: Path, s: argparse.Namespace) -> dict[str, Any]:
    """Run one cell on `parent` (made by the train cell) and return what it measured; raises when it fails."""
    if cell == "train":
        try:
            train.main(["--out", str(parent), "--arch", arch, "--input-size", str(s.input_size), "--epochs",
                        str(s.epochs), "--no-progress", "--overwrite"])
        except SystemExit as e:  # the CLI's error path: sys.exit("error: ...")
            raise RuntimeError(str(e.code)) from None
        # A fresh optimize process runs without training's deterministic-algorithms switch (seed_everything).
        torch.use_deterministic_algorithms(False)
        card = ModelCard.read(parent)
        return {"top1": card.test.top1}
    if cell == "export":
        card = export.export_dir(parent)
        assert card.export is not None
        return {"max_abs_diff": card.export["parity"]["max_abs_diff"]}
    args = optimize.parse_args([str(parent), "--variants", cell, *settings_args(s)])
    card = build(parent, optimize.TECHNIQUES[cell], args)
    assert card.export is not None
    return {"top1": card.test.top1, "top1_agreement": card.export["parity"]["top1_agreement"],
            "max_abs_diff": card.export["parity"]["max_abs_diff"]}


def prerequisites(cell: str, parent: Path) -> list[str]:
    """The cells that must be ok before `cell` can run."""
    if cell == "train":
        return []
    if cell == "export":
        return ["train"]
    return ["train", *optimize.TECHNIQUES[cell].requires(optimize.parse_args([str(parent), "--variants", cell]))]


def read_log(log: Path) -> tuple[dict[str, dict[str, Any]], tuple[str, float] | None]:
    """The cells finished so far, and the cell started last without finishing, with its start time (or None)."""
    done: dict[str, dict[str, Any]] = {}
    running = None
    if log.is_file():
        for line in log.read_text().split("\n")[:-1]:  # the last piece is empty, or a line still being written
            entry = json.loads(line)
            if "status" in entry:
                done[entry["cell"]] = {k: v for k, v in entry.items() if k != "cell"}
                running = None
            else:
                running = (entry["cell"], entry["started"])
    return done, running


def append(log: Path, entry: dict[str, Any]) -> None:
    with log.open("a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def worker(arch: str, cells: list[str], work: Path, s: argparse.Namespace) -> None:
    """Run `cells` for `arch` in this process, each result appended to work/<arch>.jsonl as it is known."""
    parent, log = work / arch, work / f"{arch}.jsonl"
    for cell in cells:
        done, _ = read_log(log)
        missing = [p for p in prerequisites(cell, parent) if done.get(p, {}).get("status") != "ok"]
        if missing:
            append(log, {"cell": cell, "status": "n/a", "reason": f"made from {', '.join(missing)}, which did not "
                                                                    "build", "seconds": 0.0})
            continue
        append(log, {"cell": cell, "started": time.time()})
        print(f"--- {arch} {cell}", flush=True)
        t0 = time.perf_counter()
        try:
            measured = run_cell(arch, cell, parent, s)
            entry = {"status": "ok", **measured}
        except NotSupportedHere as e:
            entry = {"status": "untested", "reason": str(e)[:300]}
        except ParityError as e:
            entry = {"status": "parity", "reason": reason(e), "error": str(e)[:2000]}
        except Exception as e:  # any failure is a finding to record, not a reason to stop the matrix
            traceback.print_exc()
            entry = {"status": "fails", "reason": reason(e), "error": str(e)[:2000]}
        append(log, {"cell": cell, **entry, "seconds": round(time.perf_counter() - t0, 1)})


def run_arch(arch: str, cells: list[str], work: Path, s: argparse.Namespace, timeout: float) -> dict[str, Any]:
    """All cells of one architecture, in child processes: a crash or a timeout fails that cell, and a new child
    takes the rest. Children share the cores: each gets cores // --jobs threads (OpenMP threads spinning on an
    oversubscribed core slow everything down many times over)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // s.jobs))}
    log, out = work / f"{arch}.jsonl", work / f"{arch}.log"
    log.unlink(missing_ok=True)
    while remaining := [c for c in cells if c not in read_log(log)[0]]:
        cmd = [sys.executable, "-m", "benchmarks.support_matrix", "--worker", arch, "--cells", ",".join(remaining),
               "--work", str(work), "--input-size", str(s.input_size), "--epochs", str(s.epochs),
               "--calibration-images", str(s.calibration_images)]
        with out.open("a") as output:
            child = subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=env)
            timed_out = False
            while child.poll() is None:
                time.sleep(1)
                _, running = read_log(log)
                if running is not None and time.time() - running[1] > timeout:
                    timed_out = True
                    child.kill()
                    child.wait()
        _, running = read_log(log)
        if running is not None:
            why = f"ran past {timeout:.0f} s" if timed_out else f"its process died (exit status {child.returncode})"
            append(log, {"cell": running[0], "status": "fails", "reason": why,
                         "seconds": round(time.time() - running[1], 1)})
        elif child.returncode != 0:
            raise RuntimeError(f"the worker for {arch} failed outside any cell (exit status {child.returncode}); "
                               f"see {out}")
    done, _ = read_log(log)
    for cell in cells:
        r = done[cell]
        print(f"{arch:>20} {cell:<18} {r['status']:<8} {r.get('seconds') or 0:7.1f}s  {r.get('reason', '')[:90]}",
              flush=True)
    return {"family": family(arch), "cells": {c: done[c] for c in cells}}


def footnotes(report: dict[str, Any]) -> dict[str, int]:
    """Every distinct reason in the table, numbered in reading order."""
    notes: dict[str, int] = {}
    for row in report["archs"].values():
        for cell in report["cells"]:
            why = row["cells"][cell].get("reason")
            if why and why not in notes:
                notes[why] = len(notes) + 1
    return notes


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    cells, notes = report["cells"], footnotes(report)
    m, s = report["machine"], report["settings"]
    lines = [
        "# Architecture support",
        "",
        f"Made by `{report['command']}` on {cpu_label(m)} ({m['cpus']} CPUs, GPU {m['gpu'] or 'none'}), "
        f"torch {report['versions']['torch']}, torchvision {report['versions']['torchvision']}, in "
        f"{report['seconds'] / 60:.0f} min. Each architecture trained on the bundled digits at "
        f"{s['input_size']}x{s['input_size']} for {s['epochs']} epoch(s); techniques with training.optimize's "
        f"defaults except {' '.join(settings_args(argparse.Namespace(**s)))} (support is in question here, not "
        "accuracy).",
        *[f"\n{note}" for note in report.get("notes", [])],
        "",
        "✓ works (a variant's build exports it, checks parity with the model it was made from, and evaluates the "
        "saved artifact loaded by its serving runtime) · ≠ built, but missed the parity bound against the model it "
        "was made from on this model (weight-dependent: the build refuses such an artifact, for any architecture) · "
        "✗ fails (an error before any parity verdict: the combination does not work, and the commands refuse it "
        "early) · ? untested on this machine · – not applicable (what it is made from did not build). Footnotes "
        "give the reason. top-1: the trained parent's held-out "
        "top-1 (10% is chance: the cells test support, not accuracy). One architecture stands for its "
        "torchvision family (the module it is defined in); the others of a family share its code, but only the one "
        "named was run.",
        "",
        "| architecture (family) | top-1 | " + " | ".join(cells) + " |",
        "|---|---|" + "---|" * len(cells),
    ]
    for arch, row in report["archs"].items():
        marks = []
        for cell in cells:
            r = row["cells"][cell]
            note = f"<sup>{notes[r['reason']]}</sup>" if r.get("reason") else ""
            marks.append(MARKS[r["status"]] + note)
        top1 = row["cells"].get("train", {}).get("top1")
        lines.append(f"| {arch} ({row['family']}) | {'' if top1 is None else f'{100 * top1:.0f}%'} | "
                     + " | ".join(marks) + " |")
    lines += ["", *[f"{n}. {why}" for why, n in notes.items()], "", "Not columns:", "",
              *[f"- {name}: {why}" for name, why in NOT_CELLS.items()]]
    if gaps := support.gaps_table():
        lines += ["", "## Known gaps, refused before any work runs (training/support.py)", "",
                  "training.optimize skips these when it builds its default list and stops with this message when "
                  "one is asked for by name; each technique's own command stops with it.", ""]
        lines += [f"- {fam} ({support.TESTED.get(fam, '?')}) × {technique}: {gap.reason}; use "
                  f"{' or '.join(gap.instead)} instead" for fam, technique, gap in gaps]
    lines += ["", "## Seconds per cell", "", "| architecture | " + " | ".join(cells) + " |",
              "|---|" + "---|" * len(cells)]
    for arch, row in report["archs"].items():
        secs = [row["cells"][c].get("seconds") for c in cells]
        lines.append(f"| {arch} | " + " | ".join("" if v is None or v == 0 else f"{v:.0f}" for v in secs) + " |")
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated (default {','.join(ARCHS)})")
    ap.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, in order (default {','.join(CELLS)})")
    ap.add_argument("--out", type=Path, default=ROOT / "docs", help="where support.json and support.md go")
    ap.add_argument("--work", type=Path, default=None, help="where the models are trained (default: a new folder "
                                                            "under /tmp, kept for inspection)")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4, help="training epochs (default 4: fewer leave most families "
                                                          "at chance, where parity's top-1 agreement means little)")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--cell-timeout", type=float, default=1200, help="seconds one cell may take (default 1200)")
    ap.add_argument("--jobs", type=int, default=1, help="architectures run at once (default 1)")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite support.md beside this support.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the child process of one architecture
    args = ap.parse_args(argv)
    args.archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if unknown := [a for a in args.archs if a not in architectures()]:
        ap.exit(2, f"error: unknown architecture(s) {', '.join(unknown)}; choose torchvision classification "
                   "models (python -c 'import torchvision; print(torchvision.models.list_models())')\n")
    if unknown := [c for c in args.cells if c not in CELLS]:
        ap.exit(2, f"error: unknown cell(s) {', '.join(unknown)}; choose from {', '.join(CELLS)}\n")
    return args


def matrix(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run every architecture's cells and return the report (what support.json holds)."""
    work = args.work or Path(tempfile.mkdtemp(prefix="support_matrix."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}", flush=True)
    started = time.perf_counter()
    settings = {"input_size": args.input_size, "epochs": args.epochs, "calibration_images": args.calibration_images}
    report: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.support_matrix", *argv]),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "settings": settings,
        "cells": args.cells,
    }
    # Architectures are independent; --jobs 2 overlaps one's compiles with another's training.
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = pool.map(lambda arch: run_arch(arch, args.cells, work, args, args.cell_timeout), args.archs)
        report["archs"] = dict(zip(args.archs, rows, strict=True))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.cells, args.work, args)
        return
    if args.render:
        report = json.loads(args.render.read_text())
        write_markdown(args.render.with_suffix(".md"), report)
        print(f"written: {args.render.with_suffix('.md')}")
        return
    report = matrix(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "support.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_markdown(args.out / "support.md", report)
    print(f"written: {args.out}/support.json, support.md ({report['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
