"""What build_mar.sh needs from Python: stage an archive's inputs, and record its checksum in the store's manifest.

    python -m training.package stage MODEL_DIR STAGE_DIR [--config yaml] [--device auto|cpu|gpu]
    python -m training.package config MODEL_DIR      # the model-config.yaml a build of MODEL_DIR would pack
    python -m training.package record model_store/digits.mar MODEL_DIR
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from handlers import machine
from handlers.contract import MANIFEST_FILE, Explainer, ModelCard, sha256
from training import golden

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "handlers" / "model-config.yaml"
TUNED_FILE = "tuned-config.yaml"  # in a model or variant directory: benchmarks.tune --for-variant's choice for it
TUNED_KEYS = {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "handler"}
TUNED_HANDLER_KEYS = {"threads"}


def read_manifest(store: Path) -> dict[str, dict[str, Any]]:
    """archive file name -> what build_mar.sh recorded for it (sha256, model, version, variant, ...)."""
    path = Path(store) / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rebuild the archives with build_mar.sh") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} is not a manifest (a JSON object of archives); rebuild it with build_mar.sh")
    return manifest


@contextlib.contextmanager
def manifest_lock(store: Path) -> Iterator[None]:
    """One read-modify-write of the store's manifest at a time: build_mar.sh may run in parallel into one store."""
    with open(Path(store) / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a killed builder's process ends
        yield


def write_manifest(store: Path, manifest: dict[str, dict[str, Any]]) -> Path:
    path = Path(store) / MANIFEST_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


PICK_FILE = "optimization/pick.json"  # under the parent model directory, written by training.optimize --pick
PICK_KINDS = ("latency", "throughput", "lossless")


def write_pick(parent_dir: Path, picked: dict[str, Any]) -> Path:
    path = Path(parent_dir) / PICK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(picked, indent=2) + "\n")
    return path


def read_pick(parent_dir: Path, kind: str) -> Path:
    """The variant directory training.optimize --pick chose as `kind` for this parent."""
    path = Path(parent_dir) / PICK_FILE
    if kind not in PICK_KINDS:
        raise ValueError(f"unknown pick {kind!r}; choose one of {', '.join(PICK_KINDS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; time and pick the variants on this machine first: "
                                f"python -m training.optimize {parent_dir} --pick")
    try:
        choice = json.loads(path.read_text())["choice"][kind]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} has no readable '{kind}' pick ({e}); re-run python -m training.optimize "
                         f"{parent_dir} --pick") from e
    if choice is None:
        raise ValueError(f"{path}: no variant qualified as '{kind}' (e.g. none kept top-1 exactly); pick another")
    return Path(parent_dir) / "variants" / choice["variant"]


EXPLAIN_FILE = "explain.pth"


def explainer_weights(model_dir: Path, card: ModelCard) -> tuple[Path, Explainer]:
    """The fp32 parent's checkpoint (the model's own, for a parent) that explanations run on."""
    parent_dir = Path(card.parent.dir) if card.parent else model_dir
    parent = ModelCard.read(parent_dir) if card.parent else card
    if parent.checkpoint is None or not (parent_dir / parent.checkpoint).is_file():
        raise FileNotFoundError(f"--explain needs the fp32 parent's float checkpoint, and {parent_dir} has none; "
                                f"train it with: python -m training.train --out {parent_dir}")
    return parent_dir / parent.checkpoint, Explainer(EXPLAIN_FILE, parent.architecture, parent.variant)


def check_config(cfg: dict, path: Path) -> None:
    """Refuse model-config values TorchServe 0.12 reads differently from what they say."""
    if cfg.get("asyncCommunication"):
        # AsyncBatchAggregator forgets a job only on a final streaming chunk: every plain answer stays in the heap.
        raise ValueError(f"{path}: asyncCommunication is TorchServe's mode for streaming engines (vLLM): its frontend "
                         "keeps every answered non-streaming request in memory, and these handlers answer "
                         "synchronously. Remove it; batching is batchSize and maxBatchDelay (1 ms is the shortest)")
    if cfg.get("maxBatchDelay") == 0 and int(cfg.get("batchSize", 1)) > 1:
        # ModelManagerImpl takes the archive's maxBatchDelay only when > 0; 0 falls back to its 100 ms default
        # (measured: a lone request took 135 ms instead of ~30).
        raise ValueError(f"{path}: maxBatchDelay 0 with batchSize {cfg['batchSize']} would wait 100 ms per batch "
                         "(TorchServe 0.12 reads an archive's 0 as unset and uses its default); use 1 for batches "
                         "that take what is queued and barely wait")


def serving_config(model_dir: Path, config: Path | None = None) -> tuple[dict[str, Any], list[Path]]:
    """The model-config a build of MODEL_DIR packs, and the files it came from: CONFIG alone when given; otherwise
    handlers/model-config.yaml with MODEL_DIR's tuned-config.yaml (the tuner's choice for this variant) over it."""
    base = config or DEFAULT_CONFIG
    if not base.is_file():
        raise FileNotFoundError(f"model config {base} not found; start from handlers/model-config.yaml")
    cfg = yaml.safe_load(base.read_text()) or {}
    sources = [base]
    tuned = Path(model_dir) / TUNED_FILE
    if config is None and tuned.is_file():
        over = yaml.safe_load(tuned.read_text()) or {}
        handler = over.get("handler") or {}
        unknown = sorted(set(over) - TUNED_KEYS) + sorted(f"handler.{k}" for k in set(handler) - TUNED_HANDLER_KEYS)
        if not isinstance(handler, dict) or unknown:
            raise ValueError(f"{tuned} may set only {', '.join(sorted(TUNED_KEYS - {'handler'}))} and handler.threads "
                             f"(got {', '.join(unknown) or 'handler: ' + repr(handler)}); everything else belongs in "
                             f"{base}. Rewrite it with python -m benchmarks.tune {model_dir} --for-variant")
        cfg |= {k: v for k, v in over.items() if k != "handler"}
        cfg["handler"] = {**(cfg.get("handler") or {}), **handler}
        sources.append(tuned)
    check_config(cfg, sources[-1])
    return cfg, sources


def stage(model_dir: Path, out: Path, config: Path | None, device: str, version: str | None,
          explain: bool = False) -> dict[str, str]:
    """Write OUT/model-config.yaml and OUT/extra/{metadata.json, handlers/}; return archive facts."""
    card = ModelCard.read(model_dir)
    artifact = model_dir / card.artifact
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact} not found; make it with: python -m training.export {model_dir}")
    cfg, sources = serving_config(model_dir, config)
    missing = [name for name in card.files[1:] if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir / missing[0]} ({card.runtime} reads it beside {card.artifact}) not "
                                f"found; rebuild the variant {card.variant}")
    if card.cpu_only:
        if device == "gpu":
            raise ValueError(f"variant {card.variant} ({card.runtime}, {card.precision}) is CPU-only; "
                             "build it with --device cpu or auto")
        device = "cpu"
        print(f"note: variant {card.variant} is CPU-only, packaged with deviceType: cpu", file=sys.stderr)
    if card.cuda_only:
        if device == "cpu":
            raise ValueError(f"variant {card.variant} ({card.runtime}) runs on CUDA only; build it with "
                             "--device gpu or auto")
        device = "gpu"
    elsewhere = machine.differences((card.metrics.speed or {}).get("machine", {}))
    if elsewhere:
        print(f"warning: variant {card.variant} was timed and picked on another machine ({'; '.join(elsewhere)}); "
              "the worker logs this again at start-up", file=sys.stderr)
    cfg["deviceType"] = "gpu" if device == "auto" else device
    if version:
        card = card.replace(version=version)
    extra = out / "extra"
    (extra / "handlers").mkdir(parents=True)
    if explain:
        weights, explainer = explainer_weights(model_dir, card)
        shutil.copy2(weights, extra / EXPLAIN_FILE)
        card = card.replace(explainer=explainer)
    for src in sorted((ROOT / "handlers").glob("*.py")):
        shutil.copy2(src, extra / "handlers" / src.name)
    card.write(extra)
    for name in card.files[1:]:  # the artifact itself is the archiver's --serialized-file
        (extra / name).parent.mkdir(parents=True, exist_ok=True)  # an ensemble's members keep their folders
        shutil.copy2(model_dir / name, extra / name)
    if card.data is not None:  # image models trained here: held-out images + build-time accuracy, for the canary
        golden.write(model_dir, extra)
    (out / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"name": card.name, "version": card.version, "artifact": str(artifact), "device": cfg["deviceType"],
            "config": " + ".join(map(str, sources))}


def record(mar: Path, model_dir: Path) -> dict[str, object]:
    """Add the archive's sha256 to the store's manifest.json (the deploy tool checks it)."""
    card = ModelCard.read(model_dir)
    entry = {
        "sha256": sha256(mar),
        "bytes": mar.stat().st_size,
        "model": card.name,
        "version": card.version,
        "variant": card.variant,
        "test_top1": card.test.top1,
        "source": str(model_dir),
        "built": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    with manifest_lock(mar.parent):
        manifest = read_manifest(mar.parent)
        manifest[mar.name] = entry
        write_manifest(mar.parent, manifest)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("model_dir", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--config", type=Path, default=None,
                   help="pack this file as is (default: handlers/model-config.yaml, with MODEL_DIR/tuned-config.yaml "
                        "over it when present)")
    s.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    s.add_argument("--version", default=None)
    s.add_argument("--explain", action="store_true", help="pack the fp32 parent's weights for /explanations")
    k = sub.add_parser("pick", help="print the variant directory picked as KIND by training.optimize --pick")
    k.add_argument("parent_dir", type=Path)
    k.add_argument("kind", choices=PICK_KINDS)
    c = sub.add_parser("config", help="print the model-config.yaml a build of MODEL_DIR packs, and its sources")
    c.add_argument("model_dir", type=Path)
    c.add_argument("--config", type=Path, default=None)
    r = sub.add_parser("record")
    r.add_argument("mar", type=Path)
    r.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    try:
        if args.cmd == "pick":
            print(read_pick(args.parent_dir, args.kind))
        elif args.cmd == "config":
            cfg, sources = serving_config(args.model_dir, args.config)
            print(f"# from {' + '.join(map(str, sources))}\n{yaml.safe_dump(cfg, sort_keys=False)}", end="")
        elif args.cmd == "stage":
            facts = stage(args.model_dir, args.out, args.config, args.device, args.version, args.explain)
            print("\n".join(f"{k}={v}" for k, v in facts.items()))
        else:
            entry = record(args.mar, args.model_dir)
            print(f"sha256 {entry['sha256']} recorded in {args.mar.parent / MANIFEST_FILE}")
    except (FileNotFoundError, ValueError) as e:  # CardError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
