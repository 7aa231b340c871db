"""The bad-input corpus: every way a caller can get a request wrong, with the status and code it must get."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.io import encode_jpeg, encode_png


@dataclass(frozen=True)
class BadInput:
    name: str
    body: bytes | dict[str, Any] | list[Any]
    status: int
    code: str
    content_type: str = "application/octet-stream"


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header that claims width x height (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corpus(good_image: torch.Tensor, input_size: int, max_bytes: int) -> list[BadInput]:
    png = encode_png(good_image).numpy().tobytes()
    jpg = encode_jpeg(good_image).numpy().tobytes()
    tiff = io.BytesIO()
    Image.fromarray(good_image.permute(1, 2, 0).numpy()).save(tiff, "TIFF")  # uncompressed
    nan_tensor = torch.zeros(3, input_size, input_size)
    nan_tensor[0, 0, 0] = float("nan")
    return [
        BadInput("zero_bytes", b"", 400, "empty_body"),
        BadInput("random_bytes", bytes(torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0),
                                                     dtype=torch.uint8).tolist()), 415, "unsupported_format"),
        BadInput("truncated_png", png[: len(png) // 2], 400, "corrupt_image"),
        BadInput("truncated_jpeg", jpg[: len(jpg) // 2], 400, "corrupt_image"),
        BadInput("truncated_tiff", tiff.getvalue()[: len(tiff.getvalue()) // 2], 400, "corrupt_image"),
        BadInput("text_file", b"this is a text file, not an image\n", 415, "unsupported_format", "text/plain"),
        BadInput("png_20000x20000", png_declaring(20000, 20000), 413, "too_many_pixels"),
        BadInput("oversized_body", png + b"\0" * (max_bytes + 1), 413, "body_too_large"),
        BadInput("base64_garbage", {"data": "!!not*base64@@"}, 400, "bad_base64", "application/json"),
        BadInput("tensor_wrong_shape", {"data": torch.zeros(3, 5, 5).tolist()}, 422, "wrong_shape",
                 "application/json"),
        BadInput("tensor_nan", {"data": nan_tensor.tolist()}, 422, "non_finite", "application/json"),
        BadInput("json_nested_deep", b"[" * 300_000 + b"]" * 300_000, 400, "bad_json", "application/json"),
        BadInput("json_wrong_key", {"picture": base64.b64encode(png).decode()}, 400, "bad_request_key",
                 "application/json"),
    ]
