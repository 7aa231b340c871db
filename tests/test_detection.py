"""Object detection end to end, bounded: digits on real photos -> python -m training.detect (a few steps) ->
TorchScript -> an optimized variant (fewer proposals and a factorised box head, boxes checked against its eager
model) -> build_mar.sh (mAP gate) -> the real TorchServe, and tritonclient through the OIP gateway. The served boxes
must equal the offline ones; a corrupt image in a mixed-size batch fails alone."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import tritonclient.http as thttp

from deploy.client import InferenceClient
from handlers.contract import ModelCard, sha256
from handlers.loading import build_model
from handlers.runtimes import load_model
from harness.context import call, make_context, unpack_mar
from harness.gateway import Gateway
from harness.torchserve import TorchServe
from packager import golden
from packager.pick import read_pick
from tests.conftest import ROOT, build_mar, serve
from training.detect import init_backbone
from training.detection_data import Sample, read_folder, synthesize, write_coco
from training.detection_eval import box_parity, predict
from training.golden import encode_png

pytestmark = [pytest.mark.server, pytest.mark.slow]
ALL = {"X-Score-Threshold": "0"}  # every box the model gives (a bounded run's detector scores low)
VARIANT = "lean_svd_onnx"  # served: techniques and a runtime other than TorchScript
INT8 = "lean_svd_int8"


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("detector") / "fasterrcnn"
    subprocess.run([sys.executable, "-m", "training.detect", "--out", str(out), "--images", "12", "--image-size",
                    "96", "--epochs", "1", "--batch-size", "4", "--no-progress"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "training.detection_variants", str(out), "--variants",
                    f"{VARIANT},{INT8},int8_onnx", "--proposals", "20", "--rank", "64", "--rounds", "1",
                    "--timing-images", "2"], check=True, cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def store(detector: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("detection_store")
    build_mar(detector / "variants" / VARIANT, store, "--name", "detector", "--budget", "0.5")
    return store


@pytest.fixture(scope="module")
def held_out(detector: Path) -> list[Sample]:
    """Test images of three sizes: the detector takes each as it is, in one batch."""
    samples = synthesize("test", 6, 96, seed=7)
    sizes = [(96, 96), (64, 128), (120, 80)]
    return [Sample(F.interpolate(s.image[None].float(), size=sizes[i % 3], mode="bilinear")[0].round().byte(),
                   s.boxes, s.labels) for i, s in enumerate(samples)]


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with serve(store, tmp_path_factory.mktemp("ts"), ["detector"]) as ts:
        yield ts


def widest_gap(scores: list[float]) -> float:
    """A threshold in the widest gap between the offline scores, so float noise cannot move a box across it."""
    ranked = sorted(set(scores), reverse=True)
    assert len(ranked) >= 2, "too few boxes to compare"
    gap, i = max((ranked[i] - ranked[i + 1], i) for i in range(len(ranked) - 1))
    return (ranked[i] + ranked[i + 1]) / 2


def as_detections(answer: dict, card: ModelCard) -> dict[str, torch.Tensor]:
    """A served JSON answer in the model's own terms: boxes, scores, label indices."""
    found = answer["detections"]
    return {"boxes": torch.tensor([d["box"] for d in found]).view(-1, 4),
            "scores": torch.tensor([d["score"] for d in found]),
            "labels": torch.tensor([card.labels.index(d["label"]) for d in found], dtype=torch.int64)}


def test_training_writes_a_gated_detector_with_coco_figures(detector: Path) -> None:
    card = ModelCard.read(detector)
    assert card.task == "detection" and card.labels[0] == "__background__" and len(card.labels) == 11
    assert card.test.map is not None and 0 <= card.test.map <= 1 and set(card.test.per_class_ap) == set(
        card.labels[1:])
    variant = ModelCard.read(detector / "variants" / "torchscript")
    assert variant.export["parity"]["ok"] and variant.parent.test.map == card.test.map
    assert (detector / "eval" / "test" / "detections.png").stat().st_size > 10_000


def test_the_optimized_variant_is_checked_gated_timed_and_picked(detector: Path) -> None:
    variant = ModelCard.read(detector / "variants" / VARIANT)
    assert variant.runtime == "onnxruntime" and variant.cpu_only and variant.export["parity"]["ok"]
    assert variant.export["parity"]["images"] > variant.test.n  # the test images, and some of another size
    assert variant.recipe.args["lean"]["proposals"] == 20 and variant.recipe.args["svd"]["rank"] == 64
    assert variant.test.map is not None and variant.parent.sha256 == sha256(detector / "model.pth")
    report = json.loads((detector / "optimization" / "report.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["torchscript", VARIANT, INT8]
    assert "ONNX export does not take" in report["skipped"]["int8_onnx"]
    int8 = ModelCard.read(detector / "variants" / INT8)
    assert int8.precision == "int8" and int8.cpu_only and int8.export["parity"]["ok"]
    assert all(r["latency_ms_bs1"] > 0 and r["gate"]["passed"] for r in report["rows"])
    assert read_pick(detector, "throughput").name in {"torchscript", VARIANT, INT8}
    unknown = subprocess.run([sys.executable, "-m", "training.detection_variants", str(detector), "--variants",
                                "lean_bogus"], capture_output=True, text=True, cwd=ROOT)
    assert unknown.returncode == 2 and "unknown technique 'bogus'" in unknown.stderr
    classifier_path = subprocess.run([sys.executable, "-m", "training.optimize", str(detector), "--variants", "fp32"],
                                     capture_output=True, text=True, cwd=ROOT)
    assert classifier_path.returncode == 1 and "training.detection_variants" in classifier_path.stderr



def test_a_one_stage_detector_trains_exports_and_is_told_which_techniques_apply(tmp_path: Path) -> None:
    out = tmp_path / "ssd"
    subprocess.run([sys.executable, "-m", "training.detect", "--out", str(out), "--arch",
                    "ssdlite320_mobilenet_v3_large", "--images", "8", "--image-size", "96", "--epochs", "1",
                    "--batch-size", "4", "--no-progress"], check=True, cwd=ROOT)
    assert ModelCard.read(out / "variants" / "torchscript").export["parity"]["ok"]
    subprocess.run([sys.executable, "-m", "training.detection_variants", str(out), "--variants", "lean,svd",
                    "--rounds", "1", "--timing-images", "1"], check=True, cwd=ROOT)
    report = json.loads((out / "optimization" / "report.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["torchscript"]
    assert "no region proposal network" in report["skipped"]["lean"]
    assert "no two-layer box head" in report["skipped"]["svd"]


@pytest.mark.parametrize("arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"])
def test_init_from_copies_a_classifier_into_either_detectors_backbone(arch: str, tmp_path: Path) -> None:
    classifier = torchvision.models.mobilenet_v3_large(num_classes=10)
    torch.save(classifier.state_dict(), tmp_path / "model.pth")
    detector = build_model(arch, 11)
    copied = init_backbone(detector, tmp_path)
    mine = detector.state_dict()
    # the stem, and the last layer copied (SSDlite narrows its tail, so it stops before)
    first = next(k for k in mine if k.startswith("backbone.") and k.endswith("0.0.weight"))
    assert copied >= 250 and torch.equal(mine[first], classifier.features[0][0].weight)
    assert not torch.equal(build_model(arch, 11).state_dict()[first], mine[first])

def test_coco_and_voc_folders_read_back_the_same_boxes(tmp_path: Path) -> None:
    samples = synthesize("val", 3, 64, seed=1)
    labels = ["__background__", *map(str, range(10))]
    write_coco(samples, tmp_path / "coco", labels)
    back, found = read_folder(tmp_path / "coco")
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for i, s in enumerate(samples):
        (voc / "JPEGImages" / f"{i}.png").write_bytes(encode_png(s.image))
        objects = "".join(f"<object><name>{labels[int(lab)]}</name><bndbox><xmin>{b[0] + 1}</xmin><ymin>{b[1] + 1}"
                          f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                          for b, lab in zip(s.boxes.tolist(), s.labels.tolist(), strict=True))
        (voc / "Annotations" / f"{i}.xml").write_text(f"<annotation><filename>{i}.png</filename>{objects}"
                                                       "</annotation>")
    from_voc, voc_labels = read_folder(voc)
    for a, b, c in zip(samples, back, from_voc, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.image, c.image)
        torch.testing.assert_close(a.boxes, b.boxes)
        torch.testing.assert_close(a.boxes, c.boxes)
        assert [labels[i] for i in a.labels] == [found[i] for i in b.labels] == [voc_labels[i] for i in c.labels]


def test_served_boxes_equal_the_offline_boxes(server: TorchServe, detector: Path, held_out: list[Sample]) -> None:
    variant_dir = detector / "variants" / VARIANT
    card = ModelCard.read(variant_dir)
    offline = predict(load_model(variant_dir, card), held_out)
    served = []
    for s in held_out:
        r = server.api.predict("detector", encode_png(s.image), headers=ALL)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["image_size"] == [s.image.shape[2], s.image.shape[1]]
        served.append(as_detections(answer, card))
    threshold = widest_gap([float(v) for d in offline for v in d["scores"]])
    parity = box_parity(offline, served, score_threshold=threshold, score_atol=1e-4)
    assert sum(int((d["scores"] >= threshold).sum()) for d in offline) > 0 and parity["ok"], parity

    kept = server.api.predict("detector", encode_png(held_out[0].image),
                              headers={**ALL, "X-Max-Detections": "2", "X-Classes": "3,7"}).json()
    assert len(kept["detections"]) <= 2 and {d["label"] for d in kept["detections"]} <= {"3", "7"}
    with InferenceClient(server.url("inference"), server.api.keys["inference"], model="detector") as client:
        typed = client.detect(encode_png(held_out[1].image))
    assert typed.image_size == (held_out[1].image.shape[2], held_out[1].image.shape[1]) and typed.variant
    assert all(len(b.box) == 4 and b.score >= 0.5 for b in typed.boxes)  # the served default threshold
    for headers, code in (({"X-Score-Threshold": "2"}, "bad_option"), ({"X-Classes": "cat"}, "bad_option")):
        r = server.api.predict("detector", encode_png(held_out[0].image), headers=headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_the_archive_carries_a_golden_set_the_served_detector_reproduces(store: Path, detector: Path,
                                                                      server: TorchServe) -> None:
    """The canary's reference: the test images with their true boxes, and the build-time detections; served, each
    image's tally against its true boxes is the build-time one."""
    gold = golden.from_archive(store / "detector.mar")
    test = ModelCard.read(detector).details["dataset"]["sizes"]["test"]
    assert golden.task(gold) == "detection" and golden.metric(gold) == "F1@.5" and gold["n"] == min(test, 50)
    assert all(it["boxes"] and len(it["boxes"]) == len(it["labels"]) for it in gold["items"])
    served = []
    with InferenceClient(server.url("inference"), server.api.keys["inference"], model="detector") as client:
        for (png, truth), item in zip(golden.images(gold), gold["items"], strict=True):
            found = [(b.label, b.score, list(b.box)) for b in client.detect(png).boxes]
            served.append(golden.tally(found, truth))
            assert served[-1] == golden.tally(item["build"], truth)
    assert golden.score(gold, served) == pytest.approx(gold["build_score"], abs=1e-6)


def test_a_corrupt_image_in_a_mixed_size_batch_fails_alone(store: Path, held_out: list[Sample],
                                                           tmp_path: Path) -> None:
    """One batch through the real handler in-process (TorchServe's Context): three sizes and a truncated PNG."""
    from handlers.handler import ModelHandler

    unpacked = unpack_mar(store / "detector.mar", tmp_path / "unpacked")
    handler, ctx = ModelHandler(), make_context(unpacked)
    handler.initialize(ctx)
    pngs = [encode_png(s.image) for s in held_out[:3]]
    rows = [{"body": bytearray(pngs[0])}, {"body": bytearray(pngs[1][:200])}, {"body": bytearray(pngs[1])},
            {"body": {"data": base64.b64encode(pngs[2]).decode(), "score_threshold": 0}}]
    results = call(handler, ctx, rows)
    assert [s for s, _ in results] == [200, 400, 200, 200]
    assert results[1][1]["error"]["code"] == "corrupt_image"
    assert results[2][1]["image_size"] == [held_out[1].image.shape[2], held_out[1].image.shape[1]]


def test_tritonclient_gets_boxes_through_the_gateway(server: TorchServe, held_out: list[Sample]) -> None:
    with Gateway(server) as gateway:
        client = thttp.InferenceServerClient(gateway.rest)
        headers = {"authorization": f"Bearer {server.api.keys['inference']}"}
        meta = client.get_model_metadata("detector", headers=headers)
        assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
            ("boxes", [-1, -1, 4]), ("scores", [-1, -1]), ("labels", [-1, -1]), ("count", [-1])]
        images = [encode_png(s.image) for s in held_out[:3]]
        inp = thttp.InferInput("image", [len(images)], "BYTES")
        inp.set_data_from_numpy(np.array(images, dtype=np.object_))
        result = client.infer("detector", [inp], headers=dict(headers), parameters={"score_threshold": 0.0})
        boxes, counts = result.as_numpy("boxes"), result.as_numpy("count")
        assert boxes.shape == (3, int(counts.max()), 4) and counts.shape == (3,)
        for i, png in enumerate(images):
            want = server.api.predict("detector", png, headers=ALL).json()["detections"]
            assert int(counts[i]) == len(want)
            np.testing.assert_allclose(boxes[i, :counts[i]], np.array([d["box"] for d in want]).reshape(-1, 4),
                                       atol=0.01)
