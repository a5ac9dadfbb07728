"""Client-streaming calls that cannot starve the server: a cap on concurrent streams and an idle timeout.

The gRPC server runs every handler on one thread pool, and a client-streaming handler
(``BulkEnroll``, ``ImportEmbeddings``) holds its thread while it waits for the client's next
message. Two rules keep unary calls served whatever streaming clients do:

* :class:`StreamLimiter`: at most ``max_streams`` streams at once, ``max_per_client`` of them from
  one peer address; a stream over either cap is refused at once with RESOURCE_EXHAUSTED. The
  server's pool has ``max_streams`` threads more than its unary workers (app.py), so a unary call
  always finds a thread.
* :func:`with_idle_timeout`: a stream whose client sends nothing for ``idle_s`` seconds ends with
  DEADLINE_EXCEEDED, which frees its thread and its slot. Messages are read by a helper thread
  into a bounded queue, so the handler can wait with a timeout.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TypeVar

from facegallery.server.contract.errors import StreamIdleError, TooManyStreams

__all__ = ["StreamLimiter", "with_idle_timeout", "peer_host"]

T = TypeVar("T")
_END = object()
#: Messages read ahead of the handler per stream (bounds the memory a fast client can queue).
_READ_AHEAD = 4


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:127.0.0.1:5000`` -> ``ipv4:127.0.0.1``)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class StreamLimiter:
    """Counts open streams in total and per client; thread-safe.

    Parameters
    ----------
    max_streams : int
        Streams open at once, >= 1.
    max_per_client : int
        Streams open at once from one peer address, >= 1.
    """

    def __init__(self, max_streams: int, max_per_client: int) -> None:
        if max_streams < 1 or max_per_client < 1:
            raise ValueError("stream limits must be >= 1")
        self.max_streams = max_streams
        self.max_per_client = max_per_client
        self._lock = threading.Lock()
        self._open: Counter[str] = Counter()

    @contextlib.contextmanager
    def slot(self, peer: str) -> Iterator[None]:
        """Hold one stream slot for ``peer`` (a gRPC peer string) while the block runs.

        Raises TooManyStreams (RESOURCE_EXHAUSTED, reason TOO_MANY_STREAMS) when a cap is reached.
        """
        client = peer_host(peer)
        with self._lock:
            total = sum(self._open.values())
            if total >= self.max_streams:
                raise TooManyStreams(f"the server has {total} streams open, its limit; retry when one ends")
            if self._open[client] >= self.max_per_client:
                raise TooManyStreams(f"this client has {self._open[client]} streams open, the limit per client; end one first")
            self._open[client] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[client] -= 1
                if not self._open[client]:
                    del self._open[client]


def with_idle_timeout(messages: Iterable[T], idle_s: float, what: str) -> Iterator[T]:
    """The messages of a request stream; StreamIdleError (DEADLINE_EXCEEDED) when none arrives for ``idle_s`` seconds.

    A daemon thread reads ``messages`` ahead into a queue of :data:`_READ_AHEAD`. When the
    handler gives up, gRPC ends the call and the thread's pending read returns (with an error),
    so the thread ends too.
    """
    pending: queue.Queue = queue.Queue(maxsize=_READ_AHEAD)
    stop = threading.Event()

    def read() -> None:
        try:
            for message in messages:
                while not stop.is_set():
                    try:
                        pending.put(message, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            pending.put(_END)
        except BaseException as exc:  # the call ended (cancelled) or the stream broke: hand it to the handler
            with contextlib.suppress(queue.Full):
                pending.put_nowait(exc)

    threading.Thread(target=read, name=f"stream-reader-{what}", daemon=True).start()
    try:
        while True:
            try:
                item = pending.get(timeout=idle_s)
            except queue.Empty:
                raise StreamIdleError(f"{what}: no message for {idle_s:g} s; the stream was ended") from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
