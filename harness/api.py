"""One helper for TorchServe's inference, management and metrics APIs, with the server's tokens.

It returns the raw `requests.Response` (tests check statuses and bodies as the server sent them), except where a
call only makes sense when it succeeds (describe, register, scale), which raise with the server's answer.
"""

from __future__ import annotations

import json
from typing import Any

import requests


class ServerApi:
    def __init__(self, urls: dict[str, str], keys: dict[str, str]) -> None:
        self.urls = urls  # "inference" | "management" | "metrics" -> base URL
        self.keys = keys  # "inference" | "management" -> bearer token
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def url(self, api: str, path: str = "") -> str:
        return self.urls[api] + path

    def auth(self, api: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[api]}"}

    # --- inference -------------------------------------------------------------------------
    def predict(self, model: str, body: bytes | str | dict[str, Any] | list[Any], version: str | None = None,
                content_type: str = "application/octet-stream", timeout: float = 60, path: str | None = None,
                **kwargs: Any) -> requests.Response:
        """POST a body to /predictions/<model>[/<version>] (or to `path`, e.g. a KServe route)."""
        path = path or f"/predictions/{model}" + (f"/{version}" if version else "")
        headers = {**self.auth("inference"), **kwargs.pop("headers", {})}
        if isinstance(body, (dict, list)):
            # json.dumps, not requests' json=: the corpus sends NaN on purpose, which requests refuses to encode.
            body, content_type = json.dumps(body), "application/json"
        headers["Content-Type"] = content_type
        return self.session.post(self.url("inference", path), data=body, headers=headers, timeout=timeout, **kwargs)

    # --- management ------------------------------------------------------------------------
    def manage(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url("management", path), headers=self.auth("management"),
                                    timeout=kwargs.pop("timeout", 60), **kwargs)

    def describe(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        r = self.manage("GET", f"/models/{model}" + (f"/{version}" if version else ""))
        if not r.ok:
            raise RuntimeError(f"describing {model} {version or ''} failed ({r.status_code}): {r.text[:300]}")
        return r.json()

    def worker_pids(self, model: str) -> list[int]:
        return sorted(int(w["pid"]) for m in self.describe(model) for w in m.get("workers", []) if w.get("pid"))

    def register(self, archive: str, name: str | None = None, workers: int = 1, timeout: float = 300) -> None:
        """Load an archive from the model store and wait for its workers (needs enable_model_api=true).
        The archive's model-config.yaml (minWorkers) takes precedence over `workers`."""
        params = {"url": archive, "synchronous": "true", "initial_workers": str(workers),
                  **({"model_name": name} if name else {})}
        r = self.manage("POST", "/models", params=params, timeout=timeout)
        if not r.ok:
            raise RuntimeError(f"registering {archive} failed ({r.status_code}): {r.text[:300]}")

    def unregister(self, model: str, version: str | None = None) -> requests.Response:
        return self.manage("DELETE", f"/models/{model}" + (f"/{version}" if version else ""), timeout=120)

    def scale(self, model: str, workers: int, timeout: float = 180) -> None:
        r = self.manage("PUT", f"/models/{model}", params={"min_worker": workers, "max_worker": workers,
                                                           "synchronous": "true"}, timeout=timeout)
        if not r.ok:
            raise RuntimeError(f"scaling {model} to {workers} workers failed ({r.status_code}): {r.text[:300]}")

    # --- metrics ---------------------------------------------------------------------------
    def metrics(self) -> str:
        return self.session.get(self.url("metrics", "/metrics"), timeout=10).text
