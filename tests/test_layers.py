"""Layers import downward only: handlers (in every archive) < training < deploy < harness < benchmarks < tests."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ["handlers", "training", "deploy", "harness", "benchmarks", "tests"]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def test_every_module_imports_only_its_own_layer_or_those_below() -> None:
    upward = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for package in imported_packages(path):
                if LAYERS.index(package) > rank:
                    upward.append(f"{path.relative_to(ROOT)} imports {package}")
    assert not upward, upward
    # The check itself sees imports: the harness does import deploy, and tests import the harness.
    assert "deploy" in imported_packages(ROOT / "harness" / "torchserve.py")
    assert "harness" in imported_packages(ROOT / "tests" / "conftest.py")
