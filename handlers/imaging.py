"""Image decoding, batch resizing and normalization: the model's input contract.

Training, export checks and the served handler all go through these functions, so a
served prediction is computed on exactly the tensor an offline one is.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import pillow_heif
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms.v2 import functional as TF

from handlers.deprecations import known_deprecations
from handlers.errors import InputError

# PIL names -> decoded by torchvision.io (libjpeg-turbo, libwebp, giflib) when it gives the right pixels (see
# _route), else by PIL. PNG is always PIL's: torchvision 0.29's decode_png segfaults the worker on any libpng error
# past the header (a corrupt IDAT, a bad filter byte), so one damaged upload would kill a whole batch; and it drops
# tRNS and returns 16-bit samples as uint16. MPO is a JPEG with more pictures appended (phones): the first is shown.
# Phones and browsers: HEIF/HEIC (iPhone cameras; the pillow-heif plugin, which applies the file's rotation and
# mirroring and resets the EXIF orientation to 1), AVIF (Pillow, which hands irot/imir back as the EXIF orientation
# applied below) and JPEG 2000 (Pillow; no EXIF).
TORCHVISION_FORMATS = {"JPEG", "WEBP", "GIF"}
PIL_FORMATS = {"PNG", "BMP", "TIFF", "HEIF", "AVIF", "JPEG2000"}
ALIASES = {"MPO": "JPEG"}
SUPPORTED = ", ".join(sorted(TORCHVISION_FORMATS | PIL_FORMATS))
DEFAULT_MAX_PIXELS = 40_000_000
# GIF holds 256 colours and no camera writes it; its decoder costs ~70 ns a pixel, so a 108-byte LZW bomb declaring
# 34 MP took 2.5 s (benchmarks.fuzz). Real GIFs are far below this.
GIF_MAX_PIXELS = 8_000_000
MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"II*\x00": "TIFF",
         b"MM\x00*": "TIFF", b"\x00\x00\x00\x0cjP  ": "JPEG2000", b"\xffO\xffQ": "JPEG2000"}
# ISO-BMFF brands (bytes 8-12, after the ftyp box's size and type).
BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"heim": "HEIF", b"heis": "HEIF",
          b"hevc": "HEIF", b"hevx": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF"}
# The main picture only; one decode thread, as a worker's threads are leased per core (handlers/cores.py).
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)

# Transparent pixels are composited over black (source-over, straight alpha), whatever RGB they store.
# Why black: it is the web platform's own rule for flattening (HTML: a canvas exported to an opaque format is
# "composited onto an opaque black background"), so a canvas sent as PNG and as JPEG decode alike; it equals the
# premultiplied colour, so a canvas export (transparent pixels stored as (0,0,0,0)) decodes as it always did;
# and a viewer's backdrop (white page, dark mode, checkerboard) is not knowable here. Opaque alpha changes nothing.
ALPHA_BACKGROUND = 0
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # PIL's "I" holds 16-bit samples (PNG, PGM, TIFF)
_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transpose a viewer applies (PIL rotates CCW)


@dataclass(frozen=True)
class Header:
    """What probing the header found; `route` is how decode_image decodes it."""

    format: str
    width: int
    height: int
    route: str  # "torchvision": its decoder, mode RGB | "pil": PIL, then scaled and flattened


def sniff(data: bytes | bytearray) -> str | None:
    """The format a body claims by its first bytes, even when it is too damaged to open."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in BRANDS:
        return BRANDS[head[8:12]]
    return next((fmt for magic, fmt in MAGIC.items() if head.startswith(magic)), None)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = as stored). Unreadable EXIF is ignored, as browsers ignore it."""
    try:
        return int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # PIL's EXIF parser raises many types on malformed blocks
        return 1


def _route(fmt: str, im: Image.Image) -> str:
    """torchvision's decoders are fast, but in mode RGB they drop alpha, and for WEBP and GIF they ignore EXIF
    orientation and transparency, so only the inputs they get right go to them: every JPEG (gray, YCbCr and Adobe
    CMYK/YCCK convert in libjpeg-turbo; it applies the orientation), opaque unrotated WEBP, GIF without
    transparency."""
    if fmt == "JPEG":
        return "torchvision"
    if fmt == "WEBP":
        return "torchvision" if im.mode == "RGB" and _orientation(im) == 1 else "pil"
    if fmt == "GIF":
        return "pil" if "transparency" in im.info else "torchvision"
    return "pil"


def inspect_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """Read only the header. Rejects non-images and pixel bombs."""
    if not data:
        raise InputError("empty_body", f"the request body is empty; send image bytes ({SUPPORTED})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt, (w, h) = probe.format or "", probe.size
                fmt = ALIASES.get(fmt, fmt)
                route = _route(fmt, probe)
                declared = _raw_tiff_bytes(probe) if fmt == "TIFF" else 0
    except Image.DecompressionBombError as e:
        raise InputError(
            "too_many_pixels", f"image declares too many pixels ({e}); the limit is {max_pixels}", 413
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, KeyError, IndexError, RuntimeError) as e:
        # RuntimeError: Pillow's AVIF and pillow-heif's decoders on a damaged file
        claimed = sniff(data)
        if claimed:
            raise InputError("corrupt_image", f"the {claimed} image is truncated or corrupt: {e}") from e
        raise InputError(
            "unsupported_format", f"the body is not a readable image; supported formats: {SUPPORTED}", 415
        ) from e
    if fmt not in TORCHVISION_FORMATS | PIL_FORMATS:
        raise InputError("unsupported_format", f"{fmt} images are not accepted; send one of {SUPPORTED}", 415)
    limit = min(max_pixels, GIF_MAX_PIXELS) if fmt == "GIF" else max_pixels
    if w * h > limit:
        raise InputError(
            "too_many_pixels", f"{fmt} image is {w}x{h} = {w * h} pixels; the limit is {limit}", 413
        )
    if declared > len(data):  # PIL would fill the missing strips with black and decode every declared pixel
        raise InputError("corrupt_image", f"the TIFF declares {w}x{h} uncompressed pixels ({declared} bytes) but "
                         f"the body has {len(data)} bytes: it is truncated; send the whole file")
    return Header(fmt, w, h, route)


def _raw_tiff_bytes(probe: Image.Image) -> int:
    """The bytes an uncompressed TIFF's pixels need (0 if compressed: their size is unknown until decoded)."""
    if probe.info.get("compression") != "raw":
        return 0
    bits = probe.tag_v2.get(258, (1,))  # BitsPerSample, one per sample
    per_pixel = sum(bits) if isinstance(bits, tuple) else int(bits)
    return probe.size[0] * probe.size[1] * per_pixel // 8


def probe_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """Read only the header: (format, width, height). Rejects non-images and pixel bombs."""
    header = inspect_image(data, max_pixels)
    return header.format, header.width, header.height


def _to_8bit(samples: torch.Tensor, top: int) -> torch.Tensor:
    """Samples in [0, top] -> uint8, rounded (v*257 -> v exactly; never the low byte)."""
    return ((samples.to(torch.int32).clamp_(0, top) * 255 + top // 2) // top).to(torch.uint8)


def flatten(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] uint8/uint16 with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) -> uint8 RGB [3, H, W],
    alpha composited over ALPHA_BACKGROUND."""
    if image.dtype != torch.uint8:
        image = _to_8bit(image, 65535)
    if image.shape[0] in (2, 4):
        alpha = image[-1:].to(torch.int32)
        color = image[:-1].to(torch.int32).mul_(alpha)
        if ALPHA_BACKGROUND:
            color.add_((255 - alpha) * ALPHA_BACKGROUND)
        image = color.add_(127).div_(255, rounding_mode="floor").to(torch.uint8)
    # RGB stays a [3, H, W] view of interleaved pixels, as torchvision returns it (a CHW copy costs more than PNG
    # decoding); only gray is copied out to three channels.
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _from_pil(im: Image.Image) -> torch.Tensor:
    """A loaded PIL image of any mode -> uint8 RGB [3, H, W], scaled by its bit depth, alpha flattened. PIL opens
    16-bit gray with every bit (I;16, rounded here) but 16-bit colour already cut to its high byte (libpng's
    strip_16): within one level of rounding, never the low byte."""
    if im.mode in _SIXTEEN_BIT_MODES:
        samples = torch.from_numpy(np.array(im, dtype=np.int32))[None]
        key = im.info.get("transparency")
        if isinstance(key, int):  # a 16-bit gray colour key (PNG tRNS)
            alpha = (samples != key).to(torch.int32) * 65535
            return flatten(torch.cat([samples, alpha]).clamp_(0, 65535).to(torch.uint16))
        return flatten(_to_8bit(samples, 65535))
    if im.mode == "F":  # float samples: 0.0 is black, 1.0 white (TIFF's SampleFormat=3 convention)
        # tobytes, not np.array(im): PIL's array interface copies line by line, 3-4x slower on a tall image.
        x = np.frombuffer(bytearray(im.tobytes()), dtype=np.float32).reshape(im.height, im.width)
        np.nan_to_num(x, copy=False, nan=0.0)  # in place: a compressed float TIFF can declare tens of megapixels
        np.clip(x, 0.0, 1.0, out=x)
        x *= 255
        return flatten(torch.from_numpy(np.rint(x, out=x).astype(np.uint8))[None])
    target = "RGBA" if im.mode in _ALPHA_MODES or "transparency" in im.info else "RGB"
    try:
        converted = im.convert(target)  # 1, L, P, CMYK, YCbCr, LAB, HSV: PIL knows each one's meaning
    except ValueError as e:
        raise InputError("unsupported_format", f"{im.mode} images cannot be read; send 8-bit RGB", 415) from e
    return flatten(torch.from_numpy(np.array(converted)).permute(2, 0, 1))


def decode_image(data: bytes | bytearray, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor [3, H, W]: the picture a viewer shows. EXIF orientation is applied;
    16-bit, 1/2/4-bit, palette and float samples are scaled to 8 bits; alpha is composited over
    ALPHA_BACKGROUND; an animated GIF gives its first frame."""
    header = inspect_image(data, max_pixels)
    fmt = header.format
    try:
        if header.route == "pil":
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # before reading the orientation: PIL's TIFF plugin applies it on load, then drops it
                if fmt == "BMP" and im.mode == "RGBA" and im.getextrema()[3] == (0, 0):
                    im = im.convert("RGB")  # 32-bit BMPs with an all-zero alpha mean opaque (browsers agree)
                transpose = _UPRIGHT.get(_orientation(im))
                return _from_pil(im.transpose(transpose) if transpose is not None else im)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        with known_deprecations():
            image = _tv_decode(buf, mode=ImageReadMode.RGB, apply_exif_orientation=fmt == "JPEG")
        return image[0] if image.ndim == 4 else image
    # TypeError: PIL on a TIFF's bad offsets; EOFError: pillow-heif on a truncated HEIC (fuzz)
    except (RuntimeError, OSError, ValueError, SyntaxError, TypeError, EOFError) as e:
        raise InputError(
            "corrupt_image", f"the {fmt} image could not be decoded (truncated or corrupt): {e}".split("\n")[0]
        ) from e


def _nvjpeg_ok(blob: torch.Tensor) -> bool:
    """nvjpeg applies no EXIF orientation and handles only gray and YCbCr JPEGs (not CMYK, nor MPO's extras)."""
    try:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as im:
            return im.format == "JPEG" and im.mode in ("L", "RGB") and _orientation(im) == 1
    except Exception:  # damaged: nvjpeg will say so, and the caller finds which one
        return True


def decode_jpegs_on(device: torch.device, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Batch-decode JPEG bytes with nvjpeg on a CUDA device (uint8 [3, H, W] each, on that device). JPEGs nvjpeg
    would get wrong (EXIF-rotated, CMYK) are decoded on the CPU as decode_image does; errors are RuntimeErrors."""
    from torchvision.io import decode_jpeg

    on_cpu = [not _nvjpeg_ok(b) for b in blobs]
    with known_deprecations():
        plain = [b for b, cpu in zip(blobs, on_cpu, strict=True) if not cpu]
        decoded = iter(decode_jpeg(plain, mode=ImageReadMode.RGB, device=device) if plain else [])
        return [
            _tv_decode(b, mode=ImageReadMode.RGB, apply_exif_orientation=True).to(device) if cpu else next(decoded)
            for b, cpu in zip(blobs, on_cpu, strict=True)
        ]


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize to size x size. An image far taller than wide is resized lying on its side: torchvision's
    uint8 pass down a few long columns is several times slower than along rows (docs/reliability.md, "Fuzzing").
    Ordinary pictures never take that path, so their pixels stay exactly as before."""
    h, w = image.shape[-2:]
    if h > 64 * w:
        return TF.resize(image.transpose(-1, -2), [size, size], antialias=True).transpose(-1, -2)
    return TF.resize(image, [size, size], antialias=True)


def resize_batch(images: list[torch.Tensor], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [3, h, w] images of any sizes -> one uint8 batch [N, 3, size, size] on `device`."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        if image.shape[-2:] == (size, size):
            out[i] = image
        else:
            out[i] = _resize(image, size)
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
