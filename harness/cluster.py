"""A cluster on one machine, from real parts: replicas (deploy/pod.py: TorchServe + the gateway, as the container
runs them) on loopback addresses of their own, haproxy from Debian in front (deploy/balancer.py's config), and
load from the production client (deploy.client), retrying as its policy says."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from deploy.balancer import BACKEND, haproxy_config
from deploy.client import InferenceClient, PredictionError
from deploy.pod import INTERNAL_PORTS
from deploy.processes import alive, free_port, free_ports, kill, poll_until, process_tree, terminate
from harness.tools import debian_tool
from harness.torchserve import ROOT


class Replica:
    """One replica at 127.0.0.N: `python -m deploy.pod`, the command the container's entrypoint runs."""

    def __init__(self, name: str, host: str, store: Path, workdir: Path, token_file: Path, drain_s: float = 3.0,
                 cpus: Sequence[int] | None = None, pod_args: Sequence[str] = ()) -> None:
        self.name, self.host, self.store, self.token_file = name, host, store, token_file
        self.workdir = workdir / name
        self.drain_s = drain_s
        self.cpus = cpus  # a CPU limit, as a pod's cpuset would set it
        self.pod_args = list(pod_args)  # more of deploy.pod's options
        self.port = free_port(host)
        self.internal: dict[str, int] = {}  # TorchServe's own loopback ports, as deploy.pod names them
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, store: Path | None = None) -> Replica:
        """Start (or restart, as a kubelet would) on `store` (default: the last one); returns at once."""
        self.store = store or self.store
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.internal = dict(zip(INTERNAL_PORTS, free_ports(len(INTERNAL_PORTS)), strict=True))
        cmd = [sys.executable, "-m", "deploy.pod", "--model-store", str(self.store), "--home", str(self.workdir),
               "--client-token", str(self.token_file), "--http", self.address,
               "--grpc", f"{self.host}:{free_port(self.host)}", "--metrics", f"127.0.0.1:{free_port()}",
               "--internal-ports", ",".join(map(str, self.internal.values())), "--drain-s", str(self.drain_s),
               *self.pod_args]
        with open(self.workdir / "pod.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        return self

    def ready(self) -> bool:
        try:
            return requests.get(f"http://{self.address}/v2/health/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 240) -> float:
        """Seconds until the gateway says ready; fails with the log tail if the replica exits or times out."""
        started = time.monotonic()
        poll_until(self.ready, timeout, 0.2, lambda: f"replica {self.name} did not become ready:\n{self.log_tail()}",
                   proc=self.proc)
        return time.monotonic() - started

    def processes(self) -> list[psutil.Process]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def kill9(self) -> int:
        """SIGKILL the whole replica at once: supervisor, gateway, TorchServe's frontend and its workers."""
        victims = self.processes()
        kill(victims)
        if self.proc is not None:
            self.proc.wait()
        return len(victims)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM, as Kubernetes deleting the pod: drain, then stop; SIGKILL what is left after `timeout`."""
        if self.proc is None:
            return None
        tree = self.processes()  # taken now: once the supervisor is gone, its orphans are nobody's children
        terminate(self.proc, timeout)
        kill(alive(tree))
        code, self.proc = self.proc.returncode, None
        return code

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.workdir / "pod.log", self.workdir / "logs" / "ts_log.log"):
            if path.exists():
                parts.append(f"--- {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


class Balancer:
    """haproxy in front of the replicas; its admin socket sets weights and reports what it sees."""

    def __init__(self, workdir: Path, replicas: Sequence[Replica], weights: dict[str, int] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.socket = workdir / "haproxy.sock"
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(haproxy_config(f"127.0.0.1:{self.port}", {r.name: r.address for r in replicas},
                                              self.socket, weights))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        haproxy = debian_tool("haproxy")
        check = subprocess.run([haproxy, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused {self.config}:\n{check.stdout}{check.stderr}")
        with open(self.workdir / "haproxy.log", "ab") as log:
            self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        poll_until(self.socket.exists, 20, 0.1, proc=self.proc,
                   what=lambda: f"haproxy did not start: {(self.workdir / 'haproxy.log').read_text()[-2000:]}")
        return self

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            return b"".join(iter(lambda: s.recv(65536), b"")).decode()

    def status(self) -> dict[str, str]:
        """Each server's state as haproxy sees it (UP, DOWN, UP 1/2, ...)."""
        rows = self.command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        states = {}
        for row in rows[1:]:
            fields = dict(zip(header, row.split(","), strict=False))
            if fields.get("pxname") == BACKEND and fields.get("svname") not in ("BACKEND", "FRONTEND"):
                states[fields["svname"]] = fields["status"]
        return states

    def wait_state(self, name: str, state: str, timeout: float = 240) -> float:
        """Seconds until haproxy reports `name` in `state` (exactly: "UP", "DOWN")."""
        started = time.monotonic()
        poll_until(lambda: self.status().get(name) == state, timeout, 0.05,
                   lambda: f"haproxy never saw {name} {state}: {self.status()}")
        return time.monotonic() - started

    def set_weight(self, name: str, weight: int) -> None:
        answer = self.command(f"set weight {BACKEND}/{name} {weight}").strip()
        if answer:
            raise RuntimeError(f"haproxy refused the weight for {name}: {answer}")

    def stop(self) -> None:
        terminate(self.proc, 10)
        self.proc = None


@dataclass(frozen=True)
class Outcome:
    started: float  # seconds since the load started
    latency_ms: float
    ok: bool
    version: str  # the model version that answered ("" on failure)
    correct: bool
    attempts: int
    error: str = ""


class Load:
    """`concurrency` threads, each a closed loop of predictions through the balancer with the production client
    (its retries and backoff), over labelled images; every outcome is kept."""

    def __init__(self, url: str, token: str, images: Sequence[tuple[bytes, str]], concurrency: int,
                 model: str = "digits") -> None:
        self.client = InferenceClient(url, token, model=model, timeout=(3.0, 30.0), pool_size=concurrency)
        self.images = images
        self.concurrency = concurrency
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.t0 = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _loop(self, offset: int) -> None:
        for image, label in itertools.islice(itertools.cycle(self.images), offset, None):
            if self._stop.is_set():
                return
            started = self.now()
            try:
                p = self.client.predict(image)
                outcome = Outcome(started, p.latency_ms, True, p.version, p.label == label, p.attempts)
            except PredictionError as e:
                outcome = Outcome(started, (self.now() - started) * 1000, False, "", False, e.attempts,
                                  f"{type(e).__name__}: {e}"[:300])
            with self._lock:
                self.outcomes.append(outcome)

    def start(self) -> Load:
        self.t0 = time.monotonic()
        step = max(1, len(self.images) // self.concurrency)
        self._threads = [threading.Thread(target=self._loop, args=(i * step,), daemon=True)
                         for i in range(self.concurrency)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        self.client.close()
        return self.window(0, float("inf"))

    def window(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.started < end]
