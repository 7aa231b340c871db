"""Transfer learning (--init-from): fine-tune the tiny digits model to a new label set, frozen or not, and the
errors for checkpoints that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from handlers.contract import STATE_DICT_FILE, ModelCard, sha256
from handlers.loading import build_model, load_state_dict, model_from_state_dict
from harness.imagefolder import write_imagefolder
from tests.conftest import train_tiny
from training import train
from training.train import seed_everything
from training.transfer import head_keys

PARITY = {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9]}
HEAD = ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    write_imagefolder(root, PARITY, per_class=40)
    return root


@pytest.fixture(scope="module")
def fine_tuned(tiny_model: Path, parity: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("transfer") / "fine_tuned", "--data-dir", str(parity),
                      "--init-from", str(tiny_model), "--epochs", "1")


def held_out_top1(card: ModelCard) -> float:
    """Top-1 over val and test together (26 images here), the least noisy held-out figure a small set gives."""
    assert card.data is not None and card.test is not None and card.metrics.val_top1 is not None
    n_val = card.data.sizes["val"]
    return (card.metrics.val_top1 * n_val + card.test.top1 * card.test.n) / (n_val + card.test.n)


def test_fine_tuning_replaces_the_head_and_nothing_else(tiny_model: Path, fine_tuned: Path) -> None:
    card = ModelCard.read(fine_tuned)
    assert card.labels == ["even", "odd"] and card.architecture == "resnet18"
    assert card.training is not None
    init = card.training["init"]
    assert init["from"] == str(tiny_model / STATE_DICT_FILE)
    assert init["sha256"] == sha256(tiny_model / STATE_DICT_FILE)
    assert init["reinitialized"] == HEAD and init["head"] == HEAD
    assert init["frozen_backbone"] is False and init["source_labels"] == [str(d) for d in range(10)]
    assert card.recipe.args["init_from"] == str(tiny_model)
    state = load_state_dict(fine_tuned / STATE_DICT_FILE)
    assert state["fc.weight"].shape == (2, 512)
    model_from_state_dict("resnet18", 2, state)  # the artifact loads like any other


def test_starting_from_the_digits_model_beats_starting_from_scratch(fine_tuned: Path, parity: Path,
                                                                    tmp_path: Path) -> None:
    # One epoch of 56 training images is two optimizer steps: from scratch that leaves resnet18 near chance (we saw
    # 46-62% held-out over seeds 0-2), while the digits backbone already separates the digits (77-88%).
    scratch = ModelCard.read(train_tiny(tmp_path / "scratch", "--data-dir", str(parity), "--epochs", "1"))
    transferred = ModelCard.read(fine_tuned)
    assert transferred.data is not None and scratch.data is not None
    assert transferred.data.fingerprint == scratch.data.fingerprint  # the same held-out images
    assert held_out_top1(transferred) >= 0.7
    assert held_out_top1(transferred) >= held_out_top1(scratch) + 0.15


def test_a_frozen_backbone_keeps_the_checkpoint_exactly(tiny_model: Path, parity: Path, tmp_path: Path) -> None:
    out = train_tiny(tmp_path / "frozen", "--data-dir", str(parity), "--init-from", str(tiny_model),
                     "--freeze-backbone", "--epochs", "1")
    card = ModelCard.read(out)
    assert card.training is not None and card.training["init"]["frozen_backbone"] is True
    source = load_state_dict(tiny_model / STATE_DICT_FILE)
    tuned = load_state_dict(out / STATE_DICT_FILE)
    assert tuned.keys() == source.keys()
    backbone = [k for k in source if k not in HEAD]
    changed = [k for k in backbone if not torch.equal(tuned[k], source[k])]
    assert not changed, f"frozen entries changed (batch-norm statistics included): {changed[:5]}"
    seed_everything(0)  # what train.py does before it builds the model: the head's fresh initial weights
    fresh = build_model("resnet18", 2).state_dict()
    assert not torch.equal(tuned["fc.weight"], fresh["fc.weight"])  # the head did train


def test_the_head_is_found_in_any_torchvision_classifier() -> None:
    found = {arch: head_keys(build_model(arch, 3), lambda n, a=arch: build_model(a, n), 3)
             for arch in ("mobilenet_v3_small", "squeezenet1_0", "regnet_y_400mf", "vit_b_16")}
    assert found == {"mobilenet_v3_small": ("classifier.3.weight", "classifier.3.bias"),
                     "squeezenet1_0": ("classifier.1.weight", "classifier.1.bias"),  # a 1x1 conv head
                     "regnet_y_400mf": ("fc.weight", "fc.bias"),  # built on CPU: its init cannot run on meta
                     "vit_b_16": ("heads.head.weight", "heads.head.bias")}


def refused(tmp_path: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "out"), "--input-size", "32", "--epochs", "1", "--no-progress", *extra])
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_checkpoints_that_do_not_fit_are_refused_with_the_reason(tiny_model: Path, parity: Path,
                                                                 tmp_path: Path) -> None:
    data = ("--data-dir", str(parity))
    message = refused(tmp_path, *data, "--init-from", str(tmp_path / "resnet18-f37072fd.pth"))
    assert "--init-from" in message and "not found" in message and "state_dict file" in message
    message = refused(tmp_path, *data, "--init-from", str(tiny_model), "--arch", "mobilenet_v3_small")
    assert "holds a resnet18 model, not a mobilenet_v3_small" in message and "--arch resnet18" in message
    state = load_state_dict(tiny_model / STATE_DICT_FILE)
    state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"][:96]  # a narrower layer: another network
    del state["layer4.1.bn2.running_var"]
    odd = tmp_path / "odd.pth"
    torch.save(state, odd)
    message = refused(tmp_path, *data, "--init-from", str(odd))
    assert "does not fit torchvision's resnet18 beyond its classifier head" in message
    assert "layer2.0.conv1.weight (96, 64, 3, 3) vs (128, 64, 3, 3)" in message
    assert "missing (1): layer4.1.bn2.running_var" in message and "another architecture" in message
    assert "need --init-from" in refused(tmp_path, *data, "--backbone-lr-scale", "0.1")
