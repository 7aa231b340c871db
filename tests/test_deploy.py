"""deploy/deploy.py, run as users run it (python -m deploy.deploy ...), against the real TorchServe (operator profile).

The tests share one server; each starts from an empty server and state file (the `fresh` fixture) and does what it
needs itself, so they pass in any order and one at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deploy.client import InferenceClient, PredictionError
from deploy.pod import read_properties
from deploy.processes import free_port
from deploy.store import STATE_FILE
from harness.torchserve import TorchServe
from packager import golden
from packager.manifest import read_manifest, write_manifest
from tests.conftest import ROOT, build_mar, serve, train_tiny
from training import export

pytestmark = [pytest.mark.server, pytest.mark.slow]
OPERATOR = read_properties(ROOT / "deploy" / "operator.properties")
CONFIG = yaml.safe_load((ROOT / "handlers" / "model-config.yaml").read_text())


@pytest.fixture(scope="module")
def store(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1.0 (the tiny model), v2.0 (retrained with another learning rate on the same splits), and a bad v2.0
    (one epoch at lr 1e-6: a genuinely untrained network, ~10% top-1), each in its own archive."""
    root = tmp_path_factory.mktemp("deploy")
    store = root / "model_store"
    build_mar(tiny_model, store, "--version", "1.0", "--archive", "digits-1.0")
    v2 = train_tiny(root / "v2", "--lr", "3e-3")
    export.export_dir(v2)
    build_mar(v2, store, "--version", "2.0", "--archive", "digits-2.0")
    bad = train_tiny(root / "bad", "--lr", "1e-6", "--epochs", "1")
    export.export_dir(bad)
    build_mar(bad, store, "--version", "2.0", "--archive", "digits-2.0-bad")
    return store


@pytest.fixture(scope="module")
def ts(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    overrides = {k: OPERATOR[k] for k in ("enable_model_api", "load_models", "disable_token_authorization")}
    # Retire and scale stop workers on purpose (WORKER_SCALED_DOWN); any other worker death still fails.
    with serve(store, tmp_path_factory.mktemp("ts_operator"), [], overrides, allow_worker_deaths=True) as server:
        yield server
        crashes = [line for line in server.worker_deaths() if "SCALED_DOWN" not in line]
        assert not crashes, f"a TorchServe worker died: {crashes[:3]}\n{server.log_tail()}"


@pytest.fixture(autouse=True)
def fresh(ts: TorchServe, store: Path) -> None:
    """Nothing registered and no state file: the default version goes last (TorchServe keeps it while others exist)."""
    registered = ts.api.manage("GET", "/models").json()["models"]
    if any(m["modelName"] == "digits" for m in registered):
        default = str(ts.api.describe("digits")[0]["modelVersion"])
        for v in sorted(versions(ts), key=lambda v: v == default):
            r = ts.api.unregister("digits", v)
            assert r.ok, r.text
    (store / STATE_FILE).unlink(missing_ok=True)


def deploy(ts: TorchServe, store: Path, *args: str, env: dict[str, str] | None = None,
           management: str | None = None, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "deploy.deploy", "--management", management or ts.url("management"),
           "--inference", ts.url("inference"), "--token-file", str(token_file or ts.workdir / "key_file.json"),
           "--store", str(store), "--no-progress", *args]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**clean, **(env or {})}, timeout=600)


def fails(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one-line error of a failed command, checked for each needle."""
    assert result.returncode == 1, f"expected failure, got {result.returncode}\n{result.stdout}\n{result.stderr}"
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    return line


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def versions(ts: TorchServe) -> list[str]:
    return sorted(str(v["modelVersion"]) for v in ts.api.describe("digits", "all"))


def default(ts: TorchServe) -> str:
    return str(ts.api.describe("digits")[0]["modelVersion"])


def copy_archive(store: Path, source: str, copy: str, tamper: bool = False) -> None:
    """A byte copy of an archive recorded in the manifest under its source's checksum; `tamper` flips a byte."""
    shutil.copy(store / source, store / copy)
    if tamper:
        with open(store / copy, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
    manifest = read_manifest(store)
    manifest[copy] = manifest[source]
    write_manifest(store, manifest)


def test_errors_are_one_line_and_actionable(ts: TorchServe, store: Path, tmp_path: Path) -> None:
    fails(deploy(ts, store, "list", management=f"http://127.0.0.1:{free_port()}"),
          "TorchServe is not running at", "torchserve --start --ts-config deploy/operator.properties")
    fails(deploy(ts, store, "list", token_file=tmp_path / "key_file.json"),
          "management token missing", "key_file.json not found", "--token-file")
    fails(deploy(ts, store, "list", env={"TS_TOKEN": "not-the-key"}),
          "refused the management token", "Token Authorization failed", "key_file.json")
    fails(deploy(ts, store, "list", "nope"), "model 'nope' is not registered")
    fails(deploy(ts, store, "register", "digits-7.0.mar"), "digits-7.0.mar not found", "build_mar.sh")
    fails(deploy(ts, store, "register", "/elsewhere/digits-1.0.mar"), "outside the model store")

    # An archive that changed after build_mar.sh recorded its checksum is refused before TorchServe sees it.
    shutil.copy(store / "digits-1.0.mar", store / "digits-1.0-unrecorded.mar")
    fails(deploy(ts, store, "register", "digits-1.0-unrecorded.mar"), "no checksum recorded")
    copy_archive(store, "digits-1.0.mar", "digits-1.0-tampered.mar", tamper=True)
    fails(deploy(ts, store, "register", "digits-1.0-tampered.mar"), "checksum mismatch", "rebuild it")
    fails(deploy(ts, store, "wait", "digits", "--timeout", "2"), "not ready after 2s", "a READY worker of digits")
    assert ts.api.manage("GET", "/models").json()["models"] == []


def test_register_is_idempotent_and_refuses_a_taken_version(ts: TorchServe, store: Path) -> None:
    out = ok(deploy(ts, store, "register", "digits-1.0.mar"))
    assert "sha256" in out and "verified" in out and "it is the default" in out
    assert "nothing to do" in ok(deploy(ts, store, "register", "digits-1.0"))
    n, batch, delay = CONFIG["minWorkers"], CONFIG["batchSize"], CONFIG["maxBatchDelay"]  # as packed by build_mar.sh
    assert re.search(rf"^digits\s+1\.0\s+\*\s+{n}/{n} ready\s+batch {batch}/{delay}ms\s+digits-1\.0\.mar$",
                     ok(deploy(ts, store, "list")), re.M)
    assert "ready: digits" in ok(deploy(ts, store, "wait", "digits", "--all-workers", "--timeout", "60"))
    # Same version, another archive file (a byte copy, so its checksum is honestly recorded).
    copy_archive(store, "digits-1.0.mar", "digits-1.0-copy.mar")
    fails(deploy(ts, store, "register", "digits-1.0-copy.mar"),
          "version 1.0 is already registered (from digits-1.0.mar)", "--version")
    fails(deploy(ts, store, "canary", "digits", "9.9"), "has no version '9.9'", "registered: 1.0")
    fails(deploy(ts, store, "promote", "nope", "1.0"), "model 'nope' is not registered")
    assert versions(ts) == ["1.0"]


def test_bad_v2_is_refused_at_canary(ts: TorchServe, store: Path) -> None:
    ok(deploy(ts, store, "register", "digits-1.0.mar"))
    result = deploy(ts, store, "rollout", "digits-2.0-bad.mar", "--limit", "60")
    line = fails(result, "canary FAILED for digits 2.0", "budget 1.00 pt", "1.0 stays the default")
    served, reference = map(float, re.search(r"served top-1 ([\d.]+)% vs default 1\.0 ([\d.]+)%", line).groups())
    assert served < 40 and reference > 85, line  # an untrained network against the trained v1.0
    assert default(ts) == "1.0" and versions(ts) == ["1.0"]  # the candidate it registered is gone again

    # Registered by hand, the refused version still cannot be promoted without a passing canary.
    ok(deploy(ts, store, "register", "digits-2.0-bad.mar"))
    fails(deploy(ts, store, "promote", "digits", "2.0"), "no passing canary")
    assert default(ts) == "1.0"
    ok(deploy(ts, store, "retire", "digits", "--version", "2.0", "--grace", "0.5"))
    assert versions(ts) == ["1.0"]


def test_a_watch_that_sees_failures_fails_the_rollout(ts: TorchServe, store: Path, tmp_path: Path) -> None:
    ok(deploy(ts, store, "register", "digits-1.0.mar"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature and nothing decodable
    result = deploy(ts, store, "rollout", "digits-2.0.mar", "--limit", "20", "--budget", "3", "--latency-factor",
                    "100", "--watch", str(broken))
    fails(result, "requests failed during the rollout")
    assert re.search(r"load during the change: (\d+) requests, \1 failed.*first failure: ClientError", result.stdout)
    fails(deploy(ts, store, "rollout", "digits-2.0.mar", "--watch", str(tmp_path / "missing.png")),
          "missing.png not found")


def test_rollout_under_traffic_drops_nothing(ts: TorchServe, store: Path) -> None:
    ok(deploy(ts, store, "register", "digits-1.0.mar"))
    images = [data for data, _ in golden.images(golden.from_archive(store / "digits-1.0.mar"))]
    stop = threading.Event()
    seen: list[str] = []
    errors: Counter[str] = Counter()

    def traffic(offset: int) -> None:
        # retries=0: every failure the server gives is counted, none is papered over.
        with InferenceClient(ts.url("inference"), ts.api.keys["inference"], retries=0, timeout=(3, 60)) as client:
            i = offset
            while not stop.is_set():
                try:
                    seen.append(client.predict(images[i % len(images)]).version)
                except PredictionError as e:
                    errors[f"{type(e).__name__} {e.status}: {e.message}"] += 1
                i += 1

    threads = [threading.Thread(target=traffic, args=(k * 50,)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        # Speed is not what this test checks: a p99 of 60 requests on shared CI cores is one slow request, so the
        # latency factor is wide (the latency check refusing is tested on its own). Two tiny trainings differ by a
        # point or two, hence the 3-point budget.
        out = ok(deploy(ts, store, "rollout", "digits-2.0.mar", "--limit", "60", "--budget", "3",
                        "--latency-factor", "100"))
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert "canary passed" in out and "promoted digits 2.0 to default (was 1.0)" in out and "retired digits 1.0" in out
    assert not errors, dict(errors)
    assert seen.count("1.0") > 0 and seen.count("2.0") > 0 and seen[-1] == "2.0"
    assert default(ts) == "2.0" and versions(ts) == ["2.0"]
    with InferenceClient(ts.url("inference"), ts.api.keys["inference"]) as client:
        assert client.predict(images[0]).version == "2.0"


def test_rollback_promote_scale_retire(ts: TorchServe, store: Path, tmp_path: Path) -> None:
    ok(deploy(ts, store, "register", "digits-1.0.mar"))
    images = []
    for i, (data, _) in enumerate(golden.images(golden.from_archive(store / "digits-1.0.mar"))[:3]):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(data)
    out = ok(deploy(ts, store, "rollout", "digits-2.0.mar", "--limit", "20", "--budget", "3", "--latency-factor",
                    "100", "--watch", *map(str, images), "--watch-rate", "10"))
    counts = re.search(r"load during the change: (\d+) requests, 0 failed; answered by version 1.0: (\d+), "
                       r"2.0: (\d+)", out)
    assert counts and int(counts[2]) > 0 and int(counts[3]) > 0, out
    assert default(ts) == "2.0" and versions(ts) == ["2.0"]
    out = ok(deploy(ts, store, "rollback", "digits"))
    assert "registering digits-1.0.mar again" in out and "rolled digits back to 1.0 (was 2.0)" in out
    assert default(ts) == "1.0" and versions(ts) == ["1.0", "2.0"]

    # An impossible latency limit shows the p99 check can refuse; then the canary stands failed.
    fails(deploy(ts, store, "canary", "digits", "2.0", "--limit", "20", "--budget", "3",
                 "--latency-factor", "0.01"), "p99", "limit 0.01x", "1.0 stays the default")
    fails(deploy(ts, store, "promote", "digits", "2.0"), "no passing canary")
    ok(deploy(ts, store, "canary", "digits", "2.0", "--limit", "20", "--budget", "3", "--latency-factor", "100"))
    assert "promoted digits 2.0" in ok(deploy(ts, store, "promote", "digits", "2.0"))
    assert "nothing to do" in ok(deploy(ts, store, "promote", "digits", "2.0"))
    assert default(ts) == "2.0"

    ok(deploy(ts, store, "scale", "digits", "--version", "1.0", "--workers", "0"))
    assert ts.api.describe("digits", "1.0")[0]["workers"] == []
    fails(deploy(ts, store, "retire", "digits", "--version", "2.0"), "is the default")
    assert "nothing to retire" in ok(deploy(ts, store, "retire", "digits", "--keep", "2"))
    assert "retired digits 1.0" in ok(deploy(ts, store, "retire", "digits", "--keep", "1", "--grace", "0.5"))
    assert "nothing to retire" in ok(deploy(ts, store, "retire", "digits"))
    assert versions(ts) == ["2.0"]
    state = json.loads((store / STATE_FILE).read_text())["digits"]
    assert [d["version"] for d in state["defaults"]] == ["1.0", "2.0", "1.0", "2.0"]
