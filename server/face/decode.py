"""Decode: image bytes (or a PIL image / numpy array) -> ``(H, W, 3) uint8`` RGB pixels.

The first stage of every request. It applies the EXIF orientation (phone photos are stored
sideways with an Orientation tag), converts every Pillow mode a face photo arrives in (L, LA, P,
RGBA, CMYK, I;16, I, F, YCbCr, ...) to 8-bit RGB, takes the first frame of animated formats, and
enforces the byte and pixel limits *before* the pixels are decoded, so a 30000x30000 PNG header
costs nothing. Formats: whatever Pillow reads (JPEG, PNG, WebP, BMP, TIFF, GIF, ...).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facegallery.server.contract.errors import ImageDecodeError, ImageTooLargeError, InvalidInput

__all__ = ["DecodeLimits", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "decode_image", "to_rgb_array"]

LOG = logging.getLogger(__name__)

#: 64 MiB: well above a 108 MP phone JPEG (~30 MB) or a 24 MP PNG (~50 MB).
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: 120 megapixels: a 108 MP phone sensor fits; decoding it takes ~360 MB of RGB.
DEFAULT_MAX_IMAGE_PIXELS = 120_000_000


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds checked before decoding (:class:`ImageTooLargeError`, RESOURCE_EXHAUSTED)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def decode_image(image: bytes | Image.Image | np.ndarray, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode an image to RGB pixels with its EXIF orientation applied.

    Parameters
    ----------
    image : bytes | PIL.Image.Image | numpy.ndarray
        Encoded bytes (JPEG, PNG, WebP, BMP, TIFF, GIF first frame, ...), a PIL image (its EXIF
        orientation is applied too), or pixels ``(H, W)`` / ``(H, W, 1|3|4)`` uint8, taken as
        grey / RGB / RGBA.
    limits : DecodeLimits
        Byte and pixel bounds, checked on the header before any pixel is decoded.

    Returns
    -------
    (H, W, 3) uint8, C-contiguous, RGB. H and W are after EXIF rotation.

    Raises
    ------
    ImageDecodeError
        Empty, unrecognised, corrupt or truncated data (INVALID_ARGUMENT).
    ImageTooLargeError
        Over ``limits.max_bytes`` or ``limits.max_pixels`` (RESOURCE_EXHAUSTED).
    InvalidInput
        An array of an unsupported shape or dtype.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, limits)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, limits)
        return to_rgb_array(_oriented(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(image), limits)
    raise InvalidInput(f"unsupported image type {type(image).__name__}: expected bytes, a PIL image or a numpy array")


def _decode_bytes(data: bytes, limits: DecodeLimits) -> np.ndarray:
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the image has {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.size, limits)
            img.seek(0)
            img.load()
            return to_rgb_array(_oriented(img))
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the image is too large to decode: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageDecodeError(f"the image could not be decoded: {exc}") from exc


def _check_pixels(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the image has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


def _oriented(img: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (1-8) so pixels are the right way up."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a malformed EXIF block must not lose the picture
        LOG.warning("ignoring unreadable EXIF orientation: %s", exc)
        return img


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to ``(H, W, 3) uint8`` RGB.

    16- and 32-bit grey (``I;16``, ``I``) keep their top 8 significant bits; float images (``F``) are
    clipped to 0..255. Images with transparency are composited over white, the usual
    background of ID photos (transparent pixels carry no colour of their own).
    """
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        peak = int(arr.max()) if arr.size else 0
        shift = max(0, peak.bit_length() - 8) if mode == "I" else 8
        grey = np.clip(arr >> shift, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"))
        if alpha.min() < 255:
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(background, rgba)
        return np.ascontiguousarray(np.asarray(rgba.convert("RGB"), dtype=np.uint8))
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def _array_to_rgb(arr: np.ndarray, limits: DecodeLimits) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise InvalidInput(f"pixel arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        _check_pixels((arr.shape[1], arr.shape[0]), limits)
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        _check_pixels((arr.shape[1], arr.shape[0]), limits)
        if arr.shape[2] == 4:
            return to_rgb_array(Image.fromarray(arr, "RGBA"))
        return np.ascontiguousarray(arr)
    raise InvalidInput(f"pixel arrays must be (H,W), (H,W,1), (H,W,3) or (H,W,4); got {arr.shape}")
