"""The task seam: what one kind of model takes and answers.

A task declares its input, its outputs and its per-request options, and implements a handful of verbs (setup,
decode, batch, predict, unbatch, respond). The TorchServe adapter (handlers/handler.py) and every protocol
(handlers/protocols.py) work from those declarations and never ask which task they serve. A new task is one
module in this package, named as the task, plus its name in handlers/contract.py's TASKS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handlers.contract import ModelCard
from handlers.errors import InputError


@dataclass(frozen=True)
class Output:
    """One named output as the Open Inference Protocol lists it: its datatype and one item's shape.

    -1 in `shape` is a size that differs between items (a detector's boxes): a response pads it to the longest
    item, and the output named by `count` says how many entries of each item are real.
    """

    name: str
    datatype: str  # OIP datatype: FP32, INT32, BYTES
    shape: tuple[int, ...]
    pad: Any = 0  # what fills a padded entry


def flag(value: Any) -> bool:
    """A true/false option as JSON, a form field or a query parameter (often bytes) sends it."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def as_str(value: Any) -> str:
    """A value as a string (bytes as UTF-8). Not named text: handlers.tasks.text is the text task's module."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


class Task:
    """One kind of model: its verbs, and the declarations the adapter and the protocols read."""

    accepts = 'JSON {"data": nested lists matching the model input shape}, or KServe v1/v2 tensors'
    oip_input = ("input", "FP32")  # the input the OIP metadata declares: (name, datatype)
    # True: a string payload is the input itself (text), not base64 of binary data.
    reads_text = False
    defaults: dict[str, Any] = {}  # model-config.yaml handler options this task adds to the adapter's
    # Per-request options (a JSON body's keys, KServe v1 keys, OIP parameters, query parameters) -> their parsers.
    options: dict[str, Callable[[Any], Any]] = {}

    def __init__(self, card: ModelCard, settings: dict[str, Any], device: torch.device,
                 model_dir: Path | None = None) -> None:
        # model_dir: where the card's companion files are (card.files); only a task that reads one needs it.
        self.card, self.settings, self.device, self.model_dir = card, settings, device, model_dir

    def setup(self) -> None:
        """Per-model state, built once after the model is loaded."""

    def input_shape(self) -> tuple[int, ...]:
        """The shape of one model input item (-1 where any size is taken)."""
        return tuple(self.card.input.shape)

    def decode(self, payload: Any) -> torch.Tensor:
        """One request payload (bytes, str or JSON value) -> one input item."""
        return self.tensor_from_json(payload)

    def decode_batch(self, items: list[torch.Tensor]) -> list[torch.Tensor | InputError]:
        """Work done once per batch on decoded items (e.g. GPU decoding); an InputError fails only its item."""
        return list(items)

    def batch(self, items: list[torch.Tensor]) -> Any:
        """Decoded items -> one model input on the device."""
        return torch.stack(items).to(self.device)

    def predict(self, model: Callable[[Any], Any], batch: Any) -> Any:
        """The model on one batch."""
        return model(batch).float()

    def unbatch(self, output: Any) -> list[Any]:
        """The model's output -> one output per item, on the CPU."""
        return list(output.cpu())

    def respond(self, output: Any, item: torch.Tensor, options: dict[str, Any]) -> dict[str, Any]:
        """One item's output -> its JSON answer (without the model reference, which the adapter adds)."""
        raise NotImplementedError

    def outputs(self) -> tuple[Output, ...]:
        """The outputs this model answers, as the OIP metadata lists them."""
        raise NotImplementedError

    def tensors(self, answer: dict[str, Any]) -> dict[str, Any]:
        """One item's JSON answer -> its named outputs (nested lists), for the OIP response."""
        return {o.name: answer[o.name] for o in self.outputs() if o.name in answer}

    def example(self) -> torch.Tensor:
        """One input item for the warm-up."""
        return torch.zeros(self.input_shape())

    def read_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """A request's options, parsed; a bad value is the client's mistake (422), naming what to send."""
        parsed = {}
        for name, value in given.items():
            try:
                parsed[name] = self.options[name](value)
            except (TypeError, ValueError) as e:
                raise InputError("bad_option", f"option {name}={as_str(value)[:80]!r} is not valid: {e}", 422) from e
        return parsed

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
        if tensor.ndim == len(shape) + 1 and tensor.shape[0] == 1 and fits(tensor.shape[1:], shape):
            tensor = tensor[0]
        if not fits(tensor.shape, shape):
            raise InputError("wrong_shape", f"tensor shape {list(tensor.shape)} != model input {list(shape)}", 422)
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise InputError("non_finite", "tensor holds NaN or infinite values", 422)
        return tensor


def fits(dims: tuple[int, ...] | torch.Size, shape: tuple[int, ...]) -> bool:
    """`dims` is a shape `shape` takes (-1 there: any size)."""
    return len(dims) == len(shape) and all(s in (-1, d) for d, s in zip(dims, shape, strict=True))


def task_class(card: ModelCard) -> type[Task]:
    """The Task subclass that serves `card`: TASK in the module named as card.task."""
    return importlib.import_module(f"handlers.tasks.{card.task}").TASK
