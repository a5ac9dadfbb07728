"""dlib's rounding and rectangle arithmetic, bit-exact, for scalars and numpy arrays alike.

The detector, the image pyramid and the chip aligner all reproduce dlib v20.0.1 to the last bit,
and all of them round coordinates and map rectangles between pyramid levels. These helpers are
written once here (``../shared/specs/dlib_models.md`` sections (b) and (d)):

* :func:`lround` — C++ ``std::lround``: nearest integer, halves away from zero. dlib converts a
  ``drectangle`` to an integer ``rectangle`` with it (drectangle.h l.64) and rounds the
  ``pyramid_up`` output size with it (interpolation.h l.1548).
* :func:`rect_down` / :func:`rect_up` — ``pyramid_down<2>::rect_down`` / ``rect_up``
  (image_pyramid.h l.155-170): each corner ``p -> p / 2 - (1.25, 0.75)`` per level, and back
  ``p -> (p + (1.25, 0.75)) * 2``, in double, without rounding.
* :func:`rect_area` — ``rectangle::area`` / ``drectangle::area`` (rectangle.h, drectangle.h) of
  inclusive rectangles: ``(right - left + 1) * (bottom - top + 1)``, 0 when empty.

Rectangles are ``(left, top, right, bottom)``, inclusive, pixels. Every function takes either a
plain Python sequence / scalar (and then returns Python numbers) or a numpy array of rectangles
``(..., 4)`` / values (and then returns an array of the same leading shape).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import overload

import numpy as np

__all__ = ["lround", "rect_down", "rect_up", "rect_area"]

#: ``pyramid_down<2>`` maps image point p to ``p / 2 - _PYRAMID2_SHIFT`` one level down
#: (image_pyramid.h l.155-160: ``point_down``), in the order left, top, right, bottom.
_PYRAMID2_SHIFT = np.array([1.25, 0.75, 1.25, 0.75])

Rect = tuple[float, float, float, float]


@overload
def lround(x: float) -> int: ...


@overload
def lround(x: np.ndarray) -> np.ndarray: ...


def lround(x: float | np.ndarray) -> int | np.ndarray:
    """C++ ``std::lround``: the nearest integer, halves rounded away from zero, exact for every double.

    ``sign(x) * floor(|x| + 0.5)`` is *not* exact: ``|x| + 0.5`` rounds to a double first, so
    0.49999999999999994 gives 1 and 2**52 + 1 gives 2**52 + 2. Splitting off the integer part
    first is exact (``x - trunc(x)`` is always representable).

    Parameters
    ----------
    x : float or ndarray of float
        Finite values (NaN and infinities have no integer; ``std::lround`` leaves them
        unspecified too).

    Returns
    -------
    int or ndarray of int64
        A Python ``int`` for a scalar (numpy scalars included), else an int64 array of
        ``x.shape``.
    """
    if isinstance(x, np.ndarray):
        whole = np.trunc(x)
        return (whole + np.sign(x) * (np.abs(x - whole) >= 0.5)).astype(np.int64)
    whole = math.trunc(x)
    fraction = float(x) - whole
    return int(whole + (fraction >= 0.5) - (fraction <= -0.5))


def _levels(levels: int) -> int:
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    return levels


def rect_down(rect: Sequence[float] | np.ndarray, levels: int = 1) -> Rect | np.ndarray:
    """``pyramid_down<2>::rect_down(rect, levels)``: the rectangle ``levels`` pyramid levels down.

    Each corner ``p -> p / 2 - (1.25, 0.75)`` per level, in double (image_pyramid.h l.155-160);
    no rounding (dlib's integer ``rectangle`` overload rounds the result with :func:`lround`).

    Parameters
    ----------
    rect : (4,) sequence of float, or (..., 4) ndarray
        left, top, right, bottom, inclusive pixels.
    levels : int
        Number of levels, >= 0.

    Returns
    -------
    tuple of 4 float, or (..., 4) float64 ndarray
        The same kind as ``rect``.
    """
    out = np.asarray(rect, dtype=np.float64)
    for _ in range(_levels(levels)):
        out = out / 2.0 - _PYRAMID2_SHIFT
    return out if isinstance(rect, np.ndarray) else tuple(float(v) for v in out)


def rect_up(rect: Sequence[float] | np.ndarray, levels: int = 1) -> Rect | np.ndarray:
    """``pyramid_down<2>::rect_up(rect, levels)``: the inverse of :func:`rect_down`.

    Each corner ``p -> (p + (1.25, 0.75)) * 2`` per level, in double (image_pyramid.h
    l.160-170); no rounding.

    Parameters
    ----------
    rect : (4,) sequence of float, or (..., 4) ndarray
        left, top, right, bottom, inclusive pixels.
    levels : int
        Number of levels, >= 0.

    Returns
    -------
    tuple of 4 float, or (..., 4) float64 ndarray
        The same kind as ``rect``.
    """
    out = np.asarray(rect, dtype=np.float64)
    for _ in range(_levels(levels)):
        out = (out + _PYRAMID2_SHIFT) * 2.0
    return out if isinstance(rect, np.ndarray) else tuple(float(v) for v in out)


def rect_area(rect: Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Area of inclusive rectangles, ``(right - left + 1) * (bottom - top + 1)``; 0 when empty.

    dlib ``rectangle::area`` (integer) and ``drectangle::area`` (double): a rectangle is empty
    when ``left > right`` or ``top > bottom``.

    Parameters
    ----------
    rect : (4,) sequence of float, or (..., 4) ndarray
        left, top, right, bottom.

    Returns
    -------
    float, or ndarray of shape ``rect.shape[:-1]``
        In the dtype of ``rect`` for an array (int64 boxes give int64 areas).
    """
    if not isinstance(rect, np.ndarray):
        left, top, right, bottom = rect
        if left > right or top > bottom:
            return 0.0
        return float((right - left + 1) * (bottom - top + 1))
    left, top, right, bottom = rect[..., 0], rect[..., 1], rect[..., 2], rect[..., 3]
    empty = (left > right) | (top > bottom)
    return np.where(empty, 0, (right - left + 1) * (bottom - top + 1))
