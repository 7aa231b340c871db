"""Image decoding, batch resizing and normalization: the model's input contract.

Training, export checks and the served handler all go through these functions, so a
served prediction is computed on exactly the tensor an offline one is.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms.v2 import functional as TF

from handlers.deprecations import known_deprecations
from handlers.errors import InputError

# PIL names -> decoded by torchvision.io (libjpeg-turbo, libpng, libwebp, giflib) or by PIL.
TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP", "GIF"}
PIL_FORMATS = {"BMP"}
SUPPORTED = ", ".join(sorted(TORCHVISION_FORMATS | PIL_FORMATS))
DEFAULT_MAX_PIXELS = 40_000_000
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP"}


def sniff(data: bytes | bytearray) -> str | None:
    """The format a body claims by its first bytes, even when it is too damaged to open."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in MAGIC.items() if head.startswith(magic)), None)


def probe_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Read only the header: (format, width, height). Rejects non-images and pixel bombs."""
    if not data:
        raise InputError("empty_body", f"the request body is empty; send image bytes ({SUPPORTED})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (w, h) = probe.format or "", probe.size
    except Image.DecompressionBombError as e:
        raise InputError(
            "too_many_pixels", f"image declares too many pixels ({e}); the limit is {max_pixels}", 413
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        claimed = sniff(data)
        if claimed:
            raise InputError("corrupt_image", f"the {claimed} image is truncated or corrupt: {e}") from e
        raise InputError(
            "unsupported_format", f"the body is not a readable image; supported formats: {SUPPORTED}", 415
        ) from e
    if fmt not in TORCHVISION_FORMATS | PIL_FORMATS:
        raise InputError("unsupported_format", f"{fmt} images are not accepted; send one of {SUPPORTED}", 415)
    if w * h > max_pixels:
        raise InputError(
            "too_many_pixels", f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", 413
        )
    return fmt, w, h


def decode_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor [3, H, W]. Grayscale, RGBA and palette become RGB;
    an animated GIF gives its first frame."""
    fmt, _, _ = probe_image(data, max_pixels)
    try:
        if fmt in TORCHVISION_FORMATS:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            with known_deprecations():
                image = _tv_decode(buf, mode=ImageReadMode.RGB)
            return image[0] if image.ndim == 4 else image
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
        return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(
            rgb.height, rgb.width, 3
        ).permute(2, 0, 1).contiguous()
    except (RuntimeError, OSError, ValueError) as e:
        raise InputError(
            "corrupt_image", f"the {fmt} image could not be decoded (truncated or corrupt): {e}".split("\n")[0]
        ) from e


def decode_jpegs_on(device: torch.device, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Batch-decode JPEG bytes with nvjpeg on a CUDA device (uint8 [3, H, W] each, on that device)."""
    from torchvision.io import decode_jpeg

    with known_deprecations():
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)


def resize_batch(images: list[torch.Tensor], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [3, h, w] images of any sizes -> one uint8 batch [N, 3, size, size] on `device`."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        if image.shape[-2:] == (size, size):
            out[i] = image
        else:
            out[i] = TF.resize(image, [size, size], antialias=True)
    return out


class Normalizer:
    """uint8 batch -> normalized float batch on `device`, as one fused multiply-add."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device | str = "cpu") -> None:
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.shift = (-mean_t / std_t).to(device)
        self.device = torch.device(device)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and batch.device.type == "cpu":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.to(self.device, torch.float32)
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=torch.channels_last)
