"""A TorchServe workflow archive (.war) of an ensemble variant: every member its own .mar (through build_mar.sh,
gate included), and a DAG that sends each request to all members in parallel and fuses their answers with the
ensemble card's weights (handlers/workflow_ensemble.py).

    python -m packager.workflow artifacts/resnet18/variants/ensemble --name digits_wf [--store model_store]

Writes STORE/<name>_<member>.mar and STORE/<name>.war. Serve with workflow_store set to STORE, register with
`POST /workflows?url=<name>.war` on the management API (enable_model_api=true), predict with
`POST /wfpredict/<name>`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from handlers.contract import MEMBERS_DIR, ModelCard
from packager.stage import handler_sources

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handlers" / "workflow_ensemble.py"


def spec(name: str, card: ModelCard, batch_size: int, delay_ms: int) -> dict:
    """The workflow specification: global model settings, one model per member, and the DAG."""
    assert card.fusion is not None
    members = [m.dir for m in card.fusion.members]
    models: dict = {"min-workers": 1, "max-workers": 1, "batch-size": batch_size, "max-batch-delay": delay_ms,
                    "retry-attempts": 1, "timeout-ms": 30_000}
    models.update({m: {"url": f"{name}_{m}.mar"} for m in members})
    return {"models": models, "dag": {"pre_processing": members, **{m: ["aggregate"] for m in members}}}


# Batch size 1 for every node: with batches of 8, eight concurrent requests hung a workflow here within seconds
# until its node timeout (as in pytorch/serve#3069 and #1581); with 1 it took a hundred requests, but it still hung.
def build(ensemble_dir: Path, name: str, store: Path, budget: float, batch_size: int = 1, delay_ms: int = 10,
          force: bool = False) -> Path:
    card = ModelCard.read(ensemble_dir)
    if card.fusion is None:
        raise ValueError(f"{ensemble_dir} is not an ensemble ({card.variant}); build one with: python -m "
                         "training.variants.ensemble PARENT --members A,B")
    if card.fusion.kind == "cascade":
        raise ValueError("a cascade needs a conditional edge (ask the big model only when the cheap one is unsure), "
                         "which TorchServe workflows do not have; serve the cascade variant as one .mar instead")
    war = store / f"{name}.war"
    if war.exists() and not force:
        raise FileExistsError(f"{war} already exists; pass --force to overwrite it")
    store.mkdir(parents=True, exist_ok=True)
    for m in card.fusion.members:
        cmd = ["bash", str(ROOT / "build_mar.sh"), str(ensemble_dir / MEMBERS_DIR / m.dir), "--store", str(store),
               "--name", f"{name}_{m.dir}", "--budget", str(budget), *(["--force"] if force else [])]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"member {m.dir} did not package:\n{result.stdout[-1500:]}{result.stderr[-1500:]}")
        print(result.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "spec.yaml").write_text(yaml.safe_dump(spec(name, card, batch_size, delay_ms), sort_keys=False))
        card.write(stage)
        archiver = shutil.which("torch-workflow-archiver") or Path(sys.executable).parent / "torch-workflow-archiver"
        cmd = [str(archiver), "--workflow-name", name, "--spec-file", str(stage / "spec.yaml"),
               "--handler", str(HANDLER), "--export-path", str(store), "--force",
               "--extra-files", str(stage / "metadata.json")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ValueError(f"torch-workflow-archiver failed:\n{result.stdout}{result.stderr}")
    # The archiver copies extra files flat; the function nodes import the handlers package, as a .mar's do.
    with zipfile.ZipFile(war, "a") as z:
        for src, name in handler_sources():
            z.write(src, name)
    return war


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ensemble_dir", type=Path, help="an ensemble variant (python -m training.variants.ensemble)")
    ap.add_argument("--name", required=True, help="workflow name; members are served as <name>_<member>")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store")
    ap.add_argument("--budget", type=float, default=0.5, help="each member's accuracy gate, points (build_mar.sh)")
    ap.add_argument("--batch-size", type=int, default=1, help="per node; >1 hangs sooner under concurrent requests")
    ap.add_argument("--max-batch-delay", type=int, default=10, help="ms")
    ap.add_argument("--force", action="store_true", help="overwrite existing archives")
    args = ap.parse_args(argv)
    try:
        war = build(args.ensemble_dir, args.name, args.store, args.budget, args.batch_size, args.max_batch_delay,
                    args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"built {war}; register it with POST /workflows?url={war.name}")


if __name__ == "__main__":
    main()
