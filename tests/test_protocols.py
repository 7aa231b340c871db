"""The standard protocols against the real TorchServe, spoken by third-party clients as they ship: tritonclient
(http with the binary-data extension, and grpc) and the kserve SDK (REST and gRPC), directly on TorchServe's
own routes and through the OIP gateway (deploy/oip_gateway.py)."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from torchvision.io import encode_png
from tritonclient.utils import InferenceServerException

from deploy.client import InferenceClient
from harness.encodings import encodings
from harness.gateway import Gateway
from harness.torchserve import TorchServe
from tests.conftest import ROOT, build_mar, copy_store, serve

pytestmark = pytest.mark.server
CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # a PNG signature, then garbage


@pytest.fixture(scope="module")
def store(model_store: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits.mar as built by default, and digits_batched.mar whose batches have time to form."""
    cfg = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())
    cfg.update(batchSize=8, maxBatchDelay=300)
    path = tmp_path_factory.mktemp("cfg") / "batched.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = copy_store(model_store, tmp_path_factory.mktemp("protocol_store"), "digits.mar")
    build_mar(tiny_model, store, "--name", "digits_batched", "--config", str(path), "--device", "cpu")
    return store


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with serve(store, tmp_path_factory.mktemp("ts"), ["digits", "digits_batched"]) as ts:
        yield ts


@pytest.fixture(scope="module")
def gateway(server: TorchServe) -> Iterator[Gateway]:
    with Gateway(server) as gw:
        yield gw


@pytest.fixture(scope="module")
def digits(tiny_splits) -> list[bytes]:
    """50 held-out digits as canonical 8-bit RGB PNGs."""
    return [encode_png(tiny_splits.test[i][0]).numpy().tobytes() for i in range(50)]


def auth(server: TorchServe, key: str | None = None) -> dict[str, str]:
    """A fresh dict each call: tritonclient.http adds its own entries to the headers dict it is given."""
    return {"authorization": f"Bearer {key or server.api.keys['inference']}"}


def bytes_input(module: Any, images: list[bytes], binary: bool = True) -> Any:
    inp = module.InferInput("image", [len(images)], "BYTES")
    if module is thttp:
        inp.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    else:
        inp.set_data_from_numpy(np.array(images, dtype=object))
    return inp


def tensor_input(module: Any, tensor: np.ndarray) -> Any:
    inp = module.InferInput("input", list(tensor.shape), "FP32")
    inp.set_data_from_numpy(tensor.astype(np.float32))
    return inp


def top(labels: np.ndarray, probs: np.ndarray) -> list[tuple[list[str], list[float]]]:
    """Rows of an OIP answer -> (labels, probabilities) per item."""
    decode = [[x.decode() if isinstance(x, bytes) else str(x) for x in row] for row in labels]
    return [(row, list(map(float, p))) for row, p in zip(decode, probs, strict=True)]


def raw_answer(body: dict[str, Any]) -> tuple[list[str], list[float]]:
    return list(body["probabilities"]), list(body["probabilities"].values())


def oip_json_answer(body: dict[str, Any]) -> tuple[list[str], list[float]]:
    outputs = {o["name"]: o for o in body["outputs"]}
    return outputs["labels"]["data"], outputs["probabilities"]["data"]


def normalized(tiny_card, tiny_splits, i: int) -> np.ndarray:
    from handlers.imaging import Normalizer

    return Normalizer(tiny_card.input.mean, tiny_card.input.std)(tiny_splits.test[i][0].unsqueeze(0)).numpy()


# --- the acceptance: five paths, 50 digits, one answer -----------------------------------------------
def test_fifty_digits_give_the_same_answer_on_every_path(server, gateway, digits) -> None:
    paths: dict[str, Callable[[bytes], tuple[list[str], list[float]]]] = {}
    paths["REST raw"] = lambda png: raw_answer(server.api.predict("digits", png).json())

    def oip_rest(png: bytes) -> tuple[list[str], list[float]]:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(png).decode()]}]}
        r = server.api.predict("digits", body, path="/v2/models/digits/infer")
        assert r.status_code == 200, r.text
        return oip_json_answer(r.json())
    paths["OIP REST (TorchServe)"] = oip_rest

    direct = thttp.InferenceServerClient(server.url("inference").removeprefix("http://"))
    paths["tritonclient.http binary (TorchServe)"] = lambda png: top(*(lambda r: (r.as_numpy("labels"), r.as_numpy(
        "probabilities")))(direct.infer("digits", [bytes_input(thttp, [png])], headers=auth(server))))[0]

    via_grpc = tgrpc.InferenceServerClient(gateway.grpc)
    paths["OIP gRPC tritonclient (gateway)"] = lambda png: top(*(lambda r: (r.as_numpy("labels"), r.as_numpy(
        "probabilities")))(via_grpc.infer("digits", [bytes_input(tgrpc, [png])], headers=auth(server))))[0]

    ts_grpc = InferenceClient(f"grpc://127.0.0.1:{server.props['grpc_inference_port']}", server.api.keys["inference"],
                              model="digits")
    paths["TorchServe gRPC, deploy.client"] = lambda png: raw_answer(ts_grpc.predict(png).raw)

    answers = {name: [call(png) for png in digits] for name, call in paths.items()}
    reference = answers.pop("REST raw")
    for name, got in answers.items():
        assert [a[0][0] for a in got] == [r[0][0] for r in reference], name
        assert [a[0] for a in got] == [r[0] for r in reference], name
        np.testing.assert_allclose([a[1] for a in got], [r[1] for r in reference], atol=1e-5, err_msg=name)


# --- each third-party client: live, ready, metadata, infer (bytes and tensor), auth --------------------
@pytest.mark.parametrize("module", [thttp, tgrpc], ids=["tritonclient.http", "tritonclient.grpc"])
def test_tritonclient_speaks_to_the_gateway(server, gateway, digits, tiny_card, tiny_splits, module) -> None:
    client = module.InferenceServerClient(gateway.rest if module is thttp else gateway.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1.0") and not client.is_model_ready("no_such_model")
    meta = client.get_model_metadata("digits", headers=auth(server), **({"as_json": True} if module is tgrpc else {}))
    assert meta["versions"] == ["1.0"] and meta["inputs"][0]["datatype"] == "BYTES"
    assert [o["name"] for o in meta["outputs"]] == ["labels", "probabilities", "logits"]

    want = raw_answer(server.api.predict("digits", digits[0]).json())
    result = client.infer("digits", [bytes_input(module, digits[:3])], headers=auth(server), model_version="1.0")
    assert result.as_numpy("labels").shape == (3, 5)
    assert top(result.as_numpy("labels"), result.as_numpy("probabilities"))[0][0] == want[0]

    tensor = normalized(tiny_card, tiny_splits, 0)
    outputs = [module.InferRequestedOutput(name) for name in ("labels", "logits")]
    result = client.infer("digits", [tensor_input(module, tensor)], outputs=outputs, headers=auth(server))
    labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("labels")[0]]
    assert labels == want[0] and result.as_numpy("logits").shape == (1, len(tiny_card.labels))
    assert result.as_numpy("probabilities") is None  # not asked for

    for headers in ({}, auth(server, key="wrong")):
        with pytest.raises(InferenceServerException, match="(?i)token|unauthenticated|401"):
            client.infer("digits", [bytes_input(module, digits[:1])], headers=headers)
        with pytest.raises(InferenceServerException, match="(?i)token|unauthenticated|401"):
            client.get_model_metadata("digits", headers=headers)


def test_kserve_sdk_speaks_rest_and_grpc_to_the_gateway(server, gateway, digits, tiny_card, tiny_splits,
                                                        tmp_path) -> None:
    """The kserve SDK's clients have no metadata call; metadata is covered by tritonclient above."""
    want = raw_answer(server.api.predict("digits", digits[0]).json())[0]
    (tmp_path / "digit.png").write_bytes(digits[0])
    np.save(tmp_path / "tensor.npy", normalized(tiny_card, tiny_splits, 0))
    run = subprocess.run([sys.executable, "-m", "tests.kserve_sdk_probe", gateway.rest, gateway.grpc,
                          server.api.keys["inference"], str(tmp_path / "digit.png"), str(tmp_path / "tensor.npy")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(got[f"{side}_{check}"] for side in ("rest", "grpc") for check in ("live", "ready", "model_ready"))
    assert [got[f"{side}_{kind}"] for side in ("rest", "grpc") for kind in ("bytes", "tensor")] == [want] * 4
    assert "401" in got["rest_no_token"] and got["grpc_no_token"] == "UNAUTHENTICATED"


# --- one bad item in a concurrent batch, in each protocol's own error form ---------------------------
def test_a_bad_item_fails_alone_in_every_protocol(server, gateway, digits) -> None:
    model = "digits_batched"
    pids = server.api.worker_pids(model)
    triton_http = thttp.InferenceServerClient(server.url("inference").removeprefix("http://"), concurrency=8)
    triton_grpc = tgrpc.InferenceServerClient(gateway.grpc)

    def raw(png: bytes) -> tuple[int, Any]:
        r = server.api.predict(model, png)
        return r.status_code, r.json()

    def oip_rest(png: bytes) -> tuple[int, Any]:
        body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                            "data": [base64.b64encode(png).decode()]}]}
        r = server.api.predict(model, body, path=f"/v2/models/{model}/infer")
        return r.status_code, r.json()

    def triton(client: Any, module: Any) -> Callable[[bytes], tuple[int, Any]]:
        def call(png: bytes) -> tuple[int, Any]:
            try:
                return 200, client.infer(model, [bytes_input(module, [png])], headers=auth(server))
            except InferenceServerException as e:
                return 400 if e.status() in ("400", "StatusCode.INVALID_ARGUMENT") else 500, e.message()
        return call

    protocols = {"raw": raw, "OIP REST": oip_rest, "tritonclient.http": triton(triton_http, thttp),
                 "tritonclient.grpc via gateway": triton(triton_grpc, tgrpc)}
    for name, call in protocols.items():
        batch = digits[:7] + [CORRUPT]
        with cf.ThreadPoolExecutor(len(batch)) as pool:
            results = list(pool.map(call, batch))
        assert [status for status, _ in results] == [200] * 7 + [400], (name, results[-1])
        error = results[-1][1]
        if name == "raw":
            assert error["error"]["code"] == "corrupt_image"
        elif name == "OIP REST":
            assert set(error) == {"error"} and error["error"].startswith("corrupt_image:")
        else:
            assert "corrupt_image" in error
    assert server.api.worker_pids(model) == pids


def test_client_mistakes_get_a_4xx_json_at_the_front_door_and_spare_their_batch(server, gateway, digits) -> None:
    """What curl users and hostile clients send, through the gateway (the pod's front door) while good requests
    share the batches; and, pinned down for the README, what bare TorchServe's frontend answers instead."""
    model = "digits_batched"
    limit = int(server.props["max_request_size"])
    key = server.api.keys["inference"]
    mistakes = {  # body, content type, the gateway's status
        "deep JSON": (b"[" * 300_000 + b"]" * 300_000, "application/json", 400),
        "raw bytes sent form-encoded": (digits[0] + b"%zz", "application/x-www-form-urlencoded", 415),
        "over max_request_size": (digits[0] + b"\0" * limit, "application/octet-stream", 413),
        "multipart without a field name": (b"--xx\r\n\r\n" + digits[0] + b"\r\n--xx--\r\n",
                                           "multipart/form-data; boundary=xx", 400),
    }

    def post(base: str, body: bytes, content_type: str) -> requests.Response:
        return requests.post(f"{base}/predictions/{model}", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})

    good = [(digits[i], "image/png") for i in range(12)]
    want = [server.api.predict(model, png).json()["label"] for png, _ in good]
    sent = [(body, ct) for body, ct, _ in mistakes.values()] + good
    with cf.ThreadPoolExecutor(len(sent)) as pool:
        answers = list(pool.map(lambda item: post(f"http://{gateway.rest}", *item), sent))
    for (name, (_, _, status)), r in zip(mistakes.items(), answers, strict=False):
        assert r.status_code == status and r.headers["Content-Type"].startswith("application/json"), (name, r.text)
        message = json.dumps(r.json())
        assert "send" in message, (name, message)  # says what to send instead
    assert [(r.status_code, r.json()["label"]) for r in answers[len(mistakes):]] == [(200, w) for w in want]

    bare = {name: post(server.url("inference"), body, ct) for name, (body, ct, _) in mistakes.items()}
    assert bare["deep JSON"].status_code == 400  # our handler's answer
    assert bare["raw bytes sent form-encoded"].status_code == 500
    assert "ErrorDataDecoderException" in bare["raw bytes sent form-encoded"].text
    assert bare["over max_request_size"].status_code == 413 and bare["over max_request_size"].content == b""
    assert bare["multipart without a field name"].status_code == 500


# --- what browsers and mail clients send ---------------------------------------------------------------
def test_data_uris_and_base64_line_breaks(server, digits) -> None:
    want = server.api.predict("digits", digits[1]).json()["label"]
    uri = "data:image/png;base64," + base64.b64encode(digits[1]).decode()
    mime = base64.encodebytes(digits[1]).decode()  # 76-character lines, as MIME writes them
    bodies = [uri.encode(), {"data": uri}, {"data": mime}, {"instances": [{"b64": mime}]},
              {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [uri, mime]}]}]
    for body in bodies:
        r = server.api.predict("digits", body)
        assert r.status_code == 200, (str(body)[:80], r.text)
        answer = r.json()
        labels = (answer["outputs"][0]["data"][::5] if "outputs" in answer else
                  [p["label"] for p in answer["predictions"]] if "predictions" in answer else [answer["label"]])
        assert set(labels) == {want}, str(body)[:80]
    bad = server.api.predict("digits", {"data": "data:image/png;base64,%%%"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_base64"


# --- what TorchServe 0.12 itself answers with the OIP switch on ---------------------------------------
@pytest.mark.slow
def test_torchserve_oip_switch_answers_health_but_not_stock_grpc_clients(store, tmp_path, digits) -> None:
    """Why the gateway exists: with ts_open_inference_protocol on, /v2/health/ready is a constant true,
    model readiness and metadata routes are 404, and the OIP gRPC service is in a package stock clients
    do not call."""
    with serve(copy_store(store, tmp_path / "store", "digits.mar"), tmp_path / "ts", ["digits"],
               {"ts_open_inference_protocol": "true"}) as ts:
        headers = auth(ts)
        assert requests.get(ts.url("inference", "/v2/health/ready"), headers=headers, timeout=10).json() == \
            {"ready": True}
        assert requests.get(ts.url("inference", "/v2/models/digits/ready"), headers=headers,
                            timeout=10).status_code == 404
        r = requests.post(ts.url("inference", "/v2/models/digits/infer"), headers=headers, timeout=30,
                          json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                            "data": [base64.b64encode(digits[0]).decode()]}]})
        assert r.status_code == 200 and r.json()["outputs"][0]["name"] == "labels"
        client = tgrpc.InferenceServerClient(f"127.0.0.1:{ts.props['grpc_inference_port']}")
        with pytest.raises(InferenceServerException, match="UNIMPLEMENTED"):
            client.is_server_live(headers=headers)


def test_real_world_encodings_serve_the_label_of_their_canonical_png(server, tiny_splits) -> None:
    """The encoding corpus (harness/encodings.py) through the real server: every encoding of a held-out digit
    gets the label its canonical 8-bit RGB PNG gets."""
    mismatches, total = [], 0
    for i in range(5):
        picture = tiny_splits.test[i][0].permute(1, 2, 0).numpy()
        for name, enc in encodings(picture).items():
            got, want = (server.api.predict("digits", blob) for blob in (enc.data, enc.reference))
            assert got.status_code == 200 and want.status_code == 200, (name, got.text[:200])
            total += 1
            if got.json()["label"] != want.json()["label"]:
                mismatches.append((i, name))
    assert total >= 5 * 15 and not mismatches, mismatches
