"""A process-wide budget of working memory for image calls, and the estimate it admits on.

A 115 KB PNG may declare 10900x10900 pixels: under the pixel limit, but decoding and analysing it
costs hundreds of MB, and a few such calls at once used to take gigabytes. The pixel limit bounds
one image; :class:`MemoryBudget` bounds the server. :meth:`FacePipeline.analyze` reads the image
header (size and mode are known before any pixel is decoded), estimates the call's working memory
with :func:`estimate_working_bytes`, and holds that many bytes of the budget until the call ends:

* the estimate fits what is free: admitted at once;
* it fits the budget but not what is free now: the call waits up to ``wait_s`` for other calls to
  release theirs, then is refused with :class:`MemoryBudgetExhausted` (RESOURCE_EXHAUSTED, "retry");
* it exceeds the whole budget: refused at once (no wait could admit it).

Calls on small images (a 12 MP photo is estimated at ~230 MB) never wait on each other unless large
ones hold the budget. ``MemoryBudget(0)`` admits everything (no budget).

Worst case with the default settings: the budget (25 % of physical memory, e.g. 5.9 GB of 23 GB)
bounds the *estimated* working memory of all image calls together; the estimates are above the
measured peaks (table below), so the server's RSS stays under its idle RSS (~350 MB with the dlib
model) plus the budget, plus onnxruntime's arenas, which grow once with the number of concurrent
detector runs (up to ~100 MB each) and are kept.

After a call whose estimate was large (:data:`TRIM_ABOVE_BYTES`), contract/process_memory.py
``return_memory_to_os`` asks
glibc to give freed heap pages back (``malloc_trim``): Pillow's and numpy's big buffers are freed by
Python, but glibc keeps much of the freed arena mapped, so RSS stayed gigabytes above its start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from facegallery.server.contract.errors import ImageTooLargeError, ResourceExhausted

__all__ = [
    "MemoryBudget",
    "MemoryBudgetExhausted",
    "DEFAULT_BUDGET_FRACTION",
    "DEFAULT_WAIT_S",
    "BYTES_PER_WORKING_PIXEL",
    "FIXED_WORKING_BYTES",
    "TRIM_ABOVE_BYTES",
    "default_budget_bytes",
    "physical_memory_bytes",
    "estimate_working_bytes",
]

LOG = logging.getLogger(__name__)

#: The default budget: this fraction of the machine's physical memory.
DEFAULT_BUDGET_FRACTION = 0.25
#: How long a call waits for budget held by other calls before it is refused, seconds.
DEFAULT_WAIT_S = 2.0

#: Peak working memory per pixel of the image the pipeline works on (after any reduced decoding),
#: bytes, beyond :data:`FIXED_WORKING_BYTES`. Measured with ``python bench/hostile_memory.py
#: --factor`` (peak RSS of one ``analyze`` in a warmed-up process over the RSS before it; flat-colour
#: PNGs and JPEGs): 17.7 MB per MP before this module existed (PIL's 4-byte RGBX frame, an
#: ``exif_transpose`` copy, a ``convert("RGB")`` copy, the array and the detector's
#: ``Image.fromarray`` copy), 10.0 MB per MP once decode.py stopped copying. Peak over start, MB::
#:
#:     decoded at            4 MP   16 MP   49 MP   119 MP
#:     full size (PNG/JPEG)  139    184-194 490     1,190     estimate 145 / 277 / 640 / 1,408
#:     reduced, PNG          139    169     271     522       estimate 145 / 277 / 350 / 658
#:     reduced, JPEG draft   136    181     176     147       estimate 145 / 277 / 150 / 182
#:
#: (reduced = over the default ``reduce_above_pixels`` of 24 MP: 49 MP by 2, 119 MP by 4). 11 with
#: a margin; a reduced PNG also counts its full 4-byte frame (``decoded_bytes_per_pixel``).
BYTES_PER_WORKING_PIXEL = 11
#: Per-call memory independent of the image size: the detector's pyramid at up to
#: ``max_detect_pixels`` (1.25 MP by default), landmarks, chips and the embedder batch; ~100 MB
#: measured (a 4 MP call peaks 139 MB over its start).
FIXED_WORKING_BYTES = 96 * 1024 * 1024
#: ``malloc_trim`` after calls estimated above this many bytes.
TRIM_ABOVE_BYTES = 256 * 1024 * 1024


class MemoryBudgetExhausted(ResourceExhausted):
    """The server's memory budget is held by other calls (RESOURCE_EXHAUSTED); retry later."""

    reason = "MEMORY_BUDGET_EXHAUSTED"


def physical_memory_bytes() -> int:
    """The machine's physical memory, bytes (``SC_PAGE_SIZE * SC_PHYS_PAGES``); 0 if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def default_budget_bytes(fraction: float = DEFAULT_BUDGET_FRACTION) -> int:
    """``fraction`` of physical memory, at least 1 GiB (0 = no budget when memory is unknown)."""
    total = physical_memory_bytes()
    if total <= 0:
        return 0
    return max(1 << 30, int(total * fraction))


def estimate_working_bytes(decoded_pixels: int, decoded_bytes_per_pixel: int, working_pixels: int) -> int:
    """Estimated peak memory of one call, bytes.

    Parameters
    ----------
    decoded_pixels : int
        Pixels Pillow decodes (the declared size, or the JPEG draft size).
    decoded_bytes_per_pixel : int
        Bytes per pixel of Pillow's frame: 4 for 8-bit RGB (stored RGBX) and most modes, 8 for
        16/32-bit grey (converted through int64).
    working_pixels : int
        Pixels of the image the pipeline works on after any reduction.
    """
    decode = decoded_pixels * decoded_bytes_per_pixel if decoded_pixels != working_pixels else 0
    return decode + working_pixels * BYTES_PER_WORKING_PIXEL + FIXED_WORKING_BYTES


class MemoryBudget:
    """A thread-safe counter of reserved bytes with a ceiling (a condition variable).

    Parameters
    ----------
    limit_bytes : int
        The ceiling; 0 admits every request (no budget).
    wait_s : float
        Default wait in :meth:`acquire` for budget held by others, seconds.
    """

    def __init__(self, limit_bytes: int, *, wait_s: float = DEFAULT_WAIT_S) -> None:
        if limit_bytes < 0:
            raise ValueError(f"the memory budget must be >= 0 bytes, got {limit_bytes}")
        if wait_s < 0:
            raise ValueError(f"the memory budget wait must be >= 0 s, got {wait_s}")
        self.limit_bytes = int(limit_bytes)
        self.wait_s = float(wait_s)
        self._used = 0
        self._cond = threading.Condition()

    def __repr__(self) -> str:
        return f"MemoryBudget(limit={self.limit_bytes >> 20} MB, used={self._used >> 20} MB)"

    @property
    def enabled(self) -> bool:
        """False for ``MemoryBudget(0)``, which admits everything."""
        return self.limit_bytes > 0

    @property
    def used_bytes(self) -> int:
        """Bytes held by calls now."""
        with self._cond:
            return self._used

    def acquire(self, nbytes: int, timeout: float | None = None) -> None:
        """Reserve ``nbytes``, waiting up to ``timeout`` s (default :attr:`wait_s`) for them.

        Raises
        ------
        ImageTooLargeError
            ``nbytes`` exceeds the whole budget (refused at once).
        MemoryBudgetExhausted
            Not enough was released within ``timeout``.
        """
        if not self.enabled:
            return
        nbytes = max(0, int(nbytes))
        if nbytes > self.limit_bytes:
            raise ImageTooLargeError(
                f"the image needs about {_mb(nbytes)} MB of working memory, over the server's memory budget of "
                f"{_mb(self.limit_bytes)} MB"
            )
        wait = self.wait_s if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + wait
        with self._cond:
            while self._used + nbytes > self.limit_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MemoryBudgetExhausted(
                        f"the server's memory budget of {_mb(self.limit_bytes)} MB is in use "
                        f"({_mb(self._used)} MB held by other calls, this image needs about {_mb(nbytes)} MB); retry"
                    )
                self._cond.wait(remaining)
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        """Return ``nbytes`` reserved by :meth:`acquire` and wake the waiting calls."""
        if not self.enabled:
            return
        with self._cond:
            self._used = max(0, self._used - max(0, int(nbytes)))
            self._cond.notify_all()

    @contextmanager
    def reserve(self, nbytes: int, timeout: float | None = None) -> Iterator[None]:
        """``acquire(nbytes)`` for the ``with`` block, ``release`` after it (also on error)."""
        self.acquire(nbytes, timeout)
        try:
            yield
        finally:
            self.release(nbytes)


def _mb(nbytes: int) -> int:
    return round(nbytes / (1 << 20))
