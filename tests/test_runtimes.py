"""Runtime variants: ONNX Runtime, OpenVINO, AOTInductor and torch.compile (TensorRT and CUDA AOTInductor on a GPU).

Each is built through the technique interface from a private copy of the tiny model, and checked as a user would
rely on it: the card names its runtime, precision and files; the parity it records is the tolerance its precision
states, and holds when the saved artifact is loaded again; the accuracy gate passes; build_mar.sh packs it. Then one
real TorchServe serves the TorchScript fp32 archive and every runtime archive side by side, and each runtime must
answer the held-out golden images with the labels TorchScript gives, within the agreement its precision states.

Tiers: a build, its re-check and the gate take ~10 s for an ONNX Runtime or OpenVINO variant, so the fast tier
checks four that between them cover every code path (fp32 on both, both int8 quantizers, a stacked variant) and
the refusals. The other variants (aoti and compile each spend ~20 s in Inductor), the archives and the one TorchServe
run that serves them all are in the slow tier.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from handlers.contract import ModelCard
from handlers.loading import load_state_dict, model_from_state_dict
from handlers.runtimes import load_model
from harness.torchserve import TorchServe
from packager.manifest import read_manifest
from tests.conftest import ROOT, build_mar, copy_store, serve
from training.evaluate import predict
from training.export import check_parity
from training.technique import RUNTIME_TOLERANCE, NotSupportedHere, build, variant_dir
from training.variants.aot_inductor import AOTI
from training.variants.compiled import COMPILED
from training.variants.onnx_runtime import ONNX_RUNTIME
from training.variants.openvino_ir import OPENVINO, capabilities
from training.variants.tensorrt_engine import TENSORRT

ARGS = argparse.Namespace(calibration_images=64, seed=0, progress=False)
TECHNIQUES = {t.name: t for t in (*ONNX_RUNTIME, *OPENVINO, *AOTI, *COMPILED, *TENSORRT)}
GATE_BUDGET = 2.0  # points of test top-1 a runtime variant may lose against its float source

OV_FILES = ["model.xml", "model.bin"]
# variant -> (runtime, precision, files, cpu_only)
EXPECTED: dict[str, tuple[str, str, list[str], bool]] = {
    "onnxruntime": ("onnxruntime", "fp32", ["model.onnx"], True),
    "onnxruntime_int8": ("onnxruntime", "int8", ["model.onnx"], True),
    "openvino": ("openvino", "fp32", OV_FILES, True),
    "openvino_bf16": ("openvino", "bf16", OV_FILES, True),
    "openvino_int8": ("openvino", "int8", OV_FILES, True),
    "pruned_onnxruntime_int8": ("onnxruntime", "int8", ["model.onnx"], True),  # stacked on the pruned variant
    "pruned_openvino_int8": ("openvino", "int8", OV_FILES, True),
    "aoti": ("aoti", "fp32", ["model.aoti.pt2"], True),
    "compile": ("compile", "fp32", ["model.pth"], False),
}
# Fast tier: fp32 on both runtimes, both int8 quantizers (ONNX Runtime's via a stacked variant) and stacking;
# slow tier: the other precisions and compositions of the same code, and an Inductor compile each (~20 s).
SLOW = {"onnxruntime_int8", "openvino_bf16", "pruned_openvino_int8", "aoti", "compile"}
VARIANTS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in EXPECTED]


def model_name(variant: str) -> str:
    return f"digits_{variant}"


class Runtimes:
    """The runtime variants of one parent, built on first use, and their archives in one model store."""

    def __init__(self, parent: Path, store: Path, config: Path) -> None:
        self.parent, self.store, self.config = parent, store, config
        self.cards: dict[str, ModelCard] = {}
        self.built: dict[str, subprocess.CompletedProcess[str]] = {}

    def card(self, variant: str) -> ModelCard:
        if variant == "openvino_bf16" and "BF16" not in capabilities():
            pytest.skip(f"this CPU's OpenVINO capabilities ({', '.join(capabilities())}) have no BF16")
        if variant not in self.cards:
            self.cards[variant] = build(self.parent, TECHNIQUES[variant], ARGS)
        return self.cards[variant]

    def dir(self, variant: str) -> Path:
        return variant_dir(self.parent, variant)

    def source_top1(self, card: ModelCard) -> float:
        """Test top-1 of the float model the variant was made from: the fp32 parent, or the variant it stacks on."""
        assert card.parent is not None
        return card.recipe.args["source"]["top1"] if "source" in card.recipe.args else card.parent.test.top1

    def budget(self, card: ModelCard) -> float:
        """GATE_BUDGET, plus what a stacked-on source already lost against the fp32 parent (the gate compares
        with the parent; a pruned source's own loss is the pruned variant's to answer for)."""
        assert card.parent is not None
        return GATE_BUDGET + max(0.0, 100 * (card.parent.test.top1 - self.source_top1(card)))

    def archive(self, variant: str) -> str:
        """The variant packed by build_mar.sh into the store; the model name it is served under."""
        card = self.card(variant)
        if variant not in self.built:
            self.built[variant] = build_mar(self.dir(variant), self.store, "--name", model_name(variant),
                                            "--config", str(self.config), "--budget", f"{self.budget(card):.2f}")
        return model_name(variant)


@pytest.fixture(scope="session")  # shared by both tiers (tests/conftest.py)
def runtimes(pruned_parent: Path, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Runtimes:
    """A private copy of the tiny model with its pruned variant (stacked variants start from it); a store holding
    digits.mar (TorchScript fp32) to which the runtime archives are added, each with one worker (eleven models
    share two cores) and a batch delay long enough for concurrent requests to form batches."""
    root = tmp_path_factory.mktemp("runtimes")
    parent = root / "parent"
    shutil.copytree(pruned_parent, parent)
    cfg = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())
    cfg.update(minWorkers=1, maxWorkers=1, maxBatchDelay=50)
    config = root / "model-config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return Runtimes(parent, copy_store(model_store, root / "store", "digits.mar"), config)


def float_source(runtimes: Runtimes, card: ModelCard) -> torch.nn.Module:
    """The eager float model the variant was made from, loaded from its state_dict."""
    source = card.recipe.args.get("source", {}).get("variant")
    model_dir = runtimes.dir(source) if source else runtimes.parent
    source_card = ModelCard.read(model_dir)
    assert source_card.checkpoint is not None
    state = load_state_dict(model_dir / source_card.checkpoint)
    return model_from_state_dict(source_card.architecture, source_card.num_classes, state).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_runtime_variant_card_parity_and_gate(runtimes: Runtimes, variant: str, tiny_splits) -> None:
    card = runtimes.card(variant)
    vdir = runtimes.dir(variant)
    runtime, precision, files, cpu_only = EXPECTED[variant]

    # The card: what runs it, in which precision, from which files (all present, and nothing left staged).
    assert (card.variant, card.runtime, card.precision, card.files) == (variant, runtime, precision, files)
    assert (card.cpu_only, card.cuda_only) == (cpu_only, False)
    assert card.artifact == files[0] and all((vdir / f).is_file() for f in files)
    assert ModelCard.read(vdir) == card
    assert not list(vdir.parent.glob(".*.partial")), "a staging directory was left behind"
    assert (card.recipe.args["runtime"], card.recipe.args["precision"]) == (runtime, precision)
    assert card.parent is not None and card.parent.variant == "fp32"
    stacked_on = variant.split("_")[0] if variant.startswith(("pruned_", "distilled_")) else None
    assert card.recipe.args.get("source", {}).get("variant") == stacked_on
    if precision == "int8":
        assert card.recipe.args["calibration"]["images"] == ARGS.calibration_images

    # The parity record: the tolerance RUNTIME_TOLERANCE states for the precision, over the whole test split.
    tolerance = RUNTIME_TOLERANCE[precision]
    parity = card.export["parity"] if card.export else {}
    assert (parity["atol"], parity["rtol"], parity["min_agreement"]) == (
        tolerance.atol, tolerance.rtol, tolerance.agreement)
    assert parity["images"] == len(tiny_splits.test)
    assert parity["top1_agreement"] >= parity["min_agreement"]
    assert math.isfinite(parity["max_abs_diff"]) and 0 <= parity["mean_abs_diff"] <= parity["max_abs_diff"]

    # The artifact in its final place, loaded again by its runtime: within the same tolerance of the float source
    # (check_parity raises past it), and the accuracy the card records is what it scores.
    served = load_model(vdir, card, repeatable=True)
    again = check_parity(float_source(runtimes, card), served, tiny_splits.test, card, tolerance)
    assert again["top1_agreement"] >= tolerance.agreement
    logits, labels = predict(served, tiny_splits.test, card.input.mean, card.input.std)
    reloaded, _ = predict(load_model(vdir, card, repeatable=True), tiny_splits.test, card.input.mean, card.input.std)
    assert torch.equal(logits, reloaded), "a repeatable load gave other logits the second time"
    assert card.test.n == len(labels)
    assert card.test.top1 == pytest.approx((logits.argmax(1) == labels).float().mean().item(), abs=1e-6)

    # The runtime costs at most GATE_BUDGET points against its float source, and the accuracy gate agrees.
    assert 100 * (runtimes.source_top1(card) - card.test.top1) <= GATE_BUDGET
    budget = f"{runtimes.budget(card):.2f}"
    gate = subprocess.run([str(ROOT / "build_mar.sh"), str(vdir), "--check", "--budget", budget],
                          capture_output=True, text=True, cwd=ROOT)
    assert gate.returncode == 0 and "accuracy gate passed" in gate.stdout, gate.stdout + gate.stderr


def test_onnxruntime_int8_weights_fit_in_seven_bits(runtimes: Runtimes) -> None:
    """The artifact is served on whatever x86 CPU the fleet has: without VNNI, ONNX Runtime's u8 x s8 kernel sums
    pairs of products in 16 bits, which weights of magnitude <= 64 (ONNX Runtime's reduce_range) cannot overflow:
    255 * 64 * 2 < 2**15."""
    import onnx
    from onnx import numpy_helper

    card = runtimes.card("pruned_onnxruntime_int8")
    graph = onnx.load(str(runtimes.dir("pruned_onnxruntime_int8") / card.artifact)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    # Every int8 tensor a DequantizeLinear reads from the graph's constants is a weight (activations are uint8).
    dequantized = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]
    assert len(dequantized) >= 10, f"expected the conv weights as int8 initializers, found {len(dequantized)}"
    widest = {name: (int(weights[name].min()), int(weights[name].max())) for name in dequantized}
    outside = {name: r for name, r in widest.items() if max(-r[0], r[1]) > 64}
    assert not outside, f"int8 weights beyond the reduced range [-64, 64]: {outside}"
    assert card.recipe.args["weights"] == "int8 per-channel, 7-bit range"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores: a worker on fewer threads than cores")
def test_openvino_leaves_a_worker_with_fewer_threads_than_cores_unpinned(runtimes: Runtimes) -> None:
    """OpenVINO pins each process's inference threads from the first core, so two one-thread workers would both
    run on core 0. A worker that does not use every core must keep the whole affinity mask while it infers."""
    card = runtimes.card("openvino")
    model = load_model(runtimes.dir("openvino"), card, "cpu", threads=1)
    batch = torch.rand(8, *card.input.shape)
    allowed = os.sched_getaffinity(0)
    narrowed: set[frozenset[int]] = set()
    samples = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal samples
        while not done.is_set():
            for tid in os.listdir("/proc/self/task"):
                with contextlib.suppress(OSError):  # a thread that ended between listing and asking
                    if (mask := os.sched_getaffinity(int(tid))) != allowed:
                        narrowed.add(frozenset(mask))
            samples += 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            model(batch)
    finally:
        done.set()
        watcher.join()
    assert samples > 10, f"the affinity watcher sampled only {samples} times"
    assert not narrowed, f"a thread was pinned to {sorted(map(sorted, narrowed))} of cores {sorted(allowed)}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(EXPECTED))
def test_build_mar_packs_the_artifact_and_its_companions(runtimes: Runtimes, variant: str) -> None:
    _, _, files, cpu_only = EXPECTED[variant]
    name = runtimes.archive(variant)
    mar = runtimes.store / f"{name}.mar"
    device = "cpu" if cpu_only else "gpu"  # auto: gpu, which TorchServe serves on CPU where there is none
    assert (f"built {mar} (model {name}, version 1.0, deviceType {device}, config {runtimes.config})"
            in runtimes.built[variant].stdout)
    assert json.loads((runtimes.store / "manifest.json").read_text())[mar.name]["variant"] == variant
    with zipfile.ZipFile(mar) as z:
        packed = set(z.namelist())
        card = ModelCard.from_dict(json.loads(z.read("metadata.json")))
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert set(files) <= packed, f"{mar.name} lacks {set(files) - packed}"
    assert card == runtimes.card(variant) and config["deviceType"] == device


def test_cuda_only_variants_are_refused_without_cuda(runtimes: Runtimes) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; test_cuda_variants_build_run_on_cuda_and_refuse_cpu builds them")
    for variant in ("aoti_cuda", "tensorrt_fp16"):
        technique = TECHNIQUES[variant]
        assert technique.cuda_only and not technique.cpu_only
        with pytest.raises(NotSupportedHere, match=r"CUDA GPU, and this machine has none"):
            build(runtimes.parent, technique, ARGS)
        assert not runtimes.dir(variant).exists()
        assert not list(runtimes.dir(variant).parent.glob(f".{variant}.partial"))
    # The command line says why and exits 1, as training.optimize's users see it.
    cli = subprocess.run([sys.executable, "-m", "training.variants.aot_inductor", str(runtimes.parent),
                          "--variant", "aoti_cuda", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 1 and "error: aoti_cuda compiles for a CUDA GPU" in cli.stderr, cli.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["aoti_cuda", "tensorrt_fp16"])
def test_cuda_variants_build_run_on_cuda_and_refuse_cpu(runtimes: Runtimes, variant: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA device: {variant} compiles for a CUDA GPU")
    if variant == "tensorrt_fp16":
        pytest.importorskip("torch_tensorrt", reason="torch-tensorrt is the GPU extra deploy/setup.sh installs")
    card = runtimes.card(variant)
    assert card.cuda_only and not card.cpu_only
    assert card.precision == ("fp16" if variant == "tensorrt_fp16" else "fp32")
    tolerance = RUNTIME_TOLERANCE[card.precision]
    parity = card.export["parity"] if card.export else {}
    assert (parity["atol"], parity["rtol"], parity["min_agreement"]) == (
        tolerance.atol, tolerance.rtol, tolerance.agreement)
    assert parity["top1_agreement"] >= tolerance.agreement
    gpu = load_model(runtimes.dir(variant), card, "cuda")
    batch = torch.zeros(2, *card.input.shape)
    assert gpu(batch.cuda()).shape == (2, card.num_classes)
    with pytest.raises(ValueError, match="not cpu"):
        load_model(runtimes.dir(variant), card, "cpu")
    refused = build_mar(runtimes.dir(variant), runtimes.store, "--name", model_name(variant), "--device", "cpu",
                        "--budget", "100", check=False)
    assert refused.returncode != 0 and "runs on CUDA only" in refused.stderr
    build_mar(runtimes.dir(variant), runtimes.store, "--name", model_name(variant), "--budget", "100")


def copy_variant(runtimes: Runtimes, variant: str, dest: Path, **changes: Any) -> Path:
    runtimes.card(variant)
    shutil.copytree(runtimes.dir(variant), dest)
    if changes:
        ModelCard.read(dest).replace(**changes).write(dest)
    return dest


def test_packaging_refuses_the_wrong_device_and_a_missing_companion(runtimes: Runtimes, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cuda = copy_variant(runtimes, "onnxruntime", tmp_path / "cuda", cuda_only=True, cpu_only=False)
    r = build_mar(cuda, store, "--device", "cpu", "--budget", "100", check=False)
    assert r.returncode != 0 and "error: variant onnxruntime (onnxruntime) runs on CUDA only; build it with " \
        "--device gpu or auto" in r.stderr, r.stdout + r.stderr

    cpu = copy_variant(runtimes, "onnxruntime", tmp_path / "cpu")
    r = build_mar(cpu, store, "--device", "gpu", "--budget", "100", check=False)
    assert r.returncode != 0 and "is CPU-only; build it with --device cpu or auto" in r.stderr, r.stdout + r.stderr

    ov = copy_variant(runtimes, "openvino", tmp_path / "openvino")
    (ov / "model.bin").unlink()
    r = build_mar(ov, store, "--budget", "100", check=False)
    assert r.returncode != 0, r.stdout
    assert f"{ov / 'model.bin'} (openvino reads it beside model.xml) not found" in r.stderr, r.stderr
    assert not list(store.glob("*.mar"))
    # The handler's loader names it too, should an IR without its weights reach a worker.
    with pytest.raises(FileNotFoundError, match=r"model\.bin \(runtime openvino\) not found"):
        load_model(ov, ModelCard.read(ov))


# --- one real TorchServe: TorchScript fp32 and every runtime archive side by side --------------------------------
def reference(variant: str) -> str:
    """The TorchScript fp32 archive a runtime variant must agree with: the parent's, or the pruned variant's for
    a variant stacked on it (pruning changes the model, and the runtime must not change it further)."""
    return model_name("pruned") if variant.startswith("pruned_") else "digits"


@pytest.fixture(scope="module")
def server(runtimes: Runtimes, tmp_path_factory: pytest.TempPathFactory):
    """One TorchServe: digits.mar and the pruned variant's TorchScript (the references), and every runtime archive.
    Yields (server, {runtime model: its reference model})."""
    variants = [v for v in EXPECTED if v != "openvino_bf16" or "BF16" in capabilities()]
    for v in variants:
        runtimes.card(v)  # variants are built in this process, one at a time
    # build_mar.sh runs two at a time into the one store, as a CI matrix would (its manifest is locked).
    # One fine-tune epoch costs the tiny pruned model a few points; here it is only a reference for labels.
    pruned = partial(build_mar, runtimes.dir("pruned"), runtimes.store, "--name", model_name("pruned"), "--config",
                     str(runtimes.config), "--budget", "20")
    with cf.ThreadPoolExecutor(2) as pool:
        built = pool.submit(pruned)
        served = dict(zip(pool.map(runtimes.archive, variants), map(reference, variants), strict=True))
        built.result()
    assert set(read_manifest(runtimes.store)) >= {f"{name}.mar" for name in (*served, model_name("pruned"))}
    with serve(runtimes.store, tmp_path_factory.mktemp("ts"), ["digits", model_name("pruned"), *served]) as ts:
        yield ts, served


def answers(ts: TorchServe, model: str, blobs: list[bytes]) -> list[dict[str, Any]]:
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: ts.api.predict(model, b), blobs))
    bad = [r for r in responses if r.status_code != 200]
    assert not bad, f"{model}: {len(bad)} requests failed, e.g. {bad[0].status_code} {bad[0].text[:300]}"
    return [r.json() for r in responses]


def labels(ts: TorchServe, model: str, blobs: list[bytes]) -> list[str]:
    return [a["label"] for a in answers(ts, model, blobs)]


def runner_up(answer: dict[str, Any]) -> str:
    """The second label of a top-k answer."""
    return sorted(answer["probabilities"], key=answer["probabilities"].get)[-2]


def batch_sizes(metrics: str, model: str) -> tuple[float, float]:
    """(items, batches) the handler of `model` reported."""
    def series(name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith(name + "{") and f'ModelName="{model}"' in line)
    return series("HandlerBatchSize_sum"), series("HandlerBatchSize_count")


@pytest.mark.server
@pytest.mark.slow
def test_every_runtime_serves_the_labels_of_torchscript_fp32(server, images: list[tuple[bytes, str]]) -> None:
    """fp32 runtimes answer every golden image as TorchScript does. A lower precision is held to the label
    agreement its tolerance states (RUNTIME_TOLERANCE, as the build checked it): an int8 kernel may flip an image
    TorchScript itself barely decides, so each flip must go to TorchScript's runner-up."""
    ts, served = server
    blobs = [png for png, _ in images]
    references = {model: answers(ts, model, blobs) for model in sorted(set(served.values()))}
    # The references are models: they get most of the golden set right (build-time accuracy is checked elsewhere).
    for model, ref in references.items():
        assert sum(a["label"] == want for a, (_, want) in zip(ref, images, strict=True)) >= 0.9 * len(images), model
    off_contract = {}
    for model, ref in served.items():
        got, want = labels(ts, model, blobs), references[ref]
        wrong = [(i, want[i]["label"], got[i]) for i in range(len(blobs)) if got[i] != want[i]["label"]]
        tolerance = RUNTIME_TOLERANCE[EXPECTED[model.removeprefix("digits_")][1]]
        far = [(i, label) for i, _, label in wrong if label != runner_up(want[i])]
        if len(wrong) > (1 - tolerance.agreement) * len(blobs) or far:
            off_contract[model] = {"flips": wrong, "not to the runner-up": far, "agreement": tolerance.agreement}
    # fp32 states agreement 1.0, so any flip of an fp32 runtime lands here.
    assert not off_contract, f"labels differing from TorchScript beyond the precision's tolerance, flips as " \
        f"(image, torchscript, runtime): {off_contract}"
    # Concurrent requests formed batches on every runtime: each serves a dynamic batch dimension.
    metrics = ts.api.metrics()
    for model in served:
        items, batches = batch_sizes(metrics, model)
        assert batches > 0 and items / batches > 1, f"{model}: {items} items in {batches} batches"


@pytest.mark.server
@pytest.mark.slow
def test_a_corrupt_image_fails_alone_on_a_runtime_archive(server, images: list[tuple[bytes, str]]) -> None:
    ts, _ = server
    model = model_name("onnxruntime")
    pids = ts.api.worker_pids(model)
    good = [png for png, _ in images[:7]]
    corrupt = good[0][: len(good[0]) // 2]  # a truncated PNG
    bodies = [*good[:3], corrupt, *good[3:]]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: ts.api.predict(model, b), bodies))
    bad = responses.pop(3)
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/json"), bad.text[:300]
    assert bad.json()["error"]["code"] == "corrupt_image" and bad.json()["error"]["message"]
    assert [r.status_code for r in responses] == [200] * len(good)
    assert [r.json()["label"] for r in responses] == labels(ts, "digits", good)
    after = ts.api.predict(model, good[0])
    assert after.status_code == 200 and after.json()["label"] == responses[0].json()["label"]
    assert ts.api.worker_pids(model) == pids


def described(ts: TorchServe, model: str) -> dict[str, Any]:
    r = ts.api.manage("GET", f"/models/{model}?customized=true")
    assert r.status_code == 200, r.text
    meta = r.json()[0]["customizedMetadata"]
    return meta if isinstance(meta, dict) else json.loads(meta)


@pytest.mark.server
@pytest.mark.slow
def test_describe_reports_runtime_precision_and_startup(server) -> None:
    ts, served = server
    startup = {}
    for model in ["digits", model_name("pruned"), *served]:
        serving = described(ts, model)["serving"]
        variant = model.removeprefix("digits_")
        runtime, precision = EXPECTED[variant][:2] if variant in EXPECTED else ("torchscript", "fp32")
        assert (serving["runtime"], serving["precision"], serving["device"]) == (runtime, precision, "cpu"), model
        assert set(serving["startup"]) == {"load_s", "warm_up_s"}
        assert all(isinstance(v, float | int) and v >= 0 for v in serving["startup"].values()), serving["startup"]
        assert serving["picked_elsewhere"] == []  # no variant here was timed, so none on another machine
        startup[model] = serving["startup"]
    # torch.compile compiles during the warm-up, after a load that only wraps the eager model.
    compiled = startup[model_name("compile")]
    assert compiled["warm_up_s"] > compiled["load_s"]
    others = {m: s["warm_up_s"] for m, s in startup.items() if m != model_name("compile")}
    assert compiled["warm_up_s"] > max(others.values()), (compiled, others)
