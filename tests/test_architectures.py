"""Any torchvision classifier by name: the support table (docs/support.json, from benchmarks.support_matrix) is
what training/support.py refuses, and the claims of its cells still hold when a subset is run again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import support_matrix
from handlers.loading import architectures, build_model, family, model_from_state_dict
from tests.conftest import ROOT
from training import optimize, support
from training.technique import variant_dir

REPORT = ROOT / "docs" / "support.json"
# What the slow test runs again (the whole matrix takes ~16 min): a family other than resnet through training,
# export, int8, one runtime and pruning, which convnext is known not to take (a claimed failure must hold as much
# as a claimed success).
SUBSET_ARCHS = ("convnext_tiny",)
SUBSET_CELLS = ("train", "export", "int8", "onnxruntime", "pruned")


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return json.loads(REPORT.read_text())


def technique_cells(report: dict[str, Any]) -> list[str]:
    return [c for c in report["cells"] if c in optimize.TECHNIQUES]


def test_the_matrix_covers_the_families_the_issue_names(report: dict[str, Any]) -> None:
    families = {row["family"] for row in report["archs"].values()}
    assert {"resnet", "mobilenetv2", "mobilenetv3", "efficientnet", "regnet", "convnext",
            "vision_transformer"} <= families
    assert {support.TESTED[f] for f in families} == set(report["archs"]), "support.TESTED names another arch"
    assert set(support_matrix.CELLS) == set(report["cells"]), "the cells changed: run python -m " \
                                                              "benchmarks.support_matrix again"


def test_support_table_lists_exactly_the_cells_that_failed(report: dict[str, Any]) -> None:
    for arch, row in report["archs"].items():
        assert row["family"] == family(arch)
        for cell in technique_cells(report):
            result, gap = row["cells"][cell], support.gap(arch, cell)
            if result["status"] == "fails":
                assert gap is not None, f"{arch} x {cell} failed in the matrix ({result['reason']}) but " \
                                        "training/support.py does not list it"
            else:
                assert gap is None, f"training/support.py refuses {arch} x {cell}, but the matrix says " \
                                    f"{result['status']}"
        # Training and export are not techniques: a failure there would leave the whole row without support.
        assert row["cells"]["train"]["status"] == "ok" and row["cells"]["export"]["status"] == "ok", arch


def test_every_gap_suggests_techniques_that_worked_for_that_architecture(report: dict[str, Any]) -> None:
    for fam, technique, gap in support.gaps_table():
        arch = support.TESTED[fam]
        assert report["archs"][arch]["cells"][technique]["status"] == "fails"
        assert gap.instead, f"{fam} x {technique} names nothing to use instead"
        for alternative in gap.instead:
            assert report["archs"][arch]["cells"][alternative]["status"] == "ok", \
                f"{fam} x {technique} suggests {alternative}, which is not ok for {arch} in the matrix"


def test_check_names_the_combination_and_what_to_use_instead() -> None:
    fam, technique, gap = support.gaps_table()[0]
    # Another architecture of the same torchvision module is refused the same way.
    other = next(a for a in architectures() if family(a) == fam and a != support.TESTED[fam])
    for arch in (support.TESTED[fam], other):
        with pytest.raises(support.Unsupported) as e:
            support.check(arch, technique)
        message = str(e.value)
        assert f"{technique} does not support {arch}" in message
        assert gap.reason in message and all(alt in message for alt in gap.instead)
    support.check("resnet18", "fp32")  # a combination that works passes


def test_a_vision_transformer_is_built_for_the_trained_input_size() -> None:
    model = build_model("vit_b_16", 10, 32).eval()
    reloaded = model_from_state_dict("vit_b_16", 10, model.state_dict())  # the size is read from the checkpoint
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))
    assert build_model("resnet18", 10, 32).fc.out_features == 10  # other families take any size, unchanged


@pytest.fixture(scope="module")
def subset(report: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The subset run again with the settings the table was made with."""
    work = tmp_path_factory.mktemp("support")
    s = report["settings"]
    argv = ["--archs", ",".join(SUBSET_ARCHS), "--cells", ",".join(SUBSET_CELLS), "--work", str(work),
            "--input-size", str(s["input_size"]), "--epochs", str(s["epochs"]),
            "--calibration-images", str(s["calibration_images"])]
    return support_matrix.matrix(support_matrix.parse_args(argv), argv), work


@pytest.mark.slow
def test_the_tables_claims_hold_when_run_again(subset: tuple[dict[str, Any], Path],
                                               report: dict[str, Any]) -> None:
    again, _ = subset
    for arch in SUBSET_ARCHS:
        for cell in SUBSET_CELLS:
            claimed, found = report["archs"][arch]["cells"][cell], again["archs"][arch]["cells"][cell]
            assert found["status"] == claimed["status"], \
                f"docs/support.md says {arch} x {cell} is {claimed['status']} ({claimed.get('reason', '')}), " \
                f"now it is {found['status']} ({found.get('reason', '')}); run python -m benchmarks.support_matrix"


@pytest.mark.slow
def test_optimize_refuses_a_known_gap_by_name_and_skips_it_by_default(subset: tuple[dict[str, Any], Path]) -> None:
    _, work = subset
    arch, technique = next((a, t) for a in SUBSET_ARCHS for f, t, _ in support.gaps_table() if f == family(a))
    parent = work / arch
    with pytest.raises(SystemExit) as e:
        optimize.main([str(parent), "--variants", f"fp32,{technique}", "--no-progress"])
    assert f"{technique} does not support {arch}" in str(e.value.code)
    assert not variant_dir(parent, "fp32").exists(), "nothing may be built before the refusal"

    # The default list (not named by the user) goes on without it, and says why.
    args = optimize.parse_args([str(parent), "--no-progress", "--rounds", "1", "--latency-calls", "1",
                                "--throughput-calls", "1"])
    args.variants = ["fp32", technique]
    report = optimize.run(args)
    assert [r["variant"] for r in report["rows"]] == [optimize.BASELINE, "fp32"]
    assert f"{technique} does not support {arch}" in report["skipped"][technique]
    assert not variant_dir(parent, technique).exists()
