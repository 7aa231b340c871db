"""One serving replica, as a container runs it: TorchServe plus the OIP gateway in front, supervised together.

TorchServe's inference and management APIs stay on loopback inside the replica. The gateway is the only
door: OIP REST/gRPC and TorchServe's own `/predictions` routes, checked against one shared client token
(a Kubernetes Secret), since TorchServe makes fresh random keys at every start and replicas never share them.
Health routes (`/v2/health/live`, `/v2/health/ready`) need no token, for probes and balancers.
TorchServe's own keys expire (token_expiration_min): the pod renews them at half their lifetime (deploy/keys.py),
and the gateway re-reads key_file.json, so neither readiness nor a request lapses.

On SIGTERM (Kubernetes deleting the pod, a rolling update): the gateway answers ready=503 at once and keeps
serving for --drain-s seconds, so balancers stop sending before anything stops; then TorchServe stops. If
either process dies on its own, the other is stopped and the replica exits non-zero, so it is restarted whole.

    python -m deploy.pod --model-store model_store --client-token token.txt --http 0.0.0.0:8090
    deploy/container/entrypoint.sh       # the same, configured from the container's environment
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.keys import KeyRenewer, expiration_min
from deploy.processes import poll_until, stop_group, terminate
from handlers.contract import KEY_FILE, KeyFileError, read_key
from handlers.cores import OPENMP_ENV

ROOT = Path(__file__).resolve().parent.parent
LOG_CONFIG_OPTION = "-Dlog4j.configurationFile"
INTERNAL_PORTS = ("inference", "management", "grpc_inference", "grpc_management")


def read_properties(path: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def server_properties(ports: dict[str, int], metrics: str, model_store: Path, tmp: Path,
                      overrides: dict[str, str] | None = None, builtin_logging: bool = False) -> dict[str, str]:
    """The repo's production config.properties, moved onto these ports and directories (paths made absolute).
    `builtin_logging` drops its log config for TorchServe's own, as stock TorchServe runs."""
    props = read_properties(ROOT / "config.properties")
    props.update({
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://{metrics}",
        # gRPC would take 7070/7071 on every replica, and a server failing to bind them stops itself.
        "grpc_inference_port": str(ports["grpc_inference"]), "grpc_management_port": str(ports["grpc_management"]),
        "model_store": str(model_store),
        "metrics_config": str(ROOT / "handlers" / "metrics.yaml"),
        # Worker sockets (.ts.sock.9000, ...) live in java.io.tmpdir: private to this server.
        "vmargs": " ".join([f"-Djava.io.tmpdir={tmp}", *jvm_options(props.get("vmargs", ""), builtin_logging)]),
    })
    props.update(overrides or {})
    return props


def jvm_options(vmargs: str, builtin_logging: bool) -> list[str]:
    """config.properties' JVM options with the log config's path made absolute (or dropped)."""
    out = []
    for option in vmargs.split():
        key, _, path = option.partition("=")
        if key == LOG_CONFIG_OPTION:
            if builtin_logging:
                continue
            option = f"{key}={ROOT / path}"
        out.append(option)
    return out


def torchserve_env(home: Path) -> dict[str, str]:
    """TorchServe's launcher keeps its pid file in TMPDIR and refuses a second server beside it: one per home.
    The workers inherit it, so the OpenMP setting the lease needs goes here (the caller's own value wins)."""
    tmp = home / "tmp"
    return {**OPENMP_ENV, **os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(home / "logs"),
            "METRICS_LOCATION": str(home / "logs"), "PYTHONPATH": "",
            # TorchServe's base handler imports onnxruntime when installed, which writes telemetry under $HOME.
            "ORT_DISABLE_TELEMETRY": "1"}


def torchserve_command(config: str, model_store: Path, snapshot: bool = False) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ts-config", config,
           "--model-store", str(model_store)]
    return cmd if snapshot else [*cmd, "--ncs"]


def log(message: str) -> None:
    print(f"pod: {message}", flush=True)


class Pod:
    """TorchServe in `home` and the gateway in front of it; `run` supervises both until SIGTERM or a death."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.home: Path = args.home.resolve()
        self.ports = dict(zip(INTERNAL_PORTS, args.internal_ports, strict=True))
        self.torchserve: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.renewer: KeyRenewer | None = None
        self.stopping = False

    def start_torchserve(self) -> None:
        tmp = self.home / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        overrides = {} if self.args.token_expiration_min is None else {
            "token_expiration_min": str(self.args.token_expiration_min)}
        props = server_properties(self.ports, self.args.metrics, self.args.model_store.resolve(), tmp, overrides)
        (self.home / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / KEY_FILE).unlink(missing_ok=True)  # a stale file would hold the last start's keys
        cmd = torchserve_command("config.properties", self.args.model_store.resolve())
        self.torchserve = subprocess.Popen(cmd, cwd=self.home, env=torchserve_env(self.home), start_new_session=True)
        try:
            poll_until(self.keys_written, self.args.start_timeout, 0.2,
                       f"TorchServe wrote no {KEY_FILE} in {self.args.start_timeout:.0f} s")
        except TimeoutError as e:
            raise SystemExit(f"pod: {e}; see {self.home / 'logs' / 'ts_log.log'}") from None
        # TorchServe's keys expire (token_expiration_min); the gateway re-reads the file the renewer keeps fresh.
        self.renewer = KeyRenewer(props["management_address"], self.home / KEY_FILE, expiration_min(props), log=log)
        self.renewer.start()
        log(f"renewing TorchServe's keys every {self.renewer.interval:g} s")

    def keys_written(self) -> bool:
        """TorchServe has written its keys; exits the pod if TorchServe has exited instead."""
        assert self.torchserve is not None
        try:
            read_key(self.home / KEY_FILE, "inference")
            return True
        except KeyFileError:
            if self.torchserve.poll() is not None:
                raise SystemExit(f"pod: TorchServe exited with {self.torchserve.returncode} while starting; "
                                 f"see {self.home / 'logs' / 'ts_log.log'}") from None
            return False

    def start_gateway(self) -> None:
        cmd = [sys.executable, "-m", "deploy.oip_gateway",
               "--inference", f"http://127.0.0.1:{self.ports['inference']}",
               "--management", f"http://127.0.0.1:{self.ports['management']}",
               "--key-file", str(self.home / KEY_FILE), "--http", self.args.http, "--grpc", self.args.grpc,
               "--drain-s", str(self.args.drain_s)]
        if self.args.client_token is not None:
            cmd += ["--client-token", str(self.args.client_token)]
        self.gateway = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def stop(self, *_: object) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        """The gateway first (it drains), then TorchServe: nothing in flight meets a stopped server."""
        terminate(self.gateway, self.args.drain_s + 15)
        if self.renewer is not None:  # after the drain, which still needs live keys
            self.renewer.stop()
        if self.torchserve is not None:
            stop_group(self.torchserve)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        if self.args.client_token is not None and not self.args.client_token.is_file():
            raise SystemExit(f"pod: no client token at {self.args.client_token}: mount the Secret there "
                             "(see deploy/k8s/base), or pass --client-token FILE")
        log(f"TorchServe from {self.args.model_store} (internal ports {self.ports}), gateway on {self.args.http}")
        try:
            self.start_torchserve()
            self.start_gateway()
            assert self.torchserve is not None and self.gateway is not None
            while not self.stopping:
                for name, proc in (("TorchServe", self.torchserve), ("the gateway", self.gateway)):
                    if proc.poll() is not None:
                        log(f"{name} exited with {proc.returncode}; stopping the replica so it restarts whole")
                        return 1
                time.sleep(0.2)
            log(f"stopping: draining for {self.args.drain_s:g} s, then TorchServe")
            return 0
        finally:
            self.shutdown()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-store", type=Path, default=Path(env("MODEL_STORE", "model_store")),
                   help="directory of .mar archives, all loaded at start (env MODEL_STORE)")
    p.add_argument("--home", type=Path, default=Path(env("TS_HOME", "serve")),
                   help="TorchServe's working directory: config, key_file.json, logs, tmp (env TS_HOME)")
    p.add_argument("--client-token", type=Path, default=Path(env("CLIENT_TOKEN_FILE")) if env("CLIENT_TOKEN_FILE")
                   else None, help="file with the token clients send (env CLIENT_TOKEN_FILE); without it "
                                   "clients need this replica's own key_file.json")
    p.add_argument("--http", default=env("GATEWAY_HTTP", "127.0.0.1:8090"), help="gateway REST HOST:PORT")
    p.add_argument("--grpc", default=env("GATEWAY_GRPC", "127.0.0.1:8091"), help="gateway gRPC HOST:PORT")
    p.add_argument("--metrics", default=env("METRICS_ADDRESS", "127.0.0.1:8082"),
                   help="TorchServe's Prometheus metrics HOST:PORT (no token; env METRICS_ADDRESS)")
    p.add_argument("--internal-ports", type=lambda v: [int(x) for x in v.split(",")],
                   default=[int(x) for x in env("TS_INTERNAL_PORTS", "8080,8081,7070,7071").split(",")],
                   help="TorchServe's loopback inference,management,grpc_inference,grpc_management ports")
    p.add_argument("--drain-s", type=float, default=float(env("DRAIN_SECONDS", "10")),
                   help="on SIGTERM, seconds to keep serving while ready answers 503 (env DRAIN_SECONDS)")
    p.add_argument("--start-timeout", type=float, default=180, help="seconds TorchServe may take to start")
    p.add_argument("--token-expiration-min", type=float,
                   default=float(env("TOKEN_EXPIRATION_MIN")) if env("TOKEN_EXPIRATION_MIN") else None,
                   help="lifetime of TorchServe's keys in minutes (default: config.properties'); the pod renews "
                        "them at half of it (env TOKEN_EXPIRATION_MIN)")
    args = p.parse_args(argv)
    if len(args.internal_ports) != len(INTERNAL_PORTS):
        p.error(f"--internal-ports needs {len(INTERNAL_PORTS)} ports: {','.join(INTERNAL_PORTS)}")
    if not args.model_store.is_dir():
        p.error(f"model store {args.model_store} is not a directory: mount the archives there, or pass "
                "--model-store DIR (env MODEL_STORE)")
    return args


def main(argv: list[str] | None = None) -> int:
    return Pod(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
