"""Security defaults, each with a test: tokens, loopback-only management, no registration from outside model_store,
no pickled code in checkpoints, checksummed archives, bounded request bodies.

    PYTHONPATH=. .venv/bin/python -m pytest tests/test_security.py
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import torch
from torchvision.io import encode_png

from deploy.pod import read_properties
from deploy.processes import free_port
from deploy.store import open_archive
from handlers.contract import KEY_FILE, ModelCard
from handlers.loading import load_state_dict
from handlers.runtimes import load_model
from harness.torchserve import TorchServe
from packager.manifest import read_manifest
from tests.conftest import ROOT, copy_store, serve

PROFILES = {"production": ROOT / "config.properties", "operator": ROOT / "deploy" / "operator.properties"}
OPERATOR = read_properties(PROFILES["operator"])


@pytest.fixture(scope="module")
def ts(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    """The operator profile (the one with the model API on, so the most exposed), exactly as shipped, plus digits."""
    store = copy_store(model_store, tmp_path_factory.mktemp("sec_store"), "digits.mar")
    keep = {"inference_address", "management_address", "metrics_address", "model_store", "metrics_config", "vmargs"}
    overrides = {k: v for k, v in OPERATOR.items() if k not in keep}
    with serve(store, tmp_path_factory.mktemp("ts_security"), [], overrides) as server:
        server.api.register("digits.mar")
        server.wait(["digits"])
        yield server


@pytest.fixture(scope="module")
def png(tiny_splits) -> bytes:
    return encode_png(tiny_splits.test[0][0]).numpy().tobytes()


def test_inference_and_management_refuse_requests_without_the_right_token(ts: TorchServe, png: bytes) -> None:
    keys = ts.api.keys
    calls = {"inference": ("POST", ts.url("inference", "/predictions/digits"), {"data": png}),
             "management": ("GET", ts.url("management", "/models/digits"), {})}
    for api, (method, url, kw) in calls.items():
        other = "management" if api == "inference" else "inference"
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Bearer {keys[other]}"}):
            r = requests.request(method, url, headers=headers, timeout=30, **kw)
            assert r.status_code in (400, 401) and "token" in r.text.lower(), (api, headers, r.status_code, r.text)
        r = requests.request(method, url, headers={"Authorization": f"Bearer {keys[api]}"}, timeout=30, **kw)
        assert r.status_code == 200, (api, r.text)  # the right key works: the refusals above are about the token
    for path in PROFILES.values():
        assert read_properties(path)["disable_token_authorization"] == "false", path


def non_loopback_addresses() -> list[str]:
    """This machine's own IPv4 addresses other than 127.x (from `hostname -I`); never another host's."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        out = []
    return [a for a in out if "." in a and not a.startswith("127.")]


def test_management_listens_only_on_loopback(ts: TorchServe) -> None:
    for name, path in PROFILES.items():
        props = read_properties(path)
        for key in ("management_address", "inference_address", "metrics_address"):
            assert urlparse(props[key]).hostname == "127.0.0.1", f"{name}: {key}={props[key]} must bind 127.0.0.1"
    addresses = non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address to try the management port on")
    ports = [ts.ports["management"], ts.ports["inference"], int(ts.props["grpc_management_port"])]
    for port in ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it is listening on loopback...
        for address in addresses:  # ...and on no other interface of this machine
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=3):
                pass


def test_registering_a_url_or_a_path_outside_model_store_is_refused(ts: TorchServe, tmp_path: Path) -> None:
    for path in PROFILES.values():
        assert read_properties(path).get("allowed_urls") == OPERATOR["allowed_urls"], f"{path}: allowed_urls"
    outside = tmp_path / "outside.mar"  # a valid archive, but not in the model store
    shutil.copy(ts.model_store / "digits.mar", outside)
    for url in (f"file://{outside}", "http://127.0.0.1:9/digits.mar", str(outside), "../outside.mar"):
        r = ts.api.manage("POST", "/models", params={"url": url, "model_name": "intruder", "synchronous": "true"})
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
        assert r.json()["message"], r.text
    assert ts.api.manage("GET", "/models").json()["models"] == [{"modelName": "digits", "modelUrl": "digits.mar"}]


class Payload:
    """Pickles to builtins.open(marker, "w"): loading it with plain pickle creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (self.marker, "w")


def test_a_checkpoint_carrying_a_pickled_object_is_refused_with_a_clear_message(tiny_card: ModelCard,
                                                                                tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refusing to load .*model\.pth.*carries pickled objects"):
        load_state_dict(path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_model(tmp_path, tiny_card.replace(runtime="eager", artifact="model.pth"))
    assert not marker.exists(), "the payload ran"
    torch.load(path, weights_only=False).get("extra").close()  # the unsafe loader does run it: the test is real
    assert marker.exists()


def test_deploy_refuses_an_archive_whose_sha256_does_not_match_the_manifest(model_store: Path,
                                                                            tmp_path: Path) -> None:
    store = copy_store(model_store, tmp_path / "store", "digits.mar")
    assert open_archive(store, "digits.mar").sha256 == read_manifest(store)["digits.mar"]["sha256"]  # untouched
    with open(store / "digits.mar", "ab") as f:
        f.write(b"\0")  # still a readable zip, but not the bytes build_mar.sh recorded
    key_file = tmp_path / KEY_FILE
    key_file.write_text(json.dumps({"management": {"key": "k"}, "inference": {"key": "k"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    result = subprocess.run([sys.executable, "-m", "deploy.deploy", "--management", f"http://127.0.0.1:{free_port()}",
                             "--token-file", str(key_file), "--store", str(store), "register", "digits.mar"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: checksum mismatch") and "rebuild it with build_mar.sh" in line, line


def test_bodies_above_max_request_size_are_refused_with_413(ts: TorchServe, png: bytes) -> None:
    limit = int(ts.props["max_request_size"])
    assert limit == int(read_properties(PROFILES["production"])["max_request_size"])
    r = ts.api.predict("digits", png + b"\0" * (limit - len(png) + 1))
    # The frontend (Netty) refuses before reading the body: status line only, no JSON body to parse.
    assert (r.status_code, r.reason) == (413, "Request Entity Too Large"), (r.status_code, r.reason, r.text[:300])
    r = ts.api.predict("digits", png)  # the frontend and the worker are still fine
    assert r.status_code == 200, r.text
