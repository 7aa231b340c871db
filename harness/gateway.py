"""Start and stop the OIP gateway (deploy/oip_gateway.py) in front of a harness TorchServe, on free loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys

from deploy.processes import free_ports, poll_until, terminate
from handlers.contract import KEY_FILE
from harness.torchserve import ROOT, TorchServe


class Gateway:
    def __init__(self, ts: TorchServe) -> None:
        self.ts = ts
        self.http_port, self.grpc_port = free_ports(2)
        self.log = ts.workdir / "oip_gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def rest(self) -> str:
        """host:port of the REST side, as tritonclient.http takes it."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 60) -> Gateway:
        cmd = [sys.executable, "-m", "deploy.oip_gateway", "--inference", self.ts.url("inference"),
               "--management", self.ts.url("management"), "--key-file", str(self.ts.workdir / KEY_FILE),
               "--http", self.rest, "--grpc", self.grpc]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            poll_until(lambda: "OIP gateway:" in self.log.read_text(errors="replace"), timeout, 0.1,
                       lambda: f"the OIP gateway did not start:\n{self.log.read_text(errors='replace')[-3000:]}",
                       self.proc)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        terminate(self.proc, 15)
        self.proc = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
