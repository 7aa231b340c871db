"""POST /explanations/{model} under the real TorchServe: Integrated Gradients (Captum) on the fp32 parent packed by
build_mar.sh --explain, also when an int8 variant serves the predictions; a clear 501 without Captum or without
the packed weights; the saliency falls on the digit's strokes rather than the black background.

Captum is not in the project's environment (tests/test_benchmarks.py checks it); the server that explains gets it
on its workers' PYTHONPATH from benchmarks/.captum, as a user would install it in theirs.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.tools import ensure_captum
from handlers.handler import ModelHandler
from harness.context import call, make_context, unpack_mar
from harness.torchserve import TorchServe
from tests.conftest import build_mar, copy_store, serve
from training.technique import add_options, build, variant_dir
from training.variants.int8 import INT8


@pytest.fixture(scope="module")
def store(tiny_model: Path, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.mar (no explainer) and digits_x.mar (the same fp32 model, --explain)."""
    out = copy_store(model_store, tmp_path_factory.mktemp("explain_store"), "digits.mar")
    build_mar(tiny_model, out, "--name", "digits_x", "--explain")
    return out


def int8_with_explainer(tiny_model: Path, store: Path, workdir: Path) -> str:
    """The tiny model's int8 variant, archived with --explain: predictions in int8, explanations on fp32."""
    parent = workdir / "parent"
    shutil.copytree(tiny_model, parent)
    parser = argparse.ArgumentParser()
    add_options(parser, [INT8])
    build(parent, INT8, parser.parse_args(["--calibration-images", "64", "--no-progress"]))
    build_mar(variant_dir(parent, "int8"), store, "--name", "digits_int8_x", "--explain", "--budget", "20")
    return "digits_int8_x"


def explain(ts: TorchServe, model: str, body: bytes, **headers: str) -> tuple[int, dict]:
    r = ts.api.session.post(ts.url("inference", f"/explanations/{model}"), data=body,
                            headers={**ts.api.auth("inference"), **headers}, timeout=120)
    return r.status_code, r.json()


def stroke_mask(png: bytes, side: int) -> torch.Tensor:
    """The digit's pixels (bright on black), pooled to the saliency grid."""
    grey = torch.tensor(list(Image.open(io.BytesIO(png)).convert("L").getdata()), dtype=torch.float32)
    size = Image.open(io.BytesIO(png)).size
    grey = grey.view(1, 1, size[1], size[0])
    pooled = torch.nn.functional.adaptive_avg_pool2d(grey, (side, side))[0, 0]
    return pooled > 0.25 * pooled.max()


def test_without_captum_or_without_weights_the_answer_is_501(store: Path, images, tmp_path: Path) -> None:
    """In process, where Captum is absent by design: each request gets its own answer, predictions go on."""
    png = images[0][0]
    for mar, code, hint in (("digits_x.mar", "explanations_unavailable", "pip install captum"),
                            ("digits.mar", "explanations_not_packed", "--explain")):
        model_dir = unpack_mar(store / mar, tmp_path / mar)
        handler, ctx = ModelHandler(), make_context(model_dir)
        handler.initialize(ctx)
        rows = [{"body": bytearray(png)}, {"body": bytearray(png)}]
        (status, body), (predicted, answer) = call(handler, ctx, rows, [{"explain": "True"}, {}])
        assert status == 501 and body["error"]["code"] == code and hint in body["error"]["message"], body
        ((alone, label),) = call(handler, ctx, [{"body": bytearray(png)}])
        assert predicted == alone == 200 and answer["label"] == label["label"], answer


@pytest.mark.server
@pytest.mark.slow
def test_saliency_falls_on_the_strokes_and_comes_from_the_float_parent(tiny_model: Path, store: Path, images,
                                                                       tmp_path: Path) -> None:
    model = int8_with_explainer(tiny_model, store, tmp_path)
    with serve(store, tmp_path / "ts", [model], env={"PYTHONPATH": str(ensure_captum())}) as ts:
        on_strokes, areas = [], []
        for png, _ in images[:8]:
            status, body = explain(ts, model, png)
            assert status == 200, body
            assert body["explained_with"] == {"variant": "fp32", "architecture": "resnet18"}, body  # the parent
            assert body["model"]["variant"] == "int8" and body["method"] == "integrated_gradients"
            grid = torch.tensor(body["saliency"])
            assert list(grid.shape) == body["shape"] and grid.shape[0] == grid.shape[1] <= 56
            assert grid.sum().item() == pytest.approx(1.0, abs=1e-3) and (grid >= 0).all()
            mask = stroke_mask(png, grid.shape[0])
            on_strokes.append(grid[mask].sum().item())
            areas.append(mask.float().mean().item())
        # More than chance: the strokes hold a larger share of the saliency than of the image, image by image.
        assert sum(s > a for s, a in zip(on_strokes, areas, strict=True)) >= 7, (on_strokes, areas)
        assert sum(on_strokes) > 1.5 * sum(areas), (on_strokes, areas)

        status, body = explain(ts, model, images[0][0], **{"X-Explain-PNG": "true"})
        assert status == 200 and Image.open(io.BytesIO(base64.b64decode(body["png"]))).format == "PNG"
        status, body = explain(ts, model, images[0][0][:200])
        assert status == 400 and body["error"]["code"] == "corrupt_image", body
