"""The second handler on the shared base: a feature-vector model, packaged by build_mar.sh --handler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from handlers.contract import TORCHSCRIPT_FILE, EvalSummary, InputContract, Metrics, ModelCard, Recipe
from handlers.deprecations import known_deprecations
from handlers.handler import ModelHandler
from harness.context import call, make_context, unpack_mar
from tests.conftest import build_mar


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
        torch.jit.save(torch.jit.freeze(torch.jit.script(model)), str(out / TORCHSCRIPT_FILE))
    ModelCard(name="digits_mlp", version="1.0", architecture="mlp-64-64-10", labels=[str(i) for i in range(10)],
              input=InputContract(shape=[64]), variant="fp32", runtime="torchscript", artifact=TORCHSCRIPT_FILE,
              recipe=Recipe("train", {"epochs": 200}),
              metrics=Metrics(test=EvalSummary(n=len(y_te), top1=round(top1, 6)))).write(out)
    return out, x_te, y_te


def test_tensor_handler_serves_features_and_rejects_bad_tensors(mlp_dir, tmp_path: Path) -> None:
    model_dir, x_te, y_te = mlp_dir
    build_mar(model_dir, tmp_path / "store", "--handler", "handler")
    unpacked = unpack_mar(tmp_path / "store" / "digits_mlp.mar", tmp_path / "unpacked")
    handler = ModelHandler()
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
    described = handler._describe()
    assert described["serving"]["input_shape"] == [64] and described["card"]["architecture"] == "mlp-64-64-10"


def test_tensor_handler_regression_returns_values(mlp_dir, tmp_path: Path) -> None:
    model_dir, x_te, _ = mlp_dir
    reg_dir = tmp_path / "reg"
    reg_dir.mkdir()
    (reg_dir / TORCHSCRIPT_FILE).write_bytes((model_dir / TORCHSCRIPT_FILE).read_bytes())
    ModelCard.read(model_dir).replace(task="regression").write(reg_dir)
    handler = ModelHandler()
    ctx = make_context(reg_dir, name="reg", config={"handler": {}})
    handler.initialize(ctx)
    [(status, body)] = call(handler, ctx, [{"body": {"data": x_te[0].tolist()}}])
    assert status == 200 and "label" not in body
    with torch.inference_mode(), known_deprecations():
        expected = torch.jit.load(str(model_dir / TORCHSCRIPT_FILE))(torch.from_numpy(x_te[:1]))[0]
    assert body["values"] == pytest.approx(expected.tolist(), abs=1e-5)
