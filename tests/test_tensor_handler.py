"""The second handler on the shared base: a feature-vector model, packaged by build_mar.sh --handler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from handlers.deprecations import known_deprecations
from handlers.tensor_classifier import TensorClassifier
from tests.conftest import build_mar
from tests.handler_context import call, make_context, unpack_mar
from training import metadata


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 64-feature MLP on the digits' raw 8x8 intensities, with honest held-out metrics."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.15, stratify=digits.target, random_state=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    top1 = float((model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    out = tmp_path_factory.mktemp("mlp")
    with known_deprecations():
        torch.jit.save(torch.jit.freeze(torch.jit.script(model)), str(out / "model.pt"))
    metadata.write(out, {
        "name": "digits_mlp", "version": "1.0", "architecture": "mlp-64-64-10", "num_classes": 10,
        "input_shape": [64], "labels": [str(i) for i in range(10)], "variant": "fp32",
        "recipe": {"technique": "train", "args": {"epochs": 200}}, "format": "torchscript",
        "artifact": "model.pt", "cpu_only": False, "parent": None,
        "metrics": {"test": {"n": len(y_te), "top1": round(top1, 6)}},
    })
    return out, x_te, y_te


def test_tensor_handler_serves_features_and_rejects_bad_tensors(mlp_dir, tmp_path: Path) -> None:
    model_dir, x_te, y_te = mlp_dir
    build_mar(model_dir, tmp_path / "store", "--handler", "tensor_classifier")
    unpacked = unpack_mar(tmp_path / "store" / "digits_mlp.mar", tmp_path / "unpacked")
    handler = TensorClassifier()
    ctx = make_context(unpacked)
    handler.initialize(ctx)
    rows = [{"body": {"data": x_te[i].tolist()}} for i in range(20)]
    rows += [{"body": {"data": [0.0] * 63}}, {"body": {"data": [float("inf")] * 64}}, {"body": bytearray(b"\x89PNG")},
             {"body": {"data": [["a"] * 64]}}]
    results = call(handler, ctx, rows)
    served = [int(body["label"]) for _, body in results[:20]]
    assert [s for s, _ in results[:20]] == [200] * 20
    assert np.mean(np.array(served) == y_te[:20]) >= 0.85
    assert [(s, b["error"]["code"]) for s, b in results[20:]] == [
        (422, "wrong_shape"), (422, "non_finite"), (415, "unsupported_format"), (422, "wrong_dtype")]
    card = handler.describe()
    assert card["input"]["shape"] == [64] and card["architecture"] == "mlp-64-64-10"


def test_tensor_handler_regression_returns_values(mlp_dir, tmp_path: Path) -> None:
    model_dir, x_te, _ = mlp_dir
    meta = metadata.read(model_dir)
    meta["task"] = "regression"
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    (reg_dir / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    metadata.write(reg_dir, meta)
    (reg_dir / "MAR-INF").mkdir()
    (reg_dir / "MAR-INF" / "MANIFEST.json").write_text('{"model": {"modelName": "reg", "modelVersion": "1.0"}}')
    (reg_dir / "model-config.yaml").write_text("handler: {}\n")
    handler = TensorClassifier()
    ctx = make_context(reg_dir)
    handler.initialize(ctx)
    [(status, body)] = call(handler, ctx, [{"body": {"data": x_te[0].tolist()}}])
    assert status == 200 and len(body["values"]) == 10 and "label" not in body
