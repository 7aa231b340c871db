"""The stock TorchServe archive: the built-in `image_classifier` handler on the same fp32 TorchScript.

    python -m benchmarks.stock artifacts/resnet18 STORE_DIR [--name stock]

No model-config.yaml: stock TorchServe defaults (batch size 1). The labels go in as the
index_to_name.json the stock handler reads. Serving it needs captum on the worker's PYTHONPATH
(benchmarks.tools.ensure_captum), because ts.torch_handler.vision_handler imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.served import Bench
from benchmarks.tools import ensure_captum
from handlers.contract import TORCHSCRIPT_FILE, CardError, ModelCard

# libgomp's documented default without OMP_WAIT_POLICY, for the keys of handlers.cores.OPENMP_ENV
LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}


def settings(full: bool = True) -> list[tuple[int, str]]:
    """(workers, OMP_NUM_THREADS) to serve stock with: its one-worker default and, when `full`, one worker per core
    with one thread each, the usual CPU tuning; benchmarks compare against the better of the two."""
    cores = len(os.sched_getaffinity(0))
    return [(1, "default")] + ([(cores, "1")] if full and cores > 1 else [])


def server(workdir: Path, store: Path, threads: str) -> Bench:
    """A stock TorchServe for one setting: captum for its handler, the setting's OMP_NUM_THREADS, OpenMP spinning
    as it does out of the box (the harness starts every server with our OPENMP_ENV otherwise) and TorchServe's
    built-in logging."""
    env = {"PYTHONPATH": str(ensure_captum()), **LIBGOMP_DEFAULT,
           **({"OMP_NUM_THREADS": threads} if threads != "default" else {})}
    return Bench(workdir, store, env=env, builtin_logging=True)


def build(model_dir: Path, store: Path, name: str = "stock") -> Path:
    """STORE/NAME.mar from MODEL_DIR's fp32 TorchScript; returns the archive path."""
    card = ModelCard.read(model_dir)
    artifact = model_dir / TORCHSCRIPT_FILE
    if card.variant != "fp32" or card.runtime != "torchscript" or not artifact.is_file():
        raise FileNotFoundError(f"{artifact} (fp32 TorchScript) not found; make it with: "
                                f"python -m training.export {model_dir}")
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index_to_name.json"
        index.write_text(json.dumps({str(i): label for i, label in enumerate(card.labels)}))
        cmd = [archiver, "--model-name", name, "--version", "1.0", "--serialized-file", str(artifact),
               "--handler", "image_classifier", "--extra-files", str(index), "--export-path", str(store), "--force"]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {result.stderr.strip()[-500:]}")
    return store / f"{name}.mar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("store", type=Path)
    ap.add_argument("--name", default="stock")
    args = ap.parse_args()
    try:
        print(f"built {build(args.model_dir, args.store, args.name)}")
    except (FileNotFoundError, RuntimeError, CardError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
