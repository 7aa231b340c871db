"""The accuracy gate in build_mar.sh: an over-budget variant is refused, an in-budget one is packaged (CPU-only)."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from handlers.contract import ModelCard
from harness.context import unpack_mar
from packager import gate, golden
from packager.config import TUNED_FILE
from packager.manifest import read_manifest, record
from tests.conftest import ROOT, build_mar
from training.technique import build, variant_dir
from training.variants.int8 import INT8
from training.variants.sparse import SPARSE


@pytest.fixture(scope="module")
def parent(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "parent"
    shutil.copytree(tiny_model, out)
    return out


@pytest.fixture(scope="module")
def too_sparse(parent: Path) -> Path:
    """Pruned far too hard: 95% of the weights zeroed, no fine-tune."""
    build(parent, SPARSE, argparse.Namespace(sparsity=0.95, seed=0, progress=False), name="sparse95")
    return variant_dir(parent, "sparse95")


@pytest.fixture(scope="module")
def int8(parent: Path) -> Path:
    args = argparse.Namespace(calibration_images=128, int8_backend="x86", seed=0, progress=False)
    build(parent, INT8, args)
    return variant_dir(parent, "int8")


def figures(model_dir: Path) -> tuple[str, str]:
    card = ModelCard.read(model_dir)
    assert card.parent is not None
    return f"{100 * card.test.top1:.2f}%", f"{100 * card.parent.test.top1:.2f}%"


def test_gate_refuses_a_variant_over_budget(too_sparse: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    top1, parent_top1 = figures(too_sparse)
    assert float(parent_top1[:-1]) - float(top1[:-1]) > 0.5  # really over budget, not a borderline case
    result = build_mar(too_sparse, store, "--name", "digits_sparse95", check=False)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: accuracy gate FAILED")
    assert top1 in message and parent_top1 in message and "budget 0.50 pt" in message
    assert not (store / "digits_sparse95.mar").exists()


def test_gate_budget_is_configurable(too_sparse: Path) -> None:
    top1, parent_top1 = figures(too_sparse)
    drop = float(parent_top1[:-1]) - float(top1[:-1])
    for budget, code in ((drop - 0.1, 1), (drop + 0.1, 0)):
        result = subprocess.run([str(ROOT / "build_mar.sh"), str(too_sparse), "--check", "--budget", f"{budget:.2f}"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == code, result.stderr
        assert f"budget {budget:.2f} pt" in result.stdout + result.stderr


def test_gate_accepts_int8_within_budget_and_packages_it_cpu_only(int8: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    card = ModelCard.read(int8)
    passed, verdict = gate.check(card, 0.5)
    assert passed, verdict
    result = build_mar(int8, store, "--name", "digits_int8")
    assert "accuracy gate passed" in result.stdout
    assert "CPU-only, packaged with deviceType: cpu" in result.stderr
    assert "deviceType cpu" in result.stdout
    mar = store / "digits_int8.mar"
    unpacked = unpack_mar(mar, tmp_path / "unpacked")
    config = yaml.safe_load((unpacked / "model-config.yaml").read_text())
    assert config["deviceType"] == "cpu"
    assert ModelCard.read(unpacked) == card  # the card travels into the archive unchanged
    assert read_manifest(store)["digits_int8.mar"]["variant"] == "int8"


def test_a_zero_batch_delay_is_refused_with_what_torchserve_does_with_it(parent: Path, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text(re.sub(r"(?m)^maxBatchDelay: \d+", "maxBatchDelay: 0",
                             (ROOT / "handlers" / "model-config.yaml").read_text()))
    assert yaml.safe_load(config.read_text())["maxBatchDelay"] == 0
    result = build_mar(parent, tmp_path / "store", "--config", str(config), check=False)
    assert result.returncode != 0 and not list((tmp_path / "store").glob("*.mar"))
    assert "maxBatchDelay 0 with batchSize 8 would wait 100 ms" in result.stderr and "use 1" in result.stderr


def test_torchserves_async_worker_mode_is_refused_with_why(parent: Path, tmp_path: Path) -> None:
    config = tmp_path / "model-config.yaml"
    config.write_text((ROOT / "handlers" / "model-config.yaml").read_text() + "asyncCommunication: true\n")
    result = build_mar(parent, tmp_path / "store", "--config", str(config), check=False)
    assert result.returncode != 0 and not list((tmp_path / "store").glob("*.mar"))
    assert "keeps every answered non-streaming request in memory" in result.stderr and "Remove it" in result.stderr


def test_int8_cannot_be_forced_onto_gpu(int8: Path, tmp_path: Path) -> None:
    result = build_mar(int8, tmp_path / "store", "--device", "gpu", check=False)
    assert result.returncode != 0
    assert "CPU-only" in result.stderr and "--device cpu" in result.stderr


def test_a_variants_tuned_keys_pack_over_the_shared_config_and_an_explicit_config_packs_as_is(
        int8: Path, tmp_path: Path) -> None:
    store, tuned = tmp_path / "store", int8 / TUNED_FILE
    shared = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())

    def packed(name: str) -> dict:
        return yaml.safe_load((unpack_mar(store / f"{name}.mar", tmp_path / name) / "model-config.yaml").read_text())

    tuned.write_text("batchSize: 4\nmaxBatchDelay: 7\nhandler:\n  threads: auto\n")
    try:
        assert (shared["batchSize"], shared["maxBatchDelay"], shared["handler"]["threads"]) != (4, 7, "auto")
        assert str(tuned) in build_mar(int8, store, "--name", "tuned").stdout  # the build names its sources
        cfg = packed("tuned")
        assert (cfg["batchSize"], cfg["maxBatchDelay"], cfg["handler"]["threads"]) == (4, 7, "auto")
        assert cfg["handler"]["max_bytes"] == shared["handler"]["max_bytes"] and cfg["responseTimeout"] == shared[
            "responseTimeout"]  # everything else still comes from the shared file
        build_mar(int8, store, "--name", "plain", "--config", str(ROOT / "handlers" / "model-config.yaml"))
        assert packed("plain")["batchSize"] == shared["batchSize"]
        tuned.write_text("batchSize: 4\nresponseTimeout: 5\n")  # not a tuned key
        result = build_mar(int8, store, "--name", "refused", check=False)
        assert result.returncode != 0 and not (store / "refused.mar").exists()
        assert "responseTimeout" in result.stderr and "--for-variant" in result.stderr
    finally:
        tuned.unlink(missing_ok=True)


def test_builders_recording_into_one_store_at_once_lose_no_entry(model_store: Path, tiny_model: Path,
                                                                 tmp_path: Path) -> None:
    """build_mar.sh's last step (packager.manifest.record) run by sixteen builders at the same moment."""
    mars = [tmp_path / f"digits_{i}.mar" for i in range(16)]
    for mar in mars:
        shutil.copy(model_store / "digits.mar", mar)
    start = threading.Barrier(len(mars))

    def record_when_all_are_ready(mar: Path) -> None:
        start.wait()
        record(mar, tiny_model)

    with cf.ThreadPoolExecutor(len(mars)) as pool:
        list(pool.map(record_when_all_are_ready, mars))
    assert sorted(read_manifest(tmp_path)) == sorted(m.name for m in mars)


def test_golden_tallies_match_each_true_box_once_by_label_and_overlap() -> None:
    """The canary's detection score: detections scoring >= 0.5 are hits when they overlap a true box of their label
    by IoU >= 0.5, each true box once (best score first); F1 over the images. A label is a hit or a miss."""
    truth = [("3", [0, 0, 10, 10]), ("7", [20, 20, 30, 30])]
    found = [("3", 0.9, [0, 0, 10, 11]),  # hit
             ("3", 0.8, [0, 0, 10, 10]),  # the same true box again: a false alarm
             ("7", 0.4, [20, 20, 30, 30]),  # below the score: not counted
             ("5", 0.9, [20, 20, 30, 30])]  # wrong label: a false alarm, and the 7 is missed
    assert golden.tally(found, truth) == (1, 2, 1)
    assert golden.tally([("7", 0.6, [22, 22, 32, 32])], truth[1:]) == (0, 1, 1)  # IoU 64/136 < 0.5
    assert golden.tally([("7", 0.6, [21, 21, 31, 31])], truth[1:]) == (1, 0, 0)  # IoU 81/119
    detection, classification = {"task": "detection"}, {}
    assert golden.score(detection, [(1, 2, 1), (1, 0, 0)]) == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert golden.score(detection, [golden.missed(truth)]) == 0.0 and golden.missed(truth) == (0, 0, 2)
    assert golden.tally("3", "3") == (1, 0, 0) and golden.tally("3", "8") == golden.missed("8") == (0, 0, 1)
    assert golden.score(classification, [(1, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 0)]) == 0.75
    assert golden.metric(detection) == "F1@.5" and golden.metric(classification) == "top-1"
