"""TorchServe's keys expire: renew them while the server runs, and let callers pick up the new ones.

TorchServe 0.12 makes an inference and a management key at start, each valid for `token_expiration_min`
(60 by default). A new one comes only from `GET <management>/token?type=inference|management` with the API key
(which never expires, but changes at every start); it replaces the old key at once and is written only to
key_file.json. So one process per server renews both at half their lifetime, and every caller re-reads the key
file and retries once when TorchServe refuses a key it has just replaced.

    python -m deploy.keys renew --config deploy/operator.properties [--key-file key_file.json]

runs the renewer in the foreground beside a server started with `torchserve --start` (deploy/serve.sh does);
it exits once the server has been gone for --gone-after seconds. deploy.pod and the test harness run it in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import requests

from handlers.contract import KEY_FILE, KeyFileError, read_key

DEFAULT_EXPIRATION_MIN = 60.0  # TorchServe's own default for token_expiration_min
APIS = ("management", "inference")
REFUSED = b"InvalidKeyException"  # TorchServe's 400 for a wrong or expired key


class RenewerRunning(RuntimeError):
    """Another process already renews this server's keys."""


def expiration_min(props: dict[str, str]) -> float:
    """Key lifetime in minutes from a config.properties (TorchServe takes fractions)."""
    value = float(props.get("token_expiration_min", DEFAULT_EXPIRATION_MIN))
    if value <= 0:
        raise ValueError(f"token_expiration_min must be > 0 minutes, got {value:g}")
    return value


def is_refused_key(status: int, body: bytes) -> bool:
    """TorchServe's answer to a wrong, expired or just-replaced key."""
    return status == 400 and REFUSED in body


def fresh_key(key_file: Path, api: str, stale: str, wait: float = 2.0) -> str | None:
    """The key in `key_file` once it differs from `stale` (TorchServe swaps the key in memory a moment before it
    rewrites the file); None after `wait` seconds: then `stale` was not a replaced key but a wrong one."""
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(KeyFileError):
            key = read_key(key_file, api)
            if key != stale:
                return key
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


class KeyRenewer:
    """Renews both keys of the server at `management_url` every half lifetime, in a daemon thread. Holds an
    exclusive lock beside the key file while it runs, so that no second renewer works the same server."""

    def __init__(self, management_url: str, key_file: Path, expiration_minutes: float,
                 on_renew: Callable[[dict[str, str]], None] | None = None, log: Callable[[str], None] = print) -> None:
        self.url = management_url.rstrip("/")
        self.key_file = Path(key_file)
        self.interval = expiration_minutes * 60 / 2
        self.on_renew = on_renew
        self.log = log
        self.renewals = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock: IO[bytes] | None = None
        self._session = requests.Session()

    @property
    def lock_path(self) -> Path:
        return self.key_file.with_name(self.key_file.name + ".lock")

    def renew(self) -> dict[str, str]:
        """Replace both keys now; returns the new ones. Raises requests.RequestException or KeyFileError."""
        api_key = read_key(self.key_file, "API")
        for api in APIS:
            stale = read_key(self.key_file, api)
            r = self._session.get(f"{self.url}/token", params={"type": api},
                                  headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            r.raise_for_status()
            if fresh_key(self.key_file, api, stale) is None:
                raise KeyFileError(f"TorchServe answered {r.status_code} but wrote no new {api} key to {self.key_file}")
        keys = {api: read_key(self.key_file, api) for api in APIS}
        self.renewals += 1
        if self.on_renew is not None:
            self.on_renew(keys)
        return keys

    def start(self) -> KeyRenewer:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.lock_path, "ab")  # noqa: SIM115 - held open for the renewer's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RenewerRunning(f"another process renews the keys in {self.key_file} (it holds {self.lock_path}); "
                                 "one renewer per server") from None
        self._lock = lock
        self._thread = threading.Thread(target=self._run, name="key-renewer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            try:
                self.renew()
                wait = self.interval
            except (requests.RequestException, KeyFileError) as e:
                # Retry soon: a half lifetime leaves room for many tries before the keys lapse.
                self.failures += 1
                wait = min(5.0, self.interval / 4)
                self.log(f"key renewal failed ({type(e).__name__}: {str(e)[:200]}); retrying in {wait:g} s")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
        self._session.close()

    def __enter__(self) -> KeyRenewer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=2):
            return True
    except OSError:
        return False


def renew_main(args: argparse.Namespace) -> int:
    from deploy.pod import read_properties  # the config reader the pod uses; pod imports this module

    props = read_properties(args.config)
    url = props.get("management_address", "http://127.0.0.1:8081")
    minutes = expiration_min(props)

    def log(message: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} keys: {message}", flush=True)

    renewer = KeyRenewer(url, args.key_file, minutes, log=log,
                         on_renew=lambda _: log(f"renewed both keys in {args.key_file} (every {minutes * 30:g} s)"))
    try:
        renewer.start()
    except RenewerRunning as e:
        log(str(e))
        return 1
    log(f"renewing the keys of {url} every {renewer.interval:g} s (token_expiration_min={minutes:g})")
    gone_since: float | None = None
    try:
        while True:
            time.sleep(min(1.0, args.gone_after / 4))
            if reachable(url):
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since > args.gone_after:
                log(f"TorchServe at {url} has been gone for {args.gone_after:g} s; stopping")
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        renewer.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.keys", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("renew", help="renew a running server's keys until it stops")
    r.add_argument("--config", type=Path, required=True, help="the config.properties TorchServe was started with")
    r.add_argument("--key-file", type=Path, default=Path(KEY_FILE),
                   help=f"the {KEY_FILE} TorchServe writes where it starts (default: ./{KEY_FILE})")
    r.add_argument("--gone-after", type=float, default=10.0,
                   help="exit once the management API has refused connections this many seconds (default 10)")
    args = ap.parse_args(argv)
    if not args.config.is_file():
        ap.error(f"config {args.config} not found: pass the file given to torchserve --ts-config")
    return renew_main(args)


if __name__ == "__main__":
    sys.exit(main())
