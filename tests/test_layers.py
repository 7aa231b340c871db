"""Layers import downward only: handlers (in every archive) < training, packager < deploy < harness < benchmarks
< tests. Training and packager share a rank, one way round: training imports packager (the gate, the pick, the
statistics), packager imports neither training nor deploy; and deploy, which runs where nothing is trained,
imports nothing from training."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = [("handlers",), ("training", "packager"), ("deploy",), ("harness",), ("benchmarks",), ("tests",)]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
NEVER = {"packager": {"training", "deploy"}, "deploy": {"training"}}  # besides what the ranks forbid


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & RANK.keys()


def offending_imports(layer: str) -> list[str]:
    """`path imports package` for each import from `layer` that goes up, or goes where NEVER says it may not."""
    found = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for package in sorted(imported_packages(path)):
            if RANK[package] > RANK[layer] or package in NEVER.get(layer, ()):
                found.append(f"{path.relative_to(ROOT)} imports {package}")
    return found


def test_every_module_imports_only_its_own_layer_or_those_below() -> None:
    upward = [line for layer in RANK for line in offending_imports(layer)]
    assert not upward, upward
    # The check itself sees imports: the harness does import deploy, and tests import the harness.
    assert "deploy" in imported_packages(ROOT / "harness" / "torchserve.py")
    assert "harness" in imported_packages(ROOT / "tests" / "conftest.py")


def test_deploy_imports_nothing_from_training() -> None:
    """The deploy tool runs beside TorchServe, where no model is trained: torch and the training data stay out."""
    from_training = [line for line in offending_imports("deploy") if line.endswith(" imports training")]
    assert not from_training, from_training
    assert "packager" in imported_packages(ROOT / "deploy" / "canary.py")  # it reads the golden set from packager
