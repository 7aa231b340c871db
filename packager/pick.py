"""Where a trained parent directory keeps its variants and its optimization report, and the variant
training.optimize --pick chose for each kind of serving (build_mar.sh --pick packages it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

VARIANTS_DIR = "variants"  # PARENT/variants/<variant>, each a model directory of its own
REPORT_DIR = "optimization"  # PARENT/optimization/report.json: training.optimize's timings of every variant
PICK_FILE = f"{REPORT_DIR}/pick.json"
PICK_KINDS = ("latency", "throughput", "lossless")


def variant_dir(parent_dir: Path, variant: str) -> Path:
    return Path(parent_dir) / VARIANTS_DIR / variant


def write_pick(parent_dir: Path, picked: dict[str, Any]) -> Path:
    path = Path(parent_dir) / PICK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(picked, indent=2) + "\n")
    return path


def write_report(parent_dir: Path, report: dict[str, Any], markdown: Callable[[Path, dict[str, Any]], None],
                 plot: Callable[[Path, dict[str, Any]], None]) -> Path:
    """PARENT/optimization/report.{json,md,png}, and pick.json when the report has a pick."""
    if "pick" in report:
        write_pick(parent_dir, report["pick"])
    out = Path(parent_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown(out / "report.md", report)
    plot(out / "report.png", report)
    return out


def read_pick(parent_dir: Path, kind: str) -> Path:
    """The variant directory training.optimize --pick chose as `kind` for this parent."""
    path = Path(parent_dir) / PICK_FILE
    if kind not in PICK_KINDS:
        raise ValueError(f"unknown pick {kind!r}; choose one of {', '.join(PICK_KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; time and pick the variants on this machine first: "
                                f"python -m training.optimize {parent_dir} --pick")
    try:
        choice = json.loads(path.read_text())["choice"][kind]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} has no readable '{kind}' pick ({e}); re-run python -m training.optimize "
                         f"{parent_dir} --pick") from e
    if choice is None:
        raise ValueError(f"{path}: no variant qualified as '{kind}' (e.g. none kept top-1 exactly); pick another")
    return variant_dir(parent_dir, choice["variant"])
