"""memory_budget.py: the process-wide byte budget that admits image calls, and malloc_trim."""

from __future__ import annotations

import threading
import time

import pytest

from facegallery.server.contract.errors import ImageTooLargeError, ResourceExhausted
from facegallery.server.face.memory_budget import (
    FIXED_WORKING_BYTES,
    MemoryBudget,
    MemoryBudgetExhausted,
    default_budget_bytes,
    estimate_working_bytes,
    physical_memory_bytes,
)
from facegallery.server.contract.process_memory import return_memory_to_os

MB = 1 << 20


def test_admits_while_it_fits_and_counts_releases():
    budget = MemoryBudget(100 * MB, wait_s=0)
    budget.acquire(60 * MB)
    budget.acquire(40 * MB)
    assert budget.used_bytes == 100 * MB
    budget.release(40 * MB)
    with budget.reserve(40 * MB):
        assert budget.used_bytes == 100 * MB
    assert budget.used_bytes == 60 * MB


def test_waits_then_refuses_with_a_reason():
    budget = MemoryBudget(100 * MB, wait_s=0.2)
    budget.acquire(80 * MB)
    started = time.monotonic()
    with pytest.raises(MemoryBudgetExhausted, match=r"memory budget of 100 MB is in use .*80 MB held.*retry") as err:
        budget.acquire(30 * MB)
    assert 0.15 < time.monotonic() - started < 2
    assert isinstance(err.value, ResourceExhausted) and err.value.code == "RESOURCE_EXHAUSTED"
    assert budget.used_bytes == 80 * MB  # the refused call holds nothing


def test_over_the_whole_budget_is_refused_at_once():
    budget = MemoryBudget(100 * MB, wait_s=10)
    started = time.monotonic()
    with pytest.raises(ImageTooLargeError, match="over the server's memory budget of 100 MB"):
        budget.acquire(101 * MB)
    assert time.monotonic() - started < 0.5
    assert budget.used_bytes == 0


def test_release_wakes_a_waiting_call():
    budget = MemoryBudget(100 * MB, wait_s=5)
    budget.acquire(90 * MB)
    admitted = threading.Event()

    def waiter():
        budget.acquire(50 * MB)
        admitted.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    assert not admitted.is_set()
    started = time.monotonic()
    budget.release(90 * MB)
    assert admitted.wait(2) and time.monotonic() - started < 1
    thread.join()
    assert budget.used_bytes == 50 * MB


def test_reserve_releases_on_error():
    budget = MemoryBudget(100 * MB)
    with pytest.raises(RuntimeError):
        with budget.reserve(70 * MB):
            raise RuntimeError("the call failed")
    assert budget.used_bytes == 0


def test_concurrent_calls_never_exceed_the_budget():
    budget = MemoryBudget(100 * MB, wait_s=5)
    peak, lock = [0], threading.Lock()

    def call():
        with budget.reserve(30 * MB):
            with lock:
                peak[0] = max(peak[0], budget.used_bytes)
            time.sleep(0.01)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 90 * MB and budget.used_bytes == 0


def test_zero_is_no_budget():
    budget = MemoryBudget(0)
    budget.acquire(1 << 50)
    assert not budget.enabled and budget.used_bytes == 0
    with pytest.raises(ValueError):
        MemoryBudget(-1)


def test_default_is_a_quarter_of_physical_memory():
    total = physical_memory_bytes()
    assert total > 0
    assert default_budget_bytes() == max(1 << 30, total // 4)


def test_estimate():
    # full-size decode: only the working pixels count; reduced: the decoded frame too
    assert estimate_working_bytes(10**6, 4, 10**6) == 11 * 10**6 + FIXED_WORKING_BYTES
    assert estimate_working_bytes(16 * 10**6, 4, 10**6) == 64 * 10**6 + 11 * 10**6 + FIXED_WORKING_BYTES


def test_return_memory_to_os_runs():
    assert return_memory_to_os() in (True, False)
