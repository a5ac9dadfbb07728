"""The milvus backend's sharing: several GalleryManagers (one per server process in production)
on one Milvus Lite serve the same galleries, each write acknowledged by one visible to the others'
next call (milvus_store.py's per-writer change heads, IndexedGallery.sync); and a Milvus that goes
away fails calls with BackendUnavailable (UNAVAILABLE) until it is back.

The engine's own behaviour on this backend is covered by tests/test_gallery.py, whose ``manager``
fixture runs every test on both backends.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fakes import FakePipeline, person_embedding

from facegallery.server.contract.errors import AlreadyExists, BackendUnavailable, GalleryNotFound, NotFound
from facegallery.server.gallery.decision import Aggregation, DecisionPolicy
from facegallery.server.gallery.manager import DEFAULT_GALLERY, GalleryManager
from facegallery.server.gallery.milvus_index import MilvusIndex
from facegallery.server.gallery.store import NewTemplate

pytest.importorskip("pymilvus")


@pytest.fixture
def pair(milvus_uri, milvus_prefix):
    """Two managers ("servers") on the same collections."""
    a = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix)
    b = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix)
    yield a, b
    a.close()
    b.close()


def _nearest(manager, embedding, gallery=DEFAULT_GALLERY):
    return manager.identify_embedding(gallery, embedding, threshold=0.3)


def test_a_write_acknowledged_by_one_server_is_seen_by_the_other_at_once(pair):
    a, b = pair
    assert a.store.writer != b.store.writer
    ann, bob = person_embedding(200, 10), person_embedding(10, 200)
    enrolled = a.enroll(DEFAULT_GALLERY, "ann", embedding=ann, display_name="Ann")
    found = _nearest(b, ann)
    best = found.matches[0]
    assert (found.identity_id, best.display_name, best.template_id) == ("ann", "Ann", enrolled.template_id)
    assert found.distance == pytest.approx(0.0, abs=1e-6)
    b.enroll(DEFAULT_GALLERY, "bob", embedding=bob)
    assert _nearest(a, bob).identity_id == "bob"
    second = b.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10, 40))
    assert not second.identity_created  # the identity A created is the one B adds to
    assert a.get_identity(DEFAULT_GALLERY, "ann").template_count == 2
    # deletes: a template, then a whole identity, each gone from the other's index
    assert a.delete_template(DEFAULT_GALLERY, second.template_id) is False
    assert b.index_template_ids(DEFAULT_GALLERY).tolist() == sorted([enrolled.template_id, b.get_identity(DEFAULT_GALLERY, "bob").templates[0].template_id])
    assert b.delete_identity(DEFAULT_GALLERY, "ann") == 1
    assert _nearest(a, ann).identity_id != "ann"
    for m in (a, b):
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == m.store.template_ids(DEFAULT_GALLERY).tolist()


def test_galleries_and_policies_created_elsewhere_are_followed(pair):
    a, b = pair
    a.create_gallery("staff", threshold=0.5)
    with pytest.raises(AlreadyExists):
        b.create_gallery("staff")
    a.enroll("staff", "cat", embedding=person_embedding(120, 120))
    assert _nearest(b, person_embedding(120, 120), "staff").identity_id == "cat"
    assert b.decision_status("staff").threshold == 0.5
    a.update_gallery("staff", policy=DecisionPolicy.fixed(0.4, aggregation=Aggregation.MEAN))
    status = b.decision_status("staff")
    assert (status.policy.threshold, status.policy.aggregation, status.threshold) == (0.4, Aggregation.MEAN, 0.4)
    assert _nearest(b, person_embedding(120, 120), "staff").identity_id == "cat"  # now searched among mean templates
    a.delete_gallery("staff")
    with pytest.raises(GalleryNotFound):
        b.identify_embedding("staff", person_embedding(120, 120))
    b.create_gallery("staff")  # re-created under a new key: A follows it, empty
    assert a.get_gallery("staff").template_count == 0
    assert _nearest(a, person_embedding(120, 120), "staff").identity_id is None


def test_concurrent_writers_and_a_new_server_agree_with_the_store(pair, milvus_uri, milvus_prefix):
    a, b = pair
    errors: list[BaseException] = []

    def enroll(manager, offset):
        try:
            for i in range(12):
                manager.enroll(DEFAULT_GALLERY, f"p{offset + i}", embedding=person_embedding(offset + i, 7 * i + 3))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(m, off)) for m, off in ((a, 0), (b, 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stored = a.store.template_ids(DEFAULT_GALLERY).tolist()
    assert len(stored) == 24
    for m in (a, b):
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == stored
    a.delete_identity(DEFAULT_GALLERY, "p3")
    c = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix)  # a third server starting now
    try:
        assert c.index_template_ids(DEFAULT_GALLERY).tolist() == a.store.template_ids(DEFAULT_GALLERY).tolist()
        assert len(c.index_template_ids(DEFAULT_GALLERY)) == 23
        assert _nearest(c, person_embedding(104, 31)).identity_id == "p104"
    finally:
        c.close()


def test_milvus_down_fails_calls_as_unavailable_until_it_is_back(tmp_path):
    from milvus_server import MilvusLite

    milvus = MilvusLite(tmp_path / "milvus").start()
    try:
        manager = GalleryManager.open_milvus(milvus.uri, FakePipeline())
        manager.store.milvus.timeout_s = 3.0
        try:
            manager.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10))
            milvus.stop()
            with pytest.raises(BackendUnavailable):
                manager.identify_embedding(DEFAULT_GALLERY, person_embedding(200, 10))
            with pytest.raises(BackendUnavailable):
                manager.store.ping()
            milvus.start()
            _wait_until_answering(manager.store)
            assert _nearest(manager, person_embedding(200, 10)).identity_id == "ann"  # the same manager, no restart
            manager.enroll(DEFAULT_GALLERY, "bob", embedding=person_embedding(10, 200))
            assert manager.get_gallery(DEFAULT_GALLERY).template_count == 2
        finally:
            manager.close()
    finally:
        milvus.stop()


def _wait_until_answering(store, timeout_s: float = 60.0) -> None:
    """Poll ``store.ping()`` as the server's health check does, until Milvus answers again."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            store.ping()
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_unknown_gallery_on_a_shared_store(pair):
    a, _ = pair
    with pytest.raises(NotFound):
        a.identify_embedding("nope", np.zeros(128, np.float32))


def test_migrate_an_embedded_data_dir_into_milvus_and_back(tmp_path, milvus_uri, milvus_prefix):
    from facegallery.server.gallery.keys import Role, create_key, verify_key
    from facegallery.server.gallery.manager import STORE_FILE
    from facegallery.server.gallery.migrate import migrate_store
    from facegallery.server.gallery.milvus_store import MilvusTemplateStore
    from facegallery.server.gallery.store import SqliteTemplateStore
    from fakes import photo

    embedded = GalleryManager.open(tmp_path / "a", FakePipeline())
    embedded.create_gallery("staff", policy=DecisionPolicy.fixed(0.45, aggregation=Aggregation.MEAN))
    embedded.enroll("staff", "ann", image=photo((200, 10, 0)), display_name="Ann", metadata={"team": "red"})
    embedded.enroll("staff", "ann", embedding=person_embedding(200, 10, 60))
    embedded.enroll(DEFAULT_GALLERY, "bob", embedding=person_embedding(10, 200))
    _, key = create_key(embedded.store, "ops", Role.ADMIN, now=time.time())
    embedded.close()

    source = SqliteTemplateStore(tmp_path / "a" / STORE_FILE)
    target = MilvusTemplateStore(milvus_uri, prefix=milvus_prefix)
    try:
        first = migrate_store(source, target)
        assert [(g.name, g.copied, g.skipped, g.created) for g in first] == [(DEFAULT_GALLERY, 1, 0, True), ("staff", 2, 0, True)]
        again = migrate_store(source, target)  # resumable: what is there is skipped
        assert [(g.name, g.copied, g.skipped, g.created) for g in again] == [(DEFAULT_GALLERY, 0, 1, False), ("staff", 0, 2, False)]
        assert verify_key(target, key).name == "ops"
    finally:
        source.close()
        target.close()

    served = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix)
    try:
        staff = served.get_gallery("staff")
        assert (staff.policy, staff.identity_count, staff.template_count) == (DecisionPolicy.fixed(0.45, aggregation=Aggregation.MEAN), 1, 2)
        ann = served.get_identity("staff", "ann")
        assert (ann.display_name, ann.metadata) == ("Ann", {"team": "red"})
        faces = [t.face for t in ann.templates]
        assert sum(f is not None for f in faces) == 1  # the photo's face box came along, the embedding has none
        np.testing.assert_array_equal(next(f for f in faces if f is not None).box, [0, 0, 31, 31])
        assert _nearest(served, person_embedding(10, 200)).identity_id == "bob"
    finally:
        served.close()

    back = SqliteTemplateStore(tmp_path / "b" / STORE_FILE)
    milvus = MilvusTemplateStore(milvus_uri, prefix=milvus_prefix)
    try:
        assert [(g.name, g.copied) for g in migrate_store(milvus, back)] == [(DEFAULT_GALLERY, 1), ("staff", 2)]
        exported = sorted((t.identity_id, t.embedding.tobytes()) for t in back.export_templates("staff"))
        assert exported == sorted([("ann", person_embedding(200, 10).tobytes()), ("ann", person_embedding(200, 10, 60).tobytes())])
    finally:
        back.close()
        milvus.close()


def test_the_migrate_command_copies_and_resumes(tmp_path, milvus_uri, milvus_prefix):
    from click.testing import CliRunner

    from facegallery.client.cli import main

    embedded = GalleryManager.open(tmp_path, FakePipeline())
    embedded.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10))
    embedded.close()
    to = "milvus://" + milvus_uri.removeprefix("http://")
    args = ["migrate", "--from", str(tmp_path), "--to", to, "--milvus-prefix", milvus_prefix]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "default: 1 templates copied, 0 already there" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "default: 0 templates copied, 1 already there" in again.output
    both = CliRunner().invoke(main, ["migrate", "--from", str(tmp_path), "--to", str(tmp_path / "b")])
    assert both.exit_code == 2 and "one of --from and --to must be milvus://" in both.output


def test_an_identity_deleted_on_one_server_while_another_enrolls_it_keeps_its_new_template(pair):
    a, b = pair
    a.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10), metadata={"team": "red"})
    # B has read ann's row when A deletes ann, and B's template is written after: the interleaving
    # that milvus_store.py's _keep_identities mends, forced here by deleting just before B's insert
    real_upsert = b.store.milvus.upsert
    deleted = []

    def delete_then_write(collection, rows):
        if "_templates_" in collection and not deleted:
            deleted.append(a.delete_identity(DEFAULT_GALLERY, "ann"))
        return real_upsert(collection, rows)

    b.store.milvus.upsert = delete_then_write
    try:
        added = b.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10, 50))
    finally:
        b.store.milvus.upsert = real_upsert
    assert deleted == [1] and not added.identity_created
    ann = a.get_identity(DEFAULT_GALLERY, "ann")  # the identity is back, holding B's template only
    assert [t.template_id for t in ann.templates] == [added.template_id] and ann.metadata == {"team": "red"}
    for m in (a, b):
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == [added.template_id]
        assert _nearest(m, person_embedding(200, 10, 50)).identity_id == "ann"


def test_rows_no_head_covers_are_left_out_of_indexes_and_means(pair):
    # a writer that died inside a change leaves rows its head does not cover (milvus_store.py): no
    # server indexes them, and no mean template (the default policy) takes them in or is filed under them
    a, b = pair
    enrolled = a.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10))
    key = a.get_gallery(DEFAULT_GALLERY).key
    from facegallery.server.gallery.milvus_client import key63

    orphan = {"pk": (1 << 32) | 7, "gallery_key": key, "identity_key": key63(key, "ann"), "identity_id": "ann", "writer": 1, "seq": 1,
              "embedding": person_embedding(10, 200).tolist(), "source_sha256": "", "face": "", "created": 0.0}
    assert orphan["pk"] < enrolled.template_id
    a.store.milvus.upsert(a.store.milvus.templates(128), [orphan])
    second = b.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10, 60))  # the means of ann are recomputed
    for m in (a, b):
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == sorted([enrolled.template_id, second.template_id])
        found = _nearest(m, (person_embedding(200, 10) + person_embedding(200, 10, 60)) / 2)
        assert found.identity_id == "ann" and found.distance == pytest.approx(0.0, abs=1e-5)  # the mean of the two covered templates
        assert _nearest(m, person_embedding(10, 200)).identity_id is None


def test_metadata_that_escapes_past_the_field_is_kept(pair):
    a, b = pair
    metadata = {f"k{i}": "\x01" * 4000 for i in range(4)}  # 16 KB as validation.py allows; 96 KB as escaped JSON
    a.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10), metadata=metadata)
    assert b.get_identity(DEFAULT_GALLERY, "ann").metadata == metadata


def test_a_change_that_fails_part_way_is_undone_or_completed_before_the_next(pair):
    a, b = pair
    real_commit = a.store._commit_head

    def unreachable(key, seq):
        raise BackendUnavailable("Milvus went away (test)")

    bob = a.enroll(DEFAULT_GALLERY, "bob", embedding=person_embedding(10, 200)).template_id
    # an addition whose rows are written but whose head is not: undone by the writer's next change
    a.store._commit_head = unreachable
    with pytest.raises(BackendUnavailable):
        a.enroll(DEFAULT_GALLERY, "ann", embedding=person_embedding(200, 10))
    a.store._commit_head = real_commit
    assert len(a.store.template_ids(DEFAULT_GALLERY)) == 2  # the rows are there, covered by no head
    assert _nearest(b, person_embedding(200, 10)).identity_id is None
    a.enroll(DEFAULT_GALLERY, "cat", embedding=person_embedding(120, 120))  # repairs first
    for m in (a, b):
        assert _nearest(m, person_embedding(200, 10)).identity_id is None
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == m.store.template_ids(DEFAULT_GALLERY).tolist()
    with pytest.raises(NotFound):
        b.get_identity(DEFAULT_GALLERY, "ann")
    # a removal whose templates are deleted but whose head is not: completed at the next ping
    a.store._commit_head = unreachable
    with pytest.raises(BackendUnavailable):
        a.delete_identity(DEFAULT_GALLERY, "bob")
    a.store._commit_head = real_commit
    assert bob in b.index_template_ids(DEFAULT_GALLERY).tolist()  # no head covers the removal yet: B's index still holds it
    a.store.ping()
    for m in (a, b):
        assert _nearest(m, person_embedding(10, 200)).identity_id is None
        assert m.index_template_ids(DEFAULT_GALLERY).tolist() == m.store.template_ids(DEFAULT_GALLERY).tolist()
    assert [i.identity_id for i in b.list_identities(DEFAULT_GALLERY).identities] == ["cat"]


def test_a_milvus_that_accepts_but_never_answers_fails_as_unavailable_instead_of_hanging():
    import socket

    from facegallery.server.gallery.milvus_client import CALL_TIMEOUT_S, MilvusCollections

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are accepted by the kernel, never answered
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="cannot be reached"):
            MilvusCollections(f"http://127.0.0.1:{silent.getsockname()[1]}", prefix="t", timeout_s=2.0)
        assert time.monotonic() - started < CALL_TIMEOUT_S  # bounded by the 2 s given, not the default


@pytest.mark.parametrize("ours", [False, True], ids=["pings-without-calls", "GRPC_OPTIONS"])
def test_an_idle_connection_is_not_closed_by_milvus_lite_for_too_many_pings(milvus_uri, capfd, ours):
    """Milvus Lite's gRPC server, at the library's defaults, closes a connection that sends
    keepalive pings with no call open (GOAWAY ``too_many_pings``, logged by gRPC); pymilvus's
    defaults ping every 10 s, which failed a call after a pause. Here pings are sped up to 1 s and
    not capped (gRPC caps them at 2 between data frames, which makes the GOAWAY come or not by
    timing), so 5 s idle show it for pymilvus's defaults and not for GRPC_OPTIONS."""
    from pymilvus import MilvusClient

    from facegallery.server.gallery.milvus_client import GRPC_OPTIONS

    options = {"grpc.keepalive_time_ms": 1000, "grpc.http2.max_pings_without_data": 0, "grpc.keepalive_permit_without_calls": True}
    if ours:
        options.update(GRPC_OPTIONS)
    client = MilvusClient(uri=milvus_uri, grpc_options=options, dedicated=True)
    try:
        client.list_collections()
        time.sleep(5)
        client.list_collections()
    finally:
        client.close()
    assert ("too_many_pings" in capfd.readouterr().err) is not ours


def test_a_server_searching_in_milvus_answers_as_one_searching_in_memory(milvus_uri, milvus_prefix):
    # search_in_store: Milvus's exact search, restricted to the templates the server holds, gives the
    # ranking, distances, S-norm scores, calibration and duplicates of the faiss index in memory
    memory = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix)
    searching = GalleryManager.open_milvus(milvus_uri, FakePipeline(), prefix=milvus_prefix, search_in_store=True)
    try:
        policy = DecisionPolicy.targeting(0.05, cohort_size=8, aggregation=Aggregation.NEAREST)
        memory.create_gallery("g", policy=policy)
        people = [(10 + i, 3 * i + 1) for i in range(60)]
        items = [NewTemplate(f"p{i}", person_embedding(*c, 40 * t)) for i, c in enumerate(people) for t in range(2)]
        items.append(NewTemplate("twin", person_embedding(*people[0], 20)))  # a duplicate of p0
        memory.import_embeddings("g", memory.pipeline.model_id, items)
        gallery = searching._gallery("g")
        index = gallery._index.current
        assert isinstance(index, MilvusIndex) and index.ntotal == 121
        probes = [person_embedding(*c, 90) for c in people[:8]] + [person_embedding(500 + i, 7) for i in range(8)]
        for probe in probes:
            a, b = (m.identify_embedding("g", probe, top_k=5) for m in (memory, searching))
            assert [(m.identity_id, m.template_id) for m in b.matches] == [(m.identity_id, m.template_id) for m in a.matches]
            np.testing.assert_allclose([m.distance for m in b.matches], [m.distance for m in a.matches], atol=1e-5)
            np.testing.assert_allclose([m.score for m in b.matches], [m.score for m in a.matches], atol=1e-4)
            assert b.identity_id == a.identity_id
        assert sum(memory.identify_embedding("g", p).identity_id is not None for p in probes[:8]) == 8
        assert searching.decision_status("g").threshold == pytest.approx(memory.decision_status("g").threshold, abs=1e-4)
        pairs = searching.find_duplicates("g")
        assert [(d.identity_a, d.identity_b) for d in pairs] == [(d.identity_a, d.identity_b) for d in memory.find_duplicates("g")]
        assert {pairs[0].identity_a, pairs[0].identity_b} == {"p0", "twin"}
        # a template enrolled or deleted through the other server is searched, or not, at once
        memory.delete_identity("g", "twin")
        assert searching.identify_embedding("g", person_embedding(*people[0], 20), top_k=2).matches[1].identity_id != "twin"
        added = memory.enroll("g", "late", embedding=person_embedding(900, 1))
        assert searching.identify_embedding("g", person_embedding(900, 1)).matches[0].template_id == added.template_id
        assert searching.index_template_ids("g").tolist() == memory.index_template_ids("g").tolist()
        # a row of a change whose head was never written (its writer died inside it) is in Milvus, and left out
        from facegallery.server.gallery.milvus_client import key63

        key = gallery.key
        orphan = {"pk": (1 << 32) | 9, "gallery_key": key, "identity_key": key63(key, "ghost"), "identity_id": "ghost", "writer": 1, "seq": 1,
                  "embedding": person_embedding(700, 3).tolist(), "source_sha256": "", "face": "", "created": 0.0}
        searching.store.milvus.upsert(searching.store.milvus.templates(128), [orphan])
        assert searching.store.search_templates(key, 128, person_embedding(700, 3)[None], 1)[1][0, 0] == orphan["pk"]
        assert searching.identify_embedding("g", person_embedding(700, 3)).matches[0].identity_id != "ghost"
        # past Milvus's topk cap (SEARCH_LIMIT) a search asks for the cap and pads; 6 probes at the cap take two calls
        from facegallery.server.gallery.milvus_client import SEARCH_LIMIT

        D, I = searching.store.search_templates(key, 128, np.stack([person_embedding(*c) for c in people[:6]]), SEARCH_LIMIT + 5)
        assert D.shape == I.shape == (6, SEARCH_LIMIT + 5)
        held = int(np.count_nonzero(I[0] >= 0))
        assert held == len(searching.index_template_ids("g")) + 1 == 122  # the orphan row is in Milvus too
        assert (I[:, :held] >= 0).all() and (I[:, held:] == -1).all() and np.isinf(D[:, held:]).all()
        assert (np.diff(D[:, :held], axis=1) >= 0).all()
    finally:
        memory.close()
        searching.close()
