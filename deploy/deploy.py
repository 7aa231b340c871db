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
    python -m deploy.deploy rollout digits-2.0.mar --watch a.png b.png   # ... with a small load; fails on any failure
    python -m deploy.deploy wait digits [--timeout 180]       # until each model has a READY worker [--all-workers]

Global options (before the command): --management URL, --inference URL (env TS_MANAGEMENT_URL,
TS_INFERENCE_URL), --token-file key_file.json (TorchServe writes it where it starts; env TS_TOKEN and
TS_INFERENCE_TOKEN override its keys), --store model_store, --state STORE/deploy_state.json.

TorchServe does not remember earlier defaults, so promotions, archives and canary results are kept in
the state file (default: deploy_state.json beside the archives in the model store).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deploy.canary import cmd_canary
from deploy.client import InferenceClient
from deploy.commands import (
    Context,
    cmd_list,
    cmd_promote,
    cmd_register,
    cmd_retire,
    cmd_rollback,
    cmd_rollout,
    cmd_scale,
    cmd_wait,
)
from deploy.management import DeployError, Management, read_token
from deploy.store import STATE_FILE, State
from deploy.watch import Watch
from handlers.contract import KEY_FILE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m deploy.deploy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--management", default=os.environ.get("TS_MANAGEMENT_URL", "http://127.0.0.1:8081"))
    ap.add_argument("--inference", default=os.environ.get("TS_INFERENCE_URL", "http://127.0.0.1:8080"))
    ap.add_argument("--token-file", type=Path, default=Path(KEY_FILE),
                    help=f"TorchServe's {KEY_FILE} (default: ./{KEY_FILE}); TS_TOKEN/TS_INFERENCE_TOKEN override")
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
    s = sub.add_parser("wait", help="wait until the management API answers and each model has a READY worker")
    s.add_argument("models", nargs="*")
    s.add_argument("--timeout", type=float, default=180)
    s.add_argument("--all-workers", action="store_true", help="wait until every worker is READY, not just one")
    s = sub.add_parser("rollout", help="register -> canary -> promote -> retire, stopping at the first failure")
    s.add_argument("archive")
    canary_opts(s)
    s.add_argument("--keep", type=int, default=1, help="versions to keep after the rollout (default 1)")
    s.add_argument("--grace", type=float, default=2.0)
    s.add_argument("--watch", nargs="+", type=Path, default=None, metavar="IMAGE",
                   help="send these images to the default version during the rollout; any failed request fails it")
    s.add_argument("--watch-rate", type=float, default=5.0, help="requests per second of the watch (default 5)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    mgmt = Management(args.management, read_token(args.token_file, "management", "TS_TOKEN"),
                      None if os.environ.get("TS_TOKEN") else args.token_file)
    needs_inference = args.cmd in ("canary", "rollout")
    token = read_token(args.token_file, "inference", "TS_INFERENCE_TOKEN") if needs_inference else None
    key_file = None if os.environ.get("TS_INFERENCE_TOKEN") else args.token_file
    ctx = Context(mgmt, args.inference, token, args.store, State(args.state or args.store / STATE_FILE),
                  args.progress, key_file)
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
    elif args.cmd == "wait":
        cmd_wait(ctx, args.models, args.timeout, args.all_workers)
    elif args.cmd == "rollout" and args.watch:
        images = [read_image(p) for p in args.watch]
        with InferenceClient(args.inference, token, key_file=key_file) as client:
            watch = Watch(client, images, args.watch_rate)
            try:
                with watch:
                    cmd_rollout(ctx, args.archive, args.budget, args.latency_factor, args.keep, args.grace,
                                args.limit)
            finally:
                print(watch.summary())
        if watch.failed:
            raise DeployError(f"{watch.failed} requests failed during the rollout; see the first failure above")
    elif args.cmd == "rollout":
        cmd_rollout(ctx, args.archive, args.budget, args.latency_factor, args.keep, args.grace, args.limit)


def read_image(path: Path) -> bytes:
    if not path.is_file():
        raise DeployError(f"--watch image {path} not found; pass image files the model accepts")
    return path.read_bytes()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except DeployError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
