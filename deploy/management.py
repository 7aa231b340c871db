"""TorchServe's management API for the deploy tool: one client with errors a user can act on, and the wait for
readiness that every caller shares (the deploy CLI, quickstart.sh and the test and benchmark harness)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests

from deploy.client import server_message
from deploy.keys import fresh_key, is_refused_key
from handlers.contract import KeyFileError, read_key

START_HINT = "start the operator profile from the repo root: torchserve --start --ts-config deploy/operator.properties"


class DeployError(Exception):
    """A failure the user can act on; main() prints it as one line and exits 1."""


class NotFound(DeployError):
    pass


class Unreachable(DeployError):
    """Nothing answers at the management address (yet)."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """'1.10' sorts after '1.9'; non-numeric parts sort after numeric ones."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+_]", version))


def read_token(token_file: Path, api: str, env: str) -> str:
    """The key from the environment variable `env`, else from TorchServe's key file."""
    if os.environ.get(env):
        return os.environ[env]
    try:
        return read_key(token_file, api)
    except KeyFileError as e:
        raise DeployError(f"{api} token missing: {e} (pass it with --token-file PATH or set {env})") from None


def handler_description(described: Any) -> dict[str, Any] | None:
    """What the handler adds to a describe call with customized=true (the model card and how it serves);
    None for a handler that adds nothing. The frontend passes it on as a JSON string or as an object."""
    try:
        served = described[0]["customizedMetadata"]
        return json.loads(served) if isinstance(served, str) else dict(served)
    except (KeyError, IndexError, TypeError, ValueError):
        return None


class Management:
    def __init__(self, url: str, token: str, token_file: Path | None) -> None:
        """`token_file` None: the token was given by hand (TS_TOKEN) and is never swapped for the key file's."""
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.session = requests.Session()
        self.token = token
        self.session.headers["Authorization"] = f"Bearer {token}"

    def send(self, method: str, path: str, timeout: float, params: dict[str, Any]) -> requests.Response:
        try:
            return self.session.request(method, self.url + path, params=params or None, timeout=timeout)
        except requests.ConnectionError:
            raise Unreachable(f"TorchServe is not running at {self.url} (connection refused); {START_HINT}, "
                              "or point --management at it") from None
        except requests.Timeout:
            raise DeployError(f"TorchServe at {self.url} did not answer {method} {path} in {timeout:.0f}s") from None

    def call(self, method: str, path: str, timeout: float = 60, **params: Any) -> Any:
        r = self.send(method, path, timeout, params)
        if self.token_file is not None and is_refused_key(r.status_code, r.content):
            # Renewed since this token was read (TorchServe's keys expire): once more with the key file's new key.
            key = fresh_key(self.token_file, "management", self.token)
            if key is not None:
                self.token = key
                self.session.headers["Authorization"] = f"Bearer {key}"
                r = self.send(method, path, timeout, params)
        if r.ok:
            try:
                return r.json()
            except ValueError:
                return r.text
        message, _ = server_message(r)
        if r.status_code == 401 or (r.status_code == 400 and "token" in message.lower()):
            raise DeployError(f"TorchServe refused the management token (HTTP {r.status_code}: {message}); use the "
                              f"'management' key of the key_file.json in the directory TorchServe was started from "
                              f"(--token-file, or TS_TOKEN)")
        if r.status_code == 404:
            raise NotFound(message)
        if r.status_code == 405 and method == "POST" and path == "/models":
            raise DeployError(f"TorchServe refuses to register models ({message}): this is the production profile "
                              f"(enable_model_api=false); {START_HINT}")
        raise DeployError(f"{method} {path} failed: HTTP {r.status_code}: {message}")

    def models(self) -> list[str]:
        names: list[str] = []
        token: str | None = None
        while True:
            page = self.call("GET", "/models", limit=100, **({"next_page_token": token} if token else {}))
            names += [m["modelName"] for m in page.get("models", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def versions(self, model: str) -> list[dict[str, Any]]:
        try:
            return self.call("GET", f"/models/{model}/all")
        except NotFound:
            known = ", ".join(self.models()) or "none"
            raise NotFound(f"model {model!r} is not registered (registered models: {known}); "
                           "register an archive with: python -m deploy.deploy register ARCHIVE.mar") from None

    def default(self, model: str) -> str:
        try:
            return str(self.call("GET", f"/models/{model}")[0]["modelVersion"])
        except NotFound:
            self.versions(model)  # raises the helpful message
            raise

    def wait(self, models: Sequence[str] = (), timeout: float = 180, alive: Callable[[], None] | None = None,
             every_worker: bool = False) -> None:
        """Until the API answers and every model in `models` has a READY worker (with `every_worker`: all its workers
        are READY). `alive` is called while waiting (a launcher passes a check that its server process still runs);
        a refused token fails at once."""
        deadline = time.monotonic() + timeout
        waiting_for = "the management API"
        while True:
            if alive is not None:
                alive()
            try:
                registered = set(self.models())
                pending = [m for m in models if m not in registered or not self.ready(m, every_worker)]
                if not pending:
                    return
                waiting_for = f"{'every worker' if every_worker else 'a READY worker'} of {', '.join(pending)}"
            except Unreachable as e:
                waiting_for = str(e)
            if time.monotonic() > deadline:
                raise DeployError(f"TorchServe at {self.url} not ready after {timeout:.0f}s: waiting for "
                                  f"{waiting_for}; see logs/ts_log.log and logs/model_log.log")
            time.sleep(0.3)

    def ready(self, model: str, every_worker: bool = False) -> bool:
        """Some version of `model` has a READY worker (with `every_worker`: every worker of every version is)."""
        try:
            versions = self.call("GET", f"/models/{model}/all", timeout=10)
        except NotFound:
            return False
        states = [w.get("status") == "READY" for v in versions for w in v.get("workers", [])]
        return all(states) and bool(states) if every_worker else any(states)

    def version(self, model: str, version: str) -> dict[str, Any]:
        found = {str(v["modelVersion"]): v for v in self.versions(model)}
        if version not in found:
            raise NotFound(f"model {model!r} has no version {version!r} (registered: "
                           f"{', '.join(sorted(found, key=version_key))})")
        return found[version]


