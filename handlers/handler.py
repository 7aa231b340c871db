"""TorchServe's entry point for every task: load, place, warm up, and serve a batch without ever failing it whole.

The task (handlers/tasks/) says how one input is decoded, how items make a model batch and how one output becomes
an answer; the protocols (handlers/protocols.py) read bodies and write answers from the task's declarations.
Everything else (the model card, limits, per-request errors, describe, metrics, the core lease) lives here once.
`initialize` and `handle` are TorchServe's hooks and the only public names.
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

from handlers import machine, protocols
from handlers.contract import ModelCard
from handlers.cores import OPENMP_ENV, CorePool, openmp_env_missing
from handlers.errors import InputError
from handlers.explain import Saliency, overlay_png
from handlers.imaging import DEFAULT_MAX_PIXELS
from handlers.protocols import Answer, Parsed, Protocol
from handlers.runtimes import RUNTIMES, load_model
from handlers.tasks import Task, as_str, task_class

logger = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "max_bytes": 8 * 1024 * 1024,  # per item, after base64 decoding
    "max_pixels": DEFAULT_MAX_PIXELS,  # declared width x height of an image, checked before decoding
    "amp": "none",  # "bf16" | "fp16" autocast on GPU
    # Intra-op threads per worker. lease: each batch runs on the cores no other worker is using (handlers/cores.py);
    # auto: a fixed share, this machine's cores / maxWorkers; or a fixed number.
    "threads": "lease",
}  # each task adds its own (Task.defaults): topk, score_threshold, ...


def server_fault(what: str, error: Exception) -> InputError:
    """A failure that is not the client's: 500, with the exception's type for the model log to match."""
    detail = (str(error).strip().splitlines() or [""])[0][:200]
    return InputError(f"{what}_failed", f"{what} failed on the server ({type(error).__name__}: {detail}); the "
                      "request was valid as far as the handler can tell, see the model log", 500)


def read_settings(given: dict[str, Any], task: type[Task]) -> dict[str, Any]:
    """DEFAULTS and the task's defaults, overridden by model-config.yaml's handler section; an unknown key is
    refused, not ignored."""
    known = {**DEFAULTS, **task.defaults}
    unknown = sorted(set(given) - set(known))
    if unknown:
        moved = (" torch.compile is no longer a handler option: build the compile variant "
                 "(python -m training.variants.compiled PARENT) and package it." if "compile" in unknown else "")
        raise ValueError(f"unknown handler option(s) {', '.join(unknown)} in model-config.yaml; known: "
                         f"{', '.join(known)}.{moved} Fix the config and rebuild the archive")
    return {**known, **given}


def threads_for(setting: Any, workers: int) -> int:
    """A fixed thread count per worker. Workers of one model share the machine's cores; torch's default (every core
    in each worker) oversubscribes them as soon as there are two workers, and its OpenMP threads then fight."""
    if setting in ("auto", "lease"):
        return max(1, len(os.sched_getaffinity(0)) // max(1, int(workers)))
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"handler option threads must be 'lease', 'auto' or a positive integer, got {setting!r}; "
                         "fix it in model-config.yaml and rebuild the archive")
    return setting


class ModelHandler:
    """One worker's model: the card, its task and its runtime, behind TorchServe's two hooks."""

    cores: CorePool | None = None  # set in initialize when batches lease cores (threads: lease, torch runtime, CPU)

    def initialize(self, context: Any) -> None:
        """TorchServe's start-up hook: read the card, load the model on its device, warm it up."""
        self.context = context
        props = context.system_properties
        self.model_dir = Path(props["model_dir"])
        self.card = ModelCard.read(self.model_dir)
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        kind = task_class(self.card)
        self.settings = read_settings(yaml_cfg.get("handler") or {}, kind)
        self.device = self._pick_device(props.get("gpu_id"))
        self.task = kind(self.card, self.settings, self.device, self.model_dir)
        # Only a runtime whose threads follow torch.set_num_threads leases; one fixed at load keeps the fixed
        # share, since leasing it every core serialized the workers.
        elastic = RUNTIMES[self.card.runtime].elastic
        leasing = self.settings["threads"] == "lease" and self.device.type == "cpu" and elastic
        self.cores = CorePool() if leasing else None
        if leasing and openmp_env_missing():
            logger.warning("TorchServe was started without %s: this worker's idle OpenMP threads keep spinning on "
                           "the cores its lease has released. Start it with %s torchserve --start ...",
                           ", ".join(openmp_env_missing()), " ".join(f"{k}={v}" for k, v in OPENMP_ENV.items()))
        workers = yaml_cfg.get("maxWorkers") or yaml_cfg.get("minWorkers") or 1
        self.threads = self.cores.cores if self.cores else threads_for(self.settings["threads"], workers)
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        self.model = load_model(self.model_dir, self.card, self.device, self.threads)
        loaded = time.perf_counter()
        self.elsewhere = self._machine_check()
        model_info = (context.manifest or {}).get("model", {})
        self.model_name = model_info.get("modelName", self.card.name)
        self.version = model_info.get("modelVersion") or self.card.version
        self.batch_size = int(props.get("batch_size") or 1)
        self.task.setup()
        self.served = protocols.Model(self.model_name, self.version, self.task.outputs(), tuple(self.task.options),
                                      self.task.reads_text)
        self.saliency: Saliency | None = None  # built on the first explanation
        self._warm_up()
        # A compile runtime compiles during the warm-up: start-up cost, reported rather than hidden.
        self.startup = {"load_s": round(loaded - started, 3), "warm_up_s": round(time.perf_counter() - loaded, 3)}
        logger.info("%s %s (%s %s, %s %s) ready on %s, %d threads, start-up %s", self.model_name, self.version,
                    self.card.task, self.card.variant, self.card.runtime, self.card.precision, self.device,
                    self.threads, self.startup)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        """TorchServe's batch hook: one answer per request, a 4xx or 500 for a request that fails, never the batch."""
        self.context = context
        started = time.perf_counter()
        responses: list[Any] = [None] * len(data)
        requests: list[tuple[Protocol, Parsed, dict[str, Any]] | None] = [None] * len(data)
        items: list[tuple[int, torch.Tensor]] = []  # (request index, decoded item)
        for idx, row in enumerate(data):
            if self._header(idx, "describe"):
                responses[idx] = self._describe()
                continue
            if self._header(idx, "explain"):
                responses[idx] = self._explanation(idx, row)
                continue
            protocol: Protocol = protocols.RAW
            try:
                headers = self._headers(idx)
                protocol, body = protocols.detect(protocols.body_of(row), headers)
                parsed = protocol.parse(body, headers, self.served, int(self.settings["max_bytes"]))
                for name in self.served.options:  # or as a form field (a row entry), or an X-Option-Name header
                    given = row.get(name, headers.get("x-" + name.replace("_", "-")))
                    if given is not None and name not in parsed.options:
                        parsed.options[name] = given
                options = {**self.task.read_options(parsed.options), "outputs": parsed.outputs}
                decoded = [self.task.decode(p) for payload in parsed.payloads for p in self.task.split_rows(payload)]
            except InputError as e:
                responses[idx] = self._reject(idx, e, protocol)
                continue
            except Exception as e:  # a decoder bug is the server's fault, and must not take other requests down
                logger.exception("unexpected error decoding request %d", idx)
                responses[idx] = self._reject(idx, server_fault("decode", e), protocol)
                continue
            requests[idx] = (protocol, parsed, options)
            items.extend((idx, t) for t in decoded)
        items = self._decode_items(items, responses, requests)
        pre_ms = (time.perf_counter() - started) * 1000
        if items:
            self._run_batch(items, responses, requests, pre_ms)
        return responses

    # --- device, threads, warm-up ---------------------------------------------------------
    def _pick_device(self, gpu_id: int | None) -> torch.device:
        if self.card.cuda_only and (gpu_id is None or not torch.cuda.is_available()):
            raise ValueError(f"variant {self.card.variant} ({self.card.runtime}) runs on CUDA only, and this worker "
                             "has no GPU; serve it on a GPU host, or package a CPU variant")
        if gpu_id is None or not torch.cuda.is_available():
            return torch.device("cpu")
        if self.card.cpu_only:
            logger.info("variant %s is CPU-only; ignoring gpu_id %s", self.card.variant, gpu_id)
            return torch.device("cpu")
        return torch.device(f"cuda:{gpu_id}")

    @contextlib.contextmanager
    def _leased_cores(self) -> Iterator[None]:
        """Run the enclosed inference on every core no other worker holds (at least one)."""
        if self.cores is None:
            yield
            return
        with self.cores.lease() as n:
            if n != torch.get_num_threads():
                torch.set_num_threads(n)
            yield

    def _machine_check(self) -> list[str]:
        """How this machine differs from the one the variant was timed and picked on (warned, not refused)."""
        speed = self.card.metrics.speed or {}
        elsewhere = machine.differences(speed["machine"]) if "machine" in speed else []
        if elsewhere:
            logger.warning("variant %s was timed and picked on another machine (%s); its speed here may differ: "
                           "re-run python -m training.optimize --pick on this machine", self.card.variant,
                           "; ".join(elsewhere))
        return elsewhere

    def _warm_up(self) -> None:
        # TorchScript's profiling executor specialises on the first calls at each batch shape;
        # pay that at start-up for the smallest and the largest batch the frontend will send.
        example = self.task.example()
        for size in sorted({1, self.batch_size}):
            for _ in range(2):
                self._predict(self.task.batch([example] * size))

    @torch.inference_mode()
    def _predict(self, batch: Any) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.settings["amp"]))
        enabled = dtype is not None and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=enabled):
            return self.task.predict(self.model, batch)

    # --- requests -------------------------------------------------------------------------
    def _headers(self, idx: int) -> dict[str, str]:
        """The request's headers, names lower-cased (TorchServe passes them as the client sent them)."""
        if not self.context or not self.context.request_processor:
            return {}
        return {str(k).lower(): str(v) for k, v in (self.context.get_all_request_header(idx) or {}).items()}

    def _header(self, idx: int, name: str) -> bool:
        """describe: TorchServe's describe call (management `?customized=true`) or a `describe: true` header;
        explain: POST /explanations/{model}, which the frontend marks with an `explain: True` header."""
        return as_str(self._headers(idx).get(name, "")).lower() == "true"

    def _explanation(self, idx: int, row: dict[str, Any]) -> Any:
        """One input's top-label saliency, computed on the fp32 parent; 501 when the archive or Captum lacks it."""
        try:
            if self.card.explainer is None:
                raise InputError("explanations_not_packed", f"this archive ({self.card.variant}) carries no weights "
                                 "to explain with; rebuild it with build_mar.sh MODEL_DIR --explain", 501)
            if self.saliency is None:
                self.saliency = Saliency(self.model_dir, self.card.explainer, self.card.num_classes, self.device)
            headers = self._headers(idx)
            protocol, body = protocols.detect(protocols.body_of(row), headers)
            parsed = protocol.parse(body, headers, self.served, int(self.settings["max_bytes"]))
            decoded = [self.task.decode(p) for payload in parsed.payloads for p in self.task.split_rows(payload)]
            if len(decoded) != 1:
                raise InputError("one_input", f"an explanation takes one input, got {len(decoded)}", 422)
            (tensor,) = self.task.decode_batch(decoded)
            if isinstance(tensor, InputError):
                raise tensor
            result = self.saliency(self.task.batch([tensor]), self.task.batch([torch.zeros_like(tensor)]))
        except InputError as e:
            return self._reject(idx, e, protocols.RAW)
        except Exception as e:  # as for predictions: a 500 for this request, the worker stays
            logger.exception("explanation failed for request %d", idx)
            return self._reject(idx, server_fault("explanation", e), protocols.RAW)
        grid = result.pop("grid")
        out = {"label": self.card.labels[result["target"]], **result, "shape": list(grid.shape),
               "saliency": [[round(v, 6) for v in line] for line in grid.tolist()], "model": self._model_ref()}
        # A header, not ?png=true: TorchServe 0.12 passes no query parameters to /explanations.
        if headers.get("x-explain-png", "").lower() == "true" and tensor.dtype == torch.uint8:
            out["png"] = overlay_png(tensor.cpu(), grid)
        self.context.set_response_content_type(idx, "application/json")
        return out

    def _decode_items(self, items: list[tuple[int, torch.Tensor]], responses: list[Any],
                      requests: list[Any]) -> list[tuple[int, torch.Tensor]]:
        """decode_batch over the whole batch; a request with a failed item is rejected whole, the others go on."""
        if not items:
            return items
        try:
            results = self.task.decode_batch([t for _, t in items])
        except Exception as e:
            logger.exception("decode_batch failed for a batch of %d", len(items))
            results = [server_fault("decode", e)] * len(items)
        failed: set[int] = set()
        kept = []
        for (idx, _), result in zip(items, results, strict=True):
            if isinstance(result, InputError):
                if idx not in failed:
                    responses[idx] = self._reject(idx, result, requests[idx][0])
                failed.add(idx)
            else:
                kept.append((idx, result))
        return [(idx, t) for idx, t in kept if idx not in failed]

    def _run_batch(self, items: list[tuple[int, torch.Tensor]], responses: list[Any], requests: list[Any],
                   pre_ms: float) -> None:
        t0 = time.perf_counter()
        try:
            batch = self.task.batch([t for _, t in items])
            t1 = time.perf_counter()
            with self._leased_cores():
                outputs = self.task.unbatch(self._predict(batch))
        except Exception as e:  # e.g. out of memory: answer every request in the batch, keep the worker
            logger.exception("inference failed for a batch of %d", len(items))
            for idx in {idx for idx, _ in items}:
                responses[idx] = self._reject(idx, server_fault("inference", e), requests[idx][0])
            return
        t2 = time.perf_counter()
        per_request: dict[int, list[Answer]] = {}
        for (idx, item), out in zip(items, outputs, strict=True):
            answer = self.task.respond(out, item, requests[idx][2])
            per_request.setdefault(idx, []).append(Answer({**answer, "model": self._model_ref()},
                                                          self.task.tensors(answer)))
        for idx, answers in per_request.items():
            protocol, parsed, _ = requests[idx]
            responses[idx] = protocol.respond(answers, parsed, self.served)
            self.context.set_response_content_type(idx, "application/json")
        t3 = time.perf_counter()
        self._record_metrics(pre_ms + (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000, len(items))

    def _reject(self, idx: int, error: InputError, protocol: Protocol) -> Any:
        self.context.set_response_status(error.status, error.message, idx)
        self.context.set_response_content_type(idx, "application/json")
        self._emit("RejectedInputs", 1, "count", MetricTypes.COUNTER, Dimension("Reason", error.code))
        return protocol.error(error)

    # --- metrics, describe ----------------------------------------------------------------
    def _record_metrics(self, pre_ms: float, infer_ms: float, post_ms: float, batch: int) -> None:
        for name, value in (("PreprocessMs", pre_ms), ("InferenceMs", infer_ms), ("PostprocessMs", post_ms)):
            self._emit(name, round(value, 3), "ms", MetricTypes.GAUGE)
        self._emit("HandlerBatchSize", batch, "count", MetricTypes.HISTOGRAM)

    def _emit(self, name: str, value: float, unit: str, kind: MetricTypes, *extra: Dimension) -> None:
        """Custom metrics; TorchServe drops any not declared in handlers/metrics.yaml."""
        metrics = getattr(self.context, "metrics", None)
        if metrics is None:
            return
        dims = [Dimension("ModelName", self.model_name), Dimension("Level", "Model"), *extra]
        metrics.add_metric(name, value, unit, None, dims, kind)

    def _model_ref(self) -> dict[str, str]:
        return {"name": self.model_name, "version": self.version, "variant": self.card.variant}

    def _describe(self) -> dict[str, Any]:
        """The model card as packed in the archive, and how this worker serves it."""
        name, datatype = self.task.oip_input
        item = [] if datatype == "BYTES" else list(self.task.input_shape())
        return {
            "card": self.card.to_dict(),
            "serving": {
                "name": self.model_name,
                "version": self.version,
                "task": self.card.task,
                "device": str(self.device),
                "threads": self.threads,
                "thread_policy": "lease" if self.cores else "fixed",
                "runtime": self.card.runtime,
                "precision": self.card.precision,
                "startup": self.startup,
                "picked_elsewhere": self.elsewhere,
                "batch_size": self.batch_size,
                "accepts": self.task.accepts,
                "input_shape": list(self.task.input_shape()),
                "options": sorted(self.task.options),
                "limits": {k: self.settings[k] for k in ("max_bytes", "max_pixels", "max_chars") if k in self.settings},
                "open_inference": {
                    "inputs": [{"name": name, "datatype": datatype, "shape": [-1, *item]}],
                    "outputs": [{"name": o.name, "datatype": o.datatype, "shape": [-1, *o.shape]}
                                for o in self.task.outputs()],
                },
            },
        }
