"""openvino: the float model as an OpenVINO IR on its CPU plugin, in fp32, bf16 (where the CPU has bf16 units) or
int8 through NNCF post-training quantization.

    python -m training.variants.openvino_ir artifacts/resnet18                              # -> openvino
    python -m training.variants.openvino_ir artifacts/resnet18 --variant openvino_bf16
    python -m training.variants.openvino_ir artifacts/resnet18 --variant distilled_openvino_int8   # stacked

The IR (model.xml + model.bin, weights kept in fp32) is converted from the same ONNX export as the
onnxruntime variants. fp32 and bf16 share that IR: the precision is the plugin's INFERENCE_PRECISION_HINT,
recorded in the card and set by the handler. bf16 is only built on a CPU whose OpenVINO capabilities list
BF16 (AVX512-BF16 or AMX); elsewhere the plugin would quietly run f32, so the variant is refused rather than
mislabelled. int8: nncf.quantize on the IR, calibrated on un-augmented training images; the layers NNCF
keeps in float run at the plugin's default precision for this CPU, recorded as inference_precision.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from training.export import to_onnx, to_openvino
from training.technique import Exported, NotSupportedHere, RuntimeTechnique, Source, Transformed, run_cli, stacked
from training.variants.int8 import CALIBRATION, calibration_batches, calibration_record

IR_FILE = "model.xml"


def capabilities() -> list[str]:
    import openvino

    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def default_precision() -> str:
    """What the CPU plugin computes float layers in when not told (bf16 on CPUs with bf16 units)."""
    import openvino

    return str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT"))


def quantize_int8(ir: Path, out: Path, batches: list[Any]) -> None:
    """NNCF post-training int8 of an IR, calibrated on `batches` (one normalized image each)."""
    import nncf
    import openvino

    quantized = nncf.quantize(openvino.Core().read_model(str(ir)), nncf.Dataset(batches), subset_size=len(batches))
    openvino.save_model(quantized, str(out), compress_to_fp16=False)


class OpenVINOVariant(RuntimeTechnique):
    runtime = "openvino"
    cpu_only = True
    options = (CALIBRATION,)
    recipes = {"fp32": "openvino_ir", "bf16": "openvino_ir", "int8": "openvino_nncf_int8"}

    def recipe_args(self, source: Source, args: argparse.Namespace) -> dict[str, Any]:
        if self.precision == "bf16" and "BF16" not in capabilities():
            raise NotSupportedHere(f"{self.name}: this CPU's OpenVINO capabilities ({', '.join(capabilities())}) "
                                   "have no BF16, so the plugin would run f32; build openvino (fp32) here instead")
        recipe: dict[str, Any] = {"converter": "openvino.convert_model(onnx)"}
        if self.precision == "int8":
            recipe.update(api="nncf.quantize", inference_precision=default_precision(),
                          calibration=calibration_record(args, min(args.calibration_images, len(source.splits.train))))
        return recipe

    def export(self, t: Transformed, source: Source, out: Path, args: argparse.Namespace) -> Exported:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_file = to_onnx(t.model, source.parent.input.image_size, Path(tmp) / "model.onnx")
            if self.precision != "int8":
                to_openvino(onnx_file, out / IR_FILE)
                return Exported(IR_FILE, self.runtime, "torch.onnx.export(dynamo=True) + openvino.convert_model",
                                {"inference_precision": self.precision})
            to_openvino(onnx_file, Path(tmp) / IR_FILE)
            quantize_int8(Path(tmp) / IR_FILE, out / IR_FILE, calibration_batches(source, args))
        return Exported(IR_FILE, self.runtime, "torch.onnx.export(dynamo=True) + openvino.convert_model + "
                        "nncf.quantize", {"inference_precision": f"int8, float layers {default_precision()}"})


OPENVINO = stacked(OpenVINOVariant, ("fp32", "bf16", "int8"))

if __name__ == "__main__":
    run_cli(OPENVINO, __doc__)
