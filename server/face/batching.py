"""Dynamic batching of face-chip embedding across concurrent requests.

A server handles many requests at once, and one onnxruntime run of a batch costs less than a
run per chip (the default dlib ResNet on this 2-core machine, one thread: 4.4 ms of CPU per chip
alone, 3.9 ms at batch 8) and fewer thread hand-offs. :class:`BatchingEmbedder` queues the chips
of concurrent callers and lets a worker thread embed them together: a batch is closed when it
holds ``max_batch_size`` chips or ``max_delay_ms`` after its first request arrived, whichever
comes first (the TensorFlow Serving / Triton dynamic-batching policy). Each caller blocks until
its own rows are back.

The default delay is 0 (as Triton's ``max_queue_delay_microseconds``): a free worker takes what
is queued at once, so batches are the requests that arrived while the workers were busy, and a
lone request never waits. Waiting 5 ms for more left the cores idle while every client already
waited for its answer: 8 Identify clients on chips, 198-204 -> 251-258 chips/s (0.39-0.42 ->
0.48-0.49 of raw onnxruntime batch 8 in the same runs, ``bench/identify_throughput.py``);
photos unchanged (0.91 of the pipeline).

Several workers (``workers``, one per core by default in the server) run batches side by side,
like Triton's model instances: one worker at a time collects the next batch while the others
embed theirs, so the cores embed while the handlers of the last batch search and answer.
With one worker that splits each batch over both cores instead, every call of a batch waited
for the slowest slice and the embedder sat idle while those calls did their Python work. 8
concurrent Identify clients on chips, 1,000 identities, this 2-core machine, A/B in one
session: 0.42 -> 0.51 of raw onnxruntime's rate (``bench/identify_throughput.py``,
docs/scale.md).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

import numpy as np

from facegallery.server.contract.timing import record

if TYPE_CHECKING:
    from facegallery.server.face.pipeline import ChipEmbedder

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_DELAY_MS", "BatchingEmbedder"]

LOG = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_DELAY_MS = 0.0


class _Request:
    __slots__ = ("chips", "future", "queued")

    def __init__(self, chips: np.ndarray) -> None:
        self.chips = chips
        self.future: Future[np.ndarray] = Future()
        self.queued = time.monotonic()  # for the queue-wait measurement (contract/timing.py)


_STOP = object()


class BatchingEmbedder:
    """Wraps an embedder so that concurrent ``embed`` calls share batches.

    Parameters
    ----------
    embedder : ChipEmbedder
        The wrapped embedder, ``embed(chips (N,S,S,3) uint8) -> (N,D) float32``; only the
        worker thread calls it.
    max_batch_size : int
        Chips per batch, >= 1. A single request with more chips is embedded as its own batch.
    max_delay_ms : float
        Longest wait (milliseconds) for more requests after the first one of a batch, >= 0;
        0 (the default) takes only what is already queued.
    workers : int
        Batches embedded at once, each by its own worker thread, >= 1 (with an embedder of one
        onnxruntime thread per run: the cores).

    ``embed`` has the wrapped embedder's surface. If a batch fails, its requests are retried one
    by one so that each caller gets its own result or its own exception. :meth:`close` embeds
    what is queued, then stops the worker; ``embed`` after ``close`` raises RuntimeError.
    """

    def __init__(
        self, embedder: ChipEmbedder, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_delay_ms: float = DEFAULT_MAX_DELAY_MS, workers: int = 1
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.embedder = embedder
        self.max_batch_size = int(max_batch_size)
        self.max_delay_ms = float(max_delay_ms)
        self.workers = int(workers)
        self._queue: queue.Queue = queue.Queue()
        self._collecting = threading.Lock()  # one worker forms a batch at a time
        self._closed = False
        self._close_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"batching-embedder-{i}", daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Embed ``chips`` ``(N,S,S,3)`` with other callers' chips; returns ``(N,D) float32``.

        Raises whatever the wrapped embedder raises for these chips, and RuntimeError after
        :meth:`close`.
        """
        request = _Request(np.asarray(chips))
        with self._close_lock:
            if self._closed:
                raise RuntimeError("the batching embedder is closed")
            self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        """Finish the queued requests and stop the worker thread (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)  # after every queued request; each worker passes it on
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> BatchingEmbedder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BatchingEmbedder({self.embedder!r}, max_batch_size={self.max_batch_size}, max_delay_ms={self.max_delay_ms}, workers={self.workers})"

    # -- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            with self._collecting:
                first = self._queue.get()
                if first is _STOP:
                    self._queue.put(_STOP)
                    return
                batch, stopping = self._collect(first)
            self._embed_batch(batch)
        self._queue.put(_STOP)

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` plus the requests that arrive within the delay and fit in the batch."""
        batch, size = [first], len(first.chips)
        deadline = time.monotonic() + self.max_delay_ms / 1000.0
        while size < self.max_batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            if size + len(item.chips) > self.max_batch_size:
                self._embed_batch(batch)
                batch, size = [item], len(item.chips)
                deadline = time.monotonic() + self.max_delay_ms / 1000.0
                continue
            batch.append(item)
            size += len(item.chips)
        return batch, False

    def _embed_batch(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        for request in batch:
            record("batch_queue_wait_seconds", now - request.queued)
        if len(batch) > 1:
            try:
                chips = np.concatenate([r.chips for r in batch])
                started = time.perf_counter()
                record("batch_size", len(chips))
                embeddings = self.embedder.embed(chips)
                LOG.debug("embedded %d chips of %d requests in %.1f ms", len(chips), len(batch), (time.perf_counter() - started) * 1e3)
            except Exception:  # one request's bad chips must not fail the others: retry one by one
                LOG.debug("batch of %d requests failed; embedding them one by one", len(batch), exc_info=True)
            else:
                start = 0
                for request in batch:
                    request.future.set_result(embeddings[start : start + len(request.chips)])
                    start += len(request.chips)
                return
        for request in batch:
            try:
                record("batch_size", len(request.chips))
                request.future.set_result(self.embedder.embed(request.chips))
            except Exception as exc:
                request.future.set_exception(exc)
