"""Roll model versions in and out of a live TorchServe through its management API, safely.

Run against the operator profile (model API on, loopback only), from the repository root:

    torchserve --start --ts-config deploy/operator.properties
    python -m deploy.deploy list                              # models, versions, default marked *
    python -m deploy.deploy register digits-2.0.mar           # from model_store, checksum verified
    python -m deploy.deploy canary digits 2.0 [--budget 1.0] [--latency-factor 1.5]
    python -m deploy.deploy promote digits 2.0                # set-default; needs a passing canary
    python -m deploy.deploy rollback digits                   # back to the previous default
    python -m deploy.deploy retire digits [--keep 1]          # unregister all but the newest N (never the default)
    python -m deploy.deploy scale digits [--version 2.0] --workers 2
    python -m deploy.deploy rollout digits-2.0.mar            # register -> canary -> promote -> retire

Global options (before the command): --management URL, --inference URL (env TS_MANAGEMENT_URL,
TS_INFERENCE_URL), --token-file key_file.json (TorchServe writes it where it starts; env TS_TOKEN and
TS_INFERENCE_TOKEN override its keys), --store model_store, --state STORE/deploy_state.json.

TorchServe does not remember earlier defaults, so promotions, archives and canary results are kept in
the state file (default: deploy_state.json beside the archives in the model store).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from tqdm import tqdm

from deploy.client import InferenceClient, Prediction, PredictionError, server_message
from training import golden, metadata
from training.package import MANIFEST

ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "deploy_state.json"
START_HINT = "start the operator profile from the repo root: torchserve --start --ts-config deploy/operator.properties"


class DeployError(Exception):
    """A failure the user can act on; main() prints it as one line and exits 1."""


class NotFound(DeployError):
    pass


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """'1.10' sorts after '1.9'; non-numeric parts sort after numeric ones."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+_]", version))


# --- tokens and the management API --------------------------------------------------------------
def read_token(token_file: Path, api: str, env: str) -> str:
    if os.environ.get(env):
        return os.environ[env]
    hint = (f"TorchServe writes key_file.json in the directory it was started from; pass it with "
            f"--token-file PATH or set {env}")
    try:
        return json.loads(token_file.read_text())[api]["key"]
    except FileNotFoundError:
        raise DeployError(f"{api} token missing: {token_file} not found ({hint})") from None
    except (ValueError, KeyError, TypeError):
        raise DeployError(f"{api} token missing: {token_file} has no '{api}' key ({hint})") from None


class Management:
    def __init__(self, url: str, token: str, token_file: Path) -> None:
        self.url = url.rstrip("/")
        self.token_file = token_file
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, timeout: float = 60, **params: Any) -> Any:
        try:
            r = self.session.request(method, self.url + path, params=params or None, timeout=timeout)
        except requests.ConnectionError:
            raise DeployError(f"TorchServe is not running at {self.url} (connection refused); {START_HINT}, "
                              "or point --management at it") from None
        except requests.Timeout:
            raise DeployError(f"TorchServe at {self.url} did not answer {method} {path} in {timeout:.0f}s") from None
        if r.ok:
            try:
                return r.json()
            except ValueError:
                return r.text
        message, _ = server_message(r)
        if r.status_code == 401 or (r.status_code == 400 and "token" in message.lower()):
            raise DeployError(f"TorchServe refused the management token (HTTP {r.status_code}: {message}); use the "
                              f"'management' key of the key_file.json in the directory TorchServe was started from "
                              f"(--token-file, now {self.token_file}, or TS_TOKEN)")
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

    def version(self, model: str, version: str) -> dict[str, Any]:
        found = {str(v["modelVersion"]): v for v in self.versions(model)}
        if version not in found:
            raise NotFound(f"model {model!r} has no version {version!r} (registered: "
                           f"{', '.join(sorted(found, key=version_key))})")
        return found[version]


# --- archives and the state file ----------------------------------------------------------------
@dataclass
class Archive:
    path: Path
    model: str
    version: str
    config: dict[str, Any]
    sha256: str

    @property
    def file(self) -> str:
        return self.path.name

    def golden(self) -> dict[str, Any]:
        try:
            return golden.from_archive(self.path)
        except ValueError as e:  # an archive built before golden sets, or for a model without image data
            raise DeployError(f"no canary possible: {e}") from e


def open_archive(store: Path, name: str) -> Archive:
    """An archive in the model store, after checking its sha256 against the manifest written at build time."""
    given = Path(name)
    file = given.name if given.name.endswith(".mar") else given.name + ".mar"
    if given.parent != Path(".") and given.parent.resolve() != store.resolve():
        raise DeployError(f"{name} is outside the model store {store}; TorchServe loads archives from there only "
                          "(build into it with build_mar.sh --store, or pass --store)")
    path = store / file
    if not path.is_file():
        raise DeployError(f"archive {path} not found; build it with: ./build_mar.sh MODEL_DIR --version V "
                          f"--archive {file.removesuffix('.mar')} --store {store}")
    manifest_path = store / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if file not in manifest:
        raise DeployError(f"no checksum recorded for {file} in {manifest_path}; rebuild it with build_mar.sh, "
                          "which records one")
    digest = metadata.sha256(path)
    if digest != manifest[file]["sha256"]:
        raise DeployError(f"checksum mismatch for {path}: sha256 {digest[:16]}... but {manifest_path} recorded "
                          f"{manifest[file]['sha256'][:16]}... at build time; the archive changed since, do not "
                          "register it: rebuild it with build_mar.sh")
    try:
        with zipfile.ZipFile(path) as z:
            info = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            config_file = info.get("configFile")
            config = yaml.safe_load(z.read(config_file)) if config_file else {}
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise DeployError(f"{path} is not a readable .mar: {e}; rebuild it with build_mar.sh") from e
    return Archive(path, info["modelName"], str(info["modelVersion"]), config or {}, digest)


class State:
    """What TorchServe forgets: earlier defaults, which archive holds each version, canary results."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def model(self, name: str) -> dict[str, Any]:
        return self.data.setdefault(name, {"archives": {}, "defaults": [], "canary": {}})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


@dataclass
class Context:
    mgmt: Management
    inference_url: str
    inference_token: str | None
    store: Path
    state: State
    progress: bool

    def client(self, model: str) -> InferenceClient:
        return InferenceClient(self.inference_url, self.inference_token, model=model, timeout=(3.0, 60.0),
                               retries=3, backoff=0.2)


# --- commands -----------------------------------------------------------------------------------
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


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = 0.99 * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def measure(ctx: Context, model: str, versions: list[str], images: list[tuple[bytes, str]],
            warmup: int) -> dict[str, dict[str, Any]]:
    """Send every golden image to each version, interleaved, one request at a time (so latencies compare)."""
    results: dict[str, dict[str, Any]] = {v: {"correct": 0, "latency_ms": [], "errors": []} for v in versions}
    with ctx.client(model) as client:
        for v in versions:  # first calls pay one-off costs (connections, JIT profiling); keep them out of p99
            for data, _ in images[:warmup]:
                try:
                    client.predict(data, version=v)
                except PredictionError:
                    pass
        for data, label in tqdm(images, desc=f"canary {model}", disable=not ctx.progress, file=sys.stderr):
            for v in versions:
                try:
                    pred: Prediction = client.predict(data, version=v)
                except PredictionError as e:
                    results[v]["errors"].append(f"{type(e).__name__}: {e.message}")
                    continue
                if pred.version != v:
                    results[v]["errors"].append(f"asked for version {v}, answered by {pred.version}")
                    continue
                results[v]["correct"] += pred.label == label
                results[v]["latency_ms"].append(pred.latency_ms)
    for r in results.values():
        r["top1"] = r["correct"] / len(images)
        r["p99_ms"] = p99(r["latency_ms"])
    return results


def cmd_canary(ctx: Context, model: str, version: str, budget_pt: float, latency_factor: float,
               limit: int | None = None, warmup: int = 5) -> dict[str, Any]:
    """Golden set -> candidate and current default, side by side; raise DeployError with the figures if it fails."""
    info = ctx.mgmt.version(model, version)
    default = ctx.mgmt.default(model)
    arc = open_archive(ctx.store, Path(str(info.get("modelUrl", ""))).name)
    gold = arc.golden()
    images = golden.images(gold)[:limit]
    reference = default if default != version else None
    versions = [version] + ([reference] if reference else [])
    print(f"canary {model} {version}: {len(images)} golden images ({gold['source']}) against "
          + (f"default {reference}" if reference else "its build-time figures only (it is the default)"), flush=True)
    measured = measure(ctx, model, versions, images, warmup)
    cand = measured[version]
    build_pct, cand_pct = 100 * golden.build_top1(gold, limit), 100 * cand["top1"]
    checks: list[tuple[bool, str]] = []
    if cand["errors"]:
        checks.append((False, f"{len(cand['errors'])} of {len(images)} requests failed (first: {cand['errors'][0]})"))
    checks.append((cand_pct >= build_pct - budget_pt - 1e-9,
                   f"served top-1 {cand_pct:.2f}% vs build-time {build_pct:.2f}% (budget {budget_pt:.2f} pt)"))
    record: dict[str, Any] = {"time": now(), "sha256": arc.sha256, "n": len(images), "budget_pt": budget_pt,
                              "top1": cand["top1"], "p99_ms": round(cand["p99_ms"], 3),
                              "build_top1": build_pct / 100, "against": reference}
    if reference:
        ref = measured[reference]
        ref_pct = 100 * ref["top1"]
        checks.append((ref_pct - budget_pt - 1e-9 <= cand_pct,
                       f"served top-1 {cand_pct:.2f}% vs default {reference} {ref_pct:.2f}% on the same images "
                       f"(budget {budget_pt:.2f} pt)"))
        checks.append((cand["p99_ms"] <= latency_factor * ref["p99_ms"],
                       f"p99 {cand['p99_ms']:.1f} ms vs default {ref['p99_ms']:.1f} ms (limit {latency_factor:g}x = "
                       f"{latency_factor * ref['p99_ms']:.1f} ms)"))
        record.update(default_top1=ref["top1"], default_p99_ms=round(ref["p99_ms"], 3), latency_factor=latency_factor)
        card = ctx.mgmt.call("GET", f"/models/{model}/{reference}", customized="true")
        theirs = _fingerprint(card)
        if theirs and theirs != gold["fingerprint"]:
            print(f"warning: default {reference} was trained on different splits (fingerprint {theirs[:12]} != "
                  f"{gold['fingerprint'][:12]}); it may have seen these golden images in training", file=sys.stderr)
    for ok, text in checks:
        print(f"  {'pass' if ok else 'FAIL'}  {text}")
    passed = all(ok for ok, _ in checks)
    record["passed"] = passed
    ctx.state.model(model)["canary"][version] = record
    ctx.state.save()
    if not passed:
        failed = "; ".join(text for ok, text in checks if not ok)
        raise DeployError(f"canary FAILED for {model} {version}: {failed}. Rollout stopped; "
                          f"{default} stays the default")
    print(f"canary passed for {model} {version}")
    return record


def _fingerprint(card: Any) -> str | None:
    try:
        meta = card[0]["customizedMetadata"]
        meta = json.loads(meta) if isinstance(meta, str) else meta
        return meta["data"]["fingerprint"]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


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


# --- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deploy.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--management", default=os.environ.get("TS_MANAGEMENT_URL", "http://127.0.0.1:8081"))
    ap.add_argument("--inference", default=os.environ.get("TS_INFERENCE_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--token-file", type=Path, default=Path("key_file.json"),
                    help="TorchServe's key_file.json (default: ./key_file.json); TS_TOKEN/TS_INFERENCE_TOKEN override")
    ap.add_argument("--store", type=Path, default=Path("model_store"), help="the model store TorchServe loads from")
    ap.add_argument("--state", type=Path, default=None, help=f"state file (default: STORE/{STATE_FILE})")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="models and versions, default marked *")
    s.add_argument("model", nargs="?")
    s = sub.add_parser("register", help="register an archive from the model store as a new version")
    s.add_argument("archive", help="file name in the model store, e.g. digits-2.0.mar")
    s.add_argument("--workers", type=int, default=None, help="initial workers (default: minWorkers of the archive)")

    def canary_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--budget", type=float, default=1.0, help="allowed top-1 drop in points (default 1.0)")
        p.add_argument("--latency-factor", type=float, default=1.5,
                       help="allowed p99 as a multiple of the current default's p99 (default 1.5)")
        p.add_argument("--limit", type=int, default=None, help="use only the first N golden images")

    s = sub.add_parser("canary", help="golden set against the candidate and the current default")
    s.add_argument("model")
    s.add_argument("version")
    canary_opts(s)
    s = sub.add_parser("promote", help="make a version the default (needs a passing canary)")
    s.add_argument("model")
    s.add_argument("version")
    s.add_argument("--skip-canary", action="store_true", help="promote without a passing canary (emergencies)")
    s = sub.add_parser("rollback", help="set the default back to the previous one")
    s.add_argument("model")
    s = sub.add_parser("retire", help="unregister all but the newest N versions, never the default")
    s.add_argument("model")
    s.add_argument("--keep", type=int, default=1)
    s.add_argument("--version", default=None, help="retire exactly this (non-default) version")
    s.add_argument("--grace", type=float, default=2.0, help="seconds a version must be idle before it goes")
    s = sub.add_parser("scale", help="set the number of workers of a version (default: the default version)")
    s.add_argument("model")
    s.add_argument("--workers", type=int, required=True)
    s.add_argument("--version", default=None)
    s = sub.add_parser("rollout", help="register -> canary -> promote -> retire, stopping at the first failure")
    s.add_argument("archive")
    canary_opts(s)
    s.add_argument("--keep", type=int, default=1, help="versions to keep after the rollout (default 1)")
    s.add_argument("--grace", type=float, default=2.0)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    mgmt = Management(args.management, read_token(args.token_file, "management", "TS_TOKEN"), args.token_file)
    needs_inference = args.cmd in ("canary", "rollout")
    token = read_token(args.token_file, "inference", "TS_INFERENCE_TOKEN") if needs_inference else None
    ctx = Context(mgmt, args.inference, token, args.store, State(args.state or args.store / STATE_FILE),
                  args.progress)
    if args.cmd == "list":
        cmd_list(ctx, args.model)
    elif args.cmd == "register":
        cmd_register(ctx, args.archive, args.workers)
    elif args.cmd == "canary":
        cmd_canary(ctx, args.model, args.version, args.budget, args.latency_factor, args.limit)
    elif args.cmd == "promote":
        cmd_promote(ctx, args.model, args.version, args.skip_canary)
    elif args.cmd == "rollback":
        cmd_rollback(ctx, args.model)
    elif args.cmd == "retire":
        cmd_retire(ctx, args.model, args.keep, args.version, args.grace)
    elif args.cmd == "scale":
        cmd_scale(ctx, args.model, args.workers, args.version)
    elif args.cmd == "rollout":
        cmd_rollout(ctx, args.archive, args.budget, args.latency_factor, args.keep, args.grace, args.limit)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except DeployError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
