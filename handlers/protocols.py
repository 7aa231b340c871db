"""The request and response bodies the handler speaks: TorchServe's raw bodies, KServe v1, and the Open
Inference Protocol (KServe v2, JSON or with the binary-data extension).

A protocol turns one request body into payloads (image bytes, a text, or a tensor-like value) and turns the
per-item results back into that protocol's response, or an error into that protocol's error body. The
handler never looks inside a body itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

import numpy as np
import torch

from handlers.errors import InputError

if TYPE_CHECKING:
    from handlers.tasks import Output

BASE64_KEYS = ("data", "image", "b64")
TEXT_KEYS = ("text", "inputs", "data")  # where a JSON body carries a text model's input (inputs: Hugging Face's)
# The OIP binary-data extension: the JSON header's length; the binary tensors follow it.
BINARY_HEADER = "inference-header-content-length"
DATA_URI = re.compile(rb"^data:[^,]*?(;base64)?,", re.IGNORECASE)
WHITESPACE = re.compile(rb"\s+")
# OIP tensor datatypes the handler accepts as numbers (little-endian in the binary extension).
NUMERIC = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
           "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}


@dataclass
class Parsed:
    """One request: its payloads, in order, and the task's per-request options it carried (unparsed)."""

    payloads: list[Any]
    options: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # OIP: the outputs the caller named, in its order
    id: str | None = None  # OIP: echoed in the response


@dataclass(frozen=True)
class Model:
    """What a response names: the served model, the outputs its task declares and the options it takes."""

    name: str
    version: str
    outputs: tuple[Output, ...]
    options: tuple[str, ...] = ()
    text: bool = False  # the task reads text: a string payload is the input, not base64

    @property
    def keys(self) -> tuple[str, ...]:
        """The JSON keys that hold a payload."""
        return TEXT_KEYS if self.text else BASE64_KEYS

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def options_in(self, given: Any) -> dict[str, Any]:
        """The task's options among a JSON object's keys."""
        return {k: given[k] for k in self.options if k in given} if isinstance(given, dict) else {}


@dataclass(frozen=True)
class Answer:
    """One item's answer: the JSON people read, and the named outputs the Open Inference Protocol renders."""

    json: dict[str, Any]
    tensors: dict[str, Any]


def decode_base64(text: str | bytes, max_bytes: int) -> bytes:
    """Base64 as browsers and mail clients send it: an optional `data:` URI prefix, line breaks allowed."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    uri = DATA_URI.match(raw)
    if uri:
        raw = raw[uri.end():]
        if not uri.group(1):  # a percent-encoded data URI, not base64
            return unquote_to_bytes(raw)
    raw = WHITESPACE.sub(b"", raw)
    if len(raw) > max_bytes * 4 // 3 + 4:
        raise InputError("body_too_large", f"base64 payload exceeds {max_bytes} bytes", 413)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError("bad_base64", f"the payload is not valid base64 (or a data: URI): {e}") from e


def body_of(row: dict[str, Any]) -> Any:
    body = row.get("data")
    return row.get("body") if body is None else body


def as_json(body: Any) -> Any:
    """Bodies TorchServe did not parse (a JSON body sent without a JSON content type) -> JSON values."""
    if isinstance(body, (bytes, bytearray)) and body[:1] in (b"{", b"["):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str) and body.lstrip()[:1] in ("{", "["):
        try:
            return json.loads(body)
        except json.JSONDecodeError as e:
            raise InputError("bad_json", f"body is not valid JSON: {e}") from e
        except RecursionError as e:  # nesting deeper than Python's parser recurses: the body's shape, not a bug
            raise InputError("bad_json", "body nests JSON arrays or objects too deep to parse; send a flat body "
                             "(base64 image bytes, or a tensor of at most a few dimensions)") from e
    return body


class Protocol:
    """How one protocol reads a request and writes its answer and its errors."""

    def parse(self, body: Any, headers: dict[str, str], model: Model, max_bytes: int) -> Parsed:
        """A request body -> its payloads."""
        raise NotImplementedError

    def respond(self, answers: list[Answer], parsed: Parsed, model: Model) -> Any:
        """Per-item answers of one request -> its response body."""
        raise NotImplementedError

    def error(self, error: InputError) -> Any:
        """An InputError -> this protocol's error body."""
        return {"error": f"{error.code}: {error.message}"}


class Raw(Protocol):
    """TorchServe's own bodies: image bytes, a data: URI, {"data"|"image"|"b64": base64 or tensor}, or a tensor;
    for a model that reads text, the text (text/plain, or bytes) or {"text"|"inputs"|"data": the text}."""

    def parse(self, body: Any, headers: dict[str, str], model: Model, max_bytes: int) -> Parsed:
        if body is None:
            sent = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
            if "form" in sent:  # TorchServe split the body as a form and found no field named data or body
                raise InputError("empty_body", f"the body was sent as a form ({sent.split(';')[0]}: curl's default "
                                 "for -d and --data-binary) with no field named 'data'; send image bytes with "
                                 "'Content-Type: application/octet-stream', or a multipart field 'data' "
                                 "(curl -F data=@image.png)")
            raise InputError("empty_body", "the request has no body; send image bytes or JSON")
        if isinstance(body, (bytes, bytearray)) and len(body) > max_bytes:
            raise InputError("body_too_large", f"body is {len(body)} bytes; the limit is {max_bytes}", 413)
        if isinstance(body, (bytes, bytearray)) and not model.text and DATA_URI.match(body[:256]):
            return Parsed([decode_base64(body, max_bytes)])
        if isinstance(body, str):
            if model.text:
                return Parsed([body])
            if DATA_URI.match(body[:256].encode("ascii", "replace")):
                return Parsed([decode_base64(body, max_bytes)])
            raise InputError("unsupported_format", "got text that is neither JSON nor a data: URI; send image "
                             "bytes, base64 in JSON, or a data:image/...;base64 URI", 415)
        if isinstance(body, dict):
            return Parsed([json_payload(body, max_bytes, model)], model.options_in(body))
        return Parsed([body])

    def respond(self, answers: list[Answer], parsed: Parsed, model: Model) -> Any:
        return answers[0].json

    def error(self, error: InputError) -> Any:
        return error.body()


class KServeV1(Protocol):
    """KServe v1: {"instances": [...]} -> {"predictions": [...]}."""

    def parse(self, body: Any, headers: dict[str, str], model: Model, max_bytes: int) -> Parsed:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError("bad_request", 'KServe v1 "instances" must be a non-empty list')
        return Parsed([json_payload(x, max_bytes, model) for x in instances], model.options_in(body))

    def respond(self, answers: list[Answer], parsed: Parsed, model: Model) -> Any:
        return {"predictions": [a.json for a in answers]}


class OpenInference(Protocol):
    """The Open Inference Protocol (KServe v2) infer request, in JSON or with the binary-data extension.

    One input: BYTES (encoded images: binary, base64 or a data: URI; or texts) or a numeric tensor whose first
    dimension is the batch. Outputs: the task's declared outputs, first dimension the items of the request
    (classification: `labels` and `probabilities` [n, k], and `logits` when named in "outputs" or asked by the
    `return_logits` parameter; detection: `boxes` [n, m, 4], `scores` and `labels` [n, m], `count` [n]).
    The task's options travel as request parameters.
    """

    def parse(self, body: Any, headers: dict[str, str], model: Model, max_bytes: int) -> Parsed:
        binary = b""
        if isinstance(body, (bytes, bytearray)):  # the binary-data extension: a JSON header, then the tensors
            size = header_length(headers, len(body))
            binary = memoryview(body)[size:]
            body = as_json(bytes(body[:size]))
        if not isinstance(body, dict):
            raise InputError("bad_request", "the OIP request header must be a JSON object")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise InputError("bad_request", 'OIP "inputs" must be a list of one {name, shape, datatype, data}; '
                             "this model has one input")
        params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        outputs = self.requested_outputs(body.get("outputs"))
        unknown = [n for n in outputs or () if n not in model.output_names]
        if unknown:  # refused before any decoding or inference is spent on it
            raise InputError("unknown_output", f"outputs {unknown} are not served; this model answers "
                             f"{model.output_names}")
        request_id = body.get("id")
        return Parsed(input_payloads(inputs[0], binary, max_bytes, model.text), model.options_in(params),
                      outputs=outputs, id=str(request_id) if request_id is not None else None)

    @staticmethod
    def requested_outputs(outputs: Any) -> list[str] | None:
        if outputs is None:
            return None
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
            raise InputError("bad_request", 'OIP "outputs" must be a list of {"name": ...}')
        return [str(o["name"]) for o in outputs]

    def respond(self, answers: list[Answer], parsed: Parsed, model: Model) -> Any:
        tensors = output_tensors([a.tensors for a in answers], model.outputs)
        names = parsed.outputs or list(tensors)
        response: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                                    "outputs": [tensors[n] for n in names]}
        if parsed.id is not None:
            response["id"] = parsed.id
        return response


def header_length(headers: dict[str, str], body_size: int) -> int:
    value = headers.get(BINARY_HEADER)
    if value is None:
        raise InputError("unsupported_format", "got binary data with no Inference-Header-Content-Length header",
                         415)
    try:
        size = int(value)
    except ValueError as e:
        raise InputError("bad_request", f"Inference-Header-Content-Length is not a number: {value!r}") from e
    if not 0 < size <= body_size:
        raise InputError("bad_request", f"Inference-Header-Content-Length {size} does not fit a body of "
                         f"{body_size} bytes")
    return size


def input_payloads(tensor: dict[str, Any], binary: memoryview | bytes, max_bytes: int, text: bool = False
                   ) -> list[Any]:
    """One OIP input tensor -> payloads: image bytes or texts (BYTES) or one tensor per batch row (numbers). In
    JSON, a BYTES element is base64 of binary data, or the text itself for a model that reads `text`."""
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError("bad_request", f"input shape must be a list of non-negative integers, got {shape!r}")
    count = int(np.prod(shape)) if shape else 1
    params = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise InputError("bad_request", f"binary_data_size {size!r} does not fit the {len(binary)} binary "
                             "bytes after the JSON header")
        raw = bytes(binary[:size])
        if datatype == "BYTES":
            items: list[Any] = split_bytes(raw)
        elif datatype in NUMERIC:
            items = [np.frombuffer(raw, dtype=NUMERIC[datatype])]
        else:
            raise InputError("wrong_dtype", f"datatype {datatype!r} is not supported; send BYTES images or "
                             f"one of {sorted(NUMERIC)}", 422)
    else:
        data = tensor.get("data")
        if data is None:
            raise InputError("bad_request", 'the input has neither "data" nor a binary_data_size parameter')
        items = data if datatype == "BYTES" and isinstance(data, list) else [data]
    if datatype == "BYTES":
        flat = [x for row in items for x in (row if isinstance(row, list) else [row])]
        if len(flat) != count:
            raise InputError("wrong_shape", f"BYTES input has {len(flat)} elements but shape {shape}", 422)
        return [x if isinstance(x, (bytes, bytearray)) or text else decode_base64(str(x), max_bytes) for x in flat]
    if datatype not in NUMERIC:
        raise InputError("wrong_dtype", f"datatype {datatype!r} is not supported; send BYTES images or one of "
                         f"{sorted(NUMERIC)}", 422)
    try:
        values = torch.as_tensor(np.asarray(items[0], dtype=np.float32)).reshape(shape)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError("wrong_shape", f"data does not fit shape {shape}: {e}", 422) from e
    return [values]  # the handler splits rows once it knows the model's item shape


def split_bytes(raw: bytes) -> list[bytes]:
    """The binary BYTES layout: each element is a 4-byte little-endian length, then that many bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError("bad_request", "binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + n > len(raw):
            raise InputError("bad_request", f"binary BYTES element of {n} bytes runs past the data")
        items.append(raw[offset + 4:offset + 4 + n])
        offset += 4 + n
    return items


def output_tensors(rows: list[dict[str, Any]], outputs: tuple[Output, ...]) -> dict[str, dict[str, Any]]:
    """Per-item named outputs -> OIP output tensors, row-major, first dimension the items of the request. An output
    whose declared shape starts with -1 (a detector's boxes) is padded to the request's longest item."""
    tensors = {}
    for o in outputs:
        if o.name not in rows[0]:
            continue
        items = [r[o.name] for r in rows]
        if o.shape[:1] == (-1,):
            longest = max(len(x) for x in items)
            filler = o.pad
            for d in reversed(o.shape[1:]):
                filler = [filler] * d
            items = [list(x) + [filler] * (longest - len(x)) for x in items]
            shape = [len(rows), longest, *o.shape[1:]]
        else:
            shape = [len(rows), *np.shape(items[0])]
        data = np.asarray(items, dtype=object if o.datatype == "BYTES" else None).reshape(-1).tolist()
        tensors[o.name] = {"name": o.name, "datatype": o.datatype, "shape": shape, "data": data}
    return tensors


def json_payload(obj: Any, max_bytes: int, model: Model) -> Any:
    """A JSON value -> base64-decoded bytes or a tensor-like list; a string stays text for a model that reads it."""
    if isinstance(obj, dict):
        for key in model.keys:
            if key in obj:
                value = obj[key]
                return decode_base64(value, max_bytes) if isinstance(value, str) and not model.text else value
        what = "the text" if model.text else "base64 image bytes or a tensor"
        raise InputError(
            "bad_request_key",
            f"JSON body has keys {sorted(obj)[:5]}; put {what} under "
            f"one of {list(model.keys)}, or send KServe 'instances'/'inputs'",
        )
    if isinstance(obj, str) and not model.text:
        return decode_base64(obj, max_bytes)
    return obj


def detect(body: Any, headers: dict[str, str]) -> tuple[Protocol, Any]:
    """Which protocol a body speaks, and the body as that protocol's parse takes it."""
    if BINARY_HEADER in headers:
        return OPEN_INFERENCE, body
    if headers.get("content-type", "").startswith("text/plain"):  # text, even when it starts with { or [
        return RAW, body
    body = as_json(body)
    if isinstance(body, dict) and "inputs" in body and not isinstance(body["inputs"], str):  # a string: HF's
        return OPEN_INFERENCE, body
    if isinstance(body, dict) and "instances" in body:
        return KSERVE_V1, body
    return RAW, body


RAW, KSERVE_V1, OPEN_INFERENCE = Raw(), KServeV1(), OpenInference()
