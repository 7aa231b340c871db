from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handlers.contract import STATE_DICT_FILE, ModelCard
from handlers.loading import load_state_dict, model_from_state_dict
from tests.conftest import ROOT, TINY_SIZE, train_tiny
from training.evaluate import predict


def test_tiny_training_learns_and_writes_a_complete_checkpoint(tiny_model: Path, tiny_card: ModelCard) -> None:
    # The held-out figure is real: a random 10-class guesser sits at ~10%.
    test = tiny_card.test
    assert test.top1 >= 0.9 and test.n == 270
    for value in (test.macro_precision, test.macro_recall, test.macro_f1):
        assert value is not None and value >= 0.85
    assert tiny_card.architecture == "resnet18" and tiny_card.num_classes == 10
    assert tiny_card.input.shape == [3, TINY_SIZE, TINY_SIZE] and tiny_card.labels == [str(i) for i in range(10)]
    assert tiny_card.input.std is not None and all(0 < s < 1 for s in tiny_card.input.std)
    assert tiny_card.data is not None and len(tiny_card.data.fingerprint) == 64
    assert tiny_card.recipe.args["epochs"] == 3  # TINY_ARGS, not the default 8: the recipe records the run
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert tiny_card.git_commit.removesuffix("-dirty") == head
    report = json.loads((tiny_model / "eval" / "test" / "report.json").read_text())
    assert report["top1"] == test.top1
    assert sum(map(sum, report["confusion_matrix"])) == 270
    assert set(report["per_class"]) >= {"0", "9", "macro avg"}
    png = (tiny_model / "eval" / "test" / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_checkpoint_reloads_weights_only_and_reproduces_the_test_figure(tiny_model: Path, tiny_card: ModelCard,
                                                                         tiny_splits) -> None:
    state = torch.load(tiny_model / STATE_DICT_FILE, weights_only=True)
    model = model_from_state_dict(tiny_card.architecture, tiny_card.num_classes, state)
    logits, labels = predict(model, tiny_splits.test, tiny_card.input.mean, tiny_card.input.std)
    assert round(float((logits.argmax(1) == labels).float().mean()), 6) == tiny_card.test.top1


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_bad_checkpoint_is_refused_with_its_real_cause(tiny_model: Path, tmp_path: Path) -> None:
    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"weight": Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load .*pickled objects.*weights_only=True"):
        load_state_dict(bad)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((tiny_model / STATE_DICT_FILE).read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated or not a torch.save file"):
        load_state_dict(truncated)
    wrapped = tmp_path / "training_checkpoint.pth"
    torch.save({"model": load_state_dict(tiny_model / STATE_DICT_FILE), "epoch": 3}, wrapped)
    with pytest.raises(ValueError, match="not a state_dict of tensors.*model.state_dict"):
        load_state_dict(wrapped)
    with pytest.raises(ValueError, match="does not fit torchvision's mobilenet_v3_small with 10 outputs"):
        model_from_state_dict("mobilenet_v3_small", 10, load_state_dict(tiny_model / STATE_DICT_FILE))
    with pytest.raises(FileNotFoundError, match="python -m training.train"):
        load_state_dict(tmp_path / "missing.pth")


def test_same_seed_gives_the_same_model(tmp_path: Path) -> None:
    args = ("--epochs", "1", "--arch", "mobilenet_v3_small", "--seed", "7")
    a = train_tiny(tmp_path / "a", *args)
    b = train_tiny(tmp_path / "b", *args)
    sa = torch.load(a / STATE_DICT_FILE, weights_only=True)
    sb = torch.load(b / STATE_DICT_FILE, weights_only=True)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ModelCard.read(a).metrics == ModelCard.read(b).metrics


def test_train_cli_refuses_to_overwrite_and_explains(tiny_model: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tiny_model)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "already holds a checkpoint" in result.stderr and "--overwrite" in result.stderr


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tmp_path / "x"), "--arch", "resnet7"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "unknown architecture 'resnet7'" in result.stderr
