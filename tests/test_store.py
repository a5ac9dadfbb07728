"""The template stores: records, reads for search, paging; the SQLite store's change log and
durability across reopen. The tests taking ``store`` run on both stores (SQLite, and Milvus on a
Milvus Lite server: milvus_store.py); those of what only SQLite has say so."""

from __future__ import annotations

import dataclasses
import sqlite3

import numpy as np
import pytest

from facegallery.server.contract.errors import AlreadyExists, EmbeddingShapeError, NotFound, StoreCorruptError
from facegallery.server.contract.face import Face
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore

D = 8


@pytest.fixture(params=["sqlite", "milvus"])
def store(request, tmp_path):
    if request.param == "milvus":
        from facegallery.server.gallery.milvus_store import MilvusTemplateStore

        s = MilvusTemplateStore(request.getfixturevalue("milvus_uri"), prefix=request.getfixturevalue("milvus_prefix"))
    else:
        s = SqliteTemplateStore(tmp_path / "gallery.sqlite3")
    s.create_gallery("g", model_id="m" * 64, threshold=0.6, metric="euclidean", embedding_dim=D)
    yield s
    s.close()


def sqlite_only(store, what: str) -> None:
    if getattr(store, "shared", False):
        pytest.skip(f"the Milvus store has no {what} (milvus_store.py)")


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D).astype(np.float32)


def test_gallery_lifecycle(store):
    with pytest.raises(AlreadyExists):
        store.create_gallery("g", model_id="x", threshold=0.5, metric="euclidean", embedding_dim=D)
    other = store.create_gallery("h", model_id="x", threshold=0.5, metric="euclidean", embedding_dim=4)
    assert [g.name for g in store.list_galleries()] == ["g", "h"]
    assert (other.threshold, other.embedding_dim, other.identity_count, other.template_count) == (0.5, 4, 0, 0)
    store.add_templates("h", [NewTemplate("a", np.ones(4, np.float32)), NewTemplate("b", np.zeros(4, np.float32))])
    assert store.delete_gallery("h") == (2, 2)
    with pytest.raises(NotFound):
        store.get_gallery("h")
    with pytest.raises(NotFound):
        store.delete_gallery("h")


def test_set_model_id_rewrites_the_gallery_model_only(store):
    store.add_templates("g", [NewTemplate("ann", vec(0))])
    before = store.get_gallery("g")
    after = store.set_model_id("g", "e" * 64)
    assert after.model_id == store.get_gallery("g").model_id == "e" * 64
    assert after == dataclasses.replace(before, model_id="e" * 64)
    with pytest.raises(NotFound):
        store.set_model_id("nope", "e" * 64)


def test_add_templates_creates_identities_and_merges_identity_data(store):
    face = Face(box=np.array([1, 2, 30, 40], np.float32), landmarks=np.arange(10, dtype=np.float32).reshape(5, 2), score=0.9, embedding=vec(0))
    results, seq1 = store.add_templates("g", [NewTemplate("ann", vec(0), display_name="Ann", metadata={"team": "a"}, source_sha256="ab" * 32, face=face)])
    assert results[0].identity_created
    results2, seq2 = store.add_templates("g", [NewTemplate("ann", vec(1), metadata={"room": "7"})])
    assert not results2[0].identity_created and seq2 > seq1
    ann = store.get_identity("g", "ann")
    assert (ann.display_name, ann.metadata, ann.template_count) == ("Ann", {"team": "a", "room": "7"}, 2)
    first, second = ann.templates
    assert first.template_id == results[0].template_id and second.template_id == results2[0].template_id
    np.testing.assert_array_equal(first.embedding, vec(0))
    np.testing.assert_array_equal(first.face.box, face.box)
    np.testing.assert_array_equal(first.face.landmarks, face.landmarks)
    assert first.face.score == pytest.approx(0.9) and first.source_sha256 == "ab" * 32
    assert second.face is None and second.source_sha256 == ""
    store.add_templates("g", [NewTemplate("ann", vec(2), display_name="Ann B.")])
    assert store.get_identity("g", "ann").display_name == "Ann B."
    gallery = store.get_gallery("g")
    assert (gallery.identity_count, gallery.template_count) == (1, 3)
    if not getattr(store, "shared", False):  # Milvus: the seq of this writer's changes (milvus_store.py), no change log
        assert gallery.last_seq == store.changes_since("g", 0)[-1].seq


def test_wrong_length_embedding_stores_nothing(store):
    with pytest.raises(EmbeddingShapeError):
        store.add_templates("g", [NewTemplate("a", vec(0)), NewTemplate("b", np.zeros(D + 1, np.float32))])
    assert store.get_gallery("g").template_count == 0
    assert store.changes_since("g", 0) == []


def test_skip_duplicates_compares_identity_and_exact_embedding(store):
    store.add_templates("g", [NewTemplate("a", vec(0))])
    results, _ = store.add_templates("g", [NewTemplate("a", vec(0)), NewTemplate("b", vec(0)), NewTemplate("a", vec(1))], skip_duplicates=True)
    assert results[0] is None and results[1] is not None and results[2] is not None
    assert store.get_gallery("g").template_count == 3


def test_deletes_are_logged_and_ids_never_reused(store):
    sqlite_only(store, "change log")
    (a1, a2, b1), _ = store.add_templates("g", [NewTemplate("a", vec(0)), NewTemplate("a", vec(1)), NewTemplate("b", vec(2))])
    identity_deleted, _ = store.delete_template("g", b1.template_id)
    assert identity_deleted
    with pytest.raises(NotFound):
        store.get_identity("g", "b")
    assert store.delete_template("g", a1.template_id)[0] is False
    ids, seq = store.delete_identity("g", "a")
    assert ids.tolist() == [a2.template_id]
    (c,), _ = store.add_templates("g", [NewTemplate("c", vec(3))])
    assert c.template_id > b1.template_id  # AUTOINCREMENT: the deleted largest id is not reused
    ops = [(ch.op, ch.template_id) for ch in store.changes_since("g", 0)]
    assert ops == [
        ("add", a1.template_id), ("add", a2.template_id), ("add", b1.template_id),
        ("remove", b1.template_id), ("remove", a1.template_id), ("remove", a2.template_id), ("add", c.template_id),
    ]
    assert [ch.template_id for ch in store.changes_since("g", seq)] == [c.template_id]
    assert store.prune_changes("g", seq) == 6
    assert len(store.changes_since("g", 0)) == 1
    with pytest.raises(NotFound):
        store.delete_template("g", a1.template_id)


def test_list_identities_pages_in_enrollment_order(store):
    sqlite_only(store, "enrollment-ordered identity keys (they are hashes)")
    names = [f"id{i:02d}" for i in range(7)][::-1]
    for i, name in enumerate(names):
        store.add_templates("g", [NewTemplate(name, vec(i))])
    seen, after = [], 0
    while page := store.list_identities("g", after_key=after, limit=3):
        seen += [r.identity_id for r in page]
        after = page[-1].key
    assert seen == names


def test_reads_for_search(store):
    results, _ = store.add_templates("g", [NewTemplate("a", vec(i), display_name="A") for i in range(3)] + [NewTemplate("b", vec(9))])
    ids = [r.template_id for r in results]
    owners = store.template_owners([ids[0], ids[3], 10_000])
    assert set(owners) == {ids[0], ids[3]}
    assert (owners[ids[0]].identity_id, owners[ids[0]].display_name, owners[ids[3]].identity_id) == ("a", "A", "b")
    tid, x = store.identity_embeddings("g", "a")
    assert tid.tolist() == ids[:3]
    np.testing.assert_array_equal(x, np.stack([vec(0), vec(1), vec(2)]))
    blocks = list(store.embeddings("g", [ids[3], ids[1], 99_999]))
    assert [b[0].tolist() for b in blocks] == [[ids[1], ids[3]]]
    np.testing.assert_array_equal(blocks[0][1], np.stack([vec(1), vec(9)]))
    assert store.template_ids("g").tolist() == ids
    many = store.identities_embeddings("g", ["b", "a", "nobody", "a"])
    assert sorted(many) == ["a", "b"] and many["a"][0].tolist() == ids[:3] and many["b"][0].tolist() == [ids[3]]
    np.testing.assert_array_equal(many["a"][1], x)
    np.testing.assert_array_equal(many["b"][1], vec(9)[None])
    template_ids, identity_keys = store.template_identity_keys("g")
    assert template_ids.tolist() == ids and len(set(identity_keys[:3].tolist())) == 1 and identity_keys[3] != identity_keys[0]
    assert store.identity_names(identity_keys[[0, 3]].tolist() + [10_000]) == {int(identity_keys[0]): ("a", "A"), int(identity_keys[3]): ("b", "")}
    assert store.identity_keys("g", ["b", "nobody"]) == {"b": int(identity_keys[3])}


def test_export_is_one_consistent_state(store):
    sqlite_only(store, "consistent snapshot reads")
    store.add_templates("g", [NewTemplate(f"p{i}", vec(i), metadata={"i": str(i)}) for i in range(5)])
    stream = store.export_templates("g")
    first = next(stream)
    store.add_templates("g", [NewTemplate("late", vec(50))])
    store.delete_identity("g", "p4")
    rest = list(stream)
    assert [t.identity_id for t in [first, *rest]] == ["p0", "p1", "p2", "p3", "p4"]
    assert rest[-1].metadata == {"i": "4"}
    np.testing.assert_array_equal(rest[0].embedding, vec(1))


def test_everything_survives_reopen(tmp_path):
    path = tmp_path / "gallery.sqlite3"
    s = SqliteTemplateStore(path)
    s.create_gallery("g", model_id="m", threshold=0.6, metric="euclidean", embedding_dim=D)
    (r,), seq = s.add_templates("g", [NewTemplate("a", vec(5), display_name="A")])
    s.close()
    s = SqliteTemplateStore(path)
    try:
        a = s.get_identity("g", "a")
        assert (a.display_name, a.templates[0].template_id, s.get_gallery("g").last_seq) == ("A", r.template_id, seq)
        np.testing.assert_array_equal(a.templates[0].embedding, vec(5))
        assert s._writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._writer.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        s.close()


def damaged_store(path, templates: int = 3000, dim: int = 128) -> None:
    """A closed store of ``templates`` templates with 64 KiB of garbage over pages in its middle."""
    s = SqliteTemplateStore(path)
    s.create_gallery("g", model_id="m", threshold=0.6, metric="euclidean", embedding_dim=dim)
    rng = np.random.default_rng(0)
    s.add_templates("g", [NewTemplate(f"p{i}", rng.standard_normal(dim).astype(np.float32)) for i in range(templates)])
    s.close()  # checkpoints the WAL into the file
    size = path.stat().st_size
    assert size > 4 * 65536
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(np.random.default_rng(1).bytes(65536))


def test_a_damaged_page_is_refused_with_the_file_and_the_repair_options(tmp_path):
    path = tmp_path / "gallery.sqlite3"
    damaged_store(path)
    for level, pragma in (("quick", "quick_check"), ("full", "integrity_check")):
        with pytest.raises(StoreCorruptError) as caught:
            SqliteTemplateStore(path, integrity_check=level)
        message = str(caught.value)
        assert caught.value.code == "DATA_LOSS"
        assert str(path) in message and f"PRAGMA {pragma}" in message
        assert "backup" in message and "export-gallery" in message and f"sqlite3 {path} .recover" in message
    # "off" opens it; the damage shows when it is read.
    s = SqliteTemplateStore(path, integrity_check="off")
    try:
        with pytest.raises(sqlite3.DatabaseError):
            s.template_ids("g")
    finally:
        s.close()


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "gallery.sqlite3"
    path.write_bytes(b"not a database" * 1000)
    with pytest.raises(StoreCorruptError, match="not a database") as caught:
        SqliteTemplateStore(path)
    assert str(path) in str(caught.value)


def test_a_sound_store_passes_both_checks(tmp_path, caplog):
    path = tmp_path / "gallery.sqlite3"
    s = SqliteTemplateStore(path)
    s.create_gallery("g", model_id="m", threshold=0.6, metric="euclidean", embedding_dim=D)
    s.add_templates("g", [NewTemplate(f"p{i}", vec(i)) for i in range(20)])
    s.check_integrity("full")
    s.close()
    with caplog.at_level("INFO", logger="facegallery.server.gallery.store"):
        SqliteTemplateStore(path, integrity_check="full").close()
    assert "passed PRAGMA integrity_check" in caplog.text
    with pytest.raises(ValueError):
        SqliteTemplateStore(path, integrity_check="fast")
