"""The runtimes an artifact can run on, behind one small interface: float32 NCHW batch in, float32 logits out.

    eager        state_dict loaded into build_model(architecture)
    compile      the same, through torch.compile (Inductor); the compile is paid at the handler's warm-up
    torchscript  frozen TorchScript (torch.jit, deprecated in torch 2.14 but still the common format); fp32 on CPU
                 through torch.jit.optimize_for_inference
    export       a torch.export ExportedProgram (.pt2)
    aoti         an AOTInductor package (.pt2) compiled ahead of time for CPU or CUDA
    onnxruntime  an ONNX graph on ONNX Runtime's CPU execution provider (fp32, or int8 QDQ)
    openvino     an OpenVINO IR (.xml + .bin) on its CPU plugin (fp32, bf16 where the CPU has it, or int8)
    tensorrt     a Torch-TensorRT ExportedProgram (CUDA only)
    ensemble     member model directories, each run by its own runtime, fused as the card's `fusion` says

Each runtime imports its package only when an artifact needs it, so an archive of one runtime never pays for
another's import, and a machine without openvino can still serve TorchScript.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from handlers import contract
from handlers.contract import MEMBERS_DIR, Fusion, ModelCard, sha256
from handlers.deprecations import known_deprecations
from handlers.loading import load_state_dict, model_from_state_dict

Predictor = Callable[[torch.Tensor], torch.Tensor]

# Runtime name -> its loader. handlers.contract.RUNTIMES is the one table of names (with each one's artifact
# file, read where torch is not loaded); every Runtime subclass below registers itself under one of them.
RUNTIMES: dict[str, Runtime] = {}


class Runtime:
    """How one kind of artifact is loaded. Subclasses set `name` and `devices` and implement `load`."""

    name: str = ""  # its key in handlers.contract.RUNTIMES
    devices: tuple[str, ...] = ("cpu", "cuda")
    # True when the intra-op thread count follows torch.set_num_threads at every call; False when it is
    # fixed at load (a session option, or a thread count compiled into the code).
    elastic: bool = True
    # False when two runs of one batch can differ (work split by thread): figures a card records then run
    # it on one thread, so anyone who loads the artifact again gets them exactly.
    repeatable: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name not in contract.RUNTIMES or cls.name in RUNTIMES:
            raise TypeError(f"{cls.__name__}.name is {cls.name!r}; each runtime in handlers.contract.RUNTIMES "
                            "has one loader")
        RUNTIMES[cls.name] = cls()

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        """The artifact at `path`, ready to call on batches on `device` with `threads` intra-op threads."""
        raise NotImplementedError


class Eager(Runtime):
    name = "eager"

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        model = model_from_state_dict(card.architecture, card.num_classes, load_state_dict(path))
        return model.to(device).eval()


class Compiled(Eager):
    name = "compile"
    elastic = False  # Inductor's C++ bakes the thread count in
    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        # freezing folds weights into constants and lets Inductor pre-pack them for oneDNN on CPU;
        # dynamic=True compiles one graph for every batch size above 1 rather than one per size.
        return torch.compile(super().load(path, card, device, threads), dynamic=True, options={"freezing": True})


class TorchScript(Runtime):
    name = "torchscript"

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        with known_deprecations():
            module = torch.jit.load(str(path), map_location=device).eval()
            if device.type == "cpu" and card.precision == "fp32":
                # Faster on CPU, and done at load so the archive stays portable (docs/experiments.md, "jit_optimize").
                module = torch.jit.optimize_for_inference(module)
            return module


class Export(Runtime):
    name = "export"

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        # Exported programs are already in inference form; .eval() is not allowed on them.
        return torch.export.load(str(path)).module().to(device)


class AOTInductor(Runtime):
    name = "aoti"
    elastic = False
    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        from torch._inductor import aoti_load_package

        compiled_for = "cuda" if card.cuda_only else "cpu"
        if device.type != compiled_for:
            raise ValueError(f"this AOTInductor package was compiled for {compiled_for}, not {device.type}; "
                             f"build the {'aoti' if device.type == 'cpu' else 'aoti_cuda'} variant for it")
        try:
            return aoti_load_package(str(path), device_index=device.index if device.index is not None else -1)
        except (RuntimeError, pickle.UnpicklingError, OSError) as e:
            raise ValueError(f"cannot load AOTInductor package {path} ({str(e).strip()[:200]}); packages run only "
                             f"with the torch {torch.__version__.split('+')[0]} they were compiled with: rebuild "
                             "the variant on this install") from e


class NumpyPredictor:
    """A runtime that takes and returns numpy arrays, called like a torch model: a batch tensor in, its first output
    out; or, as a torchvision detector is called, a list of images in (each its own size, so one run each) and a
    dict of the named outputs per image out."""

    def __init__(self, run: Callable[[Any], list[Any]], names: list[str]) -> None:
        self.run, self.names = run, names

    def __call__(self, batch: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[dict[str, torch.Tensor]]:
        if isinstance(batch, list):
            return [dict(zip(self.names, map(torch.from_numpy, self.run(numpy(x))), strict=True)) for x in batch]
        return torch.from_numpy(self.run(numpy(batch))[0])


def numpy(x: torch.Tensor) -> Any:
    return x.detach().cpu().float().contiguous().numpy()


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    elastic = False
    devices = ("cpu",)

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # the worker's thread count, as for torch
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return NumpyPredictor(lambda x: session.run(None, {name: x}), [o.name for o in session.get_outputs()])


# The OpenVINO inference precision each card precision asks for; int8 IR keeps the plugin's default for the
# layers NNCF left in float (bf16 on CPUs with bf16 units, f32 elsewhere).
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": None}


def openvino_config(precision: str, threads: int) -> dict[str, Any]:
    # OpenVINO pins a process's inference threads from the first core, so two 1-thread workers would share
    # core 0 (measured: half speed each). Pin only a worker whose threads cover every core it may use.
    pin = threads >= len(os.sched_getaffinity(0))
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                              "ENABLE_CPU_PINNING": pin}
    if OPENVINO_PRECISION.get(precision):
        config["INFERENCE_PRECISION_HINT"] = OPENVINO_PRECISION[precision]
    return config


class OpenVINO(Runtime):
    name = "openvino"
    elastic = False
    devices = ("cpu",)
    repeatable = False  # int8 on 2 threads: two runs of one batch gave other logits (on 1 thread: identical)

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        import openvino

        if card.precision not in OPENVINO_PRECISION:
            raise ValueError(f"OpenVINO variants run fp32, bf16 or int8, not {card.precision!r}")
        compiled = openvino.Core().compile_model(str(path), "CPU", openvino_config(card.precision, threads))
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)

        def run(x: Any) -> list[Any]:
            result = request.infer({0: x})
            return [result[o] for o in outputs]

        return NumpyPredictor(run, [o.get_any_name() for o in outputs])


class TensorRT(Runtime):
    name = "tensorrt"
    elastic = False
    devices = ("cuda",)

    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops the program calls)

        return torch.export.load(str(path)).module().to(device)


class Fused:
    """Members' probabilities combined; log-probabilities out, so the handler's softmax gives them back.

    A cascade runs its second member only on the rows where the first one's top probability is below the
    threshold, and counts them (`deferred` of `seen`)."""

    def __init__(self, fusion: Fusion, members: list[Predictor]) -> None:
        self.fusion, self.members = fusion, members
        self.seen = self.deferred = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.fusion.kind == "cascade":
            cheap, big = self.members
            probs = torch.softmax(cheap(batch).float(), 1)
            defer = probs.max(1).values < self.fusion.threshold
            self.seen, self.deferred = self.seen + len(batch), self.deferred + int(defer.sum())
            if defer.any():
                probs[defer] = torch.softmax(big(batch[defer]).float(), 1).to(probs.device)
        else:
            probs = sum(m.weight * torch.softmax(run(batch).float(), 1)
                        for m, run in zip(self.fusion.members, self.members, strict=True))
        return torch.log(probs.clamp_min(1e-12))


def verify_members(path: Path) -> None:
    """The member files are the ones the ensemble was built and gated with (sha256sum lines in the artifact)."""
    for line in path.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if sha256(path.parent / name) != digest:
            raise ValueError(f"{path.parent / name} is not the file this ensemble was built and gated with "
                             "(sha256 differs); rebuild the ensemble variant and its archive")


class Ensemble(Runtime):
    name = "ensemble"
    elastic = False
    repeatable = False  # its members may be OpenVINO
    def load(self, path: Path, card: ModelCard, device: torch.device, threads: int) -> Predictor:
        assert card.fusion is not None  # the card refuses runtime ensemble without one
        verify_members(path)
        members = []
        for m in card.fusion.members:
            member_dir = path.parent / MEMBERS_DIR / m.dir
            members.append(load_model(member_dir, ModelCard.read(member_dir), device, threads))
        return Fused(card.fusion, members)


if RUNTIMES.keys() != contract.RUNTIMES.keys():
    raise ImportError(f"no loader for runtime {', '.join(contract.RUNTIMES.keys() - RUNTIMES.keys())}")


def load_model(model_dir: Path, card: ModelCard, device: torch.device | str = "cpu",
               threads: int | None = None, repeatable: bool = False) -> Predictor:
    """The artifact the card names in `model_dir`, ready to run on `device`; `repeatable`: the same logits on
    every load, for the figures a card records (one thread for a runtime that is not repeatable on more)."""
    device = torch.device(device)
    path = Path(model_dir) / card.artifact
    for name in card.files:
        if not (Path(model_dir) / name).is_file():
            raise FileNotFoundError(f"{Path(model_dir) / name} (runtime {card.runtime}) not found; rebuild the "
                                    f"variant {card.variant} and its archive")
    runtime = RUNTIMES[card.runtime]
    if device.type not in runtime.devices:
        raise ValueError(f"runtime {card.runtime} runs on {' or '.join(runtime.devices)}, not {device.type}; "
                         f"package variant {card.variant} with --device "
                         f"{'cpu' if 'cpu' in runtime.devices else 'gpu'}")
    if repeatable and not runtime.repeatable:
        threads = 1
    return runtime.load(path, card, device, threads or torch.get_num_threads())
