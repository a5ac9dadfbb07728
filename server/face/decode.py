"""Decode: image bytes (or a PIL image / numpy array) -> ``(H, W, 3) uint8`` RGB pixels.

The first stage of every request. It applies the EXIF orientation (phone photos are stored
sideways with an Orientation tag), converts every Pillow mode a face photo arrives in (L, LA, P,
RGBA, CMYK, I;16, I, F, YCbCr, ...) to 8-bit RGB, takes the first frame of animated formats, and
enforces the byte and pixel limits *before* the pixels are decoded, so a 30000x30000 PNG header
costs nothing. Formats: whatever Pillow reads (JPEG, PNG, WebP, BMP, TIFF, GIF, ...).

:func:`read_header` reads the size and mode without decoding (the pipeline estimates a call's
memory from it, memory_budget.py), and ``decode_image(..., reduce=k)`` decodes large images at
about 1/k of their side: JPEG in draft mode (the DCT scaled by 1/2, 1/4 or 1/8, so the full-size
pixels never exist), other formats by a box-filter ``Image.reduce`` right after loading. Pixels are
copied as few times as possible: a decoded frame is only copied to the RGB array.
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

__all__ = [
    "DecodeLimits", "DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "ImageHeader", "read_header", "decode_image",
    "to_rgb_array",
]

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


#: Modes ``Image.reduce`` accepts; others are converted to one of them first (``_reducible``).
_REDUCIBLE_MODES = frozenset({"L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "RGBX", "La", "RGBa", "PA"})
#: 16-bit grey modes: never reduced (their conversion to 8 bits depends on the peak value).
_WIDE_GREY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: EXIF Orientation values that swap width and height.
_TRANSPOSING = frozenset({5, 6, 7, 8})


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What is known of an image before its pixels are decoded.

    Attributes
    ----------
    width, height : int
        Declared size, pixels, as stored (before EXIF orientation).
    mode : str
        Pillow mode of the (first) frame.
    format : str or None
        Pillow format name ("JPEG", "PNG", ...); None for arrays and PIL images.
    transposed : bool
        The EXIF orientation swaps width and height (the upright image is ``height x width``).
    """

    width: int
    height: int
    mode: str
    format: str | None = None
    transposed: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def upright_size(self) -> tuple[int, int]:
        """``(height, width)`` of the upright (EXIF-oriented) image."""
        return (self.width, self.height) if self.transposed else (self.height, self.width)

    @property
    def frame_bytes_per_pixel(self) -> int:
        """Bytes per pixel of Pillow's decoded frame and its conversion (16/32-bit grey: via int64)."""
        return 8 if self.mode in _WIDE_GREY_MODES or self.mode in ("I", "F") else 4

    @property
    def reducible(self) -> bool:
        """Whether ``decode_image(reduce=k)`` can decode this image at reduced size."""
        return self.format is not None and self.mode not in _WIDE_GREY_MODES

    def decoded_pixels(self, reduce: int) -> int:
        """Pixels Pillow decodes for ``decode_image(reduce=reduce)`` (JPEG drafts at 1/2, 1/4, 1/8)."""
        if reduce <= 1 or not self.reducible:
            return self.pixels
        if self.format == "JPEG":
            scale = next(s for s in (8, 4, 2, 1) if s <= reduce)
            return -(-self.width // scale) * -(-self.height // scale)
        return self.pixels


def read_header(image: bytes | Image.Image | np.ndarray, limits: DecodeLimits = DecodeLimits()) -> ImageHeader:
    """Size, mode and orientation of an image without decoding its pixels; the limits are checked.

    Raises the same errors as :func:`decode_image` for empty, unrecognised or oversized input.
    """
    if isinstance(image, np.ndarray):
        if image.ndim < 2:
            raise InvalidInput(f"pixel arrays must be (H,W), (H,W,1), (H,W,3) or (H,W,4); got {image.shape}")
        return ImageHeader(int(image.shape[1]), int(image.shape[0]), "RGB")
    if isinstance(image, Image.Image):
        _check_pixels(image.size, limits)
        return ImageHeader(image.size[0], image.size[1], image.mode, None, _orientation(image) in _TRANSPOSING)
    if isinstance(image, (bytes, bytearray, memoryview)):
        with _opened(bytes(image), limits) as img:
            return ImageHeader(img.size[0], img.size[1], img.mode, img.format, _header_orientation(img) in _TRANSPOSING)
    raise InvalidInput(f"unsupported image type {type(image).__name__}: expected bytes, a PIL image or a numpy array")


def decode_image(
    image: bytes | Image.Image | np.ndarray, limits: DecodeLimits = DecodeLimits(), *, reduce: int = 1
) -> np.ndarray:
    """Decode an image to RGB pixels with its EXIF orientation applied.

    Parameters
    ----------
    image : bytes | PIL.Image.Image | numpy.ndarray
        Encoded bytes (JPEG, PNG, WebP, BMP, TIFF, GIF first frame, ...), a PIL image (its EXIF
        orientation is applied too), or pixels ``(H, W)`` / ``(H, W, 1|3|4)`` uint8, taken as
        grey / RGB / RGBA.
    limits : DecodeLimits
        Byte and pixel bounds, checked on the header before any pixel is decoded.
    reduce : int
        Encoded bytes only: decode at about ``1/reduce`` of the side (ceil(W / reduce) x
        ceil(H / reduce) for a power of two with JPEG, otherwise a box filter; 16-bit grey images
        are never reduced). 1 decodes at full size.

    Returns
    -------
    (H, W, 3) uint8, C-contiguous, RGB. H and W are after EXIF rotation (and reduction).

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
        return _decode_bytes(bytes(image), limits, max(1, int(reduce)))
    raise InvalidInput(f"unsupported image type {type(image).__name__}: expected bytes, a PIL image or a numpy array")


def _decode_bytes(data: bytes, limits: DecodeLimits, reduce: int = 1) -> np.ndarray:
    with _opened(data, limits) as img:
        if reduce > 1 and img.mode not in _WIDE_GREY_MODES:
            img = _reduced(img, reduce)
        else:
            img.load()
        return to_rgb_array(_oriented(img))


def _reduced(img: Image.Image, reduce: int) -> Image.Image:
    """Load ``img`` at ceil(side / reduce): a JPEG draft at 1/2, 1/4 or 1/8 for as much of the factor
    as it covers, then a box filter (``Image.reduce``, or a BOX resize when the rest is fractional)."""
    width, height = img.size
    target = (-(-width // reduce), -(-height // reduce))
    img.draft(None, (max(1, width // reduce), max(1, height // reduce)))  # no-op except for JPEG
    img.load()
    if img.size == target:
        return img
    if img.mode not in _REDUCIBLE_MODES:
        img = _reducible(img)
    drafted = round(width / img.size[0])
    if reduce % drafted == 0:
        reduced = img.reduce(reduce // drafted)
    else:
        reduced = img.resize(target, Image.Resampling.BOX)
    reduced.info = img.info  # keeps the EXIF block for the orientation
    img.close()
    return reduced


def _reducible(img: Image.Image) -> Image.Image:
    """A copy of ``img`` in a mode ``Image.reduce`` accepts, keeping transparency (to_rgb_array rules)."""
    if img.mode in ("P", "PA") and ("transparency" in img.info or img.mode == "PA"):
        return img.convert("RGBA")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB")


class _opened:
    """``with _opened(data, limits) as img``: Image.open with the limits checked on the header and
    Pillow's errors turned into ImageDecodeError / ImageTooLargeError (also from within the block)."""

    def __init__(self, data: bytes, limits: DecodeLimits) -> None:
        self._data = data
        self._limits = limits
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> Image.Image:
        data, limits = self._data, self._limits
        if not data:
            raise ImageDecodeError("the image is empty (0 bytes)")
        if len(data) > limits.max_bytes:
            raise ImageTooLargeError(f"the image has {len(data)} bytes, over the limit of {limits.max_bytes}")
        self._warnings.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.size, limits)
            img.seek(0)
            return img
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        self._warnings.__exit__(exc_type, exc, tb)
        if exc is None or isinstance(exc, (ImageTooLargeError, ImageDecodeError)):
            return
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageTooLargeError(f"the image is too large to decode: {exc}") from exc
        if isinstance(exc, UnidentifiedImageError):
            raise ImageDecodeError(f"not a recognised image format ({len(self._data)} bytes)") from exc
        if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error)):
            raise ImageDecodeError(f"the image could not be decoded: {exc}") from exc


def _check_pixels(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"the image has an empty size {width}x{height}")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1-8), 1 when absent or unreadable."""
    try:
        value = img.getexif().get(0x0112, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # a malformed EXIF block must not lose the picture
        return 1


def _header_orientation(img: Image.Image) -> int:
    """:func:`_orientation` without decoding: a PNG's ``getexif`` decodes the whole image to look
    for an eXIf chunk after the pixels, so for PNG only a chunk before them counts here."""
    if img.format != "PNG":
        return _orientation(img)
    raw = img.info.get("exif")
    if not raw:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(0x0112, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:
        return 1


def _oriented(img: Image.Image) -> Image.Image:
    """Apply the EXIF Orientation tag (1-8) so pixels are the right way up (no copy when upright)."""
    if _orientation(img) == 1:
        return img
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
    if mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


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
