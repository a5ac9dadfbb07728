"""decode.py: formats, modes, EXIF orientation, limits and bad input."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from facegallery.server.contract.errors import ImageDecodeError, ImageTooLargeError, InvalidInput
from facegallery.server.face.decode import DecodeLimits, decode_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo(shared_dir) -> np.ndarray:
    """A real face photo, 320x240 RGB."""
    return np.asarray(Image.open(shared_dir / "faces/face_recognition/barack_obama/obama_small.jpg").convert("RGB"))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_round_trip(photo, fmt):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_encode(Image.fromarray(photo), fmt, **kw))
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert np.array_equal(out, photo)


def test_real_webp_with_jpg_name(shared_dir):
    data = (shared_dir / "faces/deepface/scarlett_johansson/img47.jpg").read_bytes()
    assert data[8:12] == b"WEBP"
    out = decode_image(data)
    assert out.ndim == 3 and out.shape[2] == 3 and min(out.shape[:2]) > 100


def test_gif_first_frame():
    frames = [Image.new("RGB", (40, 30), c) for c in [(200, 10, 10), (10, 200, 10)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue())
    assert out.shape == (30, 40, 3)
    assert out[15, 20, 0] > 150 and out[15, 20, 1] < 60


@pytest.mark.parametrize("orientation,transform", [
    (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, 1)),   # stored rotated 90° clockwise-needed: pixels are the CCW view
    (8, lambda a: np.rot90(a, -1)),
    (2, lambda a: a[:, ::-1]),
])
def test_exif_orientation_restores_upright_pixels(photo, orientation, transform):
    """A camera stores pixels sideways plus an Orientation tag; decoding must undo it."""
    stored = np.ascontiguousarray(transform(photo))
    img = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(_encode(img, "PNG", exif=exif.tobytes()))
    assert out.shape == photo.shape
    assert np.array_equal(out, photo)


def test_modes_convert_to_rgb(photo):
    grey = Image.fromarray(photo).convert("L")
    for img in [grey, grey.convert("LA"), Image.fromarray(photo).convert("P"), Image.fromarray(photo).convert("CMYK")]:
        fmt = "JPEG" if img.mode == "CMYK" else "PNG"
        out = decode_image(_encode(img, fmt))
        assert out.shape == photo.shape and out.dtype == np.uint8
    out = decode_image(_encode(grey, "PNG"))
    assert np.array_equal(out[:, :, 0], np.asarray(grey)) and np.array_equal(out[:, :, 0], out[:, :, 2])


def test_16bit_grey_keeps_top_byte():
    values = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    img = Image.fromarray(values)  # mode I;16
    assert img.mode == "I;16"
    out = decode_image(_encode(img, "PNG"))
    assert np.array_equal(out[:, :, 1], (values >> 8).astype(np.uint8))


def test_transparent_pixels_become_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half fully transparent
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[5, 5].tolist() == [255, 0, 0]
    assert out[15, 5].tolist() == [255, 255, 255]


def test_arrays_and_pil_inputs(photo):
    assert np.array_equal(decode_image(photo), photo)
    assert np.array_equal(decode_image(Image.fromarray(photo)), photo)
    grey = photo[:, :, 1].copy()
    assert np.array_equal(decode_image(grey)[:, :, 2], grey)
    with pytest.raises(InvalidInput):
        decode_image(photo.astype(np.float32))
    with pytest.raises(InvalidInput):
        decode_image(np.zeros((4, 4, 2), np.uint8))


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))])
def test_garbage_is_a_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_truncated_jpeg_is_a_decode_error(shared_dir):
    data = (shared_dir / "faces/face_recognition/barack_obama/obama.jpg").read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height whose pixel data is a few bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_huge_png_header_is_rejected_before_decoding():
    with pytest.raises(ImageTooLargeError, match="900000000 pixels"):
        decode_image(_png_header_only(30000, 30000))


def test_byte_and_pixel_limits(photo):
    data = _encode(Image.fromarray(photo), "PNG")
    with pytest.raises(ImageTooLargeError):
        decode_image(data, DecodeLimits(max_bytes=len(data) - 1))
    with pytest.raises(ImageTooLargeError):
        decode_image(data, DecodeLimits(max_pixels=320 * 240 - 1))
    assert decode_image(data, DecodeLimits(max_bytes=len(data), max_pixels=320 * 240)).shape == photo.shape


def test_read_header_does_not_decode():
    from facegallery.server.face.decode import read_header

    header = read_header(_png_header_only(10900, 10900))  # its pixel data is 64 bytes: decoding would fail
    assert (header.width, header.height, header.mode, header.format) == (10900, 10900, "RGB", "PNG")
    assert header.pixels == 118_810_000 and header.reducible and not header.transposed
    with pytest.raises(ImageTooLargeError):
        read_header(_png_header_only(30000, 30000))
    with pytest.raises(ImageDecodeError):
        read_header(b"not an image")


def test_read_header_sees_the_orientation(photo):
    from facegallery.server.face.decode import read_header

    exif = Image.Exif()
    exif[0x0112] = 6
    header = read_header(_encode(Image.fromarray(photo), "JPEG", exif=exif.tobytes()))
    assert header.transposed and header.upright_size == (photo.shape[1], photo.shape[0])
    assert header.decoded_pixels(4) == (-(-photo.shape[1] // 4)) * (-(-photo.shape[0] // 4))  # JPEG draft 1/4


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_reduced_decoding(photo, fmt):
    """reduce=k decodes at ceil(side / k), close to a downscale of the full decode."""
    big = np.asarray(Image.fromarray(photo).resize((photo.shape[1] * 4, photo.shape[0] * 4), Image.BICUBIC))
    data = _encode(Image.fromarray(big), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    full = decode_image(data)
    for k in (2, 3, 4):
        reduced = decode_image(data, reduce=k)
        assert reduced.shape == (-(-big.shape[0] // k), -(-big.shape[1] // k), 3) and reduced.dtype == np.uint8
        expected = np.asarray(Image.fromarray(full).reduce(k), dtype=np.float32)
        assert np.abs(reduced.astype(np.float32) - expected).mean() < 3


def test_reduced_decoding_keeps_orientation_and_transparency(photo):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.ascontiguousarray(np.rot90(photo, 1))
    upright = decode_image(_encode(Image.fromarray(stored), "PNG", exif=exif.tobytes()), reduce=2)
    assert upright.shape == (photo.shape[0] // 2, photo.shape[1] // 2, 3)
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert (decode_image(_encode(palette, "PNG"), reduce=4) == 255).all()  # transparent -> white, as at full size
    wide = Image.fromarray(np.full((40, 40), 40000, np.uint16))  # 16-bit grey is never reduced
    assert decode_image(_encode(wide, "PNG"), reduce=4).shape == (40, 40, 3)


def test_random_bytes_in_the_exif_block_keep_the_pixels(photo):
    """Issue 8: a broken EXIF block is ignored (orientation 1), never the whole photo lost."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera" * 20
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    app1 = data.find(b"\xff\xe1")
    length = data[app1 + 2] * 256 + data[app1 + 3]
    upright = decode_image(data, DecodeLimits())
    rng = np.random.default_rng(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns about the corrupt EXIF data it skips
        for _ in range(100):
            damaged = bytearray(data)
            for pos in rng.integers(app1 + 4, app1 + 2 + length, size=8):  # inside the segment, its length kept
                damaged[pos] = int(rng.integers(0, 256))
            pixels = decode_image(bytes(damaged), DecodeLimits())
            assert pixels.shape in (upright.shape, (upright.shape[1], upright.shape[0], 3))
