"""The image handler in-process, with TorchServe's own Context, on an unpacked archive."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from handlers.image_classifier import ImageClassifier
from handlers.imaging import Normalizer, decode_image, resize_batch
from handlers.loading import build_model, load_state_dict
from tests.bad_inputs import corpus
from tests.handler_context import call, make_context, unpack_mar


@pytest.fixture(scope="module")
def model_dir(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack_mar(model_store / "digits.mar", tmp_path_factory.mktemp("unpacked"))


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> tuple[ImageClassifier, object]:
    h = ImageClassifier()
    ctx = make_context(model_dir)
    h.initialize(ctx)
    return h, ctx


@pytest.fixture(scope="module")
def eager(tiny_model: Path, tiny_meta: dict) -> torch.nn.Module:
    m = build_model(tiny_meta["architecture"], tiny_meta["num_classes"])
    m.load_state_dict(load_state_dict(tiny_model / tiny_meta["checkpoint"]))
    return m.eval()


def offline_labels(eager: torch.nn.Module, meta: dict, blobs: list[bytes]) -> list[str]:
    batch = Normalizer(meta["mean"], meta["std"])(resize_batch([decode_image(b) for b in blobs], meta["input_size"]))
    with torch.inference_mode():
        return [meta["labels"][i] for i in eager(batch).argmax(1).tolist()]


def test_threads_per_worker(handler, model_dir: Path) -> None:
    h, _ = handler
    cores = len(os.sched_getaffinity(0))
    workers = yaml.safe_load((model_dir / "model-config.yaml").read_text())["maxWorkers"]
    assert h.threads == max(1, cores // workers)  # the shipped config: threads auto
    probe = ImageClassifier()
    probe.options = {"threads": "auto"}
    assert probe.pick_threads(1) == cores and probe.pick_threads(4 * cores) == 1
    probe.options = {"threads": 3}
    assert probe.pick_threads(2) == 3
    for bad in ("many", 0, True, 1.5):
        probe.options = {"threads": bad}
        with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'.*model-config.yaml"):
            probe.pick_threads(1)


def test_png_jpeg_and_base64_predictions_match_offline_eager(handler, eager, tiny_meta, tiny_splits) -> None:
    h, ctx = handler
    images = [tiny_splits.test[i][0] for i in range(8)]
    blobs = [encode_png(im).numpy().tobytes() for im in images[:4]]
    blobs += [encode_jpeg(im, quality=90).numpy().tobytes() for im in images[4:]]
    rows = [{"body": bytearray(b)} for b in blobs[:6]]
    rows += [{"body": {"data": base64.b64encode(blobs[6]).decode()}},
             {"body": {"image": base64.b64encode(blobs[7]).decode()}}]
    results = call(h, ctx, rows)
    assert [s for s, _ in results] == [200] * 8
    served = [r["label"] for _, r in results]
    assert served == offline_labels(eager, tiny_meta, blobs)
    for _, r in results:
        probs = list(r["probabilities"].values())
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert r["model"] == {"name": "digits", "version": "1.0", "variant": "fp32"}


def test_bad_items_get_their_own_4xx_and_good_ones_still_answer(handler, tiny_splits, tiny_meta) -> None:
    h, ctx = handler
    good = encode_png(tiny_splits.test[0][0]).numpy().tobytes()
    bad = corpus(tiny_splits.test[0][0], tiny_meta["input_size"], h.options["max_bytes"])
    rows, expected = [], []
    for item in bad:
        body = item.body if isinstance(item.body, (dict, list)) else bytearray(item.body)
        if item.content_type == "text/plain":
            body = item.body.decode()
        rows += [{"body": body}, {"body": bytearray(good)}]
        expected += [(item.status, item.code), (200, None)]
    results = call(h, ctx, rows)
    for (status, body), (want_status, want_code), row in zip(results, expected, rows, strict=True):
        if want_code is None:
            assert status == 200 and body["label"] == tiny_meta["labels"][tiny_splits.test[0][1]]
        else:
            assert (status, body["error"]["code"]) == (want_status, want_code), (row if len(str(row)) < 200 else "")
            assert body["error"]["message"]


def test_tensor_input_and_kserve_bodies(handler, tiny_splits, tiny_meta) -> None:
    h, ctx = handler
    image, label = tiny_splits.test[1]
    tensor = Normalizer(tiny_meta["mean"], tiny_meta["std"])(image.unsqueeze(0))[0]
    png64 = base64.b64encode(encode_png(image).numpy().tobytes()).decode()
    rows = [
        {"body": {"data": tensor.tolist()}},
        {"body": {"instances": [{"data": png64}, {"b64": png64}]}},
        {"body": {"inputs": [{"name": "x", "shape": [1, *tensor.shape], "datatype": "FP32",
                              "data": tensor.flatten().tolist()}]}},
    ]
    results = call(h, ctx, rows)
    want = tiny_meta["labels"][label]
    assert [s for s, _ in results] == [200, 200, 200]
    assert results[0][1]["label"] == want
    assert [p["label"] for p in results[1][1]["predictions"]] == [want, want]
    v2 = results[2][1]
    assert v2["model_name"] == "digits" and json.loads(v2["outputs"][0]["data"][0])["label"] == want


def test_logits_on_request_and_describe(handler, tiny_splits, tiny_meta) -> None:
    h, ctx = handler
    png64 = base64.b64encode(encode_png(tiny_splits.test[2][0]).numpy().tobytes()).decode()
    results = call(h, ctx, [{"body": {"data": png64, "return_logits": True}}, {"body": b""}],
                   headers=[{}, {"describe": "True"}])
    assert len(results[0][1]["logits"]) == 10
    card = results[1][1]
    assert results[1][0] == 200
    assert card["architecture"] == "resnet18" and card["variant"] == "fp32" and card["version"] == "1.0"
    assert card["metrics"]["test"]["top1"] == tiny_meta["metrics"]["test"]["top1"]
    assert card["recipe"]["technique"] == "train" and card["labels"] == tiny_meta["labels"]
    assert card["input"]["shape"] == [3, tiny_meta["input_size"], tiny_meta["input_size"]]


def test_custom_metrics_are_emitted(handler, tiny_splits, caplog: pytest.LogCaptureFixture) -> None:
    h, ctx = handler
    good = bytearray(encode_png(tiny_splits.test[0][0]).numpy().tobytes())
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        call(h, ctx, [{"body": good}, {"body": b""}, {"body": good}])
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "ts.metrics.caching_metric")
    for metric in ("PreprocessMs", "InferenceMs", "PostprocessMs"):
        assert re.search(rf"\[METRICS\]{metric}\.\w+:[0-9.]+\|#ModelName:digits", text), text
    assert re.search(r"\[METRICS\]HandlerBatchSize\.\w+:2\|", text), text
    assert re.search(r"\[METRICS\]RejectedInputs\.\w+:1\|#ModelName:digits,Level:Model,Reason:empty_body", text), text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("options", [{}, {"gpu_decode": True, "amp": "bf16"}])
def test_gpu_worker_matches_cpu(model_dir: Path, handler, tiny_splits, options: dict) -> None:
    cpu, cpu_ctx = handler
    h = ImageClassifier()
    ctx = make_context(model_dir, gpu=0)
    ctx.model_yaml_config["handler"].update(options)
    h.initialize(ctx)
    assert h.device.type == "cuda" and h.gpu_decode == bool(options.get("gpu_decode"))
    images = [tiny_splits.test[i][0] for i in range(16)]
    rows = [{"body": bytearray(encode_jpeg(im, quality=90).numpy().tobytes())} for im in images]
    gpu_labels = [b["label"] for s, b in call(h, ctx, rows) if s == 200]
    cpu_labels = [b["label"] for s, b in call(cpu, cpu_ctx, rows) if s == 200]
    assert len(gpu_labels) == 16 and sum(a == b for a, b in zip(gpu_labels, cpu_labels, strict=True)) >= 15


def test_state_dict_and_exported_program_artifacts_serve_the_same_labels(model_dir: Path, tiny_model: Path,
                                                                         tiny_meta: dict, tiny_splits,
                                                                         tmp_path: Path) -> None:
    """The base loads TorchScript, a torch.export program (.pt2) or a state_dict + architecture."""
    rows = [{"body": bytearray(encode_png(tiny_splits.test[i][0]).numpy().tobytes())} for i in range(12)]
    eager = build_model(tiny_meta["architecture"], tiny_meta["num_classes"])
    eager.load_state_dict(load_state_dict(tiny_model / tiny_meta["checkpoint"]))
    eager.eval()
    example = torch.zeros(2, 3, tiny_meta["input_size"], tiny_meta["input_size"])
    program = torch.export.export(eager, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    labels = {}
    for fmt, artifact in (("torchscript", "model.pt"), ("state_dict", "model.pth"), ("export", "model.pt2")):
        variant_dir = tmp_path / fmt
        shutil.copytree(model_dir, variant_dir)
        if fmt == "state_dict":
            shutil.copy(tiny_model / "model.pth", variant_dir / "model.pth")
        if fmt == "export":
            torch.export.save(program, str(variant_dir / "model.pt2"))
        meta = json.loads((variant_dir / "metadata.json").read_text())
        meta.update(format=fmt, artifact=artifact)
        (variant_dir / "metadata.json").write_text(json.dumps(meta))
        h = ImageClassifier()
        ctx = make_context(variant_dir)
        h.initialize(ctx)
        labels[fmt] = [body["label"] for _, body in call(h, ctx, rows)]
    assert labels["torchscript"] == labels["state_dict"] == labels["export"]
    assert len(labels["export"]) == 12
