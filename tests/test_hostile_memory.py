"""Issue 8's memory amplification case against a real ``facegallery serve`` process: four concurrent
Identify calls with a 115 KB PNG that declares 10900 x 10900 pixels (1.3 GB of server memory per
call before the memory budget) stay under the budget and give their memory back. The measurement
is bench/hostile_memory.py's ``run_server``; the bench prints the long version with baselines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "hostile_memory.py"
MB = 1 << 20


def _bench():
    spec = importlib.util.spec_from_file_location("hostile_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.mark.slow
def test_four_decompression_bombs_stay_under_the_budget_and_memory_returns(model_dir):
    bench = _bench()
    budget_mb = 1500
    figures = bench.run_server(["--memory-budget", str(budget_mb)], bench.hostile_png(10900, "L"), 4, 3.0, model_dir)
    assert len(figures["outcomes"]) == 4 and set(figures["outcomes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert figures["peak"] - figures["start"] < budget_mb * MB, figures
    assert figures["after"] - figures["start"] < 300 * MB, figures
