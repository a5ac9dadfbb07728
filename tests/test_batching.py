"""BatchingEmbedder: concurrent callers share batches, get their own rows and their own errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from facegallery.server.face.batching import BatchingEmbedder

S = 4  # chip side of the toy embedder


class RecordingEmbedder:
    """Embeds a chip as its per-channel mean (3 values); the first call blocks until released."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def embed(self, chips: np.ndarray) -> np.ndarray:
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(10)
        if chips.ndim != 4 or chips.shape[1:] != (S, S, 3):
            raise ValueError(f"bad chips {chips.shape}")
        self.batches.append(len(chips))
        return chips.reshape(len(chips), -1, 3).mean(axis=1).astype(np.float32)


def chips(value: int, n: int = 1) -> np.ndarray:
    return np.full((n, S, S, 3), value, np.uint8)


def call_all(batcher: BatchingEmbedder, inputs: list[np.ndarray]) -> list:
    """``batcher.embed`` of every input from its own thread, after the first call is in the embedder."""
    results: list = [None] * len(inputs)

    def call(i: int) -> None:
        try:
            results[i] = batcher.embed(inputs[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    batcher.embedder.entered.wait(10)  # the worker is inside the embedder with the first request
    threads += [threading.Thread(target=call, args=(i,)) for i in range(1, len(inputs))]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while batcher._queue.qsize() < len(inputs) - 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # every other request is queued behind the blocked first batch
    batcher.embedder.release.set()
    for t in threads:
        t.join(10)
    return results


def test_queued_requests_share_one_batch_and_get_their_own_rows():
    with BatchingEmbedder(RecordingEmbedder(), max_batch_size=32, max_delay_ms=1) as batcher:
        inputs = [chips(10 * i, n=1 + i % 3) for i in range(8)]
        results = call_all(batcher, inputs)
    for i, (given, got) in enumerate(zip(inputs, results)):
        assert got.shape == (len(given), 3)
        np.testing.assert_array_equal(got, np.full((len(given), 3), 10 * i, np.float32))
    assert batcher.embedder.batches == [1, sum(len(x) for x in inputs[1:])]


def test_batches_never_exceed_the_maximum():
    with BatchingEmbedder(RecordingEmbedder(), max_batch_size=5, max_delay_ms=1) as batcher:
        results = call_all(batcher, [chips(i, n=2) for i in range(7)])
    assert all(r.shape == (2, 3) for r in results)
    assert max(batcher.embedder.batches) <= 5 and sum(batcher.embedder.batches) == 14
    assert len(batcher.embedder.batches) < 7  # queued requests were combined


def test_a_bad_request_fails_alone():
    with BatchingEmbedder(RecordingEmbedder(), max_batch_size=32, max_delay_ms=1) as batcher:
        inputs = [chips(1), chips(2), np.zeros((1, S + 1, S, 3), np.uint8), chips(4)]
        results = call_all(batcher, inputs)
    assert isinstance(results[2], ValueError) and "bad chips" in str(results[2])
    for i in (0, 1, 3):
        np.testing.assert_array_equal(results[i], np.full((1, 3), i + 1, np.float32))


def test_close_finishes_queued_work_then_refuses():
    embedder = RecordingEmbedder()
    embedder.release.set()
    batcher = BatchingEmbedder(embedder, max_batch_size=4, max_delay_ms=0)
    np.testing.assert_array_equal(batcher.embed(chips(7, n=6)), np.full((6, 3), 7, np.float32))  # larger than a batch: alone
    batcher.close()
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.embed(chips(1))
    with pytest.raises(ValueError):
        BatchingEmbedder(embedder, max_batch_size=0)


class MeetingEmbedder:
    """Each call waits (up to 5 s) until ``parties`` calls are inside at once; records whether they met."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=5)
        self.met: list[bool] = []

    def embed(self, chips: np.ndarray) -> np.ndarray:
        try:
            self.barrier.wait()
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        return chips.reshape(len(chips), -1, 3).mean(axis=1).astype(np.float32)


def test_workers_embed_batches_side_by_side_and_all_stop_on_close():
    """Two workers: while one batch is in the embedder the other worker forms and runs the next
    (both calls meet inside the embedder); each caller still gets its own rows."""
    embedder = MeetingEmbedder(2)
    batcher = BatchingEmbedder(embedder, max_batch_size=1, max_delay_ms=0, workers=2)
    results: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.embed(chips(i + 1)))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert embedder.met == [True, True]
    for i in range(2):
        np.testing.assert_array_equal(results[i], np.full((1, 3), i + 1, np.float32))
    queued = threading.Thread(target=lambda: results.__setitem__(0, batcher.embed(chips(9, n=2))))
    embedder.barrier = threading.Barrier(1)  # alone from now on
    queued.start()
    queued.join(10)
    batcher.close()  # every worker passes the stop on and exits
    assert all(not t.is_alive() for t in batcher._threads)
    np.testing.assert_array_equal(results[0], np.full((2, 3), 9, np.float32))
    with pytest.raises(ValueError, match="workers"):
        BatchingEmbedder(embedder, workers=0)


def test_one_worker_runs_one_batch_at_a_time():
    """The same two calls with one worker never meet in the embedder (the barrier times out)."""
    embedder = MeetingEmbedder(2)
    embedder.barrier = threading.Barrier(2, timeout=0.3)
    with BatchingEmbedder(embedder, max_batch_size=1, max_delay_ms=0, workers=1) as batcher:
        threads = [threading.Thread(target=batcher.embed, args=(chips(1),)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert embedder.met == [False, False]
