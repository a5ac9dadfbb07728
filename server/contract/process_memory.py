"""Giving freed heap memory back to the operating system (glibc's ``malloc_trim``).

Python frees big buffers (decoded images, a replaced or replayed faiss index), but glibc keeps
much of the freed heap mapped, so the process's RSS stays where its peak was. The face pipeline
trims after large image calls (face/memory_budget.py) and the gallery manager after loading its
galleries (a replay after ``kill -9`` held both the grown and the compacted index, docs/scale.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

__all__ = ["return_memory_to_os"]

LOG = logging.getLogger(__name__)

_LIBC: ctypes.CDLL | None | bool = None


def return_memory_to_os() -> bool:
    """``malloc_trim(0)``: give glibc's free heap pages back to the OS. False where unavailable."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 (musl and macOS have none)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC is False:
        return False
    started = time.perf_counter()
    _LIBC.malloc_trim(0)  # type: ignore[union-attr]
    LOG.debug("malloc_trim in %.1f ms", 1000 * (time.perf_counter() - started))
    return True
