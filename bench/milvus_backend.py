"""Issue 11: the milvus backend against the embedded one, through GalleryManager, in one run.

Milvus is a Milvus Lite server started here on loopback (tests/milvus_server.py), on the same two
cores as the benchmark: its figures are NOT those of a Milvus standalone or cluster on its own
machines (Milvus Lite is a single process built for development; its scalar filters scan
growing segments), so read them as a lower bound and as the overhead structure, not as capacity.

Per backend, on ``--templates`` synthetic unit-norm 128-d templates (one identity each, fixed
threshold policy, so no open-set calibration runs), it prints:

* import: templates/s through ``import_embeddings`` (batches of 256, as ImportEmbeddings);
* start-up: seconds until a new manager (a restarted server) is ready: the embedded one from its
  snapshot, the milvus one pulling every template from Milvus (servers keep nothing on disk);
* identify: p50 / p99 ms of ``identify_embedding`` (one probe), which on milvus includes the
  per-call freshness check (the gallery row and the writers' heads: two small reads);
* index memory: MB the gallery's search structures hold, from their sizes: the owners' arrays
  (owners.py) plus, unless Milvus searches (the ``milvus-search`` column, ``--milvus-search
  milvus``), the faiss index's vectors and ids (``ntotal * (4 * D + 8)``). The process's resident
  set is no measure here: the allocator reuses what the previous manager freed;
* cross-server: for milvus, enroll on server A then identify the same embedding on server B at
  once: the fraction found (must be 1.0) and B's p50 ms for that first call, which pulls A's change;

and the ratio milvus / embedded for each. The ``milvus-search`` column is a server searching in
Milvus (``search_in_store``) started on the gallery the milvus column imported (no import of its
own), after a flush of the templates collection: Milvus Lite searches an unflushed (growing)
segment by brute force, ~0.5 s a probe at 20,000 templates, where a Milvus seals segments as they
fill. ``--templates 20000`` takes about 3 minutes.

    python bench/milvus_backend.py [--templates 20000] [--probes 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes import DIM, FakePipeline  # noqa: E402  (tests/: the deterministic fake model)
from milvus_server import MilvusLite  # noqa: E402

from facegallery.server.gallery.decision import DecisionPolicy  # noqa: E402
from facegallery.server.gallery.manager import GalleryManager  # noqa: E402
from facegallery.server.gallery.milvus_index import MilvusIndex  # noqa: E402
from facegallery.server.gallery.store import TemplateBatch  # noqa: E402

GALLERY = "bench"


def _templates(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _index_mb(manager: GalleryManager) -> float:
    gallery = manager._gallery(GALLERY)
    index = gallery._index.current
    vectors = 0 if isinstance(index, MilvusIndex) else index.ntotal * (4 * index.d + 8)
    return (gallery._owners.nbytes + vectors) / 2**20


def _measure(open_manager, x: np.ndarray, probes: np.ndarray) -> dict[str, float]:
    manager = open_manager()
    manager.create_gallery(GALLERY, policy=DecisionPolicy.fixed(0.6))
    ids = [f"p{i}" for i in range(len(x))]
    started = time.perf_counter()
    batches = (TemplateBatch(ids[s : s + 256], x[s : s + 256].reshape(-1)) for s in range(0, len(x), 256))
    manager.import_embeddings(GALLERY, manager.pipeline.model_id, batches)
    imported = time.perf_counter() - started
    manager.close()
    return {"import templates/s": len(x) / imported} | _started(open_manager, probes)


def _started(open_manager, probes: np.ndarray) -> dict[str, float]:
    """Start-up, memory and identify figures of a new manager on the imported gallery."""
    started = time.perf_counter()
    manager = open_manager()
    ready = time.perf_counter() - started
    times = []
    for probe in probes:
        t = time.perf_counter()
        manager.identify_embedding(GALLERY, probe)
        times.append(time.perf_counter() - t)
    p50, p99 = _percentiles(times)
    out = {"start-up s": ready, "index memory MB": _index_mb(manager), "identify p50 ms": p50, "identify p99 ms": p99}
    return out | {"_manager": manager}  # type: ignore[dict-item]


def _cross_server(a: GalleryManager, b: GalleryManager, probes: np.ndarray) -> dict[str, float]:
    found, times = 0, []
    for i, probe in enumerate(probes):
        a.enroll(GALLERY, f"new{i}", embedding=probe)
        t = time.perf_counter()
        hit = b.identify_embedding(GALLERY, probe)
        times.append(time.perf_counter() - t)
        found += hit.identity_id == f"new{i}"
    return {"cross-server found": found / len(probes), "cross-server first identify p50 ms": _percentiles(times)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--templates", type=int, default=20_000)
    parser.add_argument("--probes", type=int, default=200)
    args = parser.parse_args()
    x = _templates(args.templates, 1)
    probes = x[np.random.default_rng(2).choice(len(x), args.probes, replace=False)] + 0.01 * _templates(args.probes, 3)
    with tempfile.TemporaryDirectory() as tmp:
        embedded = _measure(lambda: GalleryManager.open(Path(tmp) / "data", FakePipeline()), x, probes)
        embedded.pop("_manager").close()  # type: ignore[union-attr]
        milvus = MilvusLite(Path(tmp) / "milvus").start()
        try:
            result = _measure(lambda: GalleryManager.open_milvus(milvus.uri, FakePipeline()), x, probes)
            b = result.pop("_manager")
            # Milvus Lite searches a growing (unflushed) segment brute force at ~0.5 s a probe at 20k; a
            # Milvus seals segments as they fill; the column is measured on sealed ones
            milvus_calls = b.store.milvus  # type: ignore[union-attr]
            milvus_calls.call(lambda: milvus_calls.client.flush(milvus_calls.templates(DIM)))
            searched = _started(lambda: GalleryManager.open_milvus(milvus.uri, FakePipeline(), search_in_store=True), probes)
            searched.pop("_manager").close()  # type: ignore[union-attr]
            a = GalleryManager.open_milvus(milvus.uri, FakePipeline())
            cross = _cross_server(a, b, _templates(min(args.probes, 50), 4))  # type: ignore[arg-type]
            a.close()
            b.close()  # type: ignore[union-attr]
        finally:
            milvus.stop()
    print(f"{args.templates} templates, {args.probes} probes; Milvus Lite on this machine (not representative of a Milvus cluster)")
    print(f"{'':36s} {'embedded':>10s} {'milvus':>10s} {'milvus/embedded':>16s} {'milvus-search':>14s} {'m-search/embedded':>18s}")
    for name, value in embedded.items():
        row = f"{name:36s} {value:10.2f} {result[name]:10.2f} {result[name] / value:16.2f}"
        if name in searched:
            row += f" {searched[name]:14.2f} {searched[name] / value:18.2f}"
        print(row)
    for name, value in cross.items():
        print(f"{name:36s} {'':10s} {value:10.2f}")


if __name__ == "__main__":
    main()
