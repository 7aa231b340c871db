"""Our detector serving against TorchServe's stock `object_detector`, on the same weights, in one run.

    python -m benchmarks.detection artifacts/detector [--seconds 20] [--out benchmarks/results/detection.json]

Stock serves the fp32 state_dict in its eager mode (a model file whose one class builds the torchvision detector;
it cannot run the TorchScript: its preprocessing stacks the batch into one tensor, which a scripted detector
refuses), with its defaults (batch 1, threshold 0.5, `ToTensor()` only). Ours serves `variants/torchscript` (fp32),
the fastest variant that changes only the runtime (ONNX Runtime or OpenVINO, fp32: the same boxes), and the variant
`python -m training.detection_variants` picked for throughput, each with the shipped model-config.
Reported: box agreement with stock on the test images at stock's 0.5 threshold (labels equal, box IoU >= 0.99,
scores within 1e-3), whether each serves a batch of mixed image sizes, and req/s with p50/p99 at 1, 16 and 64
connections (wrk), stock at its best of one worker and one worker per core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import machine, versions
from benchmarks.inputs import jpeg, write_set
from benchmarks.report import closed_loop, plt
from benchmarks.served import Bench
from benchmarks.stock import LIBGOMP_DEFAULT, settings
from benchmarks.tools import ensure_captum
from handlers.contract import STATE_DICT_FILE, ModelCard
from packager.manifest import read_manifest
from packager.pick import PICK_FILE, REPORT_DIR
from training.detection_data import test_samples
from training.detection_eval import box_parity
from training.variant_report import THROUGHPUT

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 16, 64)
# Stock's eager mode builds the model as `ModelClass()` and loads the state_dict into it: a class whose
# constructor returns torchvision's detector.
STOCK_MODEL = """import torchvision


class Detector:
    def __new__(cls):
        return torchvision.models.get_model({arch!r}, weights=None, weights_backbone=None, num_classes={n})
"""


def build_stock(model_dir: Path, store: Path) -> Path:
    card = ModelCard.read(model_dir)
    archiver = shutil.which("torch-model-archiver") or str(Path(sys.executable).parent / "torch-model-archiver")
    with tempfile.TemporaryDirectory() as tmp:
        model_file, index = Path(tmp) / "model.py", Path(tmp) / "index_to_name.json"
        model_file.write_text(STOCK_MODEL.format(arch=card.architecture, n=card.num_classes))
        index.write_text(json.dumps({str(i): label for i, label in enumerate(card.labels)}))
        subprocess.run([archiver, "--model-name", "stock", "--version", "1.0", "--model-file", str(model_file),
                        "--serialized-file", str(model_dir / STATE_DICT_FILE), "--handler", "object_detector",
                        "--extra-files", str(index), "--export-path", str(store), "--force"], check=True)
    return store / "stock.mar"


def build_ours(model_dir: Path, store: Path) -> list[str]:
    """`ours`: the fp32 TorchScript; `exact`: the fastest variant that changes only the runtime (so its boxes are the
    fp32 model's), when that is not the TorchScript; `pick`: the variant picked for throughput."""
    rows = json.loads((model_dir / REPORT_DIR / "report.json").read_text())["rows"]
    exact = max((r for r in rows if not r["recipe"]), key=lambda r: r[THROUGHPUT])["variant"]
    sources = {"ours": [str(model_dir / "variants" / "torchscript")],
               **({"exact": [str(model_dir / "variants" / exact)]} if exact != "torchscript" else {}),
               "pick": [str(model_dir), "--pick", "throughput"]}
    for name, source in sources.items():
        subprocess.run(["bash", str(ROOT / "build_mar.sh"), *source, "--store", str(store), "--name", name,
                        "--device", "cpu", "--force"], check=True, cwd=ROOT)
    return list(sources)


def stock_boxes(answer: list[dict[str, Any]], labels: list[str]) -> dict[str, torch.Tensor]:
    """Stock's [{"<label>": [x1, y1, x2, y2], "score": s}, ...] in the model's terms."""
    pairs = [(next(k for k in d if k != "score"), d) for d in answer]
    return {"boxes": torch.tensor([d[k] for k, d in pairs]).view(-1, 4),
            "scores": torch.tensor([d["score"] for _, d in pairs]),
            "labels": torch.tensor([labels.index(k) for k, _ in pairs], dtype=torch.int64)}


def our_boxes(answer: dict[str, Any], labels: list[str]) -> dict[str, torch.Tensor]:
    found = answer["detections"]
    return {"boxes": torch.tensor([d["box"] for d in found]).view(-1, 4),
            "scores": torch.tensor([d["score"] for d in found]),
            "labels": torch.tensor([labels.index(d["label"]) for d in found], dtype=torch.int64)}


def mixed_batch(bench: Bench, name: str, bodies: list[bytes]) -> dict[str, int]:
    """Statuses of concurrent requests of different image sizes to a model registered with batch size 4."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(lambda b: bench.ts.api.predict(name, b, content_type="image/jpeg").status_code,
                                 bodies))
    return {str(s): statuses.count(s) for s in sorted(set(statuses))}


def run(model_dir: Path, seconds: float, work: Path) -> dict[str, Any]:
    card = ModelCard.read(model_dir)
    samples = test_samples(card)
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    build_stock(model_dir, store)
    ours = build_ours(model_dir, store)
    inputs = write_set(work, "test", [jpeg(s.image) for s in samples], f"{len(samples)} test images, JPEG")
    sizes = [jpeg(torch.nn.functional.interpolate(samples[0].image[None].float(), size=hw)[0].byte())
             for hw in ((320, 320), (240, 400), (400, 256), (288, 288))]
    result: dict[str, Any] = {"model": str(model_dir), "architecture": card.architecture,
                              "images": len(samples), "machine": machine(), "versions": versions(), "load": {}}
    answers: dict[str, list[dict[str, torch.Tensor]]] = {}
    for threads_setting in settings():
        workers, threads = threads_setting
        env = {"PYTHONPATH": str(ensure_captum()), **LIBGOMP_DEFAULT,
               **({"OMP_NUM_THREADS": threads} if threads != "default" else {})}
        with Bench(work / f"ts-{workers}", store, env=env, builtin_logging=True) as bench:
            bench.register("stock", "stock.mar", workers=workers)
            if "stock" not in answers:
                answers["stock"] = [stock_boxes(bench.ts.api.predict("stock", f.read_bytes(),
                                                                     content_type="image/jpeg").json(), card.labels)
                                    for f in inputs.files]
            bench.prime("stock", inputs.files[0].read_bytes(), inputs.list_file)
            for c in CONCURRENCY:
                load, _ = bench.measure("stock", inputs.list_file, c, seconds)
                result["load"].setdefault(f"stock ({workers} worker{'s' * (workers > 1)}, threads {threads})",
                                          {})[c] = load.to_dict()
    result["mixed_sizes"] = {}
    for name in ours:
        with Bench(work / f"ts-{name}", store) as bench:
            bench.register(name, f"{name}.mar")
            answers[name] = [our_boxes(bench.ts.api.predict(name, f.read_bytes(), content_type="image/jpeg").json(),
                                       card.labels) for f in inputs.files]
            bench.prime(name, inputs.files[0].read_bytes(), inputs.list_file)
            for c in CONCURRENCY:
                load, _ = bench.measure(name, inputs.list_file, c, seconds)
                result["load"].setdefault(name, {})[c] = load.to_dict()
            result["mixed_sizes"][name] = mixed_batch(bench, name, sizes)
    with Bench(work / "ts-mixed", store, env={"PYTHONPATH": str(ensure_captum())}, builtin_logging=True) as bench:
        bench.ts.api.manage("POST", "/models", params={"url": "stock.mar", "batch_size": 4, "max_batch_delay": 500,
                                                       "initial_workers": 1, "synchronous": "true"})
        result["mixed_sizes"]["stock (batch size 4)"] = mixed_batch(bench, "stock", sizes)
    result["agreement"] = {name: box_parity(answers["stock"], answers[name], score_threshold=0.5, score_atol=1e-3)
                           for name in ours}
    result["pick"] = json.loads((model_dir / PICK_FILE).read_text())["choice"]["throughput"]
    result["variants"] = {name: entry["variant"] for name, entry in read_manifest(store).items()}
    best_stock = max(v[16]["rps"] for k, v in result["load"].items() if k.startswith("stock"))
    result["ratio_rps_16"] = {name: round(result["load"][name][16]["rps"] / best_stock, 2) for name in ours}
    return result


def plot(result: dict[str, Any], path: Path) -> Path:
    """req/s against p99 for stock, ours and the pick, one point per concurrency."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    closed_loop(ax, {name: list(points.values()) for name, points in result["load"].items()},
                f"{result['architecture']}, {result['images']} test images, {result['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="a detector directory from python -m training.detect")
    ap.add_argument("--seconds", type=float, default=20.0, help="per load point")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="detbench-") as tmp:
        result = run(args.model_dir, args.seconds, Path(tmp))
    result["command"] = "python -m benchmarks.detection " + " ".join(sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    figure = plot(result, args.out.with_suffix(".png"))
    for name, points in result["load"].items():
        print(f"{name:40s} " + "  ".join(f"c={c}: {p['rps']:.1f}/s p50 {p['p50_ms']:.0f} p99 {p['p99_ms']:.0f} ms"
                                         f" ({p['errors']} errors)" for c, p in points.items()))
    print(f"box agreement at 0.5: {result['agreement']}")
    print(f"mixed sizes in one batch: {result['mixed_sizes']}")
    print(f"req/s at 16 connections over the best stock: {result['ratio_rps_16']} -> {args.out}, {figure}")


if __name__ == "__main__":
    main()
