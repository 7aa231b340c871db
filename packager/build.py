"""Package a trained, exported model directory as model_store/<name>.mar: the body of build_mar.sh.

    ./build_mar.sh artifacts/resnet18                          # name and version from metadata.json
    ./build_mar.sh artifacts/resnet18/variants/int8 --name digits_int8 --version 1.1
    ./build_mar.sh artifacts/resnet18 --pick throughput          # the variant training.optimize --pick chose
    ./build_mar.sh artifacts/resnet18/variants/int8 --check      # gate it and print the config it would pack

Steps: check inputs -> accuracy gate -> stage metadata + handlers + model-config.yaml
       -> torch-model-archiver -> record sha256 in model_store/manifest.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import yaml

from handlers.contract import CARD_FILE, MANIFEST_FILE, ModelCard
from packager import gate
from packager.config import serving_config
from packager.manifest import record
from packager.pick import PICK_KINDS, read_pick
from packager.stage import stage

ROOT = Path(__file__).resolve().parent.parent


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(1, f"error: {message}\n")


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="build_mar.sh", usage="build_mar.sh MODEL_DIR [options]", allow_abbrev=False,
                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    ap.add_argument("--name", help='model name to serve under (default: "name" in metadata.json)')
    ap.add_argument("--version", metavar="V", help='archive version (default: "version" in metadata.json)')
    ap.add_argument("--archive", metavar="FILE", help="archive file name without .mar (default: NAME)")
    ap.add_argument("--pick", metavar="KIND", help="package the variant of MODEL_DIR that python -m "
                    f"training.optimize MODEL_DIR --pick chose on this machine: {' | '.join(PICK_KINDS)}")
    ap.add_argument("--handler", default="handler", metavar="NAME", help="handler module in handlers/ "
                    "(default: handler, which serves every task in handlers/tasks/)")
    ap.add_argument("--config", type=Path, metavar="FILE", help="model-config.yaml to pack as is (default: "
                    "handlers/model-config.yaml, with the tuner's choice for this variant, "
                    "MODEL_DIR/tuned-config.yaml, over it when present)")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", metavar="D",
                    help="auto|cpu|gpu deviceType (default auto: gpu, or cpu for CPU-only variants)")
    ap.add_argument("--budget", type=float, default=gate.DEFAULT_BUDGET_PT, metavar="PT",
                    help="accuracy gate: allowed top-1 drop vs the fp32 parent, in points (default 0.5)")
    ap.add_argument("--explain", action="store_true", help="pack the fp32 parent's weights so POST "
                    "/explanations/NAME answers (needs captum in the workers' environment: pip install captum==0.9.0)")
    ap.add_argument("--store", type=Path, default=ROOT / "model_store", metavar="DIR",
                    help="output directory (default: model_store)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing archive")
    ap.add_argument("--check", action="store_true", help="run the accuracy gate and print the model-config.yaml "
                    "the archive would pack, then stop (exit 1 if the gate fails); writes nothing")
    return ap


def archiver() -> str:
    """torch-model-archiver from PATH, or beside this interpreter (a virtualenv that is not activated)."""
    beside = Path(sys.executable).parent
    found = shutil.which("torch-model-archiver") or shutil.which("torch-model-archiver", path=beside)
    if found is None:
        raise FileNotFoundError("torch-model-archiver not found; run: pip install -r requirements.txt")
    return found


def check_inputs(model_dir: Path, handler: str) -> ModelCard:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} not found; train it with: python -m training.train --out {model_dir}")
    if not (model_dir / CARD_FILE).is_file():
        raise FileNotFoundError(f"{model_dir / CARD_FILE} not found; make it with: "
                                f"python -m training.train --out {model_dir}")
    if not (ROOT / "handlers" / f"{handler}.py").is_file():
        names = " ".join(sorted(p.stem for p in (ROOT / "handlers").glob("*.py")))
        raise FileNotFoundError(f"handler handlers/{handler}.py not found; pick one of: {names}")
    return ModelCard.read(model_dir)


def build(args: argparse.Namespace) -> Path | None:
    model_dir = args.model_dir
    if args.pick:
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir} not found; --pick takes the trained parent directory")
        model_dir = read_pick(model_dir, args.pick)
        print(f"pick '{args.pick}': {model_dir}")
    card = check_inputs(model_dir, args.handler)
    passed, verdict = gate.check(card, args.budget)
    if not passed:
        raise ValueError(f"accuracy gate FAILED - {verdict}. Not packaging; retune the variant or raise --budget")
    print(f"accuracy gate passed - {verdict}")
    if args.check:
        cfg, sources = serving_config(model_dir, args.config)
        print(f"# model-config.yaml from {' + '.join(map(str, sources))}")
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return None
    tool = archiver()
    name = args.name or card.name
    mar = args.store / f"{args.archive or name}.mar"
    if mar.exists() and not args.force:
        raise FileExistsError(f"{mar} already exists; pass --force to overwrite it, or --archive/--name for a new file")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        staged = stage(model_dir, work, args.config, args.device, args.version, args.explain)
        args.store.mkdir(parents=True, exist_ok=True)
        if mar.exists():
            print(f"overwriting {mar} (--force)")
        (work / "out").mkdir()
        # The archiver stages files in $TMPDIR/<model-name>; a private TMPDIR keeps parallel builds apart.
        result = subprocess.run([tool, "--model-name", name, "--version", staged.version,
                                 "--serialized-file", str(staged.artifact),
                                 "--handler", str(ROOT / "handlers" / f"{args.handler}.py"),
                                 "--extra-files", str(work / "extra"), "--config-file", str(work / "model-config.yaml"),
                                 "--export-path", str(work / "out"), "--archive-format", "default"],
                                env={**os.environ, "TMPDIR": str(work)})
        if result.returncode != 0:
            raise ValueError(f"torch-model-archiver failed (exit {result.returncode}, above); {mar} left as it was")
        shutil.move(work / "out" / f"{name}.mar", mar)
    entry = record(mar, model_dir)
    print(f"sha256 {entry['sha256']} recorded in {mar.parent / MANIFEST_FILE}")
    print(f"built {mar} (model {name}, version {staged.version}, deviceType {staged.device}, "
          f"config {' + '.join(map(str, staged.sources))})")
    return mar


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # our lines before the archiver's, which writes to the same stdout
    try:
        build(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:  # CardError is a ValueError
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
