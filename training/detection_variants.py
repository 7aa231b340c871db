"""Optimized detectors: each one frozen TorchScript (or ONNX Runtime, or OpenVINO), checked box for box against
the eager model it came from, scored on the test split and gated on mAP, then timed side by side with the fp32
TorchScript; the pick is what `build_mar.sh --pick` packages.

    python -m training.detection_variants artifacts/detector                     # every variant, report, pick
    python -m training.detection_variants artifacts/detector --variants lean --proposals 50 --budget 1.0
    ./build_mar.sh artifacts/detector --pick throughput

The techniques stack with '_' (lean_svd_int8 is all three):
- lean: the region proposal network keeps its best N proposals per image at test time (torchvision: 1000, or 150
  for the 320 models). The box head runs once per proposal, so its cost falls with N.
- svd: the box head's first fully connected layer (12544 x 1024 on an FPN detector) becomes two of rank R, by
  truncated SVD, as Fast R-CNN did for its fully connected layers.
- int8: the box head's linear layers in int8, activations quantized per call (dynamic; CPU only).
A last part `onnx` or `openvino` runs the result in ONNX Runtime or OpenVINO (fp32; CPU only) instead of frozen
TorchScript: `onnx`, `lean_onnx`, `lean_svd_openvino`. `torchscript` is the fp32 export every detector gets from
training.detect. Two-stage techniques are skipped, with
the reason, for one-stage detectors. The gate compares each variant's test mAP with the fp32 parent's, in points.

Writes PARENT/variants/<name>/ and PARENT/optimization/{report.json,report.md,report.png,pick.json}.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers.contract import (
    RUNTIMES,
    STATE_DICT_FILE,
    TORCHSCRIPT_FILE,
    Metrics,
    ModelCard,
    ParentRecord,
    Recipe,
    sha256,
)
from handlers.deprecations import known_deprecations
from handlers.loading import build_model, load_state_dict
from handlers.runtimes import load_model
from packager.pick import variant_dir
from training.detection_data import Sample, test_samples
from training.detection_eval import box_parity, coco_metrics, predict, summary
from training.export import ParityError
from training.variant_report import BASELINE, SERVED_BATCH, arguments, parent_card, parse, publish, row, run, timed
from training.variants.int8 import quantization_warnings


class NotApplicable(ValueError):
    """A technique this detector has nothing to apply to (a one-stage detector has no box head)."""


def box_head(model: torch.nn.Module) -> torch.nn.Module:
    head = getattr(getattr(model, "roi_heads", None), "box_head", None)
    if head is None or not isinstance(getattr(head, "fc6", None), torch.nn.Linear | torch.nn.Sequential):
        raise NotApplicable(f"{type(model).__name__} has no two-layer box head (two-stage FPN detectors have one)")
    return head


def fewer_proposals(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Keep the best `--proposals` regions per image at test time."""
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        raise NotApplicable(f"{type(model).__name__} has no region proposal network")
    before = rpn._post_nms_top_n["testing"]
    rpn._post_nms_top_n = {**rpn._post_nms_top_n, "testing": args.proposals}
    return {"proposals": args.proposals, "proposals_before": before}


def factorised_head(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Replace the box head's fc6 by its rank-`--rank` truncated SVD (two smaller layers)."""
    head = box_head(model)
    fc = head.fc6
    if not isinstance(fc, torch.nn.Linear):
        raise NotApplicable("fc6 is factorised already")
    rank = min(args.rank, *fc.weight.shape)
    u, s, vh = torch.linalg.svd(fc.weight.detach(), full_matrices=False)
    first = torch.nn.Linear(fc.in_features, rank, bias=False)
    second = torch.nn.Linear(rank, fc.out_features)
    with torch.no_grad():
        first.weight.copy_(s[:rank, None] * vh[:rank])
        second.weight.copy_(u[:, :rank])
        second.bias.copy_(fc.bias)
    head.fc6 = torch.nn.Sequential(first, second)
    kept = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    return {"rank": rank, "shape": list(fc.weight.shape), "energy_kept": round(kept, 4),
            "macs_per_region": {"before": fc.weight.numel(), "after": rank * (fc.in_features + fc.out_features)}}


def int8_head(model: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    """Quantize the box head's linear layers to int8 weights, with activations quantized per call."""
    head = box_head(model)
    with quantization_warnings():
        model.roi_heads.box_head = torch.ao.quantization.quantize_dynamic(head, {torch.nn.Linear}, dtype=torch.qint8)
    return {"api": "torch.ao.quantization.quantize_dynamic", "layers": "box head Linear", "weights": "int8",
            "engine": torch.backends.quantized.engine}


TECHNIQUES: dict[str, Callable[[torch.nn.Module, argparse.Namespace], dict[str, Any]]] = {
    "lean": fewer_proposals, "svd": factorised_head, "int8": int8_head}
# A variant name's last part may name the runtime it is exported to (default: frozen TorchScript).
RUNTIME_SUFFIXES = {"onnx": "onnxruntime", "openvino": "openvino"}
DEFAULT_VARIANTS = ("lean", "svd", "int8", "lean_svd", "lean_svd_int8", "onnx", "lean_onnx", "lean_svd_onnx",
                    "openvino", "lean_openvino", "lean_svd_openvino")
ONNX_OUTPUTS = ["boxes", "labels", "scores"]  # a torchvision detector's, so the runtime answers as the model does


def parent_model(parent_dir: Path, card: ModelCard) -> torch.nn.Module:
    model = build_model(card.architecture, card.num_classes)
    model.load_state_dict(load_state_dict(parent_dir / STATE_DICT_FILE))
    return model.eval()


def script(model: torch.nn.Module, out: Path, int8: bool) -> dict[str, Any]:
    """Frozen TorchScript. Freezing's passes that do not preserve numerics leave the fp32 boxes exact but moved the
    int8 box head's boxes (IoU 0.76 against its eager model), so int8 is frozen without them."""
    with known_deprecations(), quantization_warnings():
        frozen = torch.jit.freeze(torch.jit.script(model), optimize_numerics=not int8)
        torch.jit.save(frozen, str(out / TORCHSCRIPT_FILE))
    return {"method": "script+freeze", "optimize_numerics": not int8}


def to_onnx(model: torch.nn.Module, path: Path, side: int) -> None:
    """One image [3, H, W] of any size in, its boxes, labels and scores out. The TorchScript-based exporter: the
    torch.export-based one cannot follow a detector's data-dependent shapes."""
    with warnings.catch_warnings():  # torchvision's detection code under the tracer: known, harmless here
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(model, ([torch.rand(3, side, side)],), str(path), opset_version=17, dynamo=False,
                          input_names=["image"], output_names=ONNX_OUTPUTS,
                          dynamic_axes={"image": {1: "height", 2: "width"}})


def write_artifact(model: torch.nn.Module, out: Path, runtime: str, int8: bool, side: int) -> dict[str, Any]:
    """The model as `runtime` runs it, in `out`; how it was made."""
    if runtime == "torchscript":
        return script(model, out, int8)
    if int8:
        raise NotApplicable("the int8 box head is a torch dynamic-quantized module, which ONNX export does not take")
    if runtime == "onnxruntime":
        to_onnx(model, out / RUNTIMES[runtime], side)
        return {"method": "torch.onnx.export(dynamo=False), opset 17"}
    import openvino

    with tempfile.TemporaryDirectory() as tmp:
        to_onnx(model, Path(tmp) / "model.onnx", side)
        openvino.save_model(openvino.convert_model(Path(tmp) / "model.onnx"), out / RUNTIMES[runtime],
                            compress_to_fp16=False)
    return {"method": "torch.onnx.export(dynamo=False), opset 17 + openvino.convert_model"}


def other_size(samples: list[Sample]) -> list[Sample]:
    """The first samples stretched to another size and aspect, so parity also covers an input size the export never
    saw (a served batch mixes sizes)."""
    out = []
    for s in samples[:8]:
        h, w = s.image.shape[1:]
        size = (h * 3 // 4, w * 5 // 4)
        image = torch.nn.functional.interpolate(s.image[None].float(), size=size, mode="bilinear")[0]
        out.append(Sample(image.round().clamp(0, 255).to(torch.uint8), s.boxes, s.labels))
    return out


def export(parent_dir: Path, name: str, model: torch.nn.Module, samples: list[Sample], recipe: dict[str, Any],
           runtime: str = "torchscript") -> ModelCard:
    """PARENT/variants/NAME: `model` as `runtime` runs it, its boxes checked against the eager model's (labels equal,
    box IoU >= 0.99, scores within 1e-3 over a 0.3 threshold) on the test images and on some of another size, and
    its own test mAP in its card."""
    card = ModelCard.read(parent_dir)
    model.eval()
    out = variant_dir(parent_dir, name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    int8 = "int8" in recipe
    try:
        how = write_artifact(model, out, runtime, int8, card.input.shape[-1])
    except NotApplicable:
        shutil.rmtree(out)
        raise
    parent = ParentRecord(dir=str(parent_dir), checkpoint=STATE_DICT_FILE,
                          sha256=sha256(parent_dir / STATE_DICT_FILE), variant=card.variant, test=card.test)
    variant = card.replace(variant=name, runtime=runtime, artifact=RUNTIMES[runtime], checkpoint=None,
                           parent=parent, precision="int8" if int8 else "fp32",
                           cpu_only=int8 or runtime != "torchscript",
                           recipe=Recipe("export" if name == BASELINE else name, recipe), export=how)
    loaded = load_model(out, variant)
    checked = samples + other_size(samples)
    found = predict(loaded, checked)
    parity = box_parity(predict(model, checked), found)
    if not parity["ok"]:
        shutil.rmtree(out)
        raise ParityError(f"the {runtime} {name} detector's boxes differ from its eager model's: {parity}")
    test = coco_metrics(found[:len(samples)], samples, card.labels)  # the same detections, not a second pass
    variant = variant.replace(export={**how, "parity": parity}, metrics=Metrics(test=summary(test)))
    variant.write(out)
    return variant


def make(parent_dir: Path, name: str, samples: list[Sample], args: argparse.Namespace) -> ModelCard:
    """One variant: its techniques applied in order to a copy of the parent, then exported."""
    model = parent_model(parent_dir, ModelCard.read(parent_dir))
    parts = name.split("_")
    runtime = RUNTIME_SUFFIXES.get(parts[-1], "torchscript")
    recipe: dict[str, Any] = {}
    for technique in parts[:-1] if runtime != "torchscript" else parts:
        if technique not in TECHNIQUES:
            raise ValueError(f"unknown technique {technique!r} in {name!r}; choose from {', '.join(TECHNIQUES)}")
        recipe[technique] = TECHNIQUES[technique](model, args)
    return export(parent_dir, name, model, samples, recipe, runtime)


def optimize(parent_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    card = parent_card(parent_dir, "detection", "train one with python -m training.detect, or optimize a "
                       "classifier with python -m training.optimize")
    samples = test_samples(card)
    made: dict[str, ModelCard] = {}
    skipped: dict[str, str] = {}
    # The fp32 baseline again, so that it and the variants are exported and timed by one version of this code.
    made[BASELINE] = export(parent_dir, BASELINE, parent_model(parent_dir, card), samples, {})
    for i, name in enumerate(args.variants, 1):
        started = time.perf_counter()
        try:
            made[name] = make(parent_dir, name, samples, args)
        except (NotApplicable, ParityError) as e:
            skipped[name] = str(e)
            print(f"[{i}/{len(args.variants)}] {name}: skipped, {e}", flush=True)
            continue
        print(f"[{i}/{len(args.variants)}] {name}: mAP {made[name].test.map:.4f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    rows = {name: row(name, c, args.budget, {"map": c.test.map, "map50": c.test.map50}) for name, c in made.items()}
    images = [s.image.float() / 255 for s in samples[:args.timing_images]]
    print(f"timing {len(made)} detectors side by side ({args.rounds} rounds, {len(images)} images) ...", flush=True)
    models = {name: load_model(variant_dir(parent_dir, name), c) for name, c in made.items()}  # as served
    timing = timed(models, [[i] for i in images], [images[i:i + SERVED_BATCH] for i in range(0, len(images),
                                                                                             SERVED_BATCH)],
                   len(images), args.rounds)
    return publish(parent_dir, card, rows, timing, BASELINE, args, title="Detector variants", unit="image",
                   items=len(samples), columns={"map": "mAP", "map50": "mAP@.5"}, skipped=skipped)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = arguments(__doc__, "a detector directory from python -m training.detect", "mAP", "image", 8,
                   ",".join(DEFAULT_VARIANTS))
    ap.add_argument("--proposals", type=int, default=50, help="lean: proposals kept per image at test time")
    ap.add_argument("--rank", type=int, default=256, help="svd: rank of the factorised fc6")
    args = parse(ap, argv, "training.detection_variants", ("proposals", "rank", "rounds", "timing_images"))
    for name in args.variants:
        parts = name.split("_")
        unknown = [t for t in (parts[:-1] if parts[-1] in RUNTIME_SUFFIXES else parts) if t not in TECHNIQUES]
        if unknown:
            ap.error(f"variant {name!r}: unknown technique {unknown[0]!r}; combine {', '.join(TECHNIQUES)} with '_', "
                     f"optionally ending in {' or '.join(RUNTIME_SUFFIXES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    run(optimize, parse_args(argv))


if __name__ == "__main__":
    main()
