"""onnxruntime: the float model as ONNX on ONNX Runtime's CPU provider, in fp32 or static int8 (QDQ).

    python -m training.variants.onnx_runtime artifacts/resnet18                                # -> onnxruntime
    python -m training.variants.onnx_runtime artifacts/resnet18 --variant onnxruntime_int8
    python -m training.variants.onnx_runtime artifacts/resnet18 --variant pruned_onnxruntime_int8   # stacked

fp32: torch.onnx.export (the torch.export-based exporter) with a dynamic batch dimension. int8: the same
graph, pre-processed (shape inference, graph optimization) and statically quantized by
onnxruntime.quantization into QDQ form (per-channel int8 weights in a 7-bit range, uint8 activations with
min/max ranges calibrated on un-augmented training images); ONNX Runtime fuses the QDQ pairs into int8 kernels
(VNNI on x86). The 7-bit weights (reduce_range) are for x86 CPUs without VNNI, where the u8 x s8 kernel adds
pairs of products in 16 bits (VPMADDUBSW) and full-range weights can saturate and flip
labels. An artifact is built once and served on whatever CPU the fleet has, so it is always built
this way. The worker's thread count (handler option `threads`) sets the session's intra-op threads. CPU only
here: the pinned wheel is onnxruntime's CPU build.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from training.export import to_onnx
from training.technique import Exported, RuntimeTechnique, Source, Transformed, run_cli, stacked
from training.variants.int8 import CALIBRATION, calibration_batches, calibration_record

ONNX_FILE = "model.onnx"


def quantize_int8(float_onnx: Path, out: Path, batches: list[Any]) -> None:
    """Static QDQ int8 of an ONNX file, calibrated on `batches` (normalized float32 arrays)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_onnx), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


class OnnxRuntimeVariant(RuntimeTechnique):
    runtime = "onnxruntime"
    cpu_only = True
    options = (CALIBRATION,)

    recipes = {"fp32": "onnx_export", "int8": "onnxruntime_static_int8"}

    def recipe_args(self, source: Source, args: argparse.Namespace) -> dict[str, Any]:
        if self.precision != "int8":
            return {"exporter": "torch.onnx.export(dynamo=True)"}
        return {"exporter": "torch.onnx.export(dynamo=True)", "api": "onnxruntime.quantization.quantize_static",
                "format": "QDQ", "weights": "int8 per-channel, 7-bit range",
                "activations": "uint8 per-tensor, min/max",
                "calibration": calibration_record(args, min(args.calibration_images, len(source.splits.train)))}

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        size = source.parent.input.image_size
        if self.precision == "fp32":
            to_onnx(t.model, size, out / ONNX_FILE)
            return Exported(ONNX_FILE, self.runtime, "torch.onnx.export(dynamo=True)")
        with tempfile.TemporaryDirectory() as tmp:
            float_onnx = to_onnx(t.model, size, Path(tmp) / ONNX_FILE)
            quantize_int8(float_onnx, out / ONNX_FILE, calibration_batches(source, args, batch_size=32))
        return Exported(ONNX_FILE, self.runtime, "torch.onnx.export(dynamo=True) + quantize_static(QDQ)")


ONNX_RUNTIME = stacked(OnnxRuntimeVariant, ("fp32", "int8"))

if __name__ == "__main__":
    run_cli(ONNX_RUNTIME, __doc__)
