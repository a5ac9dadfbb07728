"""GalleryManager (no gRPC) with the deterministic fake pipeline of tests/fakes.py, on both
backends: the tests taking ``manager`` run on the embedded store (SQLite + snapshots) and on the
milvus backend (a Milvus Lite server, conftest.py ``milvus_uri``)."""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import pytest
from fakes import DIM, THRESHOLD, FakePipeline, person_embedding, photo

from facegallery.server.contract.errors import (
    AlreadyExists,
    EmbeddingShapeError,
    ImageDecodeError,
    InvalidInput,
    ModelMismatchError,
    MultipleFacesError,
    NoFaceError,
    NotFound,
)
from facegallery.server.gallery.decision import DecisionPolicy
from facegallery.server.gallery.manager import _IMPORT_BATCH, DEFAULT_GALLERY, STORE_FILE, FacePolicy, GalleryManager
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore
from facegallery.server.gallery.validation import (
    MAX_DISPLAY_NAME_BYTES,
    MAX_LIST_REPLY_BYTES,
    MAX_METADATA_BYTES,
    MAX_METADATA_KEY_BYTES,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_BYTES,
    MAX_PAGE_SIZE,
    identity_reply_bytes,
)

ANN, BOB, CAT, DAN = (200, 10), (10, 200), (120, 120), (60, 250)  # (red, green) = a person


def shot(person, variation=0):
    return photo((*person, variation))


class FlippedPipeline(FakePipeline):
    """The fake model with test-time flip augmentation on: the same manifest, another embedding id."""

    @property
    def model_id(self) -> str:
        return self.manifest.embedding_id(True)


@pytest.fixture(params=["embedded", "milvus", "milvus-search"])
def manager(request, tmp_path):
    if request.param.startswith("milvus"):
        m = GalleryManager.open_milvus(
            request.getfixturevalue("milvus_uri"), FakePipeline(), prefix=request.getfixturevalue("milvus_prefix"), search_in_store=request.param == "milvus-search"
        )
    else:
        m = GalleryManager.open(tmp_path, FakePipeline())
    yield m
    m.close()


def test_default_gallery_and_gallery_lifecycle(manager):
    (default,) = manager.list_galleries()
    assert (default.name, default.model_id, default.threshold, default.embedding_dim) == (DEFAULT_GALLERY, manager.pipeline.model_id, THRESHOLD, DIM)
    created = manager.create_gallery("staff.v2", threshold=0.5)
    assert created.threshold == 0.5
    with pytest.raises(AlreadyExists):
        manager.create_gallery("staff.v2")
    for bad in ["", "a b", "x" * 129, "é"]:
        with pytest.raises(InvalidInput):
            manager.create_gallery(bad)
    for bad in [0.0, -1.0, math.nan, math.inf]:
        with pytest.raises(InvalidInput):
            manager.create_gallery("t", threshold=bad)
    manager.enroll("staff.v2", "ann", image=shot(ANN))
    deletion = manager.delete_gallery("staff.v2")
    assert (deletion.deleted_identities, deletion.deleted_templates) == (1, 1)
    with pytest.raises(NotFound):
        manager.get_gallery("staff.v2")
    with pytest.raises(NotFound):
        manager.identify("staff.v2", shot(ANN))
    manager.enroll(DEFAULT_GALLERY, "ann", image=shot(ANN))
    manager.delete_gallery(DEFAULT_GALLERY)  # emptied and recreated
    assert manager.get_gallery(DEFAULT_GALLERY).template_count == 0


def test_enroll_image_and_possible_duplicate(manager):
    image = shot(ANN)
    first = manager.enroll("default", "ann", image=image, display_name="Ann", metadata={"team": "red"})
    assert first.identity_created and first.possible_duplicate is None
    assert first.source_sha256 == hashlib.sha256(image).hexdigest()
    np.testing.assert_array_equal(first.face.box, [0, 0, 31, 31])
    np.testing.assert_array_equal(first.face.embedding, person_embedding(*ANN, 0))
    again = manager.enroll("default", "ann", image=shot(ANN, 150))
    assert not again.identity_created and again.template_id > first.template_id and again.possible_duplicate is None
    # The same person under another id: the nearest other identity is reported.
    twin = manager.enroll("default", "ann-2", image=shot(ANN, 255))
    # the default policy aggregates by mean template: the distance is to ann's mean
    expected = np.linalg.norm(person_embedding(*ANN, 255) - (person_embedding(*ANN, 0) + person_embedding(*ANN, 150)) / 2)
    assert twin.possible_duplicate.identity_id == "ann" and twin.possible_duplicate.display_name == "Ann"
    assert twin.possible_duplicate.distance == pytest.approx(expected, abs=1e-5) and expected < THRESHOLD
    assert manager.enroll("default", "bob", image=shot(BOB)).possible_duplicate is None
    ann = manager.get_identity("default", "ann")
    assert (ann.display_name, ann.metadata, ann.template_count) == ("Ann", {"team": "red"}, 2)
    assert manager.get_gallery("default").identity_count == 3


def test_prepared_enrollments_are_stored_in_the_order_given(manager):
    # prepared side by side (as BulkEnroll's window), stored in order: each store sees the ones before
    near = manager.prepare_enrollment("default", "ann-2", image=shot(ANN, 255))
    first = manager.prepare_enrollment("default", "ann", image=shot(ANN), display_name="Ann", metadata={f"k{i}": "v" for i in range(40)})
    more = manager.prepare_enrollment("default", "ann", embedding=person_embedding(*ANN, 150), metadata={f"m{i}": "v" for i in range(40)})
    retry = manager.prepare_enrollment("default", "bob", image=shot(BOB), request_id="req-1")
    twice = manager.prepare_enrollment("default", "bob", image=shot(BOB), request_id="req-1")
    assert manager.get_gallery("default").template_count == 0  # preparing stores nothing
    stored = manager.store_enrollment(first)
    assert stored.identity_created and stored.face is not None and stored.possible_duplicate is None
    with pytest.raises(InvalidInput, match="merged"):  # 80 keys once merged with what "ann" holds now
        manager.store_enrollment(more)
    twin = manager.store_enrollment(near)  # its duplicate search runs now, so it finds ann
    assert twin.possible_duplicate is not None and twin.possible_duplicate.identity_id == "ann"
    bob = manager.store_enrollment(retry)
    replayed = manager.store_enrollment(twice)  # the request id was stored in between: the first result
    assert (replayed.template_id, replayed.identity_created, replayed.source_sha256) == (bob.template_id, True, bob.source_sha256)
    assert manager.get_gallery("default").template_count == 3
    remembered = manager.prepare_enrollment("default", "bob", image=shot(BOB), request_id="req-1")
    assert remembered.replay.template_id == bob.template_id and remembered.face is None  # known at once: no analysis


def test_an_enrollment_prepared_ahead_is_checked_against_the_metadata_it_is_stored_after(manager):
    # ann holds 4 x 4,000-byte values; "shrink" replaces one by 1 byte, and only after it does
    # "grow" (one more 4,000-byte value) fit the 16 KiB limit: in order, both are stored
    full = {f"v{i}": "x" * 4000 for i in range(4)}
    manager.enroll("default", "ann", embedding=person_embedding(*ANN), metadata=full)
    shrink = manager.prepare_enrollment("default", "ann", embedding=person_embedding(*ANN, 50), metadata={"v0": "y"}, early_merge_check=False)
    with pytest.raises(InvalidInput, match="merged"):  # checked now, against the stored metadata
        manager.prepare_enrollment("default", "ann", embedding=person_embedding(*ANN, 100), metadata={"v4": "z" * 4000})
    grow = manager.prepare_enrollment("default", "ann", embedding=person_embedding(*ANN, 100), metadata={"v4": "z" * 4000}, early_merge_check=False)
    manager.store_enrollment(shrink)
    manager.store_enrollment(grow)
    assert manager.get_identity("default", "ann").metadata == {**full, "v0": "y", "v4": "z" * 4000}


def test_enroll_errors(manager):
    with pytest.raises(NoFaceError):
        manager.enroll("default", "x", image=photo((0, 0, 0)))
    with pytest.raises(ImageDecodeError):
        manager.enroll("default", "x", image=b"\x89PNG not really")
    group = photo((*ANN, 0), (*BOB, 0))
    with pytest.raises(MultipleFacesError):
        manager.enroll("default", "x", image=group, face_policy=FacePolicy.REJECT_MULTIPLE)
    largest = manager.enroll("default", "x", image=group, face_policy=FacePolicy.LARGEST)
    np.testing.assert_array_equal(largest.face.embedding, person_embedding(*ANN))
    for bad in ["", "x" * 257, "a\nb"]:
        with pytest.raises(InvalidInput):
            manager.enroll("default", bad, image=shot(ANN))
    with pytest.raises(InvalidInput):
        manager.enroll("default", "x")
    with pytest.raises(InvalidInput):
        manager.enroll("default", "x", image=shot(ANN), embedding=person_embedding(*ANN))
    for bad in [np.zeros(DIM - 1), np.full(DIM, np.nan), np.zeros((2, DIM))]:
        with pytest.raises(EmbeddingShapeError):
            manager.enroll("default", "x", embedding=bad)
    assert manager.get_gallery("default").template_count == 1


def test_identify_every_face_with_decision(manager):
    manager.enroll("default", "ann", image=shot(ANN), display_name="Ann")
    manager.enroll("default", "bob", embedding=person_embedding(*BOB))
    manager.enroll("default", "cat", image=shot(CAT))
    results = manager.identify("default", photo((*BOB, 90), (0, 0, 0), (*DAN, 0), (*ANN, 200)), top_k=2)
    assert [r.identity_id for r in results] == ["bob", None, "ann"]
    bob, unknown, ann = results
    assert bob.distance == pytest.approx(np.linalg.norm(person_embedding(*BOB, 90) - person_embedding(*BOB)), abs=1e-5)
    assert len(bob.matches) == 2 and bob.matches[0].identity_id == "bob" and bob.matches[1].distance > THRESHOLD
    assert unknown.distance > THRESHOLD and len(unknown.matches) == 2  # candidates even when unknown
    assert ann.matches[0].display_name == "Ann" and ann.threshold == THRESHOLD
    np.testing.assert_array_equal(ann.face.box, [96, 0, 127, 31])
    strict = manager.identify("default", shot(ANN, 200), threshold=ann.distance / 2)
    assert strict[0].identity_id is None and strict[0].threshold == pytest.approx(ann.distance / 2)
    assert len(manager.identify("default", photo((*ANN, 0), (*BOB, 0)), max_faces=1)) == 1
    assert manager.identify("default", photo((0, 0, 0))) == []
    for bad in [0, 101]:
        with pytest.raises(InvalidInput):
            manager.identify("default", shot(ANN), top_k=bad)
    with pytest.raises(InvalidInput):  # an override is on the score scale (S-norm scores can be negative) but finite
        manager.identify("default", shot(ANN), threshold=float("nan"))


def test_identify_embedding_on_empty_and_filled_gallery(manager):
    empty = manager.identify_embedding("default", person_embedding(*ANN))
    assert empty.matches == [] and empty.identity_id is None and math.isinf(empty.distance) and empty.face is None
    manager.enroll("default", "ann", embedding=person_embedding(*ANN))
    manager.enroll("default", "ann", embedding=person_embedding(*ANN, 255))
    hit = manager.identify_embedding("default", person_embedding(*ANN, 255), top_k=5)
    mean = (person_embedding(*ANN) + person_embedding(*ANN, 255)) / 2  # the default policy's mean template
    assert hit.identity_id == "ann" and hit.distance == pytest.approx(np.linalg.norm(person_embedding(*ANN, 255) - mean), abs=1e-6) and len(hit.matches) == 1
    manager.update_gallery("default", policy=DecisionPolicy.fixed(THRESHOLD))  # nearest template
    assert manager.identify_embedding("default", person_embedding(*ANN, 255)).distance == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(EmbeddingShapeError):
        manager.identify_embedding("default", np.zeros(3))


def test_verify_and_compare(tmp_path):
    manager = GalleryManager.open(tmp_path, FakePipeline(with_head=True))
    try:
        manager.enroll("default", "ann", image=shot(ANN))
        manager.enroll("default", "ann", image=shot(ANN, 255))
        yes = manager.verify("default", "ann", shot(ANN, 240))
        nearest = min(np.linalg.norm(person_embedding(*ANN, 240) - person_embedding(*ANN, v)) for v in (0, 255))
        assert yes.is_match and yes.distance == pytest.approx(nearest, abs=1e-5)
        assert yes.probability_same == pytest.approx(math.exp(-yes.distance), rel=1e-5)
        no = manager.verify("default", "ann", shot(BOB))
        assert not no.is_match and no.distance > THRESHOLD and no.threshold == THRESHOLD
        with pytest.raises(NotFound):
            manager.verify("default", "nobody", shot(ANN))
        with pytest.raises(NoFaceError):
            manager.verify("default", "ann", photo((0, 0, 0)))
        same = manager.compare(shot(BOB), shot(BOB, 100), threshold=0.05)
        assert same.distance == pytest.approx(np.linalg.norm(person_embedding(*BOB) - person_embedding(*BOB, 100)), abs=1e-5)
        assert not same.is_match and same.threshold == 0.05  # 0.078 apart
        assert manager.compare(shot(BOB), shot(BOB, 100)).is_match
        with pytest.raises(NoFaceError, match="image_b"):
            manager.compare(shot(BOB), photo((0, 0, 0)))
        faces = manager.embed(photo((*ANN, 0), (*BOB, 0)))
        np.testing.assert_array_equal(faces[1].embedding, person_embedding(*BOB))
    finally:
        manager.close()


def test_identities_paging_update_delete(manager):
    names = [f"p{i}" for i in range(5)]
    for i, name in enumerate(names):
        manager.enroll("default", name, embedding=person_embedding(i, 3 * i + 1))
    page = manager.list_identities("default", page_size=2)
    seen = [r.identity_id for r in page.identities]
    while page.next_page_token:
        page = manager.list_identities("default", page_size=2, page_token=page.next_page_token)
        seen += [r.identity_id for r in page.identities]
    keys = [manager.get_identity("default", name).key for name in seen]
    assert sorted(seen) == names and keys == sorted(keys)  # every one once, in key order
    if not manager.shared:  # the embedded store's keys follow enrollment; Milvus's are hashes (milvus_store.py)
        assert seen == names
    token = manager.list_identities("default", page_size=2).next_page_token
    manager.create_gallery("other")
    with pytest.raises(InvalidInput, match="another gallery"):
        manager.list_identities("other", page_token=token)
    with pytest.raises(InvalidInput):
        manager.list_identities("default", page_token="!!not-a-token")
    with pytest.raises(InvalidInput):
        manager.list_identities("default", page_size=1001)
    updated = manager.update_identity("default", "p1", display_name="Pat", metadata={"k": "v"})
    assert (updated.display_name, updated.metadata, len(updated.templates)) == ("Pat", {"k": "v"}, 1)
    assert manager.update_identity("default", "p1", metadata={}).display_name == "Pat"
    with pytest.raises(NotFound):
        manager.update_identity("default", "nobody", display_name="x")
    manager.enroll("default", "p2", embedding=person_embedding(2, 7, 100))
    assert manager.delete_identity("default", "p2") == 2
    assert manager.identify_embedding("default", person_embedding(2, 7)).identity_id is None
    template = manager.get_identity("default", "p3").templates[0].template_id
    assert manager.delete_template("default", template) is True
    with pytest.raises(NotFound):
        manager.get_identity("default", "p3")
    with pytest.raises(NotFound):
        manager.delete_template("default", template)
    assert manager.index_template_ids("default").tolist() == manager.store.template_ids("default").tolist()


def test_export_import_roundtrip(manager):
    for i in range(6):
        manager.enroll("default", f"p{i % 3}", embedding=person_embedding(i, 9), display_name=f"P{i % 3}", metadata={"n": str(i % 3)})
    gallery, stream = manager.export_gallery("default")
    exported = list(stream)
    assert gallery.template_count == len(exported) == 6
    items = [NewTemplate(t.identity_id, t.embedding, display_name=t.display_name, metadata=t.metadata, source_sha256=t.source_sha256, created=t.created) for t in exported]
    result = manager.import_embeddings("copy", gallery.model_id, items)
    assert (result.imported, result.skipped) == (6, 0)
    assert manager.import_embeddings("copy", gallery.model_id, items).skipped == 6
    copy = manager.get_identity("copy", "p1")
    assert (copy.display_name, copy.metadata, copy.template_count) == ("P1", {"n": "1"}, 2)
    probe = person_embedding(4, 9)
    a, b = manager.identify_embedding("default", probe), manager.identify_embedding("copy", probe)
    mean = (person_embedding(1, 9) + person_embedding(4, 9)) / 2  # p1's mean template
    assert (a.matches[0].identity_id, a.distance) == (b.matches[0].identity_id, b.distance) == ("p1", pytest.approx(np.linalg.norm(probe - mean), abs=1e-6))
    with pytest.raises(ModelMismatchError):
        manager.import_embeddings("copy", "0" * 64, items)
    with pytest.raises(ModelMismatchError):
        manager.import_embeddings("fresh", "0" * 64, items)
    with pytest.raises(InvalidInput):
        manager.import_embeddings("copy", "", items)
    with pytest.raises(EmbeddingShapeError):
        manager.import_embeddings("copy", gallery.model_id, [NewTemplate("z", np.zeros(5))])


def test_a_failed_import_into_a_new_gallery_leaves_no_gallery_behind(manager):
    model_id = manager.pipeline.model_id
    with pytest.raises(EmbeddingShapeError):
        manager.import_embeddings("fresh", model_id, [NewTemplate("a", person_embedding(1, 2)), NewTemplate("z", np.zeros(5))])
    with pytest.raises(NotFound):
        manager.get_gallery("fresh")
    assert [g.name for g in manager.list_galleries()] == ["default"]
    # a later batch failing keeps the gallery with the batches already imported (importing again resumes)
    batch = _IMPORT_BATCH  # templates per import transaction
    good = [NewTemplate(f"p{i}", person_embedding(i, 3)) for i in range(batch)]
    with pytest.raises(EmbeddingShapeError):
        manager.import_embeddings("fresh", model_id, [*good, NewTemplate("z", np.zeros(5))])
    assert manager.get_gallery("fresh").template_count == batch
    # an existing gallery is never removed by a failed import, even when empty
    manager.create_gallery("empty")
    with pytest.raises(EmbeddingShapeError):
        manager.import_embeddings("empty", model_id, [NewTemplate("z", np.zeros(5))])
    assert manager.get_gallery("empty").template_count == 0


def test_restart_restores_galleries_and_refuses_another_model(tmp_path):
    manager = GalleryManager.open(tmp_path, FakePipeline("fake-a"))
    manager.create_gallery("g2", threshold=0.4)
    for i in range(20):
        manager.enroll("g2", f"p{i % 8}", embedding=person_embedding(i % 8, 50, i))
    before = manager.identify_embedding("g2", person_embedding(3, 50), top_k=4)
    manager.close()
    assert list((tmp_path / "index").glob("*.fgidx"))
    again = GalleryManager.open(tmp_path, FakePipeline("fake-a"))
    try:
        after = again.identify_embedding("g2", person_embedding(3, 50), top_k=4)
        assert [(m.identity_id, m.template_id, m.distance) for m in after.matches] == [(m.identity_id, m.template_id, m.distance) for m in before.matches]
        assert again.get_gallery("g2").threshold == pytest.approx(0.4)
        assert again.index_template_ids("g2").tolist() == again.store.template_ids("g2").tolist()
    finally:
        again.close()
    other = GalleryManager.open(tmp_path, FakePipeline("fake-b"))
    try:
        with pytest.raises(ModelMismatchError):
            other.identify_embedding("g2", person_embedding(3, 50))
        with pytest.raises(ModelMismatchError):
            other.enroll("g2", "x", image=shot(ANN))
        with pytest.raises(ModelMismatchError):
            other.verify("g2", "p3", shot(ANN))
        assert other.get_gallery("g2").template_count == 20  # metadata stays readable
        other.create_gallery("new")  # bound to the new model
        assert other.enroll("new", "ann", image=shot(ANN)).identity_created
    finally:
        other.close()


def names_both(error: pytest.ExceptionInfo, a: str, b: str) -> bool:
    return a in str(error.value) and b in str(error.value)


def test_a_server_with_flip_augmentation_refuses_galleries_enrolled_without_it(tmp_path):
    plain_id, flipped_id = FakePipeline().model_id, FlippedPipeline().model_id
    assert plain_id != flipped_id and FlippedPipeline().manifest.model_id == plain_id
    plain = GalleryManager.open(tmp_path, FakePipeline())
    plain.enroll("default", "ann", image=shot(ANN))
    plain.close()
    flipped = GalleryManager.open(tmp_path, FlippedPipeline())
    try:
        assert flipped.get_gallery("default").model_id == plain_id
        for call in (
            lambda: flipped.identify("default", shot(ANN)),
            lambda: flipped.enroll("default", "bob", image=shot(BOB)),
            lambda: flipped.verify("default", "ann", shot(ANN)),
            lambda: flipped.identify_embedding("default", person_embedding(*ANN)),  # no model_id: the server's
            lambda: flipped.enroll("default", "bob", embedding=person_embedding(*BOB)),
        ):
            with pytest.raises(ModelMismatchError) as refused:
                call()
            assert names_both(refused, plain_id, flipped_id), refused.value
        # embeddings of the gallery's own model need no pipeline: they are still searched and enrolled
        assert flipped.identify_embedding("default", person_embedding(*ANN), model_id=plain_id).identity_id == "ann"
        assert flipped.enroll("default", "bob", embedding=person_embedding(*BOB), model_id=plain_id).identity_created
        assert flipped.get_gallery("default").template_count == 2
        # a gallery this server creates records the server's id
        assert flipped.create_gallery("flipped").model_id == flipped_id
        flipped.enroll("flipped", "ann", image=shot(ANN))
        assert flipped.identify("flipped", shot(ANN, 20))[0].identity_id == "ann"
    finally:
        flipped.close()


def test_embeddings_carry_the_model_id_they_come_from(manager):
    own, other = manager.pipeline.model_id, FakePipeline("fake-b").model_id
    for model_id in (None, "", own):
        manager.enroll("default", "ann", embedding=person_embedding(*ANN), model_id=model_id)
        assert manager.identify_embedding("default", person_embedding(*ANN), model_id=model_id).identity_id == "ann"
    for call in (
        lambda: manager.enroll("default", "bob", embedding=person_embedding(*BOB), model_id=other),
        lambda: manager.identify_embedding("default", person_embedding(*ANN), model_id=other),
    ):
        with pytest.raises(ModelMismatchError) as refused:
            call()
        assert names_both(refused, own, other), refused.value
    with pytest.raises(InvalidInput, match="model_id"):
        manager.enroll("default", "bob", image=shot(BOB), model_id=own)  # an image is embedded by the server
    assert manager.get_gallery("default").template_count == 3


def test_legacy_model_ids_are_migrated_on_open(tmp_path, caplog):
    pipeline = FakePipeline()
    legacy = pipeline.manifest.files["embedder"].sha256
    assert legacy != pipeline.model_id
    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    for name, model_id in ((DEFAULT_GALLERY, legacy), ("foreign", "f" * 64)):
        store.create_gallery(name, model_id=model_id, threshold=THRESHOLD, metric="euclidean", embedding_dim=DIM)
    store.add_templates(DEFAULT_GALLERY, [NewTemplate("ann", person_embedding(*ANN))])
    store.close()
    with caplog.at_level(logging.WARNING, logger="facegallery.server.gallery.manager"):
        flipped = GalleryManager.open(tmp_path, FlippedPipeline())
    try:  # legacy galleries were built without flip augmentation: migrated to the id without it
        assert flipped.get_gallery(DEFAULT_GALLERY).model_id == pipeline.manifest.embedding_id(False) == pipeline.model_id
        assert flipped.get_gallery("foreign").model_id == "f" * 64  # another model's gallery is left alone
        assert "legacy model id" in caplog.text and legacy in caplog.text
        with pytest.raises(ModelMismatchError):
            flipped.identify("default", shot(ANN))
    finally:
        flipped.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facegallery.server.gallery.manager"):
        manager = GalleryManager.open(tmp_path, pipeline)
    try:
        assert "legacy" not in caplog.text  # migrated once
        assert manager.identify("default", shot(ANN, 30))[0].identity_id == "ann"
    finally:
        manager.close()


def max_metadata(tag: str = "") -> dict[str, str]:
    """A map at every metadata limit at once: 64 keys of 128 bytes, two values of 4096 bytes
    (two-byte characters), 16 KiB in all."""
    keys = [f"{tag}{i:02d}".ljust(MAX_METADATA_KEY_BYTES, "k") for i in range(MAX_METADATA_KEYS)]
    values = ["é" * (MAX_METADATA_VALUE_BYTES // 2)] * 2 + [""] * (MAX_METADATA_KEYS - 2)
    metadata = dict(zip(keys, values, strict=True))
    assert sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items()) == MAX_METADATA_BYTES
    return metadata


#: (display_name, metadata) over one limit each, and the words its message must contain.
OVER_LIMITS = [
    ("é" * (MAX_DISPLAY_NAME_BYTES // 2) + "x", {}, "display_name must be at most 256 bytes"),
    ("Ann\nBob", {}, "display_name must not contain control characters"),
    ("", {"": "v"}, "key must be 1..128 bytes"),
    ("", {"K" * 1_000_000: "v"}, "key must be 1..128 bytes"),
    ("", {"é" * 64 + "x": "v"}, "key must be 1..128 bytes"),
    ("", {"a\tb": "v"}, "key must not contain control characters"),
    ("", {"big": "v" * (MAX_METADATA_VALUE_BYTES + 1)}, "value of key 'big' must be at most 4096 bytes"),
    ("", {"big": "é" * (MAX_METADATA_VALUE_BYTES // 2) + "x"}, "value of key 'big' must be at most 4096 bytes"),
    ("", {f"k{i}": "" for i in range(MAX_METADATA_KEYS + 1)}, "at most 64 keys"),
    ("", {**max_metadata(), "00".ljust(MAX_METADATA_KEY_BYTES, "k"): "é" * 2048 + "x"}, "value of key"),
    ("", {**max_metadata(), "63".ljust(MAX_METADATA_KEY_BYTES, "k"): "x"}, "at most 16384 bytes in all"),
]


@pytest.mark.parametrize(("display_name", "metadata", "message"), OVER_LIMITS)
def test_display_names_and_metadata_over_the_limits_are_refused_everywhere(manager, display_name, metadata, message):
    with pytest.raises(InvalidInput, match=message) as info:
        manager.enroll("default", "ann", embedding=person_embedding(*ANN), display_name=display_name, metadata=metadata)
    assert len(str(info.value)) < 300  # the offending key is cut, never echoed whole
    with pytest.raises(InvalidInput, match=message):
        manager.enroll("default", "ann", image=shot(ANN), display_name=display_name, metadata=metadata)
    with pytest.raises(NotFound):
        manager.get_identity("default", "ann")
    manager.enroll("default", "ann", embedding=person_embedding(*ANN))
    with pytest.raises(InvalidInput, match=message):
        manager.update_identity("default", "ann", display_name=display_name or None, metadata=metadata or None)
    item = NewTemplate("bob", person_embedding(*BOB), display_name=display_name, metadata=metadata)
    with pytest.raises(InvalidInput, match=message):
        manager.import_embeddings("default", manager.pipeline.model_id, [NewTemplate("cat", person_embedding(*CAT)), item])
    assert [r.identity_id for r in manager.list_identities("default").identities] == ["ann"]
    assert manager.get_identity("default", "ann").metadata == {}


def test_display_names_and_metadata_at_the_limits_are_accepted(manager):
    name = "é" * (MAX_DISPLAY_NAME_BYTES // 2)
    full = max_metadata()
    manager.enroll("default", "ann", embedding=person_embedding(*ANN), display_name=name, metadata=full)
    manager.enroll("default", "bob", image=shot(BOB), display_name="x" * MAX_DISPLAY_NAME_BYTES, metadata={"é" * 64: "v" * MAX_METADATA_VALUE_BYTES})
    assert (manager.get_identity("default", "ann").display_name, manager.get_identity("default", "ann").metadata) == (name, full)
    assert manager.update_identity("default", "bob", display_name=name, metadata=full).metadata == full
    manager.enroll("default", "ann", embedding=person_embedding(*ANN, 50), metadata={next(iter(full)): "é" * 2048})  # replaces a value: same size
    result = manager.import_embeddings("copy", manager.pipeline.model_id, [NewTemplate("cat", person_embedding(*CAT), display_name=name, metadata=full)])
    assert result.imported == 1 and manager.get_identity("copy", "cat").metadata == full


def test_metadata_merged_by_enroll_and_import_must_fit_too(manager):
    full = max_metadata()
    manager.enroll("default", "ann", embedding=person_embedding(*ANN), metadata=full)
    with pytest.raises(InvalidInput, match="'ann' merged with its stored metadata must be at most 16384 bytes in all"):
        manager.enroll("default", "ann", embedding=person_embedding(*ANN, 50), metadata={"02".ljust(MAX_METADATA_KEY_BYTES, "k"): "x"})
    with pytest.raises(InvalidInput, match="merged with its stored metadata may have at most 64 keys"):
        manager.enroll("default", "ann", image=shot(ANN, 50), metadata={"x": ""})
    with pytest.raises(InvalidInput, match="merged with its stored metadata"):
        manager.import_embeddings("default", manager.pipeline.model_id, [NewTemplate("ann", person_embedding(*ANN, 80), metadata={"x": ""})])
    ann = manager.get_identity("default", "ann")
    assert (ann.template_count, ann.metadata) == (1, full)
    # within one import stream: items of one identity merge
    half = {k: v for k, v in list(full.items())[:40]}
    rest = {k[:-1] + "x": v for k, v in list(full.items())[:40]}
    items = [NewTemplate("bob", person_embedding(*BOB), metadata=half), NewTemplate("bob", person_embedding(*BOB, 30), metadata=rest)]
    with pytest.raises(InvalidInput, match="'bob' merged over the import's items may have at most 64 keys"):
        manager.import_embeddings("default", manager.pipeline.model_id, items)
    with pytest.raises(NotFound):
        manager.get_identity("default", "bob")
    # replacing the whole map (update) is checked on its own, not merged
    assert manager.update_identity("default", "ann", metadata={"x": "y"}).metadata == {"x": "y"}
    assert manager.enroll("default", "ann", embedding=person_embedding(*ANN, 50), metadata={"z": "w"}).template_id


def test_identity_pages_shrink_to_fit_the_reply_limit(manager):
    count = 120
    for i in range(count):
        manager.enroll("default", f"id-{i:03d}-" + "i" * 248, embedding=person_embedding(i, 7), display_name="é" * 128, metadata=max_metadata(f"{i}-"))
    largest = identity_reply_bytes("i" * 256, "é" * 128, max_metadata("000-"))
    assert largest < 19 * 1024  # one identity without templates, every field at its limit
    seen, pages, token = [], 0, ""
    while True:
        page = manager.list_identities("default", page_size=MAX_PAGE_SIZE, page_token=token)
        pages += 1
        size = sum(identity_reply_bytes(r.identity_id, r.display_name, r.metadata) for r in page.identities)
        assert 0 < len(page.identities) < count and size <= MAX_LIST_REPLY_BYTES - 64
        seen += [r.identity_id for r in page.identities]
        if not (token := page.next_page_token):
            break
    expected = [f"id-{i:03d}-" + "i" * 248 for i in range(count)]
    assert (seen if not manager.shared else sorted(seen)) == expected and pages == 3  # in key order: test_identities_paging_update_delete
    # a page holds at least one identity whatever the budget; small identities fill whole pages
    one = manager.list_identities("default", page_size=10, max_reply_bytes=100)
    assert len(one.identities) == 1 and one.next_page_token
    manager.create_gallery("small")
    for i in range(30):
        manager.enroll("small", f"s{i}", embedding=person_embedding(i, 9), metadata={"n": str(i)})
    assert len(manager.list_identities("small", page_size=MAX_PAGE_SIZE).identities) == 30
