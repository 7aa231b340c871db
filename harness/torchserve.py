"""Start and stop the real TorchServe (Java frontend + Python workers) on free loopback ports, privately.

Each instance gets its own work directory: config.properties (the repo's, with loopback and gRPC ports of its
own), TMPDIR and java.io.tmpdir (pid file and worker sockets), logs, and key_file.json.
So several instances, and parallel test runs, coexist on one machine.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from deploy.keys import KeyRenewer, expiration_min
from deploy.management import DeployError, Management
from deploy.pod import server_properties, torchserve_command, torchserve_env
from deploy.processes import free_ports, poll_until, stop_group
from handlers.contract import KEY_FILE, KeyFileError, read_key
from harness.api import ServerApi

ROOT = Path(__file__).resolve().parent.parent
WORKER_DEATH = re.compile(r"Backend worker process died|Worker disconnected|WORKER_STOPPED|Load model failed")


class TorchServe:
    """One TorchServe instance in its own work directory, configured from the repo's config.properties plus
    `overrides`. `api` talks to it once started."""

    def __init__(self, workdir: Path, model_store: Path, overrides: dict[str, str] | None = None,
                 snapshot: bool = False, env: dict[str, str] | None = None, builtin_logging: bool = False) -> None:
        self.workdir = Path(workdir)
        self.env = env or {}  # extra environment for the frontend and, through it, the workers
        self.model_store = Path(model_store)
        self.snapshot = snapshot
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        self.ports = {"inference": inference, "management": management, "metrics": metrics}
        internal = {"inference": inference, "management": management, "grpc_inference": grpc_inference,
                    "grpc_management": grpc_management}
        props = server_properties(internal, f"127.0.0.1:{metrics}", self.model_store, self.workdir / "tmp",
                                  builtin_logging=builtin_logging)
        props.update(overrides or {})
        self.props = props
        self.proc: subprocess.Popen[bytes] | None = None
        self._api: ServerApi | None = None
        self.renewer: KeyRenewer | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait_for: list[str] | None = None, timeout: float = 180) -> TorchServe:
        """Launch, then wait until the management API answers and every worker of each model in `wait_for` is READY."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        key_file = self.workdir / KEY_FILE
        key_file.unlink(missing_ok=True)
        # TorchServe's launcher keeps one pid file in TMPDIR and refuses to start a second server beside it;
        # TEMP becomes Java's tmpdir, where the worker sockets live.
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env = {**torchserve_env(self.workdir), **self.env}
        config = "config.properties"
        snapshots = sorted((self.workdir / "logs" / "config").glob("*-snapshot.cfg"))
        if self.snapshot and snapshots:  # restore the last snapshot, as `torchserve --ts-config SNAPSHOT` does
            config = str(snapshots[-1])
        cmd = torchserve_command(config, self.model_store, snapshot=self.snapshot)
        self._api = None
        with open(self.workdir / "stdout.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        keys = poll_until(self.written_keys, timeout, 0.2,
                          lambda: f"TorchServe wrote no {KEY_FILE} in {timeout:.0f}s\n{self.log_tail()}")
        self._api = ServerApi({api: self.url(api) for api in self.ports}, keys)
        # Keys expire (token_expiration_min) as in production: renewed as deploy.pod does, and handed to `api`.
        self.renewer = KeyRenewer(self.url("management"), key_file, expiration_min(self.props),
                                  on_renew=self._api.keys.update).start()
        self.wait(wait_for or [], deadline - time.monotonic())
        return self

    def wait(self, models: list[str], timeout: float = 180) -> None:
        """Until the management API answers and every worker of each model is READY (deploy's wait, which every
        caller shares), failing at once with the log tail if the server process exits. All workers, not one: a
        test that scales or kills workers must not catch one still loading."""
        mgmt = Management(self.url("management"), self.api.keys["management"], self.workdir / KEY_FILE)
        try:
            mgmt.wait(models, max(timeout, 1.0), alive=self.check_alive, every_worker=True)
        except DeployError as e:
            raise TimeoutError(f"{e}\n{self.log_tail()}") from None
        finally:
            mgmt.session.close()

    def written_keys(self) -> dict[str, str] | None:
        """Both keys from key_file.json; None until TorchServe has written them, RuntimeError if it has exited."""
        self.check_alive()
        try:
            return {api: read_key(self.workdir / KEY_FILE, api) for api in ("inference", "management")}
        except KeyFileError:
            return None

    def stop(self) -> None:
        if self.renewer is not None:
            self.renewer.stop()
            self.renewer = None
        if self.proc is not None:
            # The whole group, so that a restart on the same work directory finds no server still running there.
            stop_group(self.proc)
        self.proc = None
        if self._api is not None:
            self._api.close()
            self._api = None

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with {self.proc.returncode}\n{self.log_tail()}")

    @property
    def api(self) -> ServerApi:
        if self._api is None:
            raise RuntimeError(f"TorchServe in {self.workdir} is not started")
        return self._api

    def url(self, api: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

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
