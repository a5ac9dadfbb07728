"""dlib's image resampling for the MMOD detector, reproduced bit for bit in numpy.

Two operations (``../shared/specs/dlib_models.md`` (b) "Input" and gotcha 10; dlib v20.0.1):

* :func:`pyramid_up` — ``pyramid_up(img, pyramid_down<2>)`` (interpolation.h l.1548), the ×2
  upsampling of ``cnn_face_detection_model_v1(img, upsample_num_times)``: output size
  ``lround(2 (nc - 1 + 1.25)) + 1`` × ``lround(2 (nr - 1 + 0.75)) + 1``, then the RGB bilinear
  ``resize_image`` (interpolation.h l.808-928): an SSE float32 path in groups of 4 columns with
  truncation to uint8, and a double-precision path for the last few columns.
* :func:`tiled_pyramid` — ``input_rgb_image_pyramid<pyramid_down<6>>::to_tensor`` (input.h l.805-1010):
  all pyramid levels (each ``floor(5/6)`` of the previous, while at least 5 rows) tiled into one
  zero-filled planar float tensor (``compute_tiled_image_pyramid_details``, image_pyramid.h l.1029);
  level 0 is ``(pixel - mean) / 256``, every further level the align-corners bilinear resize of the
  previous level's *float* data (``tt::resize_bilinear`` → the grayscale-float ``resize_image``,
  interpolation.h l.699-805, again an SSE part and a scalar tail).

The SSE arithmetic is emulated with float32 numpy operations in dlib's evaluation order (no fused
multiply-add), the x87-free double arithmetic with float64, and every accumulated coordinate with a
sequential ``np.add.accumulate``, so the results equal dlib's x86 build exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from facegallery.server.face.dlib_geometry import lround, rect_up

__all__ = ["pyramid_up", "pyramid_up_size", "pyramid_level_sizes", "tiled_pyramid_layout", "tiled_pyramid"]

_MIN_LEVEL_HEIGHT = 5  # compute_tiled_image_pyramid_details: levels stop below 5 rows
_BLOCK_ROWS = 8  # rows per block of the vectorised SSE emulation (cache-sized temporaries)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Source rows and weights of one output axis of ``resize_image`` (all output rows)."""

    top: np.ndarray  # (n,) intp
    bottom: np.ndarray  # (n,) intp
    frac64: np.ndarray  # (n,) float64, tb_frac
    frac32: np.ndarray  # (n,) float32, (float)tb_frac
    inv32: np.ndarray  # (n,) float32, (float)(1 - tb_frac)


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Source columns and weights: the SSE groups (``simd``) and the scalar tail."""

    simd_left: np.ndarray  # (m,) intp
    simd_frac: np.ndarray  # (m,) float32, _x - left
    tail_left: np.ndarray  # (t,) intp
    tail_right: np.ndarray  # (t,) intp
    tail_frac64: np.ndarray  # (t,) float64, x - left


def _rows(n_in: int, n_out: int) -> _Rows:
    """``y = -y_scale; y += y_scale`` per row in double (interpolation.h l.722-728)."""
    y_scale = (n_in - 1) / max(n_out - 1, 1)
    steps = np.full(n_out + 1, y_scale)
    steps[0] = -y_scale
    y = np.add.accumulate(steps)[1:]
    top = np.floor(y)
    frac = y - top
    top = top.astype(np.intp)
    return _Rows(top, np.minimum(top + 1, n_in - 1), frac, frac.astype(np.float32), (1.0 - frac).astype(np.float32))


def _columns(n_in: int, n_out: int) -> _Columns:
    """Column positions of ``resize_image``'s SSE loop and scalar tail (interpolation.h l.729-799).

    The SSE loop keeps four float32 positions ``x, x + s, x + 2s, x + 3s`` (from ``x = -4s``)
    and adds ``(float)(4 s)`` before each group; it stops at the first group whose last right
    neighbour ``trunc(x) + 1`` is outside the input. The tail restarts in double at
    ``x = -s + c s`` and adds ``s`` per column.
    """
    x_scale = (n_in - 1) / max(n_out - 1, 1)
    n_groups = (n_out + 3) // 4 + 1
    x0 = -4 * x_scale
    start = np.array([x0, x0 + x_scale, x0 + 2 * x_scale, x0 + 3 * x_scale], dtype=np.float32)
    steps = np.empty((n_groups + 1, 4), dtype=np.float32)
    steps[0] = start
    steps[1:] = np.float32(4 * x_scale)
    xs = np.add.accumulate(steps, axis=0, dtype=np.float32)[1:]  # (groups, 4)
    left = xs.astype(np.int32)  # _mm_cvttps_epi32: truncation
    stop = np.flatnonzero(left[:, 3] + 1 >= n_in)
    n_simd = min(4 * int(stop[0]), n_out)
    xs, left = xs.ravel()[:n_simd], left.ravel()[:n_simd]
    simd_frac = xs - left.astype(np.float32)

    steps = np.full(n_out - n_simd + 1, x_scale)
    steps[0] = -x_scale + n_simd * x_scale
    x = np.add.accumulate(steps)[1:]
    tail_left = np.floor(x)
    tail_frac = x - tail_left
    tail_left = tail_left.astype(np.intp)
    return _Columns(left.astype(np.intp), simd_frac, tail_left, np.minimum(tail_left + 1, n_in - 1), tail_frac)


def _bilinear_sse(src: np.ndarray, rows: _Rows, cols: _Columns, out: np.ndarray) -> None:
    """The SSE part of ``resize_image`` for all rows and the first ``out.shape[2]`` columns.

    ``src`` (C, h, w) float32 planes → ``out`` (C, H, m) float32, per pixel
    ``((tlf tl + trf tr) + blf bl) + brf br`` with float32 weights ``tlf = (1 - tb)(1 - lr)``,
    ``trf = (1 - tb) lr``, ``blf = tb (1 - lr)``, ``brf = tb lr`` (interpolation.h l.737-776, blend at l.762).
    Works in blocks of rows so the temporaries stay in cache.
    """
    channels, n_rows, m = out.shape
    left, right = cols.simd_left, cols.simd_left + 1
    lr = cols.simd_frac
    inv_lr = np.float32(1) - lr
    block = min(_BLOCK_ROWS, n_rows)
    acc = np.empty((channels, block, m), np.float32)
    term = np.empty((channels, block, m), np.float32)
    weight = np.empty((block, m), np.float32)
    for r0 in range(0, n_rows, block):
        r1 = min(r0 + block, n_rows)
        a, t, w = acc[:, : r1 - r0], term[:, : r1 - r0], weight[: r1 - r0]
        top, bottom = src[:, rows.top[r0:r1]], src[:, rows.bottom[r0:r1]]
        tb, inv_tb = rows.frac32[r0:r1, None], rows.inv32[r0:r1, None]
        np.multiply(inv_tb, inv_lr, out=w)
        np.take(top, left, axis=2, out=a)
        a *= w
        terms = ((top, right, inv_tb, lr), (bottom, left, tb, inv_lr), (bottom, right, tb, lr))
        for source, index, row_weight, col_weight in terms:
            np.multiply(row_weight, col_weight, out=w)
            np.take(source, index, axis=2, out=t)
            t *= w
            a += t
        out[:, r0:r1] = a


def _resize_float(src: np.ndarray, dst: np.ndarray) -> None:
    """Grayscale-float ``resize_image`` on each channel: ``src`` (C, h, w) → ``dst`` (C, H, W), float32."""
    rows, cols = _rows(src.shape[1], dst.shape[1]), _columns(src.shape[2], dst.shape[2])
    n_simd = cols.simd_left.size
    if n_simd:
        _bilinear_sse(src, rows, cols, dst[:, :, :n_simd])
    if cols.tail_left.size:
        # Scalar tail (l.779-800): float lr_frac and row sums, double row blend, stored as float.
        top, bottom = src[:, rows.top], src[:, rows.bottom]
        left, right = cols.tail_left, cols.tail_right
        lr = cols.tail_frac64.astype(np.float32)
        inv_lr = np.float32(1) - lr
        upper = inv_lr * top[:, :, left] + lr * top[:, :, right]
        lower = inv_lr * bottom[:, :, left] + lr * bottom[:, :, right]
        tb = rows.frac64[:, None]
        dst[:, :, n_simd:] = ((1.0 - tb) * upper + tb * lower).astype(np.float32)


def pyramid_up_size(height: int, width: int) -> tuple[int, int]:
    """Output ``(height, width)`` of :func:`pyramid_up`: ``rect_up`` of the image rectangle
    (``p -> (p + (1.25, 0.75)) * 2``, image_pyramid.h l.160-170), its bottom-right corner rounded
    with ``lround``, plus one (interpolation.h l.1548)."""
    _, _, right, bottom = rect_up((0, 0, width - 1, height - 1))
    return lround(bottom) + 1, lround(right) + 1


def pyramid_up(rgb: np.ndarray) -> np.ndarray:
    """dlib ``pyramid_up(img, pyramid_down<2>)``: ×2 bilinear upsampling, bit-exact.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        Non-empty RGB image.

    Returns
    -------
    (H', W', 3) uint8
        ``(H', W') = pyramid_up_size(H, W)``, i.e. ``(2H + 1, 2W + 2)``; values truncated, not rounded.
    """
    height, width = rgb.shape[:2]
    out_h, out_w = pyramid_up_size(height, width)
    rows, cols = _rows(height, out_h), _columns(width, out_w)
    planes = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    n_simd = cols.simd_left.size
    if n_simd:
        sse = np.empty((3, out_h, n_simd), np.float32)
        _bilinear_sse(planes, rows, cols, sse)
        out[:, :n_simd] = sse.astype(np.int32).transpose(1, 2, 0)  # _mm_cvttps_epi32, then (unsigned char)
    if cols.tail_left.size:
        # Scalar tail (l.903-925): everything in double, then static_cast<unsigned char>.
        top, bottom = planes[:, rows.top].astype(np.float64), planes[:, rows.bottom].astype(np.float64)
        left, right = cols.tail_left, cols.tail_right
        lr = cols.tail_frac64
        inv_lr = 1.0 - lr
        tb = rows.frac64[:, None]
        value = (1.0 - tb) * (inv_lr * top[:, :, left] + lr * top[:, :, right]) + tb * (
            inv_lr * bottom[:, :, left] + lr * bottom[:, :, right]
        )
        out[:, n_simd:] = value.astype(np.int32).transpose(1, 2, 0)
    return out


def pyramid_level_sizes(height: int, width: int, downscale: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of every level of ``pyramid_down<downscale>`` down to 5 rows.

    Each level is ``floor(rate * size)`` with ``rate = (N - 1) / N`` in double
    (``find_pyramid_down_output_image_size``, image_pyramid.h l.983-993).
    """
    rate = (downscale - 1.0) / downscale
    sizes = [(height, width)]
    while True:
        height, width = math.floor(rate * height), math.floor(rate * width)
        if height * width == 0 or height < _MIN_LEVEL_HEIGHT:
            return sizes
        sizes.append((height, width))


def tiled_pyramid_layout(
    height: int, width: int, *, downscale: int, padding: int, outer_padding: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """Where each pyramid level goes in the tiled image (``compute_tiled_image_pyramid_details``).

    Levels are stacked in one column (``padding`` px apart, ``outer_padding`` margin) until the
    next fits beside the previous one and at least half of the remaining height is used; the rest
    go bottom-up along the right edge, stopping before one would overlap level 0.

    Parameters
    ----------
    height, width : int
        Image size, pixels (both > 0).

    Returns
    -------
    rects : (L, 4) int64
        ``left, top, right, bottom`` (inclusive) of each level in the tiled image, level 0 first.
    shape : (int, int)
        ``(rows, cols)`` of the tiled image.
    """
    sizes = pyramid_level_sizes(height, width, downscale)
    total_height = sum(h + padding for h, _ in sizes) - 2 * padding
    base_h, base_w = sizes[0]
    column_height, prev_width = 0, 0
    for h, w in sizes:
        if w <= base_w - prev_width - padding and (column_height - base_h) * 2 >= total_height - base_h:
            break
        column_height += h + padding
        prev_width = w
    column_height -= padding
    shape = (column_height + 2 * outer_padding, base_w + 2 * outer_padding)

    rects: list[tuple[int, int, int, int]] = []
    y = outer_padding
    while y < column_height + outer_padding and len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        rects.append((outer_padding, y, outer_padding + w - 1, y + h - 1))
        y += h + padding
    y -= padding
    base = rects[0]
    while len(rects) < len(sizes):
        h, w = sizes[len(rects)]
        right, bottom = outer_padding + base_w - 1, y - 1
        rect = (right - (w - 1), bottom - (h - 1), right, bottom)
        if rect[0] <= base[2] and rect[2] >= base[0] and rect[1] <= base[3] and rect[3] >= base[1]:
            break  # it would intersect level 0
        rects.append(rect)
        y -= h + padding
    return np.asarray(rects, dtype=np.int64), shape


def tiled_pyramid(
    rgb: np.ndarray,
    mean_rgb: tuple[float, float, float] | np.ndarray,
    scale: float,
    *,
    downscale: int,
    padding: int,
    outer_padding: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Build the detector's input tensor, exactly as ``input_rgb_image_pyramid::to_tensor``.

    Parameters
    ----------
    rgb : (H, W, 3) uint8
        Non-empty RGB image.
    mean_rgb : (3,) float
        Per-channel mean subtracted in float32 (``avg_red, avg_green, avg_blue``).
    scale : float
        Multiplier after the mean (1/256 for dlib: exact in float32).
    downscale, padding, outer_padding : int
        ``pyramid_down<N>``, gap between levels and outer margin (pixels).

    Returns
    -------
    tensor : (1, 3, NR, NC) float32
        Planar RGB; zero outside the levels.
    rects : (L, 4) int64
        Level rectangles, as :func:`tiled_pyramid_layout`.
    """
    height, width = rgb.shape[:2]
    rects, (nr, nc) = tiled_pyramid_layout(
        height, width, downscale=downscale, padding=padding, outer_padding=outer_padding
    )
    tensor = np.zeros((1, 3, nr, nc), dtype=np.float32)
    planes = tensor[0]
    l0, t0, r0, b0 = rects[0]
    mean = np.asarray(mean_rgb, dtype=np.float32)
    level0 = (rgb.astype(np.float32) - mean) * np.float32(scale)  # (pixel - avg) in float, / 256.0 exact
    planes[:, t0 : b0 + 1, l0 : r0 + 1] = level0.transpose(2, 0, 1)
    for (sl, st, sr, sb), (dl, dt, dr, db) in zip(rects[:-1], rects[1:]):
        _resize_float(planes[:, st : sb + 1, sl : sr + 1], planes[:, dt : db + 1, dl : dr + 1])
    return tensor, rects
