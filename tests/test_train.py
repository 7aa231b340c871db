from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handlers.loading import build_model, load_state_dict
from tests.conftest import ROOT, TINY_SIZE, train_tiny
from training import metadata


def test_tiny_training_learns_and_writes_a_complete_checkpoint(tiny_model: Path, tiny_meta: dict) -> None:
    # The held-out figure is real: a random 10-class guesser sits at ~10%.
    assert tiny_meta["metrics"]["test"]["top1"] >= 0.9
    assert tiny_meta["metrics"]["test"]["n"] == 270
    for key in ("macro_precision", "macro_recall", "macro_f1"):
        assert 0.85 <= tiny_meta["metrics"]["test"][key] <= 1.0
    assert tiny_meta["architecture"] == "resnet18" and tiny_meta["num_classes"] == 10
    assert tiny_meta["input_size"] == TINY_SIZE and tiny_meta["labels"] == [str(i) for i in range(10)]
    assert len(tiny_meta["mean"]) == 3 and all(0 < s < 1 for s in tiny_meta["std"])
    assert len(tiny_meta["data"]["fingerprint"]) == 64
    assert tiny_meta["recipe"]["args"]["epochs"] == 3
    assert tiny_meta["git_commit"] != ""
    report = json.loads((tiny_model / "eval" / "test" / "report.json").read_text())
    assert report["top1"] == tiny_meta["metrics"]["test"]["top1"]
    assert sum(map(sum, report["confusion_matrix"])) == 270
    assert set(report["per_class"]) >= {"0", "9", "macro avg"}
    png = (tiny_model / "eval" / "test" / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_checkpoint_loads_weights_only_into_the_named_architecture(tiny_model: Path, tiny_meta: dict) -> None:
    state = torch.load(tiny_model / metadata.STATE_DICT_FILE, weights_only=True)
    model = build_model(tiny_meta["architecture"], tiny_meta["num_classes"])
    model.load_state_dict(state)
    assert model.fc.out_features == 10


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_object_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to load .*weights_only=True"):
        load_state_dict(bad)
    with pytest.raises(FileNotFoundError, match="python -m training.train"):
        load_state_dict(tmp_path / "missing.pth")


def test_same_seed_gives_the_same_model(tmp_path: Path) -> None:
    args = ("--epochs", "1", "--arch", "mobilenet_v3_small", "--seed", "7")
    a = train_tiny(tmp_path / "a", *args)
    b = train_tiny(tmp_path / "b", *args)
    sa = torch.load(a / metadata.STATE_DICT_FILE, weights_only=True)
    sb = torch.load(b / metadata.STATE_DICT_FILE, weights_only=True)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert metadata.read(a)["metrics"] == metadata.read(b)["metrics"]


def test_train_cli_refuses_to_overwrite_and_explains(tiny_model: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tiny_model)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "already holds a checkpoint" in result.stderr and "--overwrite" in result.stderr


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tmp_path / "x"), "--arch", "resnet7"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "unknown architecture 'resnet7'" in result.stderr
