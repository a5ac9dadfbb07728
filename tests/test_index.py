"""FAISS index against brute-force numpy, identity aggregation; snapshots, replay and rebuild."""

from __future__ import annotations

import logging
import threading

import faiss
import numpy as np
import pytest

from facegallery.server.gallery.index import make_index, search_identities, set_search_threads
from facegallery.server.gallery.owners import TemplateOwners
from facegallery.server.gallery.snapshot import (
    SnapshotError,
    open_gallery_index,
    read_snapshot,
    remove_stale_snapshots,
    snapshot_path,
    write_snapshot,
)
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered float32 vectors (faiss SyntheticDataset style: not uniform, still hard)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 20), d)).astype(np.float32)
    return (centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def brute_force(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = np.sqrt(((xq[:, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


def assert_knn_congruent(D_ref, I_ref, D, I, rtol=1e-4, atol=1e-4):
    """Distances agree; ids agree except among neighbours tied (within tolerance) at a rank."""
    np.testing.assert_allclose(D, D_ref, rtol=rtol, atol=atol)
    for row in range(len(D_ref)):
        for rank in range(D_ref.shape[1]):
            if I[row, rank] != I_ref[row, rank]:
                tied = np.isclose(D_ref[row], D_ref[row, rank], rtol=rtol, atol=atol)
                assert I[row, rank] in set(I_ref[row, tied].tolist()) | {-1}, (row, rank)


@pytest.mark.parametrize("k", [1, 10])
def test_flat_search_matches_brute_force(k):
    d = 128
    xb, xq = synthetic(2000, d, 0), synthetic(40, d, 1)
    ids = np.random.default_rng(2).permutation(10_000)[:2000].astype(np.int64)
    index = make_index(d)
    index.add(ids[:1500], xb[:1500])
    index.add(ids[1500:], xb[1500:])
    D, I = index.search(xq, k)
    assert D.shape == I.shape == (40, k) and D.dtype == np.float32 and I.dtype == np.int64
    assert_knn_congruent(*brute_force(xb, ids, xq, k), D, I)


def test_remove_and_missing_results():
    d = 16
    xb = synthetic(50, d, 3)
    ids = np.arange(100, 150, dtype=np.int64)
    index = make_index(d)
    index.add(ids, xb)
    assert index.remove(np.array([100, 101, 999])) == 2
    assert index.ntotal == 48 and index.ids().tolist() == list(range(102, 150))
    D, I = index.search(xb[:3], 60)
    assert (I[:, 48:] == -1).all() and np.isinf(D[:, 48:]).all()
    assert_knn_congruent(*brute_force(xb[2:], ids[2:], xb[:3], 48), D[:, :48], I[:, :48])
    assert not np.isin(I, [100, 101]).any()
    empty = make_index(d)
    D, I = empty.search(xb[:2], 3)
    assert (I == -1).all() and np.isinf(D).all()
    with pytest.raises(ValueError):
        index.search(np.zeros((1, d + 1), np.float32), 1)
    with pytest.raises(ValueError):
        make_index(d, "HNSW32")  # not an IDMap2: ids could not be removed


def test_identity_search_matches_brute_force_min_over_templates():
    d = 32
    rng = np.random.default_rng(4)
    counts = rng.integers(1, 7, 120)  # 120 identities with 1..6 templates
    identity = np.repeat(np.arange(120), counts)
    xb = synthetic(len(identity), d, 5)
    # Identity 0 gets 60 templates right next to the first probe, so the first fetch of 4k
    # templates holds no other identity and the search has to widen.
    xq = synthetic(10, d, 6)
    crowd = (xq[0] + 0.01 * rng.standard_normal((60, d))).astype(np.float32)
    xb, identity = np.concatenate([xb, crowd]), np.concatenate([identity, np.zeros(60, int)])
    ids = np.arange(1000, 1000 + len(xb), dtype=np.int64)
    index = make_index(d)
    index.add(ids, xb)
    owners = TemplateOwners(ids, identity)
    k = 5
    hits = search_identities(index, owners, xq, k)
    dist = np.sqrt(((xq[:, None].astype(np.float64) - xb[None]) ** 2).sum(-1))
    for q in range(len(xq)):
        per_identity = {}
        for j in np.argsort(dist[q]):
            per_identity.setdefault(int(identity[j]), (dist[q, j], int(ids[j])))
        expected = sorted(per_identity.items(), key=lambda kv: kv[1][0])[:k]
        assert hits[q].identity_keys.tolist() == [e[0] for e in expected]
        np.testing.assert_allclose(hits[q].distances, [e[1][0] for e in expected], rtol=1e-4, atol=1e-4)
        assert hits[q].template_ids.tolist() == [e[1][1] for e in expected]
    assert hits[0].identity_keys[0] == 0 and len(set(hits[0].identity_keys.tolist())) == k
    # More identities asked than exist: every identity once, then the search stops.
    all_ids = search_identities(index, owners, xq[:2], 200)
    assert [len(h) for h in all_ids] == [120, 120]
    assert [len(h) for h in search_identities(make_index(d), owners, xq[:3], 5)] == [0, 0, 0]
    # Templates the owners do not hold are skipped: with identity 0's crowd forgotten, the
    # nearest identity is the brute-force nearest of the other templates.
    owners.remove(ids[-60:])
    (first,) = search_identities(index, owners, xq[:1], 1)
    nearest = int(np.argmin(dist[0, :-60]))
    assert first.identity_keys.tolist() == [int(identity[nearest])] and first.template_ids.tolist() == [int(ids[nearest])]


def test_snapshot_roundtrip_and_corruption(tmp_path):
    d = 24
    xb = synthetic(300, d, 7)
    index = make_index(d)
    index.add(np.arange(300, dtype=np.int64) * 3, xb)
    path = tmp_path / "g.fgidx"
    copied = index.copy()
    index.add(np.array([10_000]), xb[:1])  # a write after the copy is not in the copy
    written = write_snapshot(path, copied, gallery_key=7, gallery="g", last_seq=42)
    header, loaded = read_snapshot(path)
    assert header == written and copied.ntotal == 300
    assert (header.gallery_key, header.gallery, header.last_seq, header.d, header.ntotal) == (7, "g", 42, d, 300)
    assert index.remove(np.array([10_000])) == 1
    for a, b in zip(index.search(xb[:5], 4), loaded.search(xb[:5], 4)):
        np.testing.assert_array_equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="corrupt"):
        read_snapshot(path)
    path.write_bytes(bytes(data[:20]))
    with pytest.raises(SnapshotError):
        read_snapshot(path)
    with pytest.raises(SnapshotError):
        read_snapshot(tmp_path / "missing.fgidx")


@pytest.fixture
def store(tmp_path):
    s = SqliteTemplateStore(tmp_path / "gallery.sqlite3")
    s.create_gallery("g", model_id="m", threshold=0.6, metric="euclidean", embedding_dim=16)
    yield s
    s.close()


def add(store, vectors, owner="p"):
    results, _ = store.add_templates("g", [NewTemplate(f"{owner}{i % 7}", v) for i, v in enumerate(vectors)])
    return [r.template_id for r in results]


def opened(store, path, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="facegallery.server.gallery.snapshot"):
        index = open_gallery_index(store, store.get_gallery("g"), path)
    how = "snapshot" if "(snapshot)" in caplog.text else "rebuild"
    return index, how


def test_open_replays_changes_after_the_snapshot(store, tmp_path, caplog):
    path = tmp_path / "g.fgidx"
    xb = synthetic(200, 16, 8)
    ids = add(store, xb[:150])
    index, how = opened(store, path, caplog)
    assert how == "rebuild" and index.ids().tolist() == ids
    write_snapshot(path, index, gallery_key=store.get_gallery("g").key, gallery="g", last_seq=store.get_gallery("g").last_seq)
    new_ids = add(store, xb[150:], owner="q")
    store.delete_template("g", ids[3])
    store.delete_template("g", new_ids[0])  # added and removed after the snapshot
    store.delete_identity("g", "p1")
    index, how = opened(store, path, caplog)
    assert how == "snapshot"
    assert index.ids().tolist() == store.template_ids("g").tolist()
    rebuilt = make_index(16)
    for block_ids, x in store.embeddings("g"):
        rebuilt.add(block_ids, x)
    for a, b in zip(index.search(xb[:20], 5), rebuilt.search(xb[:20], 5)):
        np.testing.assert_array_equal(a, b)


def test_open_rebuilds_when_the_snapshot_does_not_fit(store, tmp_path, caplog):
    path = tmp_path / "g.fgidx"
    add(store, synthetic(40, 16, 9))
    key = store.get_gallery("g").key
    index, _ = opened(store, path, caplog)
    write_snapshot(path, index, gallery_key=key + 1, gallery="g", last_seq=store.get_gallery("g").last_seq)
    assert opened(store, path, caplog)[1] == "rebuild"  # another gallery's snapshot
    write_snapshot(path, index, gallery_key=key, gallery="g", last_seq=store.get_gallery("g").last_seq + 5)
    assert opened(store, path, caplog)[1] == "rebuild"  # newer than the store
    # A snapshot whose changes were pruned but that misses templates: ids disagree with the store.
    stale = make_index(16)
    write_snapshot(path, stale, gallery_key=key, gallery="g", last_seq=store.get_gallery("g").last_seq)
    index, how = opened(store, path, caplog)
    assert how == "rebuild" and index.ids().tolist() == store.template_ids("g").tolist()
    path.write_bytes(b"garbage")
    assert opened(store, path, caplog)[1] == "rebuild"


def test_search_threads_reach_every_calling_thread():
    """OpenMP's thread count is per thread: the setting must apply in the server's handler threads."""
    index = make_index(8)
    index.add(np.arange(10), synthetic(10, 8, 11))
    seen = []

    def search():
        index.search(synthetic(2, 8, 12), 3)
        seen.append(faiss.omp_get_max_threads())

    set_search_threads(1)
    try:
        thread = threading.Thread(target=search)
        thread.start()
        thread.join()
    finally:
        set_search_threads(None)
    assert seen == [1]


def test_stale_snapshots_and_leftover_temporary_files_are_removed(tmp_path):
    index = make_index(4)
    for key in (1, 2):
        write_snapshot(snapshot_path(tmp_path, key), index, gallery_key=key, gallery=f"g{key}", last_seq=0)
    leftovers = [".gallery-1.fgidx.k3j2.tmp", "gallery-1.fgidx.tmp"]  # interrupted writes (atomic_write; earlier versions)
    for name in [*leftovers, "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    remove_stale_snapshots(tmp_path, [1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery-1.fgidx", "notes.txt"]
