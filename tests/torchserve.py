"""Start and stop the real TorchServe (Java frontend + Python workers) on free loopback ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
WORKER_DEATH = re.compile(r"Backend worker process died|Worker disconnected|WORKER_STOPPED|Load model failed")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_alive(group: int) -> bool:
    """Any live (non-zombie) process in process group `group`."""
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == group and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class TorchServe:
    """One TorchServe instance in its own work directory, configured from the repo's config.properties."""

    def __init__(self, workdir: Path, model_store: Path, overrides: dict[str, str] | None = None,
                 snapshot: bool = False, env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.env = env or {}  # extra environment for the frontend and, through it, the workers
        self.model_store = Path(model_store)
        self.snapshot = snapshot
        self.ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
        props = read_properties(ROOT / "config.properties")
        props.update({
            "inference_address": f"http://127.0.0.1:{self.ports['inference']}",
            "management_address": f"http://127.0.0.1:{self.ports['management']}",
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            # gRPC (loopback by default) would take 7070/7071, and a second server failing to bind them stops itself.
            "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
            "model_store": str(self.model_store),
            "metrics_config": str(ROOT / "handlers" / "metrics.yaml"),
            # Worker sockets live in java.io.tmpdir as .ts.sock.<port>: private per instance.
            "vmargs": f"-Djava.io.tmpdir={self.workdir / 'tmp'}",
        })
        props.update(overrides or {})
        self.props = props
        self.proc: subprocess.Popen[bytes] | None = None
        self._keys = None
        self.session = requests.Session()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait_for: list[str] | None = None, timeout: float = 180) -> TorchServe:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        key_file = self.workdir / "key_file.json"
        key_file.unlink(missing_ok=True)
        # TorchServe's launcher keeps one pid file in TMPDIR and refuses to start a second server beside it:
        # a TMPDIR per work directory lets several test servers (and parallel test runs) coexist.
        (self.workdir / "tmp").mkdir(exist_ok=True)
        # TEMP becomes Java's tmpdir, where the worker sockets (.ts.sock.9000, ...) live: one set per server.
        tmp = str(self.workdir / "tmp")
        env = {**os.environ, "TMPDIR": tmp, "TEMP": tmp, "LOG_LOCATION": str(self.workdir / "logs"),
               "METRICS_LOCATION": str(self.workdir / "logs"), "PYTHONPATH": "", **self.env}
        config = "config.properties"
        snapshots = sorted((self.workdir / "logs" / "config").glob("*-snapshot.cfg"))
        if self.snapshot and snapshots:  # restore the last snapshot, as `torchserve --ts-config SNAPSHOT` does
            config = str(snapshots[-1])
        cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground",
               "--ts-config", config, "--model-store", str(self.model_store)]
        if not self.snapshot:
            cmd.append("--ncs")
        self.log = open(self.workdir / "stdout.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        self._keys: dict[str, str] | None = None
        while not self._read_keys():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"TorchServe wrote no key_file.json in {timeout}s\n{self.log_tail()}")
            time.sleep(0.2)
        for model in wait_for or []:
            self.wait_ready(model, deadline - time.monotonic())
        return self

    def stop(self) -> None:
        if self.proc is not None:
            group = self.proc.pid
            if self.proc.poll() is None:
                try:
                    os.killpg(group, signal.SIGTERM)
                    self.proc.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            # The launcher exits before Java and the workers: wait for the whole group, so that a restart on the
            # same work directory finds no server still running there.
            deadline = time.monotonic() + 30
            while group_alive(group) and time.monotonic() < deadline:
                time.sleep(0.2)
            if group_alive(group):
                os.killpg(group, signal.SIGKILL)
        self.proc = None
        self.session.close()

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with {self.proc.returncode}\n{self.log_tail()}")

    # --- auth and URLs ---------------------------------------------------------------------
    def _read_keys(self) -> bool:
        try:
            data = json.loads((self.workdir / "key_file.json").read_text())
            self._keys = {"inference": data["inference"]["key"], "management": data["management"]["key"]}
            return True
        except (OSError, ValueError, KeyError):
            return False

    def keys(self) -> dict[str, str]:
        if self._keys is None and not self._read_keys():
            raise RuntimeError(f"no readable key_file.json in {self.workdir}")
        assert self._keys is not None
        return self._keys

    def auth(self, api: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[api]}"}

    def url(self, api: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

    # --- calls -----------------------------------------------------------------------------
    def predict(self, model: str, body: bytes | str | dict[str, Any] | list[Any], version: str | None = None,
                content_type: str = "application/octet-stream", timeout: float = 60,
                **kwargs: Any) -> requests.Response:
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        headers = {**self.auth("inference"), **kwargs.pop("headers", {})}
        if isinstance(body, (dict, list)):
            # json.dumps, not requests' json=: the corpus sends NaN on purpose, which requests refuses to encode.
            body, content_type = json.dumps(body), "application/json"
        headers["Content-Type"] = content_type
        return self.session.post(self.url("inference", path), data=body, headers=headers, timeout=timeout,
                                 **kwargs)

    def manage(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url("management", path), headers=self.auth("management"),
                                    timeout=kwargs.pop("timeout", 60), **kwargs)

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        r = self.manage("GET", f"/models/{model}" + (f"/{version}" if version else ""))
        r.raise_for_status()
        return r.json()

    def wait_ready(self, model: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                r = self.manage("GET", f"/models/{model}", timeout=5)
                last = r.text
                if r.ok and any(w.get("status") == "READY" for m in r.json() for w in m.get("workers", [])):
                    return
            except requests.RequestException as e:
                last = str(e)
            time.sleep(0.3)
        raise TimeoutError(f"model {model} not READY in {timeout:.0f}s: {last[:300]}\n{self.log_tail()}")

    def worker_pids(self, model: str) -> list[int]:
        return sorted(int(w["pid"]) for m in self.describe(model) for w in m.get("workers", []) if w.get("pid"))

    def metrics(self) -> str:
        return self.session.get(self.url("metrics", "/metrics"), timeout=10).text

    # --- logs ------------------------------------------------------------------------------
    def logs(self, name: str = "ts_log.log") -> str:
        path = self.workdir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("ts_log.log", "model_log.log"):
            text = self.logs(name).splitlines()[-lines:]
            parts.append(f"--- tail of {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def worker_deaths(self) -> list[str]:
        return [line for line in self.logs().splitlines() if WORKER_DEATH.search(line)]
