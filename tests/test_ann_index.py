"""Approximate search (ann_index.py) at small scale: recall against exact search on face-like
identities made from real dlib descriptors (bench/ann_search.py ``FaceLike`` over
../shared/golden_dlib), deletes, the index plan, background rebuilds beside searches and writes,
snapshots of the approximate index, and calibration on top of it."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from facegallery.server.gallery import ann_index
from facegallery.server.gallery.ann_index import (
    IndexPlan,
    IvfFlatIndex,
    RebuildableIndex,
    nlist_for,
)
from facegallery.server.gallery.decision import (
    Aggregation,
    DecisionPolicy,
    Normalization,
)
from facegallery.server.gallery.index import FaissIndex, search_identities
from facegallery.server.gallery.owners import TemplateOwners
from facegallery.server.gallery.indexed_gallery import IndexedGallery
from facegallery.server.gallery.snapshot import read_snapshot, write_snapshot
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ann_search.py"


@pytest.fixture(scope="module")
def faces(shared_dir):
    spec = importlib.util.spec_from_file_location("ann_search", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.FaceLike(*module.golden_embeddings(shared_dir), seed=0)


def test_recall_against_exact_search_on_face_like_identities(faces):
    n, d = 20_000, 128
    x = faces.identities(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    probes = np.concatenate([faces.genuine(x[:500]), faces.identities(500)])
    exact = FaissIndex(d)
    exact.add(ids, x)
    ivf = IndexPlan(approximate_above=10_000).build(d, ids, x)
    assert isinstance(ivf, IvfFlatIndex) and ivf.nlist == nlist_for(n)
    (_, top_exact), (D, top) = exact.search(probes, 1), ivf.search(probes, 1)
    assert np.mean(top[:, 0] == top_exact[:, 0]) >= 0.99
    assert np.mean(top[:500, 0] == ids[:500]) >= 0.95  # genuine probes find their identity
    np.testing.assert_allclose(D[top == top_exact], exact.search(probes, 1)[0][top == top_exact], atol=2e-5)
    assert sorted(ivf.ids().tolist()) == sorted(ids.tolist()) and ivf.items()[1].shape == (n, d)


def test_deleted_templates_are_never_returned(faces):
    n, d = 20_000, 128
    x = faces.identities(n)
    ivf = IndexPlan(approximate_above=10_000).build(d, np.arange(n), x)
    probes = faces.genuine(x[:300])
    _, before = ivf.search(probes, 5)
    gone = np.unique(before)
    assert ivf.remove(np.concatenate([gone, [10**9]])) == len(gone)  # an absent id is skipped
    _, after = ivf.search(probes, 20)
    assert not np.isin(after, gone).any() and ivf.ntotal == n - len(gone)
    assert ivf.remove(gone) == 0


def test_identity_search_stops_when_the_probed_lists_are_exhausted():
    """An IVF returns fewer hits than asked when its probed lists hold fewer vectors: the
    identity search must take that as the end rather than widen to the whole index."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    ivf = IndexPlan(approximate_above=1000, nprobe=1).build(16, np.arange(2000), x)
    owners = TemplateOwners(np.arange(2000), np.arange(2000) % 5)
    (hits,) = search_identities(ivf, owners, x[:1], 5)
    assert 1 <= len(hits) <= 5 and hits.template_ids[0] == 0


def test_index_plan_switches_with_hysteresis_and_retrains_as_the_gallery_grows():
    plan = IndexPlan(approximate_above=50_000)
    assert plan.factory_for(49_999) == "IDMap2,Flat" and plan.factory_for(50_000) == "IVF512,Flat"
    assert plan.accepts("IVF2048,Flat") and plan.accepts("IDMap2,Flat") and not plan.accepts("HNSW32")
    assert not IndexPlan(approximate_above=None).accepts("IVF512,Flat")

    class Sized:
        rebuildable = True

        def __init__(self, factory, ntotal):
            self.factory, self.ntotal = factory, ntotal

    assert plan.rebuild_factory(Sized("IDMap2,Flat", 49_999)) is None
    searched_by_milvus = Sized("milvus", 1_000_000)
    searched_by_milvus.rebuildable = False  # milvus_index.py: Milvus's own index, never swapped
    assert plan.rebuild_factory(searched_by_milvus) is None
    assert plan.rebuild_factory(Sized("IDMap2,Flat", 50_000)) == "IVF512,Flat"
    assert plan.rebuild_factory(Sized("IVF512,Flat", 30_000)) is None  # between half the threshold and it
    assert plan.rebuild_factory(Sized("IVF512,Flat", 24_000)) == "IDMap2,Flat"
    assert plan.rebuild_factory(Sized("IVF512,Flat", 65_000)) is None
    assert plan.rebuild_factory(Sized("IVF512,Flat", 66_000)) == "IVF1024,Flat"  # 4 sqrt(N) passed 1024
    assert plan.rebuild_factory(Sized("IVF1024,Flat", 262_000)) is None and nlist_for(10**6) == 2048
    assert IndexPlan(approximate_above=None).rebuild_factory(Sized("IVF512,Flat", 10**6)) == "IDMap2,Flat"


def test_rebuildable_index_replays_the_writes_made_during_a_rebuild():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    index = RebuildableIndex(FaissIndex(8))
    index.add(np.arange(2000), x[:2000])
    ids, vectors = index.start_rebuild()
    index.add(np.arange(2000, 3000), x[2000:])
    index.remove(np.array([5, 2500]))
    rebuilt = IndexPlan(approximate_above=1000).build(8, ids, vectors)
    assert index.finish_rebuild(rebuilt) == 2 and index.current is rebuilt and not index.rebuilding
    assert index.ids().tolist() == [i for i in range(3000) if i not in (5, 2500)]


def test_ivf_snapshot_round_trip(faces, tmp_path):
    x = faces.identities(5000)
    ivf = IndexPlan(approximate_above=1000, nprobe=4).build(128, np.arange(5000), x)
    header = write_snapshot(tmp_path / "g.fgidx", ivf.copy(), gallery_key=1, gallery="g", last_seq=9)
    read, loaded = read_snapshot(tmp_path / "g.fgidx")
    assert read == header and header.factory == ivf.factory and isinstance(loaded, IvfFlatIndex)
    loaded = IndexPlan(nprobe=4).restored(loaded)
    for a, b in zip(ivf.search(x[:50], 5), loaded.search(x[:50], 5)):
        np.testing.assert_array_equal(a, b)
    assert loaded.remove(np.arange(10)) == 10  # the direct map came back too


def _gallery(tmp_path, *, approximate_above, policy=None):
    (tmp_path / "index").mkdir(parents=True)
    store = SqliteTemplateStore(tmp_path / "gallery.sqlite3")
    record = store.create_gallery("g", model_id="m" * 64, threshold=0.6, metric="euclidean", embedding_dim=128)
    record = store.set_policy("g", policy or DecisionPolicy.fixed(0.6, aggregation=Aggregation.MEAN), 0.6)  # two indexes, no calibration
    gallery = IndexedGallery(store, record, FaissIndex(128), snapshot_file=tmp_path / "index" / "gallery-1.fgidx", approximate_above=approximate_above)
    return store, gallery


def _wait_rebuilt(gallery, timeout=30):
    """Until no rebuild and no background recalibration (open_set.py) runs: a daemon thread
    still inside faiss when the interpreter exits aborts it."""
    deadline = time.monotonic() + timeout
    while gallery.rebuilding() or gallery.scorer._calibrating.locked():
        assert time.monotonic() < deadline, "the rebuild did not finish"
        time.sleep(0.02)


def test_a_gallery_switches_to_ivf_in_the_background_without_stalling_or_losing_writes(faces, tmp_path, monkeypatch):
    """The switch's build is held open; meanwhile searches and writes finish on the exact index,
    and the swapped-in IVF index (templates and mean templates) holds every write."""
    store, gallery = _gallery(tmp_path, approximate_above=2000)
    x = faces.identities(2600)
    building, release = threading.Event(), threading.Event()
    real_build = ann_index.IndexPlan.build

    def held_build(self, d, ids, vectors, *, factory=None):
        if threading.current_thread().name.startswith("rebuild-"):
            building.set()
            assert release.wait(30), "the test never released the rebuild"
        return real_build(self, d, ids, vectors, factory=factory)

    monkeypatch.setattr(ann_index.IndexPlan, "build", held_build)
    gallery.add_templates([NewTemplate(f"p{i}", e) for i, e in enumerate(x[:2100])])
    assert building.wait(30) and gallery.rebuilding()
    errors = []

    def write_and_search():
        try:
            for i in range(2100, 2600, 50):
                gallery.add_templates([NewTemplate(f"p{j}", x[j]) for j in range(i, i + 50)])
                gallery.delete_identity(f"p{i - 2000}")
                (hits,), _ = gallery.identify(x[i : i + 1], 1)
                assert hits[0].hit.identity_id == f"p{i}"
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=write_and_search)
    worker.start()
    worker.join(20)
    stalled = worker.is_alive()
    release.set()
    worker.join(30)
    assert not stalled and not errors, errors[:1]
    _wait_rebuilt(gallery)
    assert gallery._index.factory.startswith("IVF") and gallery._means.index.factory.startswith("IVF")
    assert gallery.template_ids().tolist() == store.template_ids("g").tolist()
    assert gallery._means.index.ntotal == store.get_gallery("g").identity_count
    deleted = {f"p{i - 2000}" for i in range(2100, 2600, 50)}
    for i in range(0, 2600, 97):
        (hits,), _ = gallery.identify(x[i : i + 1], 1)
        assert hits[0].hit.identity_id not in deleted
        if f"p{i}" not in deleted:
            assert hits[0].hit.identity_id == f"p{i}"
    _wait_rebuilt(gallery)
    store.close()


def test_an_approximate_gallery_snapshots_and_loads_both_indexes(faces, tmp_path):
    store, gallery = _gallery(tmp_path, approximate_above=2000)
    x = faces.identities(2500)
    gallery.add_templates([NewTemplate(f"p{i}", e) for i, e in enumerate(x)])
    _wait_rebuilt(gallery)
    assert gallery.snapshot() is not None and (tmp_path / "index" / "gallery-1-means.fgidx").exists()
    gallery.add_templates([NewTemplate("late", x[0] + 0.01)])  # replayed after the snapshot
    record = store.get_gallery("g")
    loaded = IndexedGallery.load(store, record, index_dir=tmp_path / "index", approximate_above=2000)
    assert loaded._index.factory == gallery._index.factory and loaded._means.index.factory.startswith("IVF")
    assert loaded.template_ids().tolist() == store.template_ids("g").tolist()
    assert loaded._means.index.ntotal == record.identity_count and not loaded.rebuilding()
    for i in range(0, 2500, 250):
        assert loaded.identify(x[i : i + 1], 1)[0][0][0].hit.identity_id == gallery.identify(x[i : i + 1], 1)[0][0][0].hit.identity_id
    _wait_rebuilt(gallery)
    _wait_rebuilt(loaded)
    store.close()


def test_calibration_on_the_approximate_index_matches_the_exact_one(faces, tmp_path):
    """Leave-one-out calibration and S-norm on top of IVF (600 identities, at least S-norm's 300):
    the same threshold within 2%."""
    x = faces.identities(600)
    thresholds = {}
    for kind, above in (("exact", None), ("ivf", 500)):
        store, gallery = _gallery(tmp_path / kind, approximate_above=above, policy=DecisionPolicy.targeting(0.01, normalization=Normalization.SNORM))
        gallery.add_templates([NewTemplate(f"p{i}", e) for i, e in enumerate(x)])
        _wait_rebuilt(gallery)
        assert gallery._means.index.factory.startswith("IVF" if above else "IDMap2")
        thresholds[kind] = gallery.decision_status().threshold
        _wait_rebuilt(gallery)
        store.close()
    assert thresholds["ivf"] == pytest.approx(thresholds["exact"], rel=0.02)
