"""TorchServe's keys expire (token_expiration_min): in compressed time, against the real server, the pod and the
quick start's server renew them, and deploy.client, the gateway (spoken to with tritonclient) and deploy.deploy
keep working through three expiries with no failed request and no drop in readiness."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import tritonclient.http as thttp

from deploy.client import AuthError, InferenceClient
from deploy.keys import KeyRenewer, RenewerRunning
from deploy.pod import server_properties, torchserve_env
from deploy.processes import free_port, free_ports
from handlers.contract import KEY_FILE, read_key
from harness.cluster import Replica
from tests.conftest import ROOT, copy_store

pytestmark = pytest.mark.slow
EXPIRY_MIN = 0.1  # 6 s: upstream's own token test uses fractions too
EXPIRIES = 3


class Keys:
    """Every distinct key the key file held while the load ran."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self.seen: list[str] = []

    def sample(self) -> None:
        key = read_key(self.key_file, "inference")
        if not self.seen or self.seen[-1] != key:
            self.seen.append(key)


def drive(seconds: float, loops: dict[str, Callable[[], bool]]) -> dict[str, dict[str, object]]:
    """Run each loop body over and over for `seconds`, each in its own thread; per loop: calls, failures."""
    stop = time.monotonic() + seconds
    results: dict[str, dict[str, object]] = {}

    def run(name: str, body: Callable[[], bool]) -> None:
        calls, failures = 0, []
        while time.monotonic() < stop:
            calls += 1
            try:
                if not body():
                    failures.append(f"call {calls}: answered wrong")
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                failures.append(f"call {calls}: {type(e).__name__}: {str(e)[:200]}")
            time.sleep(0.05)
        results[name] = {"calls": calls, "failures": failures}

    threads = [threading.Thread(target=run, args=item) for item in loops.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def deploy_cli(management: str, key_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.deploy", "--management", management,
                           "--token-file", str(key_file), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def assert_no_failures(results: dict[str, dict[str, object]]) -> None:
    for name, r in results.items():
        assert r["calls"] and not r["failures"], f"{name}: {r['failures'][:3]} of {r['calls']} calls"  # type: ignore[index]


def test_the_pod_renews_keys_through_three_expiries(model_store: Path, images, tmp_path: Path) -> None:
    image, label = images[0]
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    store = copy_store(model_store, tmp_path / "store", "digits.mar")
    replica = Replica("r1", "127.0.0.1", store, tmp_path, tmp_path / "token",
                      pod_args=["--token-expiration-min", str(EXPIRY_MIN)]).start()
    try:
        replica.wait_ready()
        key_file = replica.workdir / KEY_FILE
        first_key = read_key(key_file, "inference")
        keys = Keys(key_file)
        internal = f"http://127.0.0.1:{replica.internal['inference']}"
        # One tritonclient per thread: its gevent connection pool is not shared across threads.
        triton, probe = (thttp.InferenceServerClient(replica.address) for _ in range(2))
        direct = InferenceClient(internal, key_file=key_file, retries=0)

        def via_gateway() -> bool:
            inp = thttp.InferInput("image", [1], "BYTES")
            inp.set_data_from_numpy(np.array([image], dtype=object))
            answer = triton.infer("digits", [inp], headers={"authorization": f"Bearer {token}"})
            top = answer.as_numpy("labels")[0][0]
            return (top.decode() if isinstance(top, bytes) else str(top)) == label

        def ready() -> bool:
            keys.sample()
            return (requests.get(f"http://{replica.address}/v2/health/ready", timeout=5).status_code == 200
                    and probe.is_server_ready() and probe.is_model_ready("digits"))

        started = time.monotonic()
        results = drive(EXPIRY_MIN * 60 * EXPIRIES + 2, {
            "tritonclient through the gateway": via_gateway,
            "deploy.client on TorchServe": lambda: direct.predict(image).label == label,
            "readiness": ready,
        })
        assert time.monotonic() - started > EXPIRY_MIN * 60 * EXPIRIES
        assert_no_failures(results)
        # Renewed at half the lifetime: at least two new keys per expiry crossed.
        assert len(keys.seen) >= 2 * EXPIRIES, keys.seen
        listed = deploy_cli(f"http://127.0.0.1:{replica.internal['management']}", key_file, "list", "digits")
        assert listed.returncode == 0 and "digits" in listed.stdout, listed.stdout + listed.stderr
        # The first key is refused now: it is the renewal that kept everything answering.
        stale = requests.post(f"{internal}/predictions/digits", data=image,
                              headers={"Authorization": f"Bearer {first_key}"}, timeout=30)
        assert stale.status_code == 400 and "InvalidKeyException" in stale.text, stale.text
        # A wrong token is refused once, not retried forever.
        with InferenceClient(internal, "wrong", retries=0) as wrong, pytest.raises(AuthError):
            wrong.predict(image)
        direct.close()
    finally:
        replica.stop()


@pytest.fixture
def quickstart_server(model_store: Path, tmp_path: Path):
    """The quick start's server, started as it starts it (deploy/serve.sh: `torchserve --start` in the background
    plus the renewer) from a private directory, with the operator profile moved onto free ports."""
    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    store = copy_store(model_store, tmp_path / "store", "digits.mar")
    inference, management, grpc_i, grpc_m = free_ports(4)
    props = server_properties({"inference": inference, "management": management, "grpc_inference": grpc_i,
                               "grpc_management": grpc_m}, f"127.0.0.1:{free_port()}", store, home / "tmp",
                              {"enable_model_api": "true", "load_models": "",
                               "token_expiration_min": str(EXPIRY_MIN)})
    config = home / "operator.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    env = {**torchserve_env(home), "PYTHON": sys.executable}
    started = subprocess.run(["bash", str(ROOT / "deploy" / "serve.sh"), str(config)], cwd=home, env=env,
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    renewer = psutil.Process(int(started.stdout.split("renewer pid ")[1].split()[0]))
    urls = {"inference": props["inference_address"], "management": props["management_address"]}
    try:
        yield home, store, urls, renewer, config, env
    finally:
        subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], cwd=home, env=env,
                       capture_output=True, timeout=120)
        if renewer.is_running():
            renewer.send_signal(signal.SIGKILL)


def test_the_quick_start_server_renews_keys_through_three_expiries(quickstart_server, images) -> None:
    home, store, urls, renewer, config, env = quickstart_server
    image, label = images[0]
    key_file = home / KEY_FILE
    registered = deploy_cli(urls["management"], key_file, "--store", str(store), "--no-progress", "register",
                            "digits.mar")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    assert deploy_cli(urls["management"], key_file, "wait", "digits").returncode == 0
    keys = Keys(key_file)
    client = InferenceClient(urls["inference"], key_file=key_file, retries=0)

    def manage() -> bool:
        keys.sample()
        r = deploy_cli(urls["management"], key_file, "list", "digits")
        return r.returncode == 0 and "digits" in r.stdout

    results = drive(EXPIRY_MIN * 60 * EXPIRIES + 2, {
        "deploy.client": lambda: client.predict(image).label == label,
        "deploy.deploy list": manage,
    })
    client.close()
    assert_no_failures(results)
    assert len(keys.seen) >= 2 * EXPIRIES, keys.seen
    log = (home / "logs" / "key_renewal.log").read_text()
    assert "renewed both keys" in log, log

    # One renewer per server: a second one refuses to start.
    second = subprocess.run([sys.executable, "-m", "deploy.keys", "renew", "--config", str(config)], cwd=home,
                            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "one renewer per server" in second.stdout, second.stdout + second.stderr

    # Once the server stops, the renewer goes too.
    subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], cwd=home, env=env,
                   capture_output=True, timeout=120)
    renewer.wait(timeout=60)
    assert "has been gone" in (home / "logs" / "key_renewal.log").read_text()


def test_a_renewer_refuses_a_server_another_renews(tmp_path: Path) -> None:
    key_file = tmp_path / KEY_FILE
    with KeyRenewer("http://127.0.0.1:1", key_file, 60), pytest.raises(RenewerRunning):
        KeyRenewer("http://127.0.0.1:1", key_file, 60).start()
