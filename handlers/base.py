"""The shared handler base: load, place, warm up, and serve a batch without ever failing it whole.

A subclass says how to turn one input into a tensor (`decode`, and `decode_batch` for work done once per
batch), how to stack tensors into a model batch (`collate`) and how to turn one output row into a response
(`respond`). Everything else (the model card, request bodies, limits, per-request errors, describe, metrics)
lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from handlers import machine, protocols
from handlers.contract import ModelCard
from handlers.cores import OPENMP_ENV, CorePool, openmp_env_missing
from handlers.errors import InputError
from handlers.explain import Saliency, overlay_png
from handlers.protocols import Parsed, Protocol
from handlers.runtimes import RUNTIMES, load_model

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "topk": 5,
    "max_bytes": 8 * 1024 * 1024,  # per item, after base64 decoding
    "max_pixels": 40_000_000,  # declared width x height, checked before decoding
    "amp": "none",  # "bf16" | "fp16" autocast on GPU
    "gpu_decode": False,  # nvjpeg JPEG decoding on GPU workers
    # Intra-op threads per worker. lease: each batch runs on the cores no other worker is using (handlers/cores.py);
    # auto: a fixed share, this machine's cores / maxWorkers; or a fixed number.
    "threads": "lease",
}


class Item:
    """One model input: where it came from in the batch, and the decoded tensor."""

    __slots__ = ("request", "tensor")

    def __init__(self, request: int, tensor: torch.Tensor) -> None:
        self.request = request
        self.tensor = tensor


def server_fault(what: str, error: Exception) -> InputError:
    """A failure that is not the client's: 500, with the exception's type for the model log to match."""
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return InputError(f"{what}_failed", f"{what} failed on the server ({type(error).__name__}: {detail}); the "
                      "request was valid as far as the handler can tell, see the model log", 500)


def query_flag(row: dict[str, Any], name: str) -> bool:
    """A true/false query or form parameter, which TorchServe passes as a row entry (often bytes)."""
    value = row.get(name)
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    return str(value).lower() == "true"


class ModelHandler(BaseHandler):
    # What a subclass takes as input; used in error messages and in describe().
    accepts = "a JSON tensor matching the model's input shape"
    # The input the Open Inference Protocol metadata declares: (name, datatype).
    oip_input = ("input", "FP32")
    cores: CorePool | None = None  # set in initialize when batches lease cores (threads: lease, torch runtime, CPU)

    def initialize(self, context: Any) -> None:
        self.context = context
        self.manifest = context.manifest
        props = context.system_properties
        self.model_dir = Path(props["model_dir"])
        self.card = ModelCard.read(self.model_dir)
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        self.options = self.read_options(yaml_cfg.get("handler") or {})
        self.device = self.pick_device(props.get("gpu_id"))
        # Only a runtime whose threads follow torch.set_num_threads leases; one fixed at load keeps the fixed
        # share, since leasing it every core serialized the workers.
        elastic = RUNTIMES[self.card.runtime].elastic
        leasing = self.options["threads"] == "lease" and self.device.type == "cpu" and elastic
        self.cores = CorePool() if leasing else None
        if leasing and openmp_env_missing():
            logger.warning("TorchServe was started without %s: this worker's idle OpenMP threads keep spinning on "
                           "the cores its lease has released. Start it with %s torchserve --start ...",
                           ", ".join(openmp_env_missing()), " ".join(f"{k}={v}" for k, v in OPENMP_ENV.items()))
        self.threads = self.pick_threads(yaml_cfg.get("maxWorkers") or yaml_cfg.get("minWorkers") or 1)
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        self.model = load_model(self.model_dir, self.card, self.device, self.threads)
        loaded = time.perf_counter()
        self.elsewhere = self.machine_check()
        model_info = (self.manifest or {}).get("model", {})
        self.model_name = model_info.get("modelName", self.card.name)
        self.version = model_info.get("modelVersion") or self.card.version
        self.batch_size = int(props.get("batch_size") or 1)
        self.served = protocols.Model(self.model_name, self.version, self.outputs())
        self.saliency: Saliency | None = None  # built on the first explanation
        self.setup()
        self.warm_up()
        # A compile runtime compiles during the warm-up: start-up cost, reported rather than hidden.
        self.startup = {"load_s": round(loaded - started, 3), "warm_up_s": round(time.perf_counter() - loaded, 3)}
        self.initialized = True
        logger.info("%s %s (%s, %s %s) ready on %s, %d threads, start-up %s", self.model_name, self.version,
                    self.card.variant, self.card.runtime, self.card.precision, self.device, self.threads,
                    self.startup)

    # --- hooks for subclasses -------------------------------------------------------------
    def setup(self) -> None:
        """Per-model state built once, after the model is loaded."""

    def input_shape(self) -> tuple[int, ...]:
        """The shape of one model input item."""
        return tuple(self.card.input.shape)

    def decode(self, payload: Any) -> torch.Tensor:
        """One request payload (bytes, str or JSON value) -> one input tensor."""
        return self.tensor_from_json(payload)

    def decode_batch(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | InputError]:
        """Work done once per batch on decoded items (e.g. GPU decoding); an InputError fails only its item."""
        return list(tensors)

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Decoded items -> one model batch on the device."""
        return torch.stack(tensors).to(self.device)

    def respond(self, output: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        """One output row -> top-k labels with probabilities (and raw logits when asked)."""
        labels = self.card.labels
        top = torch.topk(torch.softmax(output, dim=0), min(int(self.options["topk"]), len(labels)))
        pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        result: dict[str, Any] = {
            "label": labels[int(top.indices[0])],
            "probabilities": {labels[i]: round(p, 6) for i, p in pairs},
            "model": self.model_card_ref(),
        }
        if options.get("logits"):
            result["logits"] = [round(float(x), 6) for x in output]
        return result

    def outputs(self) -> tuple[str, ...]:
        """The named outputs `respond` gives, as the Open Inference Protocol lists them."""
        return ("labels", "probabilities", "logits")

    def model_card_ref(self) -> dict[str, str]:
        return {"name": self.model_name, "version": self.version, "variant": self.card.variant}

    # --- device, warm-up ------------------------------------------------------------------
    def pick_device(self, gpu_id: int | None) -> torch.device:
        if self.card.cuda_only and (gpu_id is None or not torch.cuda.is_available()):
            raise ValueError(f"variant {self.card.variant} ({self.card.runtime}) runs on CUDA only, and this worker "
                             "has no GPU; serve it on a GPU host, or package a CPU variant")
        if gpu_id is None or not torch.cuda.is_available():
            return torch.device("cpu")
        if self.card.cpu_only:
            logger.info("variant %s is CPU-only; ignoring gpu_id %s", self.card.variant, gpu_id)
            return torch.device("cpu")
        return torch.device(f"cuda:{gpu_id}")

    def pick_threads(self, workers: int) -> int:
        """Workers of one model share the machine's cores. torch's default (every core in each worker)
        oversubscribes them as soon as there are two workers, and its OpenMP threads then fight over cores."""
        value = self.options["threads"]
        cores = len(os.sched_getaffinity(0))
        if self.cores is not None:
            return self.cores.cores  # the most a batch can lease
        if value in ("auto", "lease"):
            return max(1, cores // max(1, int(workers)))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"handler option threads must be 'lease', 'auto' or a positive integer, got {value!r}; "
                             "fix it in model-config.yaml and rebuild the archive")
        return value

    @contextlib.contextmanager
    def leased_cores(self) -> Iterator[None]:
        """Run the enclosed inference on every core no other worker holds (at least one)."""
        if self.cores is None:
            yield
            return
        with self.cores.lease() as n:
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
            yield

    @staticmethod
    def read_options(given: dict[str, Any]) -> dict[str, Any]:
        """DEFAULTS overridden by model-config.yaml's handler section; an unknown key is refused, not ignored."""
        unknown = sorted(set(given) - set(DEFAULTS))
        if unknown:
            moved = (" torch.compile is no longer a handler option: build the compile variant "
                     "(python -m training.variants.compiled PARENT) and package it." if "compile" in unknown else "")
            raise ValueError(f"unknown handler option(s) {', '.join(unknown)} in model-config.yaml; known: "
                             f"{', '.join(DEFAULTS)}.{moved} Fix the config and rebuild the archive")
        return {**DEFAULTS, **given}

    def machine_check(self) -> list[str]:
        """How this machine differs from the one the variant was timed and picked on (warned, not refused)."""
        speed = self.card.metrics.speed or {}
        elsewhere = machine.differences(speed["machine"]) if "machine" in speed else []
        if elsewhere:
            logger.warning("variant %s was timed and picked on another machine (%s); its speed here may differ: "
                           "re-run python -m training.optimize --pick on this machine", self.card.variant,
                           "; ".join(elsewhere))
        return elsewhere

    def amp_dtype(self) -> torch.dtype | None:
        if self.device.type != "cuda":
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.options["amp"]))

    def warm_up(self) -> None:
        # TorchScript's profiling executor specialises on the first calls at each batch shape;
        # pay that at start-up for the smallest and the largest batch the frontend will send.
        example = torch.zeros(self.input_shape())
        for size in sorted({1, self.batch_size}):
            for _ in range(2):
                self.forward(self.collate([example] * size))

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = self.amp_dtype()
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return self.model(batch).float()

    # --- request bodies -------------------------------------------------------------------
    def headers(self, idx: int) -> dict[str, str]:
        """The request's headers, names lower-cased (TorchServe passes them as the client sent them)."""
        if not self.context or not self.context.request_processor:
            return {}
        return {str(k).lower(): str(v) for k, v in (self.context.get_all_request_header(idx) or {}).items()}

    def split_rows(self, payload: Any) -> list[Any]:
        """A tensor holding a batch of model inputs (an OIP input with a batch dimension) -> one per row."""
        if isinstance(payload, torch.Tensor) and payload.ndim == len(self.input_shape()) + 1:
            return list(payload)
        return [payload]

    def tensor_from_json(self, value: Any) -> torch.Tensor:
        """A nested list (or tensor) that must already match the model input shape."""
        if isinstance(value, (bytes, bytearray)):
            raise InputError("unsupported_format", f"got binary data; this model takes {self.accepts}", 415)
        if isinstance(value, torch.Tensor):
            tensor = value
        else:
            try:
                tensor = torch.tensor(value)
            except (TypeError, ValueError, RuntimeError) as e:
                raise InputError("wrong_dtype", f"tensor must be nested lists of numbers: {e}", 422) from e
        if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32)):
            raise InputError("wrong_dtype", f"tensor must hold numbers, got {tensor.dtype}", 422)
        shape = self.input_shape()
        if tuple(tensor.shape) == (1, *shape):
            tensor = tensor[0]
        if tuple(tensor.shape) != shape:
            raise InputError("wrong_shape", f"tensor shape {list(tensor.shape)} != model input {list(shape)}", 422)
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise InputError("non_finite", "tensor holds NaN or infinite values", 422)
        return tensor

    # --- the batch ------------------------------------------------------------------------
    def is_describe(self, idx: int) -> bool:
        """TorchServe's describe call (management `?customized=true`) or a `describe: true` request header."""
        return self.headers(idx).get("describe", "").lower() == "true"

    def is_explain(self, idx: int) -> bool:
        """POST /explanations/{model}: TorchServe's frontend marks the request with an `explain: True` header."""
        return self.headers(idx).get("explain", "").lower() == "true"

    def explanation(self, idx: int, row: dict[str, Any]) -> Any:
        """One input's top-label saliency, computed on the fp32 parent; 501 when the archive or Captum lacks it."""
        try:
            if self.card.explainer is None:
                raise InputError("explanations_not_packed", f"this archive ({self.card.variant}) carries no weights "
                                 "to explain with; rebuild it with build_mar.sh MODEL_DIR --explain", 501)
            if self.saliency is None:
                self.saliency = Saliency(self.model_dir, self.card.explainer, self.card.num_classes, self.device)
            headers = self.headers(idx)
            protocol, body = protocols.detect(protocols.body_of(row), headers)
            parsed = protocol.parse(body, headers, self.served, int(self.options["max_bytes"]))
            decoded = [self.decode(p) for payload in parsed.payloads for p in self.split_rows(payload)]
            if len(decoded) != 1:
                raise InputError("one_input", f"an explanation takes one input, got {len(decoded)}", 422)
            (tensor,) = self.decode_batch(decoded)
            if isinstance(tensor, InputError):
                raise tensor
            result = self.saliency(self.collate([tensor]), self.collate([torch.zeros_like(tensor)]))
        except InputError as e:
            return self.reject(idx, e, protocols.RAW)
        except Exception as e:  # as for predictions: a 500 for this request, the worker stays
            logger.exception("explanation failed for request %d", idx)
            return self.reject(idx, server_fault("explanation", e), protocols.RAW)
        grid = result.pop("grid")
        out = {"label": self.card.labels[result["target"]], **result, "shape": list(grid.shape),
               "saliency": [[round(v, 6) for v in line] for line in grid.tolist()], "model": self.model_card_ref()}
        # A header, not ?png=true: TorchServe 0.12 passes no query parameters to /explanations.
        if headers.get("x-explain-png", "").lower() == "true" and tensor.dtype == torch.uint8:
            out["png"] = overlay_png(tensor.cpu(), grid)
        self.context.set_response_content_type(idx, "application/json")
        return out

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        self.context = context
        started = time.perf_counter()
        responses: list[Any] = [None] * len(data)
        requests: list[tuple[Protocol, Parsed] | None] = [None] * len(data)
        items: list[Item] = []
        for idx, row in enumerate(data):
            if self.is_describe(idx):
                responses[idx] = self.describe()
                continue
            if self.is_explain(idx):
                responses[idx] = self.explanation(idx, row)
                continue
            protocol: Protocol = protocols.RAW
            try:
                headers = self.headers(idx)
                protocol, body = protocols.detect(protocols.body_of(row), headers)
                parsed = protocol.parse(body, headers, self.served, int(self.options["max_bytes"]))
                parsed.logits = parsed.logits or query_flag(row, "return_logits")
                decoded = [self.decode(p) for payload in parsed.payloads for p in self.split_rows(payload)]
            except InputError as e:
                responses[idx] = self.reject(idx, e, protocol)
                continue
            except Exception as e:  # a decoder bug is the server's fault, and must not take other requests down
                logger.exception("unexpected error decoding request %d", idx)
                responses[idx] = self.reject(idx, server_fault("decode", e), protocol)
                continue
            requests[idx] = (protocol, parsed)
            items.extend(Item(idx, t) for t in decoded)
        items = self.decode_items(items, responses, requests)
        pre_ms = (time.perf_counter() - started) * 1000
        if items:
            self.run_batch(items, responses, requests, pre_ms)
        return responses

    def decode_items(self, items: list[Item], responses: list[Any],
                     requests: list[tuple[Protocol, Parsed] | None]) -> list[Item]:
        """decode_batch over the whole batch; a request with a failed item is rejected whole, the others go on."""
        if not items:
            return items
        try:
            results = self.decode_batch([it.tensor for it in items])
        except Exception as e:
            logger.exception("decode_batch failed for a batch of %d", len(items))
            results = [server_fault("decode", e)] * len(items)
        failed: set[int] = set()
        for it, result in zip(items, results, strict=True):
            if isinstance(result, InputError):
                if it.request not in failed:
                    responses[it.request] = self.reject(it.request, result, self.protocol_of(requests, it.request))
                failed.add(it.request)
            else:
                it.tensor = result
        return [it for it in items if it.request not in failed]

    def run_batch(self, items: list[Item], responses: list[Any], requests: list[tuple[Protocol, Parsed] | None],
                  pre_ms: float) -> None:
        t0 = time.perf_counter()
        try:
            batch = self.collate([it.tensor for it in items])
            t1 = time.perf_counter()
            with self.leased_cores():
                outputs = self.forward(batch).cpu()
        except Exception as e:  # e.g. out of memory: answer every request in the batch, keep the worker
            logger.exception("inference failed for a batch of %d", len(items))
            for idx in {it.request for it in items}:
                responses[idx] = self.reject(idx, server_fault("inference", e), self.protocol_of(requests, idx))
            return
        t2 = time.perf_counter()
        per_request: dict[int, list[dict[str, Any]]] = {}
        for it, out in zip(items, outputs, strict=True):
            protocol, parsed = requests[it.request]  # type: ignore[misc]
            per_request.setdefault(it.request, []).append(self.respond(out, {"logits": parsed.logits}))
        for idx, results in per_request.items():
            protocol, parsed = requests[idx]  # type: ignore[misc]
            responses[idx] = protocol.respond(results, parsed, self.served)
            self.context.set_response_content_type(idx, "application/json")
        t3 = time.perf_counter()
        self.record_metrics(pre_ms + (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000, len(items))

    @staticmethod
    def protocol_of(requests: list[tuple[Protocol, Parsed] | None], idx: int) -> Protocol:
        request = requests[idx]
        return request[0] if request else protocols.RAW

    def reject(self, idx: int, error: InputError, protocol: Protocol) -> Any:
        self.context.set_response_status(error.status, error.message, idx)
        self.context.set_response_content_type(idx, "application/json")
        self.record_rejection(error.code)
        return protocol.error(error)

    # --- metrics, describe ----------------------------------------------------------------
    def record_metrics(self, pre_ms: float, infer_ms: float, post_ms: float, batch: int) -> None:
        for name, value in (("PreprocessMs", pre_ms), ("InferenceMs", infer_ms), ("PostprocessMs", post_ms)):
            self.emit(name, round(value, 3), "ms", MetricTypes.GAUGE)
        self.emit("HandlerBatchSize", batch, "count", MetricTypes.HISTOGRAM)

    def record_rejection(self, reason: str) -> None:
        self.emit("RejectedInputs", 1, "count", MetricTypes.COUNTER, Dimension("Reason", reason))

    def emit(self, name: str, value: float, unit: str, kind: MetricTypes, *extra: Dimension) -> None:
        """Custom metrics; TorchServe drops any not declared in handlers/metrics.yaml."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        dims = [Dimension("ModelName", self.model_name), Dimension("Level", "Model"), *extra]
        metrics.add_metric(name, value, unit, None, dims, kind)

    def describe(self) -> dict[str, Any]:
        """The model card as packed in the archive, and how this worker serves it."""
        return {
            "card": self.card.to_dict(),
            "serving": {
                "name": self.model_name,
                "version": self.version,
                "device": str(self.device),
                "threads": self.threads,
                "thread_policy": "lease" if self.cores else "fixed",
                "runtime": self.card.runtime,
                "precision": self.card.precision,
                "startup": self.startup,
                "picked_elsewhere": self.elsewhere,
                "batch_size": self.batch_size,
                "accepts": self.accepts,
                "input_shape": list(self.input_shape()),
                "limits": {k: self.options[k] for k in ("max_bytes", "max_pixels")},
                "open_inference": self.tensor_metadata(),
            },
        }

    def tensor_metadata(self) -> dict[str, list[dict[str, Any]]]:
        """The Open Inference Protocol's model metadata: the input and outputs, -1 for the batch dimension."""
        name, datatype = self.oip_input
        item = [] if datatype == "BYTES" else list(self.input_shape())
        k = min(int(self.options["topk"]), len(self.card.labels))
        shapes = {"labels": [-1, k], "probabilities": [-1, k], "logits": [-1, len(self.card.labels)],
                  "values": [-1, -1]}
        return {
            "inputs": [{"name": name, "datatype": datatype, "shape": [-1, *item]}],
            "outputs": [{"name": o, "datatype": "BYTES" if o == "labels" else "FP32", "shape": shapes[o]}
                        for o in self.outputs()],
        }
