from __future__ import annotations

import dataclasses
import json
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import Subset

from handlers.contract import STATE_DICT_FILE, DataSpec, ModelCard
from handlers.loading import build_model, load_state_dict, model_from_state_dict
from harness.imagefolder import write_imagefolder
from tests.conftest import ROOT, TINY_ARGS, TINY_SIZE, train_tiny
from training import recipe, resume, train
from training.data import Splits, load_splits
from training.evaluate import predict
from training.train import FitConfig, fit, seed_everything


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


@pytest.mark.slow  # a fault test (~40 s: three short trainings), with the other fault tests in the slow tier
def test_a_killed_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Killed (SIGKILL, as an OOM kill or a lost VM would) after its first epoch, the run continues with --resume and
    ends bit-identical to one that was never interrupted."""
    args = ("--arch", "mobilenet_v3_small", "--seed", "5", "--epochs", "2")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training.train", "--out", str(out), *TINY_ARGS, *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state_file = out / resume.STATE_FILE
    try:
        deadline = time.monotonic() + 300
        while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
    saved = torch.load(state_file, weights_only=True)
    assert saved["epoch"] == 1 and not (out / STATE_DICT_FILE).exists(), f"not interrupted mid-run: {stderr}"

    plain = subprocess.run([sys.executable, "-m", "training.train", "--out", str(out), *TINY_ARGS, *args],
                           capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode != 0 and "interrupted training run" in plain.stderr and "--resume" in plain.stderr
    with pytest.raises(SystemExit, match=r"other options or data \(lr 0.002 -> 0.001\)"):
        train.main(["--out", str(out), *TINY_ARGS, *args, "--resume", "--lr", "1e-3"])

    train.main(["--out", str(out), *TINY_ARGS, *args, "--resume"])
    straight = train_tiny(tmp_path / "straight", *args)
    resumed_weights = torch.load(out / STATE_DICT_FILE, weights_only=True)
    straight_weights = torch.load(straight / STATE_DICT_FILE, weights_only=True)
    assert all(torch.equal(resumed_weights[k], straight_weights[k]) for k in straight_weights)
    resumed_card, straight_card = ModelCard.read(out), ModelCard.read(straight)
    assert resumed_card.metrics == straight_card.metrics
    assert [h["val_top1"] for h in resumed_card.training["history"]] == \
        [h["val_top1"] for h in straight_card.training["history"]]
    assert not state_file.exists(), "a finished run leaves no resume state behind"
    finished = subprocess.run([sys.executable, "-m", "training.train", "--out", str(out), *TINY_ARGS, *args,
                               "--resume"], capture_output=True, text=True, cwd=ROOT)
    assert finished.returncode != 0 and "its training finished" in finished.stderr


def test_unknown_architecture_is_named(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "training.train", "--out", str(tmp_path / "x"), "--arch", "resnet7"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "unknown architecture 'resnet7'" in result.stderr


# Training recipes: schedules, augmentation, clipping, label smoothing (training/recipe.py).

def lr_trace(schedule: str, epochs: int, steps: int, **options: float) -> list[float]:
    """The lr of every step of a schedule built by the training code, read from the optimizer it drives."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    scheduler = recipe.lr_schedule(optimizer, schedule, epochs, steps, **options)
    trace = []
    for _ in range(epochs * steps):
        trace.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return trace


def test_each_schedule_has_its_shape() -> None:
    cosine = lr_trace("cosine", epochs=4, steps=10, warmup_epochs=1)
    assert cosine[0] == pytest.approx(1e-4)  # warm-up starts at 1% of the peak ...
    assert all(a < b for a, b in zip(cosine[:10], cosine[1:11], strict=True))  # ... rises for one epoch ...
    assert cosine[10] == pytest.approx(1e-2)  # ... to the peak, then anneals to ~0
    assert all(a > b for a, b in zip(cosine[10:], cosine[11:], strict=False)) and cosine[-1] < 1e-4
    step = lr_trace("step", epochs=4, steps=10, step_size=1, gamma=0.5)
    assert [step[i * 10] for i in range(4)] == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    assert all(len(set(step[i * 10:(i + 1) * 10])) == 1 for i in range(4))  # flat within an epoch
    onecycle = lr_trace("onecycle", epochs=4, steps=10)
    peak = onecycle.index(max(onecycle))
    assert 4 <= peak <= 6 and onecycle[peak] == pytest.approx(1e-2, rel=0.02) and onecycle[-1] < 1e-5


def small_splits() -> Splits:
    splits = load_splits(DataSpec("digits"), 16)
    return dataclasses.replace(splits, train=Subset(splits.train, range(48)), val=Subset(splits.val, range(16)))


def fit_steps(cfg: FitConfig) -> tuple[list[float], list[float]]:
    """lr and total gradient L2 norm at every optimizer step of a real (tiny) training run, read by torch's global
    optimizer hook just before each step."""
    lrs, norms = [], []

    def before_step(optimizer: torch.optim.Optimizer, *_: object) -> None:
        lrs.append(optimizer.param_groups[0]["lr"])
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        seed_everything(0)
        fit(build_model("resnet18", 10), small_splits(), [0.5] * 3, [0.25] * 3, cfg, torch.device("cpu"))
    finally:
        handle.remove()
    return lrs, norms


def test_training_follows_the_schedule_and_clipping_bounds_the_gradient() -> None:
    # 48 images in batches of 8: 6 steps an epoch.
    lrs, norms = fit_steps(FitConfig(epochs=2, batch_size=8, lr=1e-3, lr_schedule="cosine", warmup_epochs=1,
                                     clip_grad_norm=0.5, progress=False))
    assert len(lrs) == 12
    assert all(a < b for a, b in zip(lrs[:6], lrs[1:7], strict=True)) and lrs[6] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[6:], lrs[7:], strict=False)) and lrs[-1] < 1e-4
    assert max(norms) <= 0.5 * (1 + 1e-4)
    _, unclipped = fit_steps(FitConfig(epochs=1, batch_size=8, lr=1e-3, progress=False))
    assert max(unclipped) > 1.0  # so the bound above is the clipping's doing


@pytest.mark.parametrize("name", ["affine", "trivial", "randaugment"])
def test_augmentations_change_the_image_not_its_shape(name: str) -> None:
    image = small_splits().train[0][0]
    transform = recipe.augmentation(name)
    assert transform is not None
    torch.manual_seed(0)
    outs = [transform(image) for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o, image) for o in outs)
    assert recipe.augmentation("none") is None


def test_the_model_card_records_the_recipe(tmp_path: Path) -> None:
    data = tmp_path / "data"  # 14 training images: one step an epoch
    write_imagefolder(data, {"even": [0, 2, 4, 6, 8], "odd": [1, 3, 5, 7, 9]}, per_class=10, photos=False)
    out = train_tiny(tmp_path / "recipe", "--data-dir", str(data), "--epochs", "2", "--lr-schedule", "step",
                     "--step-size", "1", "--gamma", "0.5", "--augment", "randaugment", "--label-smoothing", "0.1",
                     "--clip-grad-norm", "1")
    card = ModelCard.read(out)
    args = card.recipe.args
    assert (args["lr_schedule"], args["step_size"], args["gamma"]) == ("step", 1, 0.5)
    assert (args["augment"], args["label_smoothing"], args["clip_grad_norm"]) == ("randaugment", 0.1, 1.0)
    assert card.training is not None
    assert card.training["augment"].startswith("RandAugment(")
    assert "StepLR: x0.5 every 1 epochs" in card.training["lr_schedule"]
    assert [h["lr"] for h in card.training["history"]] == pytest.approx([1e-3, 5e-4])  # after each epoch's steps
    assert card.training["world_size"] == 1 and "backend" not in card.training


@pytest.mark.parametrize(("extra", "message"), [
    (["--freeze-backbone"], "need --init-from"),
    (["--lr-schedule", "cosine", "--warmup-epochs", "3", "--epochs", "2"], "--warmup-epochs must be .* below --epochs"),
    (["--warmup-epochs", "1"], "onecycle rises over its first 15%"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be positive"),
    (["--label-smoothing", "1"], r"--label-smoothing must be in \[0, 1\)"),
])
def test_a_recipe_that_cannot_work_is_refused_before_training(tmp_path: Path, extra: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        train.main(["--out", str(tmp_path / "x"), *extra])
    assert not (tmp_path / "x").exists()


def test_no_augment_is_augment_none() -> None:
    assert train.parse_args(["--out", "x", "--no-augment"]).augment == "none"
    assert train.parse_args(["--out", "x"]).augment == "affine"


@pytest.mark.parametrize(("arch", "raised"), [("mobilenet_v3_small", True), ("mnasnet0_5", True), ("resnet18", False)])
def test_batchnorm_momenta_made_for_imagenet_runs_are_raised_for_short_runs(arch: str, raised: bool) -> None:
    """torchvision builds mobilenet_v3 with BatchNorm momentum 0.01 and mnasnet with 3e-4; over a few hundred steps
    their running statistics stay near their start, and a mobilenet_v3_large at 94% train top-1 scored 10% on
    val. Training sets torch's 0.1; resnet18 already has it."""
    model = build_model(arch, 10, 64)
    before = {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    changed = recipe.short_run_batchnorm(model)
    after = {m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert after == {recipe.SHORT_RUN_BN_MOMENTUM}
    assert (changed > 0) == raised and (before != after) == raised
