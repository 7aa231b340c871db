"""The cluster rehearsal in CI, bounded: three real replicas (deploy/pod.py: TorchServe + gateway) on their own
loopback addresses behind haproxy from Debian, under load from the production client.
(a) kill -9 one whole replica: nothing fails, it restarts and rejoins; (b) a rolling update to v2: nothing fails
and every answer afterwards comes from v2. Plus the balancer config, the shared token and the drain."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from deploy.balancer import haproxy_config
from deploy.processes import alive
from harness.cluster import Replica
from harness.rehearsal import canary_verdict, cluster, cpu_cost, replica_loss, rolling_update, summary
from harness.tools import debian_tool
from tests.conftest import ROOT, build_mar

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stores(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One store per version of `digits`, as each replica's volume would hold one."""
    root = tmp_path_factory.mktemp("cluster_stores")
    # One worker per replica: three replicas restart several times on two cores, and start-up is what it costs.
    config = root / "model-config.yaml"
    text = (ROOT / "handlers" / "model-config.yaml").read_text()
    config.write_text(text.replace("minWorkers: 2", "minWorkers: 1").replace("maxWorkers: 2", "maxWorkers: 1"))
    assert "maxWorkers: 1" in config.read_text()
    for version in ("1", "2"):
        build_mar(tiny_model, root / f"v{version}", "--version", f"{version}.0", "--config", str(config))
    return {"v1": root / "v1", "v2": root / "v2"}


def test_haproxy_accepts_the_config(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config("127.0.0.1:18080", {"r1": "127.0.0.2:8090", "r2": "127.0.0.3:8090"},
                                     tmp_path / "admin.sock"))
    result = subprocess.run([debian_tool("haproxy"), "-c", "-f", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "option httpchk GET /v2/health/ready" in config.read_text()


def test_replica_loss_and_rolling_update(stores: dict[str, Path], images: list[tuple[bytes, str]],
                                         tmp_path: Path) -> None:
    with cluster(tmp_path, [stores["v1"]] * 3, images[:60], drain_s=2.0) as c:
        loss = replica_loss(c, victim="r2", concurrency=4, before_s=3, restart_after_s=2, after_s=3)
        assert loss["processes_killed"] >= 4, loss  # supervisor, gateway, TorchServe's frontend and workers
        assert loss["all"]["requests"] > 50, loss["all"]
        assert loss["all"]["failed"] == 0, loss["all"]["errors"]
        assert loss["after"]["requests"] > 0 and c.balancer.status()["r2"] == "UP", c.balancer.status()
        assert loss["all"]["accuracy"] > 0.8, loss["all"]

        update = rolling_update(c, stores["v2"], concurrency=4, before_s=2, after_s=3)
        assert update["all"]["failed"] == 0, update["all"]["errors"]
        assert [s["exit_code"] for s in update["steps"]] == [0, 0, 0], update["steps"]  # drained, not killed
        assert set(update["during"]["versions"]) == {"1.0", "2.0"}, update["during"]
        assert set(update["after"]["versions"]) == {"2.0"}, update["after"]

        cost = cpu_cost(c, concurrency=4, window_s=3, settle_s=1)  # what benchmarks.capacity reads
        assert cost["window"]["failed"] == 0 and cost["window"]["requests"] > 10, cost["window"]
        parts = cost["cpu_ms_per_request"]
        assert all(parts.get(k, 0) > 0 for k in ("balancer", "gateway", "frontend", "workers")), parts


def test_one_token_for_every_replica_and_a_drain(stores: dict[str, Path], images: list[tuple[bytes, str]],
                                                 tmp_path: Path) -> None:
    """Each TorchServe has its own random keys; clients hold one token (the Secret) that every gateway checks.
    SIGTERM turns readiness off at once while requests are still answered, then the replica exits 0."""
    image, label = images[0]
    with cluster(tmp_path, [stores["v1"]] * 2, images[:10], drain_s=4.0) as c:
        keys = {(r.workdir / "key_file.json").read_text() for r in c.replicas}
        assert len(keys) == 2
        for r in c.replicas:
            url = f"http://{r.address}/predictions/digits"
            good = requests.post(url, data=image, headers={"Authorization": f"Bearer {c.token}"}, timeout=30)
            assert good.status_code == 200 and good.json()["label"] == label, good.text
            bad = requests.post(url, data=image, headers={"Authorization": "Bearer nope"}, timeout=30)
            assert bad.status_code == 401 and "token" in bad.json()["error"], bad.text
        r1 = c.replica("r1")
        assert r1.proc is not None
        tree = r1.processes()  # supervisor, gateway, TorchServe's frontend and workers
        assert len(tree) >= 4, tree
        r1.proc.send_signal(signal.SIGTERM)
        ready = requests.get(f"http://{r1.address}/v2/health/ready", timeout=5)
        deadline = time.monotonic() + 10  # the supervisor passes the signal on; on busy CI cores that takes a while
        while ready.status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
            ready = requests.get(f"http://{r1.address}/v2/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json() == {"ready": False, "draining": True}, ready.text
        served = requests.post(f"http://{r1.address}/predictions/digits", data=image,
                               headers={"Authorization": f"Bearer {c.token}"}, timeout=30)
        assert served.status_code == 200, served.text
        assert r1.proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10  # the last workers may still be exiting after the supervisor
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tree), alive(tree)


def test_replica_refuses_a_missing_token_file(stores: dict[str, Path], tmp_path: Path) -> None:
    r = Replica("r1", "127.0.0.2", stores["v1"], tmp_path, tmp_path / "no-such-token").start()
    assert r.proc is not None and r.proc.wait(timeout=30) != 0
    assert "mount the Secret" in (tmp_path / "r1" / "pod.log").read_text()


def test_canary_verdict_can_refuse() -> None:
    base = summary([], 1.0) | {"requests": 100, "accuracy": 0.99, "p99_ms": 50.0}
    assert canary_verdict(base, base | {"requests": 10}, 1.0, 1.5) == (True, [])
    promote, reasons = canary_verdict(base, base | {"requests": 10, "accuracy": 0.95, "failed": 1}, 1.0, 1.5)
    assert not promote and len(reasons) == 2, reasons
