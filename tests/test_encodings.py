"""The same picture, encoded the ways real devices, browsers and scanners send it, must decode to the same pixels
and get the same label as its canonical 8-bit RGB PNG. A 200 with the wrong label is worse than an error."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from sklearn.datasets import load_digits

from handlers.errors import InputError
from handlers.handler import ModelHandler
from handlers.imaging import ALPHA_BACKGROUND, decode_image, decode_jpegs_on, inspect_image
from harness import encodings as enc
from harness.context import call, make_context, unpack_mar
from tests.bad_inputs import corpus
from training.data import render_digits

LOSSY_MEAN_ABS = 6.0  # JPEG/WEBP q95 on these pictures: <= 4; a rotated, mirrored or colour-swapped decode: >= 20
N_LABELLED = 20


def colour_picture() -> np.ndarray:
    """Non-square (a transposed decode changes the shape), with a different gradient per channel (a swapped or
    inverted channel shows) and a saturated patch (chroma subsampling and CMYK)."""
    yy, xx = np.mgrid[0:23, 0:37]
    rgb = np.stack([xx * 255 // 36, yy * 255 // 22, (xx + yy) * 255 // 58], axis=-1).astype(np.uint8)
    rgb[5:12, 8:20] = (250, 30, 40)
    rgb[0, 0] = (0, 0, 0)
    return rgb


def digit_picture(i: int, size: int = 32) -> np.ndarray:
    """A digit rendered as training renders it (white ink on black), without training a model."""
    pixels = torch.from_numpy(load_digits().images[i : i + 1].astype(np.uint8))
    return render_digits(pixels, size)[0].permute(1, 2, 0).numpy()


def hwc(blob: bytes) -> np.ndarray:
    image = decode_image(blob)
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
    return image.permute(1, 2, 0).numpy()


def mismatches(picture: np.ndarray) -> dict[str, str]:
    found = {}
    for name, e in enc.encodings(picture).items():
        got, want = hwc(e.data).astype(int), hwc(e.reference).astype(int)
        if got.shape != want.shape:
            found[name] = f"shape {got.shape} != {want.shape}"
            continue
        err = np.abs(got - want)
        if (err.mean() > LOSSY_MEAN_ABS) if e.lossy else err.any():
            found[name] = f"max |diff| {err.max()}, mean {err.mean():.2f}, {np.count_nonzero(err)} values differ"
    return found


# --- (a) pixels ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("picture", [colour_picture(), digit_picture(0), digit_picture(7)],
                         ids=["colour", "digit0", "digit7"])
def test_every_encoding_decodes_to_its_reference(picture: np.ndarray) -> None:
    assert np.array_equal(hwc(enc.png_rgb8(picture)), picture)  # the references themselves decode to the picture
    assert mismatches(picture) == {}


def test_the_corpus_is_what_it_says() -> None:
    """Guards against the harness quietly writing something simpler than its names claim (a tautology)."""
    picture = colour_picture()
    corpus_ = enc.encodings(picture)

    def opened(name: str) -> Image.Image:
        return Image.open(io.BytesIO(corpus_[name].data))

    ihdr = {n: corpus_[n].data[24:26] for n in corpus_ if n.startswith("png_")}  # bit depth, colour type
    assert ihdr["png_rgb8"] == bytes([8, 2]) and ihdr["png_gray8"] == bytes([8, 0])
    assert ihdr["png_gray16"] == bytes([16, 0]) and opened("png_gray16").mode == "I;16"
    assert ihdr["png_rgb16"] == bytes([16, 2]) and ihdr["png_rgba16"] == bytes([16, 6])
    assert ihdr["png_la8"] == bytes([8, 4]) and ihdr["png_la16"] == bytes([16, 4])
    assert ihdr["png_rgba8"] == bytes([8, 6])
    assert ihdr["png_palette8"] == bytes([8, 3]) and ihdr["png_palette4"] == bytes([4, 3])
    assert ihdr["png_1bit"] == bytes([1, 0]) and ihdr["png_gray16_trns"] == bytes([16, 0])
    for name in ("png_palette_trns", "png_gray_trns", "png_gray16_trns"):
        assert b"tRNS" in corpus_[name].data, name
    assert opened("png_canvas_alpha").getextrema()[3][0] == 0  # really has transparent pixels
    for name in ("png_exif_o6", "jpeg_exif_o6", "webp_exif_o6"):  # stored turned: 37 rows of 23
        assert opened(name).getexif()[0x0112] == 6 and opened(name).size == (23, 37), name
    assert opened("tiff_exif_o6").tag_v2[0x0112] == 6  # PIL's TIFF plugin reports the size as shown
    assert opened("jpeg_cmyk").mode == "CMYK" and opened("jpeg_progressive").info.get("progressive")
    assert opened("jpeg_mpo").format == "MPO" and opened("jpeg_mpo").n_frames == 2
    assert JpegImagePlugin.get_sampling(opened("jpeg_420")) == 2
    assert JpegImagePlugin.get_sampling(opened("jpeg_444")) == 0
    assert opened("webp_canvas_alpha").mode == "RGBA" and "transparency" in opened("gif_transparent").info
    assert opened("tiff_gray16").mode == "I;16" and opened("tiff_float32").mode == "F"
    assert opened("tiff_cmyk").mode == "CMYK" and opened("tiff_1bit_g4").info["compression"] == "group4"
    assert opened("bmp_1bit").mode == "1" and opened("bmp_palette8").mode == "P"
    assert opened("heic").format == "HEIF" and opened("avif").format == "AVIF"
    assert opened("jp2").format == "JPEG2000" and corpus_["j2k"].data[:4] == b"\xffO\xffQ"  # a bare codestream
    assert opened("avif_exif_o6").getexif()[0x0112] == 6  # stored turned, irot/imir handed back as EXIF
    assert opened("heic_exif_o6").size == (37, 23)  # stored turned, the plugin turns it back (size as shown)
    # the references really differ where the format cannot hold the picture
    assert corpus_["png_1bit"].reference != corpus_["png_rgb8"].reference
    assert corpus_["png_palette4"].reference != corpus_["png_rgb8"].reference


def test_plain_images_stay_on_the_fast_decoder() -> None:
    corpus_ = enc.encodings(colour_picture())
    fast = [n for n in corpus_ if n.startswith("jpeg_")] + ["webp_lossless", "webp_lossy", "gif"]
    assert {n: inspect_image(corpus_[n].data).route for n in fast} == dict.fromkeys(fast, "torchvision")


def png_with_idat(raw: bytes) -> bytes:
    """A 4x2 8-bit gray PNG whose IDAT holds `raw` (the zlib stream as sent), every chunk CRC valid."""
    png = enc.write_png(np.zeros((2, 4), np.uint8))
    start = png.index(b"IDAT") - 4
    end = start + 12 + struct.unpack(">I", png[start : start + 4])[0]
    idat = struct.pack(">I", len(raw)) + b"IDAT" + raw + struct.pack(">I", zlib.crc32(b"IDAT" + raw))
    return png[:start] + idat + png[end:]


def test_a_corrupt_png_is_a_400_not_a_dead_worker() -> None:
    """torchvision 0.29's decode_png segfaults on any libpng error past the header; PNG must not reach it. Run in a
    child process so a regression fails this test instead of killing pytest."""
    bodies = {
        "bad_deflate": png_with_idat(b"\x78\x9c\xff\xff\xff\xff" + bytes(range(40))),
        "bad_filter_byte": png_with_idat(zlib.compress(b"\x07\0\0\0\0" * 2)),
        "cut_stream": png_with_idat(zlib.compress(b"\0\0\0\0\0" * 2, 0)[:9]),
        "short_stream": png_with_idat(zlib.compress(b"\0\0\0\0\0")),  # complete, one row of two: no crash is enough
    }
    script = (
        "import json, sys\n"
        "from handlers.errors import InputError\n"
        "from handlers.imaging import decode_image\n"
        "for name, body in json.load(sys.stdin).items():\n"
        "    try:\n        decode_image(bytes.fromhex(body))\n        print(name, 'decoded', flush=True)\n"
        "    except InputError as e:\n        print(name, e.status, e.code, flush=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], input=json.dumps({k: v.hex() for k, v in bodies.items()}),
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-500:])  # -11: a segfault
    outcome = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines()}
    assert list(outcome) == list(bodies)
    for name in ("bad_deflate", "bad_filter_byte", "cut_stream"):
        assert outcome[name] == ["400", "corrupt_image"], name
    # short_stream may decode: PIL shows the missing row black, as browsers show a short PNG in part


# --- (c) 16-bit -----------------------------------------------------------------------------------------------------
TRICKY = np.array([[0, 256, 0x7F80, 0x80FF, 0xFF00, 0xFFFF]], dtype=np.uint16)  # low bytes far from their value
ROUNDED = [[0, 1, 127, 128, 254, 255]]  # round(v * 255 / 65535)
LOW_BYTE = [[0, 0, 128, 255, 0, 255]]   # the wrapped value a uint16 -> uint8 cast would give


def test_sixteen_bit_samples_v257_decode_to_v() -> None:
    v = np.arange(256, dtype=np.uint16).reshape(16, 16)
    gray = {"png": enc.write_png(v * 257, 16), "png_pil": enc.save(Image.fromarray(v * 257), "PNG"),
            "tiff": enc.save(Image.fromarray(v * 257), "TIFF")}
    for name, data in gray.items():
        assert np.array_equal(hwc(data), np.dstack([v] * 3)), name
    rgb = np.dstack([v, v.T, 255 - v]).astype(np.uint16) * 257
    for name, data in {"rgb48": enc.write_png(rgb, 16), "rgba64": enc.write_png(np.dstack([rgb, v * 0 + 65535]), 16),
                       "la32": enc.write_png(np.dstack([v * 257, v * 0 + 65535]), 16)}.items():
        want = rgb if name != "la32" else np.dstack([v * 257] * 3)
        assert np.array_equal(hwc(data), want // 257), name


def test_sixteen_bit_gray_is_rounded_and_colour_never_wraps() -> None:
    assert np.rint(TRICKY / 65535 * 255).astype(int).tolist() == ROUNDED
    # 16-bit gray keeps every bit through PIL (mode I;16): rounded exactly
    for name, data in {"png": enc.write_png(TRICKY, 16), "tiff": enc.save(Image.fromarray(TRICKY), "TIFF"),
                       "png_trns": enc.write_png(TRICKY, 16, ((b"tRNS", struct.pack(">H", 1)),))}.items():
        assert hwc(data)[..., 0].tolist() == ROUNDED, name
    # 16-bit colour PNGs reach us as PIL's high byte (libpng's strip_16): within one level of rounding, never wrapped
    rgb48 = np.dstack([TRICKY, TRICKY[:, ::-1], TRICKY])
    got = hwc(enc.write_png(rgb48, 16)).astype(int)
    assert np.abs(got - np.dstack([ROUNDED, np.array(ROUNDED)[:, ::-1], ROUNDED])).max() <= 1
    assert got[..., 0].tolist() != LOW_BYTE


# --- (d) EXIF orientation -------------------------------------------------------------------------------------------
def test_orientation_convention() -> None:
    """Pinned without PIL: tag 6 means "rotate 90 clockwise to view", so the stored top-left shows top-right."""
    stored = np.zeros((2, 3, 3), np.uint8)
    stored[0, 0] = (255, 0, 0)
    shown = enc.display(stored, 6)
    assert shown.shape == (3, 2, 3) and tuple(shown[0, 1]) == (255, 0, 0)
    data = enc.save(Image.fromarray(stored), "PNG", exif=enc.exif_orientation(6))
    assert np.array_equal(hwc(data), shown)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt,params", [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
                         ids=["png", "webp", "tiff"])
def test_every_orientation_of_a_lossless_image_shows_the_upright_picture(orientation: int, fmt: str,
                                                                         params: dict) -> None:
    upright = colour_picture()
    stored = Image.fromarray(enc.stored_for(upright, orientation))
    data = enc.save(stored, fmt, exif=enc.exif_orientation(orientation), **params)
    assert np.array_equal(hwc(data), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_of_a_jpeg_is_the_same_jpeg_turned(orientation: int) -> None:
    """Exact: the tagged and untagged files hold the same compressed pixels."""
    stored = Image.fromarray(enc.stored_for(colour_picture(), orientation))
    plain = enc.save(stored, "JPEG", quality=90)
    tagged = enc.save(stored, "JPEG", quality=90, exif=enc.exif_orientation(orientation))
    want = enc.display(hwc(plain), orientation)
    assert np.array_equal(hwc(tagged), want)
    # the GPU path's batch decoder (run here on the CPU) must route tagged JPEGs the same way
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (plain, tagged)]
    got = [t.permute(1, 2, 0).numpy() for t in decode_jpegs_on(torch.device("cpu"), blobs)]
    assert np.array_equal(got[0], hwc(plain)) and np.array_equal(got[1], want)


def test_batch_jpeg_decoder_routes_cmyk_and_mpo_like_decode_image() -> None:
    corpus_ = enc.encodings(colour_picture())
    names = ["jpeg_444", "jpeg_cmyk", "jpeg_mpo", "jpeg_exif_o5", "jpeg_gray"]
    blobs = [torch.frombuffer(bytearray(corpus_[n].data), dtype=torch.uint8) for n in names]
    for name, got in zip(names, decode_jpegs_on(torch.device("cpu"), blobs), strict=True):
        assert torch.equal(got, decode_image(corpus_[name].data)), name


# --- alpha ----------------------------------------------------------------------------------------------------------
def test_transparent_pixels_composite_over_the_documented_background_whatever_rgb_they_store() -> None:
    assert enc.BACKGROUND == (ALPHA_BACKGROUND,) * 3
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    alpha[0] = 0      # fully transparent, random stored colour (not the canvas's (0,0,0))
    alpha[1] = 255    # opaque: the stored colour exactly
    want = np.rint((rgb * (alpha[..., None] / 255.0)) + ALPHA_BACKGROUND * (1 - alpha[..., None] / 255.0))
    for fmt in ("PNG", "WEBP", "TIFF"):
        params = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
        got = hwc(enc.save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), fmt, **params))
        assert np.array_equal(got, want.astype(np.uint8)), fmt
        assert (got[0] == ALPHA_BACKGROUND).all() and np.array_equal(got[1], rgb[1]), fmt


def bmp_bgra(rgb: np.ndarray, alpha: np.ndarray) -> bytes:
    """A 32-bit BMP with a V4 header and an alpha mask (PIL writes none): what Windows apps save."""
    h, w, _ = rgb.shape
    pixels = np.dstack([rgb[::-1, :, ::-1], alpha[::-1]]).astype(np.uint8).tobytes()  # bottom-up BGRA rows
    info = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 32, 3, len(pixels), 2835, 2835, 0, 0)
    info += struct.pack("<IIII", 0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000) + bytes(108 - 56)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def test_bmp_alpha_is_composited_unless_it_is_all_zero() -> None:
    rgb = colour_picture()
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:3] = 0
    assert Image.open(io.BytesIO(bmp_bgra(rgb, alpha))).mode == "RGBA"
    got = hwc(bmp_bgra(rgb, alpha))
    assert (got[:3] == ALPHA_BACKGROUND).all() and np.array_equal(got[3:], rgb[3:])
    # an alpha channel of zeros everywhere is an app that never wrote it: opaque, as browsers show it
    assert np.array_equal(hwc(bmp_bgra(rgb, np.zeros_like(alpha))), rgb)


# --- (b) labels through the real handler ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def handler(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelHandler, object]:
    h = ModelHandler()
    ctx = make_context(unpack_mar(model_store / "digits.mar", tmp_path_factory.mktemp("unpacked")))
    h.initialize(ctx)
    return h, ctx


def test_every_encoding_of_held_out_digits_gets_the_label_of_its_reference(handler, tiny_splits) -> None:
    h, ctx = handler
    disagreements, checked = {}, 0
    for i in range(N_LABELLED):
        corpus_ = enc.encodings(tiny_splits.test[i][0].permute(1, 2, 0).numpy())
        names = list(corpus_)
        references = sorted({e.reference for e in corpus_.values()})
        bodies = [corpus_[n].data for n in names] + references
        results = call(h, ctx, [{"body": bytearray(b)} for b in bodies])
        failed = {n: r for n, (s, r) in zip(names, results, strict=False) if s != 200}
        assert not failed and all(s == 200 for s, _ in results), (i, failed)
        labels = [r["label"] for _, r in results]
        of_reference = dict(zip(references, labels[len(names):], strict=True))
        for name, label in zip(names, labels, strict=False):
            checked += 1
            if label != of_reference[corpus_[name].reference]:
                disagreements[(i, name)] = (label, of_reference[corpus_[name].reference])
    assert checked == N_LABELLED * len(names)
    assert disagreements == {}


# --- (e) hostile input ----------------------------------------------------------------------------------------------
def tiff_declaring(width: int, height: int) -> bytes:
    """A well-formed little-endian TIFF header claiming width x height 8-bit gray pixels, with no pixel data."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8),
            (277, 3, 1), (278, 4, height), (279, 4, width * height & 0xFFFFFFFF)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def raises(data: bytes) -> tuple[int, str]:
    with pytest.raises(InputError) as e:
        decode_image(data)
    return e.value.status, e.value.code


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL on a damaged TIFF
def test_hostile_inputs_still_fail_with_their_codes() -> None:
    picture = torch.from_numpy(digit_picture(3)).permute(2, 0, 1).contiguous()
    for item in corpus(picture, 32, 8 << 20):
        if isinstance(item.body, bytes) and item.code not in ("body_too_large", "bad_json"):  # the handler's checks
            assert raises(item.body) == (item.status, item.code), item.name
    assert raises(tiff_declaring(100_000, 100_000)) == (413, "too_many_pixels")  # past PIL's own bomb limit
    assert raises(tiff_declaring(8000, 6000)) == (413, "too_many_pixels")  # past ours
    assert raises(b"II*\x00" + bytes(range(256)) * 4) == (400, "corrupt_image")
    assert raises(b"MM\x00*" + b"\xff" * 64) == (400, "corrupt_image")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # PIL on a damaged TIFF
def test_every_truncated_encoding_is_a_400_not_a_guess() -> None:
    for name, e in enc.encodings(colour_picture()).items():
        assert raises(e.data[: len(e.data) // 3]) == (400, "corrupt_image"), name
