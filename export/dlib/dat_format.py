"""Reader for dlib's binary serialization format (the ``.dat`` model files).

The format has no magic, no type tags and no nesting markers: a reader must know the C++ type
that was serialized and read its fields in order. This module provides the primitives; the
network and shape-predictor readers (``dlib_resnet``, ``dlib_mmod``, ``dlib_shape_predictor``)
walk the known architectures with them.

Encodings (``../shared/specs/dlib_models.md`` section (a); dlib v20.0.1 ``dlib/serialize.h``,
``dlib/float_details.h``, ``dlib/cuda/tensor.h``):

* integer: one control byte (bit 7 = sign, sign-magnitude; bits 0-3 = n magnitude bytes), then n
  little-endian bytes of the magnitude (serialize.h l.343-560).
* bool: one ASCII byte ``'1'`` or ``'0'`` (serialize.h l.1079).
* string: unsigned packed length, then raw bytes (serialize.h l.1871).
* float / double: packed int64 mantissa, then packed int16 exponent, value = m * 2**e; exponents
  32000/32001/32002 are +inf/-inf/NaN (serialize.h l.645-662).
* ``resizable_tensor``: int version 2, four packed dims (n, k, nr, nc), then n*k*nr*nc raw
  little-endian float32 in NCHW order (tensor.h l.444-495).
* ``alias_tensor``: int version 1 and four packed dims, no data.
* ``matrix<T>``: packed -nr, packed -nc, then the elements row-major in T's encoding
  (matrix.h l.1874).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DlibFormatError", "DlibReader"]

_INF, _NINF, _NAN = 32000, 32001, 32002


class DlibFormatError(ValueError):
    """The bytes do not follow the expected dlib serialization at ``offset``."""


class DlibReader:
    """Sequential reader over the bytes of one dlib ``.dat`` file.

    Parameters
    ----------
    data : bytes
        The whole file.

    Every ``read_*`` method consumes its field and advances ``offset`` (bytes). Malformed data
    raises :class:`DlibFormatError` naming the offset.
    """

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.offset = 0

    # -- primitives -------------------------------------------------------------------------
    def _take(self, n: int) -> memoryview:
        end = self.offset + n
        if end > len(self.data):
            raise DlibFormatError(f"unexpected end of file at offset {self.offset} (need {n} bytes)")
        out = self.data[self.offset:end]
        self.offset = end
        return out

    def read_int(self) -> int:
        """A packed integer of any C++ integer type (sign-magnitude)."""
        control = self._take(1)[0]
        n = control & 0x0F
        if control & 0x70 or n == 0 or n > 8:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at offset {self.offset - 1}")
        value = int.from_bytes(self._take(n), "little")
        return -value if control & 0x80 else value

    def expect_int(self, expected: int, what: str) -> None:
        """Read an integer and fail unless it equals ``expected`` (version fields)."""
        start = self.offset
        got = self.read_int()
        if got != expected:
            raise DlibFormatError(f"{what}: expected {expected}, got {got} at offset {start}")

    def read_bool(self) -> bool:
        ch = bytes(self._take(1))
        if ch not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool byte {ch!r} at offset {self.offset - 1}")
        return ch == b"1"

    def read_str(self) -> str:
        n = self.read_int()
        return bytes(self._take(n)).decode("latin-1")

    def expect_str(self, *allowed: str) -> str:
        """Read a version string and fail unless it is one of ``allowed``."""
        start = self.offset
        got = self.read_str()
        if got not in allowed:
            raise DlibFormatError(f"expected one of {allowed}, got {got!r} at offset {start}")
        return got

    def read_float(self) -> float:
        """A float or double in dlib's float_details encoding (mantissa first, then exponent)."""
        mantissa = self.read_int()
        exponent = self.read_int()
        if exponent == _INF:
            return math.inf
        if exponent == _NINF:
            return -math.inf
        if exponent == _NAN:
            return math.nan
        return math.ldexp(mantissa, exponent)

    # -- containers -------------------------------------------------------------------------
    def read_float_matrix(self) -> np.ndarray:
        """``matrix<float>``: returns a ``(nr, nc)`` float32 array."""
        nr, nc = abs(self.read_int()), abs(self.read_int())
        values = [self.read_float() for _ in range(nr * nc)]
        return np.asarray(values, dtype=np.float32).reshape(nr, nc)

    def read_tensor(self) -> np.ndarray:
        """``resizable_tensor``: returns an ``(n, k, nr, nc)`` float32 array (NCHW)."""
        self.expect_int(2, "tensor version")
        dims = tuple(self.read_int() for _ in range(4))
        count = int(np.prod(dims))
        raw = self._take(4 * count)
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(dims)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """``alias_tensor``: returns its dims (n, k, nr, nc); it holds no data."""
        self.expect_int(1, "alias_tensor version")
        return tuple(self.read_int() for _ in range(4))  # type: ignore[return-value]

    def at_end(self) -> bool:
        return self.offset == len(self.data)

    def expect_end(self) -> None:
        if not self.at_end():
            raise DlibFormatError(f"{len(self.data) - self.offset} trailing bytes at offset {self.offset}")

    # -- runs (fast paths for long sequences of scalars) ------------------------------------
    def read_int_run(self, count: int) -> np.ndarray:
        """``count`` consecutive packed integers as an ``(count,)`` int64 array.

        Same encoding as :meth:`read_int`, decoded in one tight loop (about 10x faster than
        ``count`` calls); used for the ~3 million packed integers of a shape predictor file.
        """
        data = self.data.obj if isinstance(self.data.obj, bytes) else bytes(self.data)
        end = len(self.data)
        offset = self.offset
        out = [0] * count
        from_bytes = int.from_bytes
        for i in range(count):
            if offset >= end:
                raise DlibFormatError(f"unexpected end of file at offset {offset} (integer {i} of {count})")
            control = data[offset]
            n = control & 0x0F
            if control & 0x70 or n == 0 or n > 8 or offset + 1 + n > end:
                raise DlibFormatError(f"bad integer control byte 0x{control:02x} at offset {offset}")
            value = data[offset + 1] if n == 1 else from_bytes(data[offset + 1:offset + 1 + n], "little")
            out[i] = -value if control & 0x80 else value
            offset += 1 + n
        self.offset = offset
        return np.asarray(out, dtype=np.int64)

    def read_float_run(self, count: int) -> np.ndarray:
        """``count`` consecutive float_details values as a ``(count,)`` float64 array.

        Each value is a packed mantissa then a packed exponent (see :meth:`read_float`); the
        inf/NaN exponent codes are honoured. float32 fields convert to float32 without loss.
        """
        pairs = self.read_int_run(2 * count).reshape(count, 2)
        mantissa, exponent = pairs[:, 0], pairs[:, 1]
        special = exponent >= _INF
        values = np.ldexp(mantissa.astype(np.float64), np.where(special, 0, exponent).astype(np.int32))
        if special.any():
            values[exponent == _INF] = math.inf
            values[exponent == _NINF] = -math.inf
            values[exponent == _NAN] = math.nan
        return values
