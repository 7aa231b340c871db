"""Each technique on the tiny 32 px model through the one technique interface, and the pipeline end to end."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from handlers.contract import STATE_DICT_FILE, TORCHSCRIPT_FILE, ModelCard, sha256
from handlers.imaging import Normalizer
from handlers.loading import build_model, load_state_dict
from tests.conftest import ROOT
from training import optimize
from training.data import Splits
from training.evaluate import predict, splits_for
from training.export import Tolerance
from training.speed import count_macs
from training.technique import RUNTIME_TOLERANCE, build, load_parent, load_source, run_cli, variant_dir
from training.variants import int8, pruned, sparse
from training.variants.bf16 import BF16
from training.variants.distilled import DISTILLED, kd_loss

# Loads a TorchScript file in a fresh interpreter that never imports our code or torchvision, runs it on
# saved inputs, and proves those modules stayed out: the artifact carries everything it needs.
LOADER = """
import json, sys, warnings
import torch
warnings.simplefilter("ignore")
model = torch.jit.load(sys.argv[1])
with torch.inference_mode():
    logits = model(torch.load(sys.argv[2]))
foreign = sorted(m for m in sys.modules if m.split(".")[0] in ("training", "handlers", "torchvision"))
ops = sorted({n.kind() for n in model.graph.nodes() if n.kind().startswith("quantized::")})
print(json.dumps({"pred": logits.argmax(1).tolist(), "dtype": str(logits.dtype), "foreign": foreign,
                  "quantized_ops": ops}))
"""


@pytest.fixture(scope="module")
def parent(pruned_parent: Path) -> Path:
    """The tiny fp32 model (a private copy) with its pruned variant (40% of channels, 1 fine-tune epoch)."""
    return pruned_parent


@pytest.fixture(scope="module")
def eager(parent: Path) -> tuple[ModelCard, torch.nn.Module]:
    return load_parent(parent)


def flags(parent: Path, *extra: str) -> argparse.Namespace:
    """The arguments the techniques read, parsed by training.optimize's parser (the flags every command shares)."""
    return optimize.parse_args([str(parent), "--no-progress", *extra])


@pytest.fixture(scope="module")
def test_inputs(tiny_splits: Splits, tiny_card: ModelCard, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 128 normalized test images, saved for the subprocess loader."""
    images = torch.stack([tiny_splits.test[i][0] for i in range(128)])
    path = tmp_path_factory.mktemp("inputs") / "x.pt"
    torch.save(Normalizer(tiny_card.input.mean, tiny_card.input.std)(images), path)
    return path


def run_artifact(artifact: Path, inputs: Path, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-I", "-c", LOADER, str(artifact), str(inputs)],
                            capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["foreign"] == [], f"loading the artifact imported {out['foreign']}"
    return out


def fp32_predictions(model: torch.nn.Module, inputs: Path) -> list[int]:
    with torch.inference_mode():
        return model(torch.load(inputs)).argmax(1).tolist()


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def check_card(card: ModelCard, parent: Path, name: str, technique: str) -> None:
    parent_card = ModelCard.read(parent)
    assert card.variant == name and card.recipe.technique == technique
    assert card.runtime == "torchscript" and card.artifact == TORCHSCRIPT_FILE
    assert card.parent is not None and card.parent.sha256 == sha256(parent / STATE_DICT_FILE)
    assert card.parent.test == parent_card.test
    assert card.test.n == 270
    assert card.profile is not None and card.profile.params > 0
    vdir = variant_dir(parent, name)
    assert ModelCard.read(vdir) == card
    report = json.loads((vdir / "eval" / "test" / "report.json").read_text())
    assert report["top1"] == card.test.top1 and sum(map(sum, report["confusion_matrix"])) == 270


def test_unstructured_pruning_zeroes_the_requested_share(parent: Path, eager: tuple, test_inputs: Path) -> None:
    _, model = eager
    card = build(parent, sparse.SPARSE, flags(parent, "--sparsity", "0.6"))
    check_card(card, parent, "sparse", "unstructured_magnitude_prune")
    assert card.recipe.args["sparsity"] == 0.6 and card.details["sparsity"]["global"] == pytest.approx(0.6, abs=0.005)
    assert sparse.sparsity_of(model)["global"] < 0.01  # the parent was copied, not pruned in place
    # Permanent: the checkpoint (same shapes as the parent) reloads with the zeros in it.
    reloaded = build_model("resnet18", 10)
    reloaded.load_state_dict(load_state_dict(variant_dir(parent, "sparse") / STATE_DICT_FILE))
    assert sparse.sparsity_of(reloaded)["global"] == pytest.approx(0.6, abs=0.005)
    out = run_artifact(variant_dir(parent, "sparse") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert out["pred"] == fp32_predictions(reloaded.to(memory_format=torch.channels_last).eval(), test_inputs)


def test_structured_pruning_removes_channels_and_macs(parent: Path, eager: tuple, test_inputs: Path) -> None:
    _, model = eager
    card = ModelCard.read(variant_dir(parent, "pruned"))  # built by the pruned_parent fixture with --prune-ratio 0.4
    check_card(card, parent, "pruned", "structured_channel_prune")
    assert card.recipe.args["ratio"] == 0.4 and card.recipe.args["finetune"]["epochs"] == 1
    source = load_source(parent, "pruned")
    after, before = dict(source.model.named_modules()), dict(model.named_modules())
    assert after["conv1"].out_channels < before["conv1"].out_channels
    assert after["fc"].in_features < 512 and after["fc"].out_features == 10  # the output layer kept its classes
    assert pruned.channels_of(source.model) <= 0.65 * pruned.channels_of(model)
    assert count_macs(source.model, 32) < 0.45 * count_macs(model, 32)
    assert card.details["pruning"]["macs_removed"] > 0.55
    assert card.profile is not None and card.profile.macs == count_macs(source.model, 32)
    out = run_artifact(variant_dir(parent, "pruned") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert out["pred"] == fp32_predictions(source.model, test_inputs)
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.8
    # The float checkpoint has the pruned shapes; fit_shapes resizes torchvision's resnet18 to load it.
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("resnet18", 10).load_state_dict(load_state_dict(variant_dir(parent, "pruned") / STATE_DICT_FILE))


def test_int8_stacks_on_the_pruned_variant(parent: Path, eager: tuple, test_inputs: Path) -> None:
    _, model = eager
    card = build(parent, int8.PRUNED_INT8, flags(parent, "--calibration-images", "128"))
    check_card(card, parent, "pruned_int8", "static_int8_quantization")
    source = card.recipe.args["source"]
    assert card.cpu_only and source["variant"] == "pruned"
    assert source["recipe"]["technique"] == "structured_channel_prune"
    assert card.recipe.args["calibration"]["images"] == 128
    pruned_model = load_source(parent, "pruned").model
    assert card.profile is not None and card.profile.macs == count_macs(pruned_model, 32)  # the pruned MACs
    out = run_artifact(variant_dir(parent, "pruned_int8") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert "quantized::conv2d_relu" in out["quantized_ops"]
    assert agreement(out["pred"], fp32_predictions(pruned_model, test_inputs)) >= 0.9


def test_static_int8_has_int8_weights_and_matches_fp32(parent: Path, eager: tuple, tiny_splits: Splits,
                                                       test_inputs: Path) -> None:
    parent_card, model = eager
    calibration = int8.calibration_subset(tiny_splits, 64)
    fx = int8.static_int8(model, calibration, 32, parent_card.input.mean, parent_card.input.std)
    assert int8.int8_weights(fx) >= 20  # every conv and the fc: 20 convs + fc in resnet18
    card = build(parent, int8.INT8, flags(parent, "--calibration-images", "128"))
    check_card(card, parent, "int8", "static_int8_quantization")
    assert card.cpu_only and card.checkpoint is None  # no float weights: nothing can be stacked on int8
    assert card.export is not None and card.export["parity"]["top1_agreement"] == 1.0  # TorchScript == FX model
    out = run_artifact(variant_dir(parent, "int8") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert "quantized::conv2d_relu" in out["quantized_ops"] and "quantized::linear" in out["quantized_ops"]
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.9
    assert abs(card.test.top1 - parent_card.test.top1) <= 0.03


def test_dynamic_int8_quantizes_linear_and_lstm_layers() -> None:
    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(16, 32, batch_first=True)
            self.head = torch.nn.Linear(32, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0][:, -1])

    model = Tagger().eval()
    q = int8.dynamic_int8(model)
    assert type(q.head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(q.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert q.head.weight().dtype == torch.qint8
    assert int8.int8_weights(q) >= 1
    x = torch.randn(64, 7, 16)
    with torch.inference_mode():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert isinstance(model.head, torch.nn.Linear)  # the input model is left alone


def test_bf16_variant_keeps_float32_interface(parent: Path, eager: tuple, test_inputs: Path) -> None:
    _, model = eager
    card = build(parent, BF16, flags(parent))
    check_card(card, parent, "bf16", "bf16_cast")
    assert card.export is not None and card.export["parity"]["atol"] == 5e-2  # a bf16 tolerance, recorded
    out = run_artifact(variant_dir(parent, "bf16") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert out["dtype"] == "torch.float32"
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.95


def test_kd_loss_terms() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(kd_loss(student, teacher, labels, 4.0, alpha=0.0), ce)
    # A student that already matches the teacher pays only the hard-label term.
    assert torch.allclose(kd_loss(teacher, teacher, labels, 4.0, alpha=0.5),
                          0.5 * torch.nn.functional.cross_entropy(teacher, labels), atol=1e-6)
    # KL term by hand: T^2 * sum p_t (log p_t - log p_s), batch mean.
    t = 3.0
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert torch.allclose(kd_loss(student, teacher, labels, t, alpha=1.0), kl, atol=1e-5)


def test_distillation_trains_a_loadable_student(parent: Path, test_inputs: Path) -> None:
    card = build(parent, DISTILLED, flags(parent, "--kd-temperature", "3", "--kd-alpha", "0.6", "--kd-epochs", "2"))
    check_card(card, parent, "distilled", "knowledge_distillation")
    assert card.architecture == "mobilenet_v3_small"
    assert (card.recipe.args["temperature"], card.recipe.args["alpha"], card.recipe.args["epochs"]) == (3.0, 0.6, 2)
    # Its state_dict is a plain torchvision mobilenet_v3_small checkpoint.
    reloaded = build_model("mobilenet_v3_small", 10).eval()
    reloaded.load_state_dict(load_state_dict(variant_dir(parent, "distilled") / STATE_DICT_FILE))
    logits, _ = predict(reloaded.to(memory_format=torch.channels_last), torch.utils.data.Subset(
        splits_for(card).test, range(64)), card.input.mean, card.input.std)
    out = run_artifact(variant_dir(parent, "distilled") / TORCHSCRIPT_FILE, test_inputs, parent)
    assert out["pred"][:64] == logits.argmax(1).tolist()
    assert card.training is not None and len(card.training["history"]) == 2
    # It learned in eval mode too: BatchNorm running statistics track the weights (the momentum fix),
    # so inputs do not collapse to one class.
    assert len(set(out["pred"])) >= 8 and card.test.top1 >= 0.5


def test_pipeline_writes_variants_and_report(parent: Path) -> None:
    optimize.main([str(parent), "--variants", "fp32,int8", "--threads", "1", "--rounds", "1", "--latency-calls", "2",
                   "--throughput-calls", "1", "--calibration-images", "64", "--no-progress"])
    report = json.loads((parent / "optimization" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["fp32_eager", "fp32", "int8"]
    assert report["environment"]["threads"] == 1 and report["environment"]["torch"] == torch.__version__
    assert report["parent"]["sha256"] == sha256(parent / STATE_DICT_FILE)
    for r in rows.values():
        assert r["timed_calls"] == 1 * (2 + 1)  # one round of 2 batch-1 and 1 batch-8 calls
        assert r["params"] > 1e6 and r["macs"] > 1e7
    assert rows["int8"]["cpu_only"] and rows["int8"]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]
    assert rows["fp32"]["drop_pt"] == 0.0 and rows["fp32"]["gate"]["passed"]
    assert report["recipes"]["int8"]["args"]["calibration"]["images"] == 64
    assert "int8" in report["targets"] and "met" in report["targets"]["int8"]
    md = (parent / "optimization" / "report.md").read_text()
    assert "| int8 |" in md and "bs1 latency ms" in md and "## Kernel ceiling on this CPU" in md
    ceiling = report["kernel_ceiling"]
    assert len(ceiling["layers"]) == 4 and ceiling["threads"] == 1
    assert (parent / "optimization" / "report.png").stat().st_size > 10_000
    card = ModelCard.read(variant_dir(parent, "int8"))
    assert card.metrics.speed is not None and card.metrics.speed["threads"] == 1
    assert card.profile is not None and card.profile.macs == rows["int8"]["macs"]
    # --reuse keeps variants built from the same checkpoint and only re-times them.
    before = (variant_dir(parent, "int8") / TORCHSCRIPT_FILE).stat().st_mtime_ns
    optimize.main([str(parent), "--variants", "int8", "--reuse", "--rounds", "1", "--latency-calls", "1",
                   "--throughput-calls", "1", "--no-progress"])
    assert (variant_dir(parent, "int8") / TORCHSCRIPT_FILE).stat().st_mtime_ns == before


def test_a_variant_that_misses_parity_is_skipped_with_the_reason_and_the_rest_are_timed(
        parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A parity miss depends on the weights (docs/support.md); here a zero tolerance makes the real check fail.
    monkeypatch.setitem(RUNTIME_TOLERANCE, "fp32", Tolerance(0.0, 0.0, 1.0))
    optimize.main([str(parent), "--variants", "fp32,onnxruntime", "--threads", "1", "--rounds", "1",
                   "--latency-calls", "1", "--throughput-calls", "1", "--no-progress"])
    report = json.loads((parent / "optimization" / "report.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["fp32_eager", "fp32"]
    assert "does not match its source" in report["skipped"]["onnxruntime"]
    assert "max |diff|" in report["skipped"]["onnxruntime"]


def test_pipeline_rejects_unknown_variant(parent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        optimize.parse_args([str(parent), "--variants", "int8,int4"])
    assert e.value.code == 2
    assert "unknown variant(s) int4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        optimize.parse_args([str(parent), "--variants", "pruned_int8,pruned"])
    assert e.value.code == 2
    assert "pruned_int8 is made from pruned; list pruned before it" in capsys.readouterr().err


def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_every_command_offers_a_technique_flag_under_the_same_name(capsys: pytest.CaptureFixture[str]) -> None:
    def help_text(command: Any) -> str:
        with pytest.raises(SystemExit):
            command(["--help"])
        return capsys.readouterr().out

    optimize_help = help_text(optimize.parse_args)
    for technique in (sparse.SPARSE, pruned.PRUNED, int8.INT8, DISTILLED):
        own_help = help_text(lambda argv, t=technique: run_cli([t], None, argv))
        for option in technique.options:
            assert option.flag in own_help and option.flag in optimize_help, (technique.name, option.flag)


def test_technique_cli_explains_what_is_missing(tiny_model: Path, tmp_path: Path) -> None:
    result = cli("training.variants.int8", str(tmp_path))  # no trained model there
    assert result.returncode == 1
    assert f"error: {tmp_path}/metadata.json not found" in result.stderr and "training.train" in result.stderr
    fresh = tmp_path / "fresh"
    shutil.copytree(tiny_model, fresh)  # a parent without variants: nothing to stack int8 on
    result = cli("training.variants.int8", str(fresh), "--variant", "pruned_int8")
    assert result.returncode == 1
    assert "variants/pruned not found; build it first" in result.stderr
    result = cli("training.variants.sparse", str(fresh), "--sparsity", "1.5")
    assert result.returncode == 1 and "--sparsity must be between 0 and 1" in result.stderr
