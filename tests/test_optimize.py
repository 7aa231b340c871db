"""Each optimization technique on the tiny 32 px model, with numerical checks, and the pipeline end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handlers.loading import build_model, load_state_dict
from training import bf16, distill, metadata, optimize, prune, prune_structured, quantize, variant
from training.data import Splits
from training.evaluate import predict, splits_for
from training.speed import count_macs

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
def parent(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny fp32 model, so variants written here touch no other test's files."""
    out = tmp_path_factory.mktemp("optimize") / "parent"
    shutil.copytree(tiny_model, out)
    return out


@pytest.fixture(scope="module")
def eager(parent: Path) -> tuple[dict, torch.nn.Module]:
    return variant.load_parent(parent)


@pytest.fixture(scope="module")
def test_inputs(tiny_splits: Splits, tiny_meta: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 128 normalized test images, saved for the subprocess loader."""
    from handlers.imaging import Normalizer

    images = torch.stack([tiny_splits.test[i][0] for i in range(128)])
    path = tmp_path_factory.mktemp("inputs") / "x.pt"
    torch.save(Normalizer(tiny_meta["mean"], tiny_meta["std"])(images), path)
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


def check_variant_metadata(meta: dict, parent: Path, name: str, technique: str) -> None:
    assert meta["variant"] == name
    assert meta["recipe"]["technique"] == technique
    assert meta["format"] == "torchscript" and meta["artifact"] == "model.pt"
    assert meta["parent"]["sha256"] == metadata.sha256(parent / "model.pth")
    assert meta["parent"]["metrics"]["test"] == metadata.read(parent)["metrics"]["test"]
    test = meta["metrics"]["test"]
    assert test["n"] == 270 and 0.0 <= test["top1"] <= 1.0
    vdir = variant.variant_dir(parent, name)
    assert metadata.read(vdir) == meta
    assert json.loads((vdir / "eval" / "test" / "report.json").read_text())["top1"] == test["top1"]


def test_unstructured_pruning_zeroes_the_requested_share(parent: Path, eager: tuple, test_inputs: Path) -> None:
    parent_meta, model = eager
    meta, pruned = prune.make(parent, parent_meta, model, sparsity=0.6)
    check_variant_metadata(meta, parent, "sparse", "unstructured_magnitude_prune")
    assert abs(prune.sparsity_of(pruned)["global"] - 0.6) < 0.005
    assert prune.sparsity_of(model)["global"] < 0.01  # the parent was copied, not pruned in place
    # Permanent: no masks or hooks left, and the checkpoint (same shapes) reloads with the zeros in it.
    assert not any(hasattr(m, "weight_orig") for m in pruned.modules())
    reloaded = build_model("resnet18", 10)
    reloaded.load_state_dict(load_state_dict(variant.variant_dir(parent, "sparse") / meta["checkpoint"]))
    assert abs(prune.sparsity_of(reloaded)["global"] - 0.6) < 0.005
    out = run_artifact(variant.variant_dir(parent, "sparse") / "model.pt", test_inputs, parent)
    assert out["pred"] == fp32_predictions(pruned, test_inputs)


def test_structured_pruning_removes_channels_and_macs(parent: Path, eager: tuple, test_inputs: Path) -> None:
    parent_meta, model = eager
    meta, pruned = prune_structured.make(parent, parent_meta, model, ratio=0.5, epochs=1, progress=False)
    check_variant_metadata(meta, parent, "pruned", "structured_channel_prune")
    before, after = dict(model.named_modules()), dict(pruned.named_modules())
    assert after["conv1"].out_channels == 32 and before["conv1"].out_channels == 64
    assert after["layer4.1.conv2"].out_channels == 256
    assert after["fc"].in_features == 256 and after["fc"].out_features == 10  # the output layer kept its classes
    assert prune_structured.channels_of(pruned) <= 0.5 * prune_structured.channels_of(model)
    assert count_macs(pruned, 32) < 0.3 * count_macs(model, 32)
    assert meta["pruning"]["macs_removed"] > 0.7
    out = run_artifact(variant.variant_dir(parent, "pruned") / "model.pt", test_inputs, parent)
    assert out["pred"] == fp32_predictions(pruned, test_inputs)
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.8
    # The float checkpoint has the pruned shapes; fit_shapes resizes torchvision's resnet18 to load it.
    state = load_state_dict(variant.variant_dir(parent, "pruned") / meta["checkpoint"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_model("resnet18", 10).load_state_dict(state)
    _, reloaded = variant.load_float_variant(parent, "pruned")
    assert reloaded.conv1.out_channels == 32 and reloaded.fc.in_features == 256
    assert fp32_predictions(reloaded, test_inputs) == out["pred"]


def test_int8_stacks_on_the_pruned_variant(parent: Path, eager: tuple, test_inputs: Path) -> None:
    parent_meta, model = eager
    if not (variant.variant_dir(parent, "pruned") / "model.pth").is_file():
        prune_structured.make(parent, parent_meta, model, ratio=0.5, epochs=1, progress=False)
    meta, source = quantize.make(parent, parent_meta, model, "static", calibration_images=128, source="pruned")
    check_variant_metadata(meta, parent, "pruned_int8", "static_int8_quantization")
    assert meta["cpu_only"] is True and meta["recipe"]["args"]["source"]["variant"] == "pruned"
    assert meta["recipe"]["args"]["source"]["recipe"]["technique"] == "structured_channel_prune"
    assert source.conv1.out_channels == 32  # quantized the pruned network, not the parent
    assert count_macs(source, 32) < 0.3 * count_macs(model, 32)
    out = run_artifact(variant.variant_dir(parent, "pruned_int8") / "model.pt", test_inputs, parent)
    assert "quantized::conv2d_relu" in out["quantized_ops"]
    assert agreement(out["pred"], fp32_predictions(source, test_inputs)) >= 0.9
    with pytest.raises(FileNotFoundError, match="build it first"):
        quantize.make(parent, parent_meta, model, "static", source="no_such_variant")


def test_static_int8_has_int8_weights_and_matches_fp32(parent: Path, eager: tuple, tiny_splits: Splits,
                                                       test_inputs: Path) -> None:
    parent_meta, model = eager
    fx = quantize.static_int8(model, quantize.calibration_subset(tiny_splits, 64), parent_meta)
    assert quantize.int8_weights(fx) >= 20  # every conv and the fc: 20 convs + fc in resnet18
    meta, _ = quantize.make(parent, parent_meta, model, "static", calibration_images=128)
    check_variant_metadata(meta, parent, "int8", "static_int8_quantization")
    assert meta["cpu_only"] is True
    assert meta["export"]["parity"]["top1_agreement"] == 1.0  # TorchScript == the FX-quantized model
    out = run_artifact(variant.variant_dir(parent, "int8") / "model.pt", test_inputs, parent)
    assert "quantized::conv2d_relu" in out["quantized_ops"] and "quantized::linear" in out["quantized_ops"]
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.9
    assert abs(meta["metrics"]["test"]["top1"] - parent_meta["metrics"]["test"]["top1"]) <= 0.03


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
    q = quantize.dynamic_int8(model)
    assert type(q.head).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert type(q.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert q.head.weight().dtype == torch.qint8
    assert quantize.int8_weights(q) >= 1
    x = torch.randn(64, 7, 16)
    with torch.inference_mode():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert isinstance(model.head, torch.nn.Linear)  # the input model is left alone


def test_bf16_variant_keeps_float32_interface(parent: Path, eager: tuple, test_inputs: Path) -> None:
    parent_meta, model = eager
    meta, _ = bf16.make(parent, parent_meta, model)
    check_variant_metadata(meta, parent, "bf16", "bf16_cast")
    out = run_artifact(variant.variant_dir(parent, "bf16") / "model.pt", test_inputs, parent)
    assert out["dtype"] == "torch.float32"
    assert agreement(out["pred"], fp32_predictions(model, test_inputs)) >= 0.95


def test_kd_loss_terms() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    labels = torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(student, labels)
    assert torch.allclose(distill.kd_loss(student, teacher, labels, 4.0, alpha=0.0), ce)
    # A student that already matches the teacher pays only the hard-label term.
    assert torch.allclose(distill.kd_loss(teacher, teacher, labels, 4.0, alpha=0.5),
                          0.5 * torch.nn.functional.cross_entropy(teacher, labels), atol=1e-6)
    # KL term by hand: T^2 * sum p_t (log p_t - log p_s), batch mean.
    t = 3.0
    p_t = torch.softmax(teacher / t, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    assert torch.allclose(distill.kd_loss(student, teacher, labels, t, alpha=1.0), kl, atol=1e-5)


def test_distillation_trains_a_loadable_student(parent: Path, eager: tuple, test_inputs: Path) -> None:
    parent_meta, model = eager
    meta, student = distill.make(parent, parent_meta, model, temperature=3.0, alpha=0.6, epochs=2, lr=3e-3,
                                 progress=False)
    check_variant_metadata(meta, parent, "distilled", "knowledge_distillation")
    assert meta["architecture"] == "mobilenet_v3_small"
    assert meta["recipe"]["args"]["temperature"] == 3.0 and meta["recipe"]["args"]["alpha"] == 0.6
    # Its state_dict is a plain torchvision mobilenet_v3_small checkpoint.
    reloaded = build_model("mobilenet_v3_small", 10).eval()
    reloaded.load_state_dict(load_state_dict(variant.variant_dir(parent, "distilled") / meta["checkpoint"]))
    logits, _ = predict(reloaded.to(memory_format=torch.channels_last), torch.utils.data.Subset(
        splits_for(parent_meta).test, range(64)), parent_meta["mean"], parent_meta["std"])
    out = run_artifact(variant.variant_dir(parent, "distilled") / "model.pt", test_inputs, parent)
    assert out["pred"][:64] == logits.argmax(1).tolist()
    assert len(meta["training"]["history"]) == 2
    # It learned in eval mode too: BatchNorm running statistics track the weights (the momentum fix),
    # so inputs do not collapse to one class.
    assert len(set(out["pred"])) >= 8 and meta["metrics"]["test"]["top1"] >= 0.5


def test_pipeline_writes_variants_and_report(parent: Path) -> None:
    optimize.main([str(parent), "--variants", "fp32,int8", "--rounds", "1", "--latency-calls", "2",
                   "--throughput-calls", "1", "--calibration-images", "64", "--no-progress"])
    report = json.loads((parent / "optimization" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["fp32_eager", "fp32", "int8"]
    assert report["environment"]["threads"] == 2 and report["environment"]["torch"] == torch.__version__
    assert report["parent"]["sha256"] == metadata.sha256(parent / "model.pth")
    for r in rows.values():
        assert r["latency_ms_bs1"] > 0 and r["throughput_bs8"] > 0 and r["size_bytes"] > 0
        assert r["params"] > 1e6 and r["macs"] > 1e7
    assert rows["fp32_eager"]["speedup_bs8"] == 1.0
    assert rows["int8"]["cpu_only"] and rows["int8"]["size_bytes"] < 0.5 * rows["fp32"]["size_bytes"]
    assert rows["fp32"]["drop_pt"] == 0.0 and rows["fp32"]["gate"]["passed"]
    assert "int8" in report["targets"] and "met" in report["targets"]["int8"]
    md = (parent / "optimization" / "report.md").read_text()
    assert "| int8 |" in md and "bs1 latency ms" in md
    ceiling = report["kernel_ceiling"]
    assert len(ceiling["layers"]) == 4 and ceiling["int8_gmacs_max"] > 0 and ceiling["int8_speedup_bound"] > 0
    assert "## Kernel ceiling on this CPU" in md
    assert (parent / "optimization" / "report.png").stat().st_size > 10_000
    int8 = metadata.read(variant.variant_dir(parent, "int8"))
    assert int8["metrics"]["speed"]["threads"] == 2 and int8["profile"]["macs"] == rows["int8"]["macs"]
    # --reuse keeps variants built from the same checkpoint and only re-times them.
    before = (variant.variant_dir(parent, "int8") / "model.pt").stat().st_mtime_ns
    optimize.main([str(parent), "--variants", "int8", "--reuse", "--rounds", "1", "--latency-calls", "1",
                   "--throughput-calls", "1", "--no-progress"])
    assert (variant.variant_dir(parent, "int8") / "model.pt").stat().st_mtime_ns == before


def test_pipeline_rejects_unknown_variant(parent: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        optimize.parse_args([str(parent), "--variants", "int8,int4"])
    assert e.value.code == 2
    assert "unknown variant(s) int4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        optimize.parse_args([str(parent), "--variants", "pruned_int8,pruned"])
    assert e.value.code == 2
    assert "pruned_int8 is made from pruned; list pruned before it" in capsys.readouterr().err


def test_technique_cli_explains_what_is_missing(parent: Path, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "training.quantize", *args], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=300)

    result = cli(str(tmp_path))  # no trained model there
    assert result.returncode == 1
    assert f"error: {tmp_path}/metadata.json not found" in result.stderr and "training.train" in result.stderr
    result = cli(str(parent), "--source", "missing_variant")
    assert result.returncode == 1
    assert "variant" in result.stderr and "build it first" in result.stderr
