"""Real-world encodings of one picture: what phones, browsers, scanners and image editors send for it.

`encodings(picture)` gives name -> Encoding(data, reference, lossy). `reference` is the canonical 8-bit RGB PNG of
the picture a correct decoder must show for `data` (the picture itself, or what the format can hold of it: its
gray levels, a palette, a threshold), so every encoding carries its own expected pixels; `lossy` marks codecs
that may move pixels a little (JPEG, lossy WEBP, HEIF, AVIF). Stdlib, numpy, PIL and its HEIF plugin only: nothing
from handlers/ or tests/.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pillow_heif
from PIL import Image

pillow_heif.register_heif_opener()  # HEIF/HEIC, as phones write it (Pillow itself writes AVIF and JPEG 2000)

# The colour a decoder composites transparent pixels over (handlers/imaging.py ALPHA_BACKGROUND): the encodings
# with transparency are "the same picture" only under that rule, and their references are computed with it.
BACKGROUND = (0, 0, 0)

# EXIF orientation -> the transform a viewer applies to the stored pixels to show them (EXIF 2.3, tag 0x0112).
DISPLAY: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                       # mirror horizontally
    3: lambda a: a[::-1, ::-1],                    # rotate 180
    4: lambda a: a[::-1],                          # mirror vertically
    5: lambda a: a.swapaxes(0, 1),                 # transpose: row 0 is the visual left column
    6: lambda a: np.rot90(a, -1),                  # rotate 90 clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),     # transverse
    8: lambda a: np.rot90(a, 1),                   # rotate 90 counter-clockwise
}
_INVERSE = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}


class Encoding(NamedTuple):
    data: bytes       # the file as sent
    reference: bytes  # canonical 8-bit RGB PNG of the picture a correct decoder shows for `data`
    lossy: bool       # the codec itself may move pixel values a little


def display(stored: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for `stored` pixels tagged with this EXIF orientation."""
    return np.ascontiguousarray(DISPLAY[orientation](stored))


def stored_for(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that, tagged with `orientation`, the viewer shows `upright`."""
    return display(upright, _INVERSE[orientation])


def exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def save(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def png_rgb8(rgb: np.ndarray) -> bytes:
    """The canonical encoding: 8-bit RGB PNG."""
    return save(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB"), "PNG")


def write_png(samples: np.ndarray, bit_depth: int = 8, chunks: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB/RGBA/LA): samples H x W (gray) or H x W x C with C = 2
    (gray+alpha), 3 (RGB) or 4 (RGBA), big-endian at 16 bits; `chunks` go between IHDR and IDAT (e.g. tRNS)."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    h, w, c = samples.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = samples.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    body = b"".join(chunk(k, d) for k, d in ((b"IHDR", ihdr), *chunks, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")))
    return b"\x89PNG\r\n\x1a\n" + body


def composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight-alpha source-over onto BACKGROUND, rounded: the picture a viewer shows on that backdrop."""
    a = alpha.astype(np.int32)[..., None]
    bg = np.array(BACKGROUND, dtype=np.int32)
    return ((rgb.astype(np.int32) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


def _as_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"need a uint8 H x W x 3 picture, got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _darkest(p: Image.Image) -> int:
    """The palette index of the darkest colour the image uses (the one made transparent)."""
    used = np.unique(np.asarray(p))
    palette = np.array(p.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return int(used[np.argmin(palette[used].sum(axis=1))])


def _keyed(picture: np.ndarray, transparent: np.ndarray) -> np.ndarray:
    """`picture` with the `transparent` pixels showing BACKGROUND."""
    out = picture.copy()
    out[transparent] = BACKGROUND
    return out


class _Context(NamedTuple):
    rgb: np.ndarray
    picture: Image.Image
    luma: np.ndarray
    binary: np.ndarray
    p256: Image.Image
    canonical: bytes
    luma_ref: bytes
    binary_ref: bytes
    p256_ref: bytes


def encodings(image: np.ndarray | Image.Image) -> dict[str, Encoding]:
    """Every encoding of `image` (uint8 RGB, H x W x 3 or a PIL image), by stable name:

    png_rgb8           canonical 8-bit RGB PNG (its own reference)
    png_gray8          8-bit grayscale PNG of the picture's luma (reference: the luma picture)
    png_gray16         16-bit grayscale PNG (PIL I;16), samples v*257
    png_rgb16          48-bit RGB PNG (16 bits per channel), samples v*257
    png_la8            gray + alpha PNG, alpha opaque everywhere
    png_la16           16-bit gray + alpha PNG, alpha opaque everywhere
    png_rgba8          RGBA PNG, alpha opaque everywhere
    png_rgba16         64-bit RGBA PNG, alpha opaque everywhere
    png_palette8       8-bit palette PNG of the picture quantized to 256 colours (reference: the quantized picture)
    png_palette4       4-bit palette PNG, 16 colours
    png_palette_trns   8-bit palette PNG whose darkest entry is transparent (tRNS)
    png_gray_trns      8-bit gray PNG with a tRNS colour key on black
    png_gray16_trns    16-bit gray PNG with a tRNS colour key on black
    png_1bit           1-bit PNG of the luma thresholded at 128 (reference: the thresholded picture)
    png_canvas_alpha   browser-canvas export of light ink: RGB white, alpha = luma, transparent pixels (0,0,0,0)
    png_exif_o2..o8    PNG with an eXIf orientation, pixels stored so the viewer shows the picture upright
    jpeg_444           baseline JPEG, quality 95, no chroma subsampling
    jpeg_420           baseline JPEG, quality 95, 4:2:0 chroma subsampling (phones, browsers)
    jpeg_progressive   progressive JPEG, quality 95
    jpeg_gray          grayscale JPEG of the luma
    jpeg_cmyk          Adobe CMYK JPEG (print workflows)
    jpeg_mpo           MPO: the JPEG followed by a second, different picture (multi-camera phones)
    jpeg_exif_o2..o8   JPEG (4:4:4, quality 95) with an EXIF orientation, pixels stored as the camera would
    webp_lossless      lossless WEBP
    webp_lossy         lossy WEBP, quality 95
    webp_canvas_alpha  lossless WEBP of the canvas export above
    webp_exif_o2..o8   lossless WEBP with an EXIF orientation
    gif                GIF of the 256-colour quantized picture
    gif_transparent    GIF whose darkest palette entry is transparent
    bmp_rgb24          24-bit BMP
    bmp_rgba32         32-bit BMP with alpha, opaque everywhere
    bmp_palette8       8-bit palette BMP, 256 colours
    bmp_1bit           1-bit BMP of the thresholded picture
    tiff_rgb           8-bit RGB TIFF, LZW compressed (scanners)
    tiff_gray16        16-bit grayscale TIFF, samples v*257
    tiff_float32       32-bit float grayscale TIFF, samples v/255 (0.0 black, 1.0 white)
    tiff_cmyk          CMYK TIFF
    tiff_1bit_g4       1-bit CCITT group 4 TIFF of the thresholded picture (document scanners, fax)
    tiff_exif_o2..o8   TIFF with an Orientation tag
    heic               HEIF/HEIC, quality 90 (the iPhone camera's default format)
    heic_exif_o2..o8   HEIC with an EXIF orientation (the plugin stores it as the file's rotation and mirroring)
    avif               AVIF, quality 90, 4:4:4 (browsers, Android)
    avif_exif_o2..o8   AVIF with an EXIF orientation (Pillow stores it as irot/imir)
    jp2                JPEG 2000 in its JP2 container, lossless
    j2k                JPEG 2000 codestream, lossless
    """
    rgb = _as_rgb(image)
    picture = Image.fromarray(rgb, "RGB")
    luma = np.asarray(picture.convert("L"))  # exact for a gray picture (the weights sum to one)
    binary = np.where(luma >= 128, 255, 0).astype(np.uint8)
    p256 = picture.quantize(256, dither=Image.Dither.NONE)
    ctx = _Context(
        rgb=rgb, picture=picture, luma=luma, binary=binary, p256=p256,
        canonical=png_rgb8(rgb), luma_ref=png_rgb8(_gray3(luma)), binary_ref=png_rgb8(_gray3(binary)),
        p256_ref=png_rgb8(np.asarray(p256.convert("RGB"))),
    )
    out: dict[str, Encoding] = {}
    for family in (_png, _jpeg, _webp, _gif, _bmp, _tiff, _phone):
        out.update(family(ctx))
    return out


def _canvas(c: _Context) -> tuple[Image.Image, bytes]:
    """Light ink on a transparent canvas, as a browser exports it: alpha = luma, colour white where any ink is."""
    ink = np.where(c.luma[:, :, None] > 0, 255, 0).astype(np.uint8).repeat(3, axis=2)
    rgba = np.dstack([ink, c.luma])
    return Image.fromarray(rgba, "RGBA"), png_rgb8(composite(ink, c.luma))


def _oriented(c: _Context, fmt: str, **params: Any) -> dict[str, bytes]:
    return {f"o{o}": save(Image.fromarray(stored_for(c.rgb, o), "RGB"), fmt, exif=exif_orientation(o), **params)
            for o in range(2, 9)}


def _png(c: _Context) -> dict[str, Encoding]:
    v16 = c.rgb.astype(np.uint16) * 257
    l16 = c.luma.astype(np.uint16) * 257
    opaque8 = np.full(c.luma.shape, 255, np.uint8)
    opaque16 = np.full(c.luma.shape, 65535, np.uint16)
    p16 = c.picture.quantize(16, dither=Image.Dither.NONE)
    dark = _darkest(c.p256)
    black = c.luma == 0
    canvas, canvas_ref = _canvas(c)
    out = {
        "png_rgb8": Encoding(c.canonical, c.canonical, False),
        "png_gray8": Encoding(save(Image.fromarray(c.luma, "L"), "PNG"), c.luma_ref, False),
        "png_gray16": Encoding(save(Image.fromarray(l16), "PNG"), c.luma_ref, False),
        "png_rgb16": Encoding(write_png(v16, 16), c.canonical, False),
        "png_la8": Encoding(save(Image.fromarray(np.dstack([c.luma, opaque8]), "LA"), "PNG"), c.luma_ref, False),
        "png_la16": Encoding(write_png(np.dstack([l16, opaque16]), 16), c.luma_ref, False),
        "png_rgba8": Encoding(save(Image.fromarray(np.dstack([c.rgb, opaque8]), "RGBA"), "PNG"), c.canonical, False),
        "png_rgba16": Encoding(write_png(np.dstack([v16, opaque16]), 16), c.canonical, False),
        "png_palette8": Encoding(save(c.p256, "PNG"), c.p256_ref, False),
        "png_palette4": Encoding(save(p16, "PNG", bits=4), png_rgb8(np.asarray(p16.convert("RGB"))), False),
        "png_palette_trns": Encoding(
            save(c.p256, "PNG", transparency=dark),
            png_rgb8(_keyed(np.asarray(c.p256.convert("RGB")), np.asarray(c.p256) == dark)), False),
        "png_gray_trns": Encoding(save(Image.fromarray(c.luma, "L"), "PNG", transparency=0),
                                  png_rgb8(_keyed(_gray3(c.luma), black)), False),
        "png_gray16_trns": Encoding(write_png(l16, 16, ((b"tRNS", struct.pack(">H", 0)),)),
                                    png_rgb8(_keyed(_gray3(c.luma), black)), False),
        "png_1bit": Encoding(save(Image.fromarray(c.binary, "L").convert("1"), "PNG"), c.binary_ref, False),
        "png_canvas_alpha": Encoding(save(canvas, "PNG"), canvas_ref, False),
    }
    out.update({f"png_exif_{k}": Encoding(v, c.canonical, False) for k, v in _oriented(c, "PNG").items()})
    return out


def _jpeg(c: _Context) -> dict[str, Encoding]:
    second = Image.fromarray(255 - c.rgb[::-1], "RGB")  # a different picture: a decoder must show the first
    out = {
        "jpeg_444": save(c.picture, "JPEG", quality=95, subsampling=0),
        "jpeg_420": save(c.picture, "JPEG", quality=95, subsampling=2),
        "jpeg_progressive": save(c.picture, "JPEG", quality=95, progressive=True),
        "jpeg_cmyk": save(c.picture.convert("CMYK"), "JPEG", quality=95),
        "jpeg_mpo": save(c.picture, "MPO", quality=95, save_all=True, append_images=[second]),
    }
    out.update({f"jpeg_exif_{k}": v for k, v in _oriented(c, "JPEG", quality=95, subsampling=0).items()})
    encoded = {k: Encoding(v, c.canonical, True) for k, v in out.items()}
    encoded["jpeg_gray"] = Encoding(save(Image.fromarray(c.luma, "L"), "JPEG", quality=95), c.luma_ref, True)
    return encoded


def _webp(c: _Context) -> dict[str, Encoding]:
    canvas, canvas_ref = _canvas(c)
    out = {
        "webp_lossless": Encoding(save(c.picture, "WEBP", lossless=True), c.canonical, False),
        "webp_lossy": Encoding(save(c.picture, "WEBP", quality=95), c.canonical, True),
        "webp_canvas_alpha": Encoding(save(canvas, "WEBP", lossless=True), canvas_ref, False),
    }
    out.update({f"webp_exif_{k}": Encoding(v, c.canonical, False)
                for k, v in _oriented(c, "WEBP", lossless=True).items()})
    return out


def _gif(c: _Context) -> dict[str, Encoding]:
    dark = _darkest(c.p256)
    keyed = _keyed(np.asarray(c.p256.convert("RGB")), np.asarray(c.p256) == dark)
    return {
        "gif": Encoding(save(c.p256, "GIF"), c.p256_ref, False),
        "gif_transparent": Encoding(save(c.p256, "GIF", transparency=dark), png_rgb8(keyed), False),
    }


def _bmp(c: _Context) -> dict[str, Encoding]:
    opaque = np.full(c.luma.shape, 255, np.uint8)
    return {
        "bmp_rgb24": Encoding(save(c.picture, "BMP"), c.canonical, False),
        "bmp_rgba32": Encoding(save(Image.fromarray(np.dstack([c.rgb, opaque]), "RGBA"), "BMP"), c.canonical, False),
        "bmp_palette8": Encoding(save(c.p256, "BMP"), c.p256_ref, False),
        "bmp_1bit": Encoding(save(Image.fromarray(c.binary, "L").convert("1"), "BMP"), c.binary_ref, False),
    }


def _tiff(c: _Context) -> dict[str, Encoding]:
    floats = Image.fromarray(c.luma.astype(np.float32) / 255, "F")
    out = {
        "tiff_rgb": Encoding(save(c.picture, "TIFF", compression="tiff_lzw"), c.canonical, False),
        "tiff_gray16": Encoding(save(Image.fromarray(c.luma.astype(np.uint16) * 257), "TIFF"), c.luma_ref, False),
        "tiff_float32": Encoding(save(floats, "TIFF"), c.luma_ref, False),
        "tiff_cmyk": Encoding(save(c.picture.convert("CMYK"), "TIFF"), c.canonical, False),
        "tiff_1bit_g4": Encoding(save(Image.fromarray(c.binary, "L").convert("1"), "TIFF", compression="group4"),
                                 c.binary_ref, False),
    }
    out.update({f"tiff_exif_{k}": Encoding(v, c.canonical, False) for k, v in _oriented(c, "TIFF").items()})
    return out


def _phone(c: _Context) -> dict[str, Encoding]:
    heic = {"heic": save(c.picture, "HEIF", quality=90)}
    heic.update({f"heic_exif_{k}": v for k, v in _oriented(c, "HEIF", quality=90).items()})
    avif = {"avif": save(c.picture, "AVIF", quality=90, subsampling="4:4:4")}
    avif.update({f"avif_exif_{k}": v for k, v in _oriented(c, "AVIF", quality=90, subsampling="4:4:4").items()})
    out = {k: Encoding(v, c.canonical, True) for k, v in {**heic, **avif}.items()}
    out["jp2"] = Encoding(save(c.picture, "JPEG2000", irreversible=False), c.canonical, False)
    out["j2k"] = Encoding(save(c.picture, "JPEG2000", irreversible=False, no_jp2=True), c.canonical, False)
    return out
