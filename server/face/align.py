"""Face alignment: the aligned face chip, exactly as ``dlib.get_face_chip(img, shape, size, padding)``.

Two steps (dlib v20.0.1 ``dlib/image_transforms/interpolation.h``; ``../shared/specs/dlib_models.md``
section (d), gotcha 9):

1. :func:`chip_transform` (``get_face_chip_details`` l.2062-2153 and ``chip_details`` l.1663):
   the least-squares similarity (Umeyama) from the template points placed in the chip to the
   landmarks gives the chip's rotation ``angle`` and its rectangle in the image.
2. :func:`extract_chip` (``extract_image_chip`` l.1977 / ``extract_image_chips`` l.1842-1950):
   for faces much larger than the chip, the bounding region is first reduced with
   ``pyramid_down<2>`` ([1 4 6 4 1] separable filter on integers, truncating), then each chip
   pixel is sampled bilinearly (black outside the source, value truncated to uint8).

Every face is extracted on its own, as one ``get_face_chip`` call per face does: a chip never
depends on the other faces of the image (dlib's joint ``get_face_chips`` shares one pyramid
origin between faces and can differ by a few grey levels).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np

from facegallery.server.contract.errors import InvalidInput
from facegallery.server.contract.manifest import ChipSpec
from facegallery.server.face.dlib_geometry import lround, rect_area, rect_down

__all__ = [
    "template_in_chip",
    "DLIB_5POINT_TEMPLATE",
    "ChipDetails",
    "similarity_transform",
    "chip_transform",
    "extract_chip",
    "extract_chips",
    "pyramid_down2",
]

logger = logging.getLogger(__name__)

#: dlib's 5-point face template in unit chip coordinates, x right / y down, in the order of the
#: 5-point shape predictor's parts (0-1 one eye's outer/inner corner, 2-3 the other eye's
#: outer/inner corner, 4 nose base). Source: dlib v20.0.1 interpolation.h l.2062-2153
#: (``get_face_chip_details``, points p0..p4).
DLIB_5POINT_TEMPLATE: tuple[tuple[float, float], ...] = (
    (0.8595674595992, 0.2134981538014),
    (0.6460604764104, 0.2289674387677),
    (0.1205750620789, 0.2137274526848),
    (0.3340850613712, 0.2290642403242),
    (0.4901123135679, 0.6277975316475),
)


@dataclasses.dataclass(frozen=True)
class ChipDetails:
    """Where a chip lies in the image (dlib ``chip_details``).

    Attributes
    ----------
    rect : tuple of 4 float
        left, top, right, bottom of the (unrotated) chip rectangle, image pixels, inclusive
        (dlib ``drectangle``; width = right - left + 1 = size * scale).
    angle : float
        Rotation of the chip about the rectangle's centre, radians (atan2 of T(1, 0)).
    size : int
        Chip side in pixels (rows = cols = size).
    """

    rect: tuple[float, float, float, float]
    angle: float
    size: int


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity ``dst ~ M @ src + t`` (Umeyama), batched over ``dst``.

    Umeyama, "Least-squares estimation of transformation parameters between two point
    patterns", TPAMI 1991, eqs. 34-43, as dlib ``find_similarity_transform``
    (point_transforms.h l.323), in float64 with dlib's order of summation. In 2-D the SVD
    solution has the closed form ``M = [[a, -b], [b, a]]``, ``a = (cov00 + cov11) / sigma_src``,
    ``b = (cov10 - cov01) / sigma_src`` (identity when all ``src`` points coincide).

    Parameters
    ----------
    src : (P, 2) float64
    dst : (..., P, 2) float64

    Returns
    -------
    M : (..., 2, 2) float64
        Scale times rotation.
    t : (..., 2) float64
        Translation.
    """
    n = src.shape[0]
    mean_src = src.sum(axis=0) / n
    mean_dst = dst.sum(axis=-2) / n
    s = src - mean_src
    d = dst - mean_dst[..., None, :]
    sigma = float((s * s).sum(axis=-1).sum()) / n
    cov = (d[..., :, :, None] * s[:, None, :]).sum(axis=-3) / n  # (1/n) sum_i d_i s_i^T
    if sigma == 0:
        scale_rot = np.broadcast_to(np.eye(2), cov.shape).copy()
    else:
        a = (cov[..., 0, 0] + cov[..., 1, 1]) / sigma
        b = (cov[..., 1, 0] - cov[..., 0, 1]) / sigma
        scale_rot = np.stack([np.stack([a, -b], axis=-1), np.stack([b, a], axis=-1)], axis=-2)
    return scale_rot, mean_dst - scale_rot @ mean_src


def _check_rgb(rgb: np.ndarray) -> None:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        raise InvalidInput(f"face chips need an (H, W, 3) uint8 RGB image, got {getattr(rgb, 'shape', None)} "
                           f"{getattr(rgb, 'dtype', type(rgb).__name__)}")


def _check_landmarks(landmarks: np.ndarray, spec: ChipSpec) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (len(spec.template), 2) or not np.isfinite(points).all():
        raise InvalidInput(f"landmarks must be a finite ({len(spec.template)}, 2) array, got shape {points.shape}")
    return points


def template_in_chip(spec: ChipSpec) -> np.ndarray:
    """The template landmarks in chip pixels, ``(K, 2) float64``.

    Template point ``p`` (unit coordinates) sits at ``(padding + p) / (2 * padding + 1) * size``
    (dlib ``get_face_chip_details``, interpolation.h l.2062-2153): where an aligned chip's
    landmarks are.
    """
    template = np.asarray(spec.template, dtype=np.float64)
    return (spec.padding + template) / (2 * spec.padding + 1) * spec.size


def chip_transform(landmarks: np.ndarray, spec: ChipSpec) -> ChipDetails:
    """The chip rectangle and angle for one face (dlib ``get_face_chip_details``).

    Parameters
    ----------
    landmarks : (K, 2) array_like of float
        x, y image pixels of the K = ``len(spec.template)`` landmarks (5 for dlib's template).
    spec : ChipSpec
        Chip size (pixels), padding (fraction of the template box per side) and template
        ``(K, 2)`` unit coordinates.

    Returns
    -------
    ChipDetails
        The template point ``p`` goes to chip pixel ``(padding + p) / (2 * padding + 1) * size``
        (interpolation.h l.2087-2095); ``T`` = least-squares similarity chip -> image;
        ``angle = atan2(T(1,0))``, ``scale = |T(1,0)|``, ``rect = centered_drect(T(size/2,
        size/2), size*scale, size*scale)`` (l.1663-1690, drectangle.h ``centered_drect``).
        As a consequence chip pixel (c, r) samples the image at ``T(c + 1/2, r + 1/2)``.

    Raises
    ------
    InvalidInput
        ``landmarks`` is not a finite (K, 2) array, or all landmarks coincide.
    """
    points = _check_landmarks(landmarks, spec)
    m, t = similarity_transform(template_in_chip(spec), points)
    px, py = float(m[0, 0]), float(m[1, 0])  # T applied to the unit vector (1, 0)
    angle = math.atan2(py, px)
    scale = math.sqrt(px * px + py * py)
    if not scale > 0:
        raise InvalidInput("landmarks are degenerate (all at one point): no face chip")
    half = spec.size / 2.0
    cx = float(m[0, 0] * half + m[0, 1] * half + t[0])
    cy = float(m[1, 0] * half + m[1, 1] * half + t[1])
    w = spec.size * scale - 1  # centered_drect subtracts 1 before halving
    h = spec.size * scale - 1
    return ChipDetails((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle, int(spec.size))


def pyramid_down2(img: np.ndarray) -> np.ndarray:
    """One level of dlib's ``pyramid_down<2>`` on an RGB image (image_pyramid.h l.150-480).

    Separable [1 4 6 4 1] filter in integers, keeping every other row and column: output
    pixel (r, c) is centred on input (2r+2, 2c+2) and equals the 5x5 weighted sum // 256.

    Parameters
    ----------
    img : (H, W, 3) uint8

    Returns
    -------
    ((H-3)//2, (W-3)//2, 3) uint8, or (0, 0, 3) when H or W is at most 8 (dlib clears it).
    """
    nr, nc = img.shape[:2]
    if nr <= 8 or nc <= 8:
        return np.zeros((0, 0, 3), np.uint8)
    out_r, out_c = (nr - 3) // 2, (nc - 3) // 2
    src = img.astype(np.int32)
    span = 2 * out_c - 1
    rows = (src[:, 0:span:2] + 4 * src[:, 1:span + 1:2] + 6 * src[:, 2:span + 2:2]
            + 4 * src[:, 3:span + 3:2] + src[:, 4:span + 4:2])
    span = 2 * out_r - 1
    cols = (rows[0:span:2] + 4 * rows[1:span + 1:2] + 6 * rows[2:span + 2:2]
            + 4 * rows[3:span + 3:2] + rows[4:span + 4:2])
    return (cols // 256).astype(np.uint8)


def _rotate(center: tuple[float, float], point: tuple[float, float], cos_a: float, sin_a: float) -> tuple[float, float]:
    """dlib ``rotate_point`` (point_transforms.h l.680)."""
    x, y = point[0] - center[0], point[1] - center[1]
    return cos_a * x - sin_a * y + center[0], sin_a * x + cos_a * y + center[1]


def _bilinear(src: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib ``interpolate_bilinear`` (interpolation.h l.229) at float64 points; black outside.

    Returns ``x.shape + (3,)`` uint8, the double value truncated like ``vector_to_pixel``.
    """
    left = np.floor(x)
    top = np.floor(y)
    lr = x - left
    tb = y - top
    left = left.astype(np.int64)
    top = top.astype(np.int64)
    inside = (left >= 0) & (top >= 0) & (left + 1 < src.shape[1]) & (top + 1 < src.shape[0])
    li = np.where(inside, left, 0)
    ti = np.where(inside, top, 0)
    img = src.astype(np.float64) if src.size else np.zeros((2, 2, 3))
    tl, tr = img[ti, li], img[ti, li + 1]
    bl, br = img[ti + 1, li], img[ti + 1, li + 1]
    lr, tb = lr[..., None], tb[..., None]
    value = (1 - tb) * ((1 - lr) * tl + lr * tr) + tb * ((1 - lr) * bl + lr * br)
    return np.where(inside[..., None], value, 0).astype(np.uint8)


def _extract(rgb: np.ndarray, details: ChipDetails) -> np.ndarray:
    """dlib ``extract_image_chip`` for one chip (interpolation.h l.1842-1999)."""
    size = details.size
    left, top, right, bottom = details.rect
    height, width = rgb.shape[:2]
    if details.angle == 0 and right - left + 1 == size and bottom - top + 1 == size:
        # basic_extract_image_chip: a plain copy of the rounded rectangle, black outside.
        x0, y0 = lround(left), lround(top)
        chip = np.zeros((size, size, 3), np.uint8)
        ys, xs = slice(max(y0, 0), min(y0 + size, height)), slice(max(x0, 0), min(x0 + size, width))
        if ys.start < ys.stop and xs.start < xs.stop:
            chip[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0] = rgb[ys, xs]
        return chip

    # Pyramid depth and the region of the image the chip needs (l.1874-1897).
    chip_area = float(size * size)
    depth, grow = 0, 2.0
    rect = rect_down(details.rect)
    while rect_area(rect) > chip_area:
        rect = rect_down(rect)
        depth += 1
        grow = grow * 2 + 2
    cos_a, sin_a = math.cos(details.angle), math.sin(details.angle)
    center = ((left + right) / 2.0, (top + bottom) / 2.0)
    corners = [_rotate(center, p, cos_a, sin_a) for p in ((left, top), (right, top), (left, bottom), (right, bottom))]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    box = (max(min(xs) - grow, 0.0), max(min(ys) - grow, 0.0),
           min(max(xs) + grow, width - 1.0), min(max(ys) + grow, height - 1.0))
    bl, bt, br, bb = (lround(v) for v in box)
    if bl > br or bt > bb:  # the chip lies outside the image
        return np.zeros((size, size, 3), np.uint8)
    level_img = rgb[bt:bb + 1, bl:br + 1]

    # Pick the pyramid level (l.1928-1935) and build it.
    rect = (left - bl, top - bt, right - bl, bottom - bt)
    level = -1
    while rect_area(rect_down(rect)) > chip_area and level + 1 < depth:
        level += 1
        rect = rect_down(rect)
    for _ in range(level + 1):
        level_img = pyramid_down2(level_img)

    # Affine map chip (0,0), (size-1,0), (0,size-1) -> the rotated corners of rect (l.1937-1949).
    center = ((rect[0] + rect[2]) / 2.0, (rect[1] + rect[3]) / 2.0)
    tl = _rotate(center, (rect[0], rect[1]), cos_a, sin_a)
    tr = _rotate(center, (rect[2], rect[1]), cos_a, sin_a)
    bl_ = _rotate(center, (rect[0], rect[3]), cos_a, sin_a)
    m00, m10 = (tr[0] - tl[0]) / (size - 1), (tr[1] - tl[1]) / (size - 1)
    m01, m11 = (bl_[0] - tl[0]) / (size - 1), (bl_[1] - tl[1]) / (size - 1)
    c = np.arange(size, dtype=np.float64)[None, :]
    r = np.arange(size, dtype=np.float64)[:, None]
    x = m00 * c + m01 * r + tl[0]
    y = m10 * c + m11 * r + tl[1]
    return _bilinear(level_img, x, y)


def extract_chip(rgb: np.ndarray, landmarks: np.ndarray, spec: ChipSpec) -> np.ndarray:
    """The aligned face chip of one face, like ``dlib.get_face_chip(img, shape, size, padding)``.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        RGB image.
    landmarks : (K, 2) array_like of float
        The face's landmarks, image pixels, K = ``len(spec.template)``.
    spec : ChipSpec
        Chip size, padding and template (``ChipSpec(150, 0.25, DLIB_5POINT_TEMPLATE)`` for the
        default model).

    Returns
    -------
    (size, size, 3) uint8
        RGB chip; parts of it outside the image are black.

    Raises
    ------
    InvalidInput
        ``rgb`` is not (H, W, 3) uint8, or ``landmarks`` is not a finite (K, 2) array.
    """
    _check_rgb(rgb)
    return _extract(rgb, chip_transform(landmarks, spec))


def extract_chips(rgb: np.ndarray, landmarks: np.ndarray, spec: ChipSpec) -> np.ndarray:
    """Aligned chips of N faces, each extracted independently (see :func:`extract_chip`).

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    landmarks : (N, K, 2) array_like of float
    spec : ChipSpec

    Returns
    -------
    (N, size, size, 3) uint8
        ``(0, size, size, 3)`` when N = 0.

    Raises
    ------
    InvalidInput
        As :func:`extract_chip`, or ``landmarks`` is not (N, K, 2).
    """
    _check_rgb(rgb)
    points = np.asarray(landmarks, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, spec.size, spec.size, 3), np.uint8)
    if points.ndim != 3:
        raise InvalidInput(f"landmarks must be (N, {len(spec.template)}, 2), got shape {points.shape}")
    return np.stack([_extract(rgb, chip_transform(p, spec)) for p in points])
