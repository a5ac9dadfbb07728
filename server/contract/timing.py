"""A pluggable sink for stage timings and other measurements, so that ``face`` and ``gallery`` can
be measured without importing a metrics library (only ``service`` knows Prometheus).

The engine calls :func:`observe` (a stage's duration in seconds), :func:`timed` (the same, as a
context manager) and :func:`record` (any other value: a batch size, a count); all three do nothing
until a sink is installed with :func:`set_sink` (``service/metrics.py`` installs one that feeds
Prometheus histograms). One sink per process; the sink must be thread-safe and must not raise
(an exception from it is logged once per name and swallowed, never failing a request).

Stages (``observe``): ``decode``, ``detect``, ``landmarks``, ``align``, ``embed`` (pipeline.py),
``search`` (indexed_gallery.py), ``decision`` (manager.py). Values (``record``): ``batch_size``
(chips per embedder run) and ``batch_queue_wait_seconds`` (batching.py), ``faces_per_image``
(manager.py identify/embed), ``snapshot_seconds`` (indexed_gallery.py), ``model_load_seconds``
(pipeline.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["TimingSink", "get_sink", "observe", "record", "set_sink", "timed"]

LOG = logging.getLogger(__name__)


class TimingSink(Protocol):
    """Where measurements go; both methods must be thread-safe and fast."""

    def observe(self, stage: str, seconds: float) -> None: ...

    def record(self, name: str, value: float) -> None: ...


_sink: TimingSink | None = None
_failed: set[str] = set()


def set_sink(sink: TimingSink | None) -> TimingSink | None:
    """Install ``sink`` (None: measurements are dropped again); returns the previous one."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def get_sink() -> TimingSink | None:
    """The installed sink, or None."""
    return _sink


def _failure(name: str) -> None:
    if name not in _failed:
        _failed.add(name)
        LOG.warning("the timing sink failed for %r; further failures for it are not logged", name, exc_info=True)


def observe(stage: str, seconds: float) -> None:
    """Report that ``stage`` took ``seconds``."""
    sink = _sink
    if sink is not None:
        try:
            sink.observe(stage, seconds)
        except Exception:
            _failure(stage)


def record(name: str, value: float) -> None:
    """Report a value that is not a stage duration (``batch_size``, ``faces_per_image``, ...)."""
    sink = _sink
    if sink is not None:
        try:
            sink.record(name, value)
        except Exception:
            _failure(name)


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """``with timed("detect"): ...`` observes the block's wall time (also when it raises)."""
    if _sink is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        observe(stage, time.perf_counter() - started)
