"""The deploy tool's commands: list, register, promote, rollback, retire, scale, rollout and wait.

The canary has its own module (deploy/canary.py)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.canary import cmd_canary
from deploy.client import InferenceClient
from deploy.management import DeployError, Management, NotFound, version_key
from deploy.store import Archive, State, now, open_archive


@dataclass
class Context:
    mgmt: Management
    inference_url: str
    inference_token: str | None
    store: Path
    state: State
    progress: bool
    key_file: Path | None = None  # where a renewed inference key is read again (None: the token came from TS_*)

    def client(self, model: str) -> InferenceClient:
        return InferenceClient(self.inference_url, self.inference_token, model=model, timeout=(3.0, 60.0),
                               retries=3, backoff=0.2, key_file=self.key_file)


def cmd_list(ctx: Context, model: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in [model] if model else ctx.mgmt.models():
        default = ctx.mgmt.default(name)
        for v in sorted(ctx.mgmt.versions(name), key=lambda v: version_key(str(v["modelVersion"]))):
            workers = v.get("workers", [])
            ready = sum(w.get("status") == "READY" for w in workers)
            rows.append({"model": name, "version": str(v["modelVersion"]), "default": str(v["modelVersion"]) == default,
                         "workers": f"{ready}/{len(workers)} ready", "batch": f"{v.get('batchSize')}/"
                         f"{v.get('maxBatchDelay')}ms", "archive": Path(str(v.get("modelUrl", ""))).name})
    if not rows:
        print("no models registered")
    for r in rows:
        print(f"{r['model']:<16} {r['version']:<10} {'*' if r['default'] else ' '} {r['workers']:<12} "
              f"batch {r['batch']:<10} {r['archive']}")
    return rows


def cmd_register(ctx: Context, name: str, workers: int | None = None) -> tuple[Archive, bool]:
    """(archive, True if registered now / False if this archive already serves that version)."""
    arc = open_archive(ctx.store, name)
    try:
        existing = {str(v["modelVersion"]): v for v in ctx.mgmt.versions(arc.model)}
    except NotFound:
        existing = {}
    if arc.version in existing:
        source = Path(str(existing[arc.version].get("modelUrl", ""))).name
        if source == arc.file:
            print(f"{arc.model} {arc.version} is already registered from {arc.file}; nothing to do")
            return arc, False
        raise DeployError(f"{arc.model} version {arc.version} is already registered (from {source}); a new archive "
                          "needs a new version: ./build_mar.sh MODEL_DIR --version NEW --archive NAME-NEW")
    n = workers if workers is not None else int(arc.config.get("minWorkers", 1))
    params: dict[str, Any] = {"url": arc.file, "initial_workers": n, "synchronous": "true"}
    for key, param in (("batchSize", "batch_size"), ("maxBatchDelay", "max_batch_delay")):
        if key in arc.config:
            params[param] = arc.config[key]
    print(f"registering {arc.file} as {arc.model} {arc.version} ({n} workers, batch {params.get('batch_size')}, "
          f"delay {params.get('max_batch_delay')} ms, sha256 {arc.sha256[:12]} verified)...", flush=True)
    ctx.mgmt.call("POST", "/models", timeout=600, **params)
    entry = ctx.state.model(arc.model)
    entry["archives"][arc.version] = {"file": arc.file, "sha256": arc.sha256, "registered": now()}
    if not existing:  # TorchServe makes a model's first version its default
        entry["defaults"].append({"version": arc.version, "previous": None, "time": now(), "how": "first"})
    ctx.state.save()
    print(f"registered {arc.model} {arc.version}" + (" (first version: it is the default)" if not existing else ""))
    return arc, True


def cmd_promote(ctx: Context, model: str, version: str, skip_canary: bool = False) -> bool:
    """Make `version` the default. Idempotent; needs a passing canary of this archive against the current default."""
    ctx.mgmt.version(model, version)
    current = ctx.mgmt.default(model)
    if current == version:
        print(f"{model} {version} is already the default; nothing to do")
        return False
    entry = ctx.state.model(model)
    canary = entry["canary"].get(version)
    archive = entry["archives"].get(version, {})
    if not skip_canary:
        if not canary or not canary.get("passed"):
            raise DeployError(f"{model} {version} has no passing canary in {ctx.state.path}; run: python -m "
                              f"deploy.deploy canary {model} {version} (or promote --skip-canary)")
        if canary.get("against") != current or (archive and canary.get("sha256") != archive.get("sha256")):
            raise DeployError(f"the canary of {model} {version} compared it with {canary.get('against')}, but the "
                              f"default is now {current}; run the canary again")
    ctx.mgmt.call("PUT", f"/models/{model}/{version}/set-default")
    entry["defaults"].append({"version": version, "previous": current, "time": now(),
                              "how": "promote" + (" --skip-canary" if skip_canary else "")})
    ctx.state.save()
    print(f"promoted {model} {version} to default (was {current})")
    return True


def cmd_rollback(ctx: Context, model: str) -> str:
    """Set the default back to the one before the current default, re-registering its archive if it was retired."""
    current = ctx.mgmt.default(model)
    entry = ctx.state.model(model)
    previous = next((d["previous"] for d in reversed(entry["defaults"]) if d["version"] == current), None)
    if not previous:
        raise DeployError(f"no earlier default of {model} is recorded in {ctx.state.path} (it records promotions made "
                          f"by this tool); choose one: python -m deploy.deploy promote {model} VERSION --skip-canary")
    registered = {str(v["modelVersion"]) for v in ctx.mgmt.versions(model)}
    if previous not in registered:
        archive = entry["archives"].get(previous)
        if not archive:
            raise DeployError(f"{model} {previous} was retired and its archive is not recorded; register it again")
        print(f"{model} {previous} was retired; registering {archive['file']} again")
        cmd_register(ctx, archive["file"])
    ctx.mgmt.call("PUT", f"/models/{model}/{previous}/set-default")
    entry["defaults"].append({"version": previous, "previous": current, "time": now(), "how": "rollback"})
    ctx.state.save()
    print(f"rolled {model} back to {previous} (was {current})")
    return previous


def drain(ctx: Context, model: str, version: str, grace_s: float, timeout_s: float = 120) -> None:
    """Wait until `version` has no queued requests and has stayed so for grace_s.

    Unregistering scales the version's workers to zero at once: a request still queued or inside a
    worker is answered with an error. After a promote nothing new is routed to the old version, so
    its queue only drains; the grace period covers the batch a worker has already taken.
    """
    deadline = time.monotonic() + timeout_s
    quiet_since: float | None = None
    while True:
        info = ctx.mgmt.version(model, version)
        pending = int((info.get("jobQueueStatus") or {}).get("pendingRequests", 0))
        if pending:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= grace_s:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"{model} {version} still has {pending} queued requests after {timeout_s:.0f}s; is a "
                              "client calling that version explicitly? Not unregistering it")
        time.sleep(0.1)


def cmd_retire(ctx: Context, model: str, keep: int = 1, version: str | None = None, grace_s: float = 2.0) -> list[str]:
    """Unregister every version but the newest `keep` (or just `version`); never the default."""
    default = ctx.mgmt.default(model)
    registered = sorted((str(v["modelVersion"]) for v in ctx.mgmt.versions(model)), key=version_key, reverse=True)
    if version is not None:
        ctx.mgmt.version(model, version)
        if version == default:
            raise DeployError(f"{model} {version} is the default; promote another version before retiring it")
        victims = [version]
    else:
        if keep < 1:
            raise DeployError("--keep must be at least 1")
        victims = [v for v in registered[keep:] if v != default]
    if not victims:
        print(f"nothing to retire: {model} serves {', '.join(registered)} (default {default}, keep {keep})")
        return []
    for v in victims:
        print(f"draining {model} {v}...", flush=True)
        drain(ctx, model, v, grace_s)
        ctx.mgmt.call("DELETE", f"/models/{model}/{v}", timeout=120)
        print(f"retired {model} {v}")
    return victims


def cmd_scale(ctx: Context, model: str, workers: int, version: str | None = None) -> None:
    if workers < 0:
        raise DeployError("--workers must be >= 0")
    version = version or ctx.mgmt.default(model)
    ctx.mgmt.version(model, version)
    ctx.mgmt.call("PUT", f"/models/{model}/{version}", timeout=600, min_worker=workers, max_worker=workers,
                  synchronous="true")
    print(f"{model} {version} scaled to {workers} workers")


def cmd_wait(ctx: Context, models: list[str], timeout: float, every_worker: bool = False) -> None:
    ctx.mgmt.wait(models, timeout, every_worker=every_worker)
    print(f"ready: {', '.join(models)}" if models else f"the management API at {ctx.mgmt.url} answers")


def cmd_rollout(ctx: Context, name: str, budget_pt: float, latency_factor: float, keep: int, grace_s: float,
                limit: int | None = None) -> None:
    """register (if needed) -> canary -> promote -> retire; stops at the first failure, default untouched."""
    arc, registered_now = cmd_register(ctx, name)
    default = ctx.mgmt.default(arc.model)
    if default == arc.version and registered_now:
        print(f"{arc.model} {arc.version} is the model's first version and already the default")
    try:
        cmd_canary(ctx, arc.model, arc.version, budget_pt, latency_factor, limit)
    except DeployError:
        if registered_now and default != arc.version:  # it never served default traffic: take it out again
            ctx.mgmt.call("DELETE", f"/models/{arc.model}/{arc.version}", timeout=120)
            print(f"unregistered the refused candidate {arc.model} {arc.version}", file=sys.stderr)
        raise
    cmd_promote(ctx, arc.model, arc.version)
    cmd_retire(ctx, arc.model, keep=keep, grace_s=grace_s)


