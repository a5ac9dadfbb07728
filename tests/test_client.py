"""GalleryClient against a real in-process gRPC server running the fake servicer (fake_gallery.py)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import socket
import threading
import time
import types
from pathlib import Path

import grpc
import numpy as np
import pytest
from fake_gallery import BASIS_CURVE, DIM, MODEL_ID, THRESHOLD, embedding_of, fpir_of, pixels_of, running_fake_server, score_of, threshold_for
from grpc_health.v1 import health_pb2
from PIL import Image

import facegallery.client as fc
from facegallery.v1 import gallery_service_pb2 as pb


@pytest.fixture()
def fake():
    with running_fake_server() as (address, servicer, health_servicer):
        yield types.SimpleNamespace(address=address, servicer=servicer, health=health_servicer)


@pytest.fixture()
def client(fake):
    with fc.GalleryClient(fake.address, timeout=10.0) as client:
        yield client


@pytest.fixture(scope="module")
def photo(shared_dir: Path) -> Path:
    return shared_dir / "faces" / "face_recognition" / "joe_biden" / "biden.jpg"


@pytest.fixture(scope="module")
def other_photo(shared_dir: Path) -> Path:
    return shared_dir / "faces" / "face_recognition" / "barack_obama" / "obama2.jpg"


def _last_request(servicer, method: str):
    return [r for name, r in servicer.requests if name == method][-1]


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_all_lists_exactly_the_public_names():
    public = {
        name
        for name, value in vars(fc).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert fc.__all__ == sorted(fc.__all__)
    assert set(fc.__all__) == public


# ---------------------------------------------------------------------------------------------
# Image inputs


@pytest.mark.parametrize("kind", ["path-str", "path", "bytes", "pil", "numpy"])
def test_image_inputs_reach_the_server_as_the_same_pixels(client, fake, photo, kind):
    enrolled = client.enroll("biden", photo)
    assert enrolled.source_sha256 == hashlib.sha256(photo.read_bytes()).hexdigest()  # a path is sent byte for byte
    with Image.open(photo) as image:
        rgb = image.convert("RGB")
    pixels = np.asarray(rgb)
    probe = {"path-str": str(photo), "path": photo, "bytes": photo.read_bytes(), "pil": rgb, "numpy": pixels}[kind]

    faces = client.identify(probe)

    np.testing.assert_array_equal(pixels_of(_last_request(fake.servicer, "Identify").image.data), pixels)
    assert len(faces) == 1
    h, w = pixels.shape[:2]
    assert faces[0].face.box == (0.0, 0.0, float(w - 1), float(h - 1))
    assert len(faces[0].face.landmarks) == 5
    assert faces[0].identity_id == "biden"
    assert faces[0].distance == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 1), (7, 9, 3), (7, 9, 4)], ids=["grey", "grey1", "rgb", "rgba"])
def test_numpy_images_are_sent_as_lossless_png(client, fake, shape):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    client.identify(array)
    data = _last_request(fake.servicer, "Identify").image.data
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        decoded = np.asarray(image)
    np.testing.assert_array_equal(decoded.reshape(array.shape), array)


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), TypeError),
        (np.zeros((4, 4, 2), dtype=np.uint8), ValueError),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), ValueError),
        (b"", ValueError),
        (12345, TypeError),
        ("/nonexistent/photo.jpg", FileNotFoundError),
    ],
    ids=["float-array", "two-channels", "batch", "empty-bytes", "int", "missing-file"],
)
def test_unusable_images_fail_on_the_client_before_sending(client, fake, image, error):
    with pytest.raises(error):
        client.identify(image)
    assert fake.servicer.requests == []


def test_image_kind_and_face_policy_reach_the_server(client, fake, photo):
    client.enroll("biden", photo, kind=fc.ImageKind.FACE_CROP, face_policy=fc.FacePolicy.REJECT_MULTIPLE)
    request = _last_request(fake.servicer, "Enroll")
    assert request.image.kind == 2  # IMAGE_KIND_FACE_CROP
    assert request.face_policy == 2  # FACE_POLICY_REJECT_MULTIPLE
    assert request.model_id == ""


def test_the_model_id_of_an_embedding_reaches_the_server(client, fake):
    client.enroll("a", embedding=_unit(1), model_id=MODEL_ID)
    assert _last_request(fake.servicer, "Enroll").model_id == MODEL_ID
    client.enroll("b", embedding=_unit(2))
    assert _last_request(fake.servicer, "Enroll").model_id == ""  # unset: the server's own
    list(client.bulk_enroll([fc.EnrollItem("c", embedding=_unit(3), model_id=MODEL_ID)]))
    assert _last_request(fake.servicer, "BulkEnroll").model_id == MODEL_ID


def test_a_model_id_beside_an_image_fails_on_the_client_before_sending(client, fake, photo):
    with pytest.raises(ValueError, match="model_id"):
        client.enroll("biden", photo, model_id=MODEL_ID)
    assert fake.servicer.requests == []


# ---------------------------------------------------------------------------------------------
# Results


def test_identify_decides_known_and_unknown_and_ranks_matches(client, photo, other_photo):
    client.enroll("biden", photo, display_name="Joe Biden", metadata={"source": "face_recognition"})
    client.enroll("someone", embedding=_unit(1))

    known = client.identify(photo, top_k=2)[0]
    assert known.identity_id == "biden" and known.is_known
    assert [m.identity_id for m in known.matches] == ["biden", "someone"]
    assert known.matches[0].display_name == "Joe Biden"
    assert known.matches[0].distance <= known.matches[1].distance
    assert known.threshold == pytest.approx(THRESHOLD)

    unknown = client.identify(other_photo)[0]
    assert unknown.identity_id is None and not unknown.is_known
    assert unknown.distance == pytest.approx(unknown.matches[0].distance) and unknown.distance > THRESHOLD

    # A threshold override above every distance turns the unknown into the nearest identity.
    assert client.identify(other_photo, threshold=10.0)[0].identity_id == unknown.matches[0].identity_id


def test_empty_gallery_and_no_face_results_are_empty_not_errors(client, photo):
    result = client.identify(photo)[0]
    assert result.matches == () and result.identity_id is None and math.isinf(result.distance)
    assert json.loads(json.dumps(result.to_dict()))["distance"] is None  # +inf has no JSON form
    blank = np.full((20, 20, 3), 128, dtype=np.uint8)  # the fake finds no face in one colour
    assert client.identify(blank) == []
    assert client.embed(blank) == []


def test_enroll_reports_identity_creation_and_possible_duplicates(client, photo):
    first = client.enroll("biden", photo)
    again = client.enroll("biden", photo)
    assert first.identity_created and not again.identity_created
    assert again.template_id != first.template_id and again.possible_duplicate is None
    alias = client.enroll("joe", photo)
    assert alias.possible_duplicate is not None
    assert alias.possible_duplicate.identity_id == "biden"
    assert alias.possible_duplicate.distance == pytest.approx(0.0, abs=1e-6)


def test_embed_verify_compare_and_identify_embedding(client, photo, other_photo):
    with Image.open(photo) as image:
        expected = embedding_of(np.asarray(image.convert("RGB")))
    [embedded] = client.embed(photo)
    assert embedded.embedding.dtype == np.float32 and embedded.embedding.shape == (DIM,)
    np.testing.assert_array_equal(embedded.embedding, expected)

    client.enroll("biden", embedding=embedded.embedding)
    verified = client.verify("biden", photo)
    assert verified.is_match and verified.distance == pytest.approx(0.0, abs=1e-6)
    assert verified.probability_same is None  # the fake model has no head
    assert not client.verify("biden", other_photo).is_match

    compared = client.compare(photo, other_photo)
    expected_distance = np.linalg.norm(client.embed(photo)[0].embedding - client.embed(other_photo)[0].embedding)
    assert compared.distance == pytest.approx(float(expected_distance), rel=1e-6)
    assert compared.is_match is (compared.distance <= compared.threshold)
    assert compared.face_a is not None and compared.face_b is not None

    by_vector = client.identify_embedding(embedded.embedding)
    assert by_vector.face is None and by_vector.identity_id == "biden"


def test_identities_templates_paging_update_and_delete(client, fake, photo):
    for i in range(5):
        client.enroll(f"person{i}", embedding=_unit(10 + i), metadata={"i": str(i)})
    client.enroll("person0", photo)

    listed = list(client.list_identities(page_size=2))
    assert [i.identity_id for i in listed] == [f"person{i}" for i in range(5)]
    assert fake.servicer.calls["ListIdentities"] == 3  # 2 + 2 + 1
    assert listed[0].templates == () and listed[0].template_count == 2

    person0 = client.get_identity("person0")
    assert [t.source_sha256 for t in person0.templates] == ["", hashlib.sha256(photo.read_bytes()).hexdigest()]
    assert person0.templates[0].face is None and person0.templates[1].face is not None
    assert person0.metadata == {"i": "0"}

    updated = client.update_identity("person1", display_name="P. One")
    assert list(_last_request(fake.servicer, "UpdateIdentity").update_mask.paths) == ["display_name"]
    assert updated.display_name == "P. One" and updated.metadata == {"i": "1"}
    assert client.update_identity("person1", metadata={"k": "v"}).metadata == {"k": "v"}
    with pytest.raises(ValueError):
        client.update_identity("person1")

    assert client.delete_identity("person0") == 2
    [template] = client.get_identity("person1").templates
    assert client.delete_template(template.template_id) is True
    assert [i.identity_id for i in client.list_identities()] == ["person2", "person3", "person4"]


def test_galleries(client, fake):
    created = client.create_gallery("staff", threshold=0.5)
    assert (created.name, created.threshold, created.model_id, created.embedding_dim) == ("staff", 0.5, MODEL_ID, DIM)
    assert created.create_time is not None and created.create_time.tzinfo is not None
    assert created.policy == fc.DecisionPolicy(
        threshold=0.5, target_fpir=None, normalization=fc.Normalization.NONE, cohort_size=0, aggregation=fc.Aggregation.NEAREST
    )
    assert (created.policy.kind, created.policy.describe()) == ("threshold", "threshold 0.5")
    assert (created.score_kind, created.estimated_fpir, created.threshold_basis) == (fc.ScoreKind.DISTANCE, 0.0, "fixed threshold")
    request = _last_request(fake.servicer, "CreateGallery")
    assert request.HasField("threshold") and not request.HasField("policy")  # a bare threshold: the field every server reads
    client.enroll("ann", embedding=_unit(3), gallery="staff")
    assert client.get_gallery("staff").identity_count == 1
    assert {g.name for g in client.list_galleries()} == {"default", "staff"}
    assert client.delete_gallery("staff") == fc.GalleryDeletion(deleted_identities=1, deleted_templates=1)


def test_export_then_import_round_trips_embeddings_and_metadata(client):
    vectors = {f"p{i}": _unit(20 + i) for i in range(3)}
    for identity_id, vector in vectors.items():
        client.enroll(identity_id, embedding=vector, display_name=identity_id.upper(), metadata={"team": "a"})

    gallery, templates = client.export_gallery()
    exported = list(templates)
    assert gallery.name == "default" and gallery.model_id == MODEL_ID and gallery.template_count == 3
    assert [t.identity_id for t in exported] == list(vectors)
    for t in exported:
        np.testing.assert_array_equal(t.embedding, vectors[t.identity_id])
        assert t.display_name == t.identity_id.upper() and t.metadata == {"team": "a"}

    assert client.import_embeddings(exported, model_id=gallery.model_id, gallery="copy") == fc.ImportResult(3, 0)
    assert client.import_embeddings(exported, model_id=gallery.model_id, gallery="copy") == fc.ImportResult(0, 3)
    _, copied = client.export_gallery("copy")
    for original, copy in zip(exported, copied, strict=True):
        np.testing.assert_array_equal(original.embedding, copy.embedding)
        assert (original.identity_id, original.metadata) == (copy.identity_id, copy.metadata)
    with pytest.raises(fc.FailedPrecondition):
        client.import_embeddings(exported, model_id="another-model", gallery="copy")


# ---------------------------------------------------------------------------------------------
# Decision policies, scores and estimates


def test_create_gallery_sends_the_policy_and_reads_back_what_the_gallery_decides_with(client, fake):
    default = client.create_gallery("default-policy")
    assert not _last_request(fake.servicer, "CreateGallery").HasField("policy")  # the server's default
    assert default.policy == fc.DecisionPolicy(
        threshold=None, target_fpir=0.01, normalization=fc.Normalization.SNORM, cohort_size=100, aggregation=fc.Aggregation.MEAN
    )
    assert (default.policy.kind, default.policy.describe()) == ("target_fpir", "target FPIR 0.01, S-norm k=100, mean template")
    assert default.score_kind is fc.ScoreKind.SNORM and default.threshold == pytest.approx(threshold_for(0.01, pb.SCORE_KIND_SNORM), rel=1e-6)
    assert default.threshold_basis == BASIS_CURVE

    plain = client.create_gallery("plain", target_fpir=0.05, normalization="none", cohort_size=20, aggregation="nearest")
    sent = _last_request(fake.servicer, "CreateGallery").policy
    assert sent == pb.DecisionPolicy(target_fpir=0.05, normalization=pb.SCORE_NORMALIZATION_NONE, cohort_size=20, aggregation=pb.TEMPLATE_AGGREGATION_NEAREST)
    assert plain.policy.describe() == "target FPIR 0.05, no normalisation" and plain.policy.cohort_size == 20
    assert plain.policy.aggregation is fc.Aggregation.NEAREST
    assert plain.score_kind is fc.ScoreKind.DISTANCE and plain.threshold == pytest.approx(threshold_for(0.05, pb.SCORE_KIND_DISTANCE), rel=1e-6)

    snormed = client.create_gallery("snormed", target_fpir=0.02, normalization=fc.Normalization.SNORM)
    assert _last_request(fake.servicer, "CreateGallery").policy == pb.DecisionPolicy(target_fpir=0.02, normalization=pb.SCORE_NORMALIZATION_SNORM)
    assert snormed.policy.aggregation is fc.Aggregation.MEAN  # the server's default with a target FPIR
    client.create_gallery("fixed-explicit", threshold=0.4, normalization="none")  # with another keyword: as a policy
    assert _last_request(fake.servicer, "CreateGallery").policy == pb.DecisionPolicy(threshold=0.4, normalization=pb.SCORE_NORMALIZATION_NONE)
    fixed_mean = client.create_gallery("fixed-mean", threshold=0.4, aggregation=fc.Aggregation.MEAN)
    request = _last_request(fake.servicer, "CreateGallery")
    assert not request.HasField("threshold") and request.policy == pb.DecisionPolicy(threshold=0.4, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    assert fixed_mean.policy == fc.DecisionPolicy(
        threshold=pytest.approx(0.4), target_fpir=None, normalization=fc.Normalization.NONE, cohort_size=0, aggregation=fc.Aggregation.MEAN
    )
    assert fixed_mean.policy.describe() == "threshold 0.4, mean template"

    as_json = json.loads(json.dumps(default.to_dict()))
    assert as_json["policy"] == {"threshold": None, "target_fpir": 0.01, "normalization": "SNORM", "cohort_size": 100, "aggregation": "MEAN"}
    assert (as_json["score_kind"], as_json["threshold_basis"]) == ("SNORM", BASIS_CURVE)
    with pytest.raises(fc.InvalidArgument):
        client.create_gallery("bad", threshold=0.5, normalization="snorm")  # the server's rule


@pytest.mark.parametrize(
    "kwargs",
    [
        {"threshold": 0.5, "target_fpir": 0.01},
        {"cohort_size": 50},
        {"normalization": "none"},
        {"target_fpir": 0.01, "normalization": "zscore"},
        {"aggregation": "mean"},
        {"threshold": 0.5, "aggregation": "median"},
    ],
    ids=["both-rules", "k-alone", "normalization-alone", "unknown-normalization", "aggregation-alone", "unknown-aggregation"],
)
def test_policy_keywords_that_make_no_policy_fail_before_sending(client, fake, kwargs):
    with pytest.raises(ValueError):
        client.create_gallery("never", **kwargs)
    with pytest.raises(ValueError):
        client.update_gallery("default", **kwargs)
    assert fake.servicer.requests == []


def test_update_gallery_changes_the_scale_later_searches_decide_on(client, fake, photo, other_photo):
    client.enroll("biden", photo)
    before = client.identify(other_photo)[0]
    assert before.score_kind is fc.ScoreKind.DISTANCE and before.score == before.distance == before.matches[0].score

    with pytest.raises(ValueError):
        client.update_gallery()  # neither rule
    updated = client.update_gallery(target_fpir=0.3)  # the client's gallery; S-norm by default
    assert _last_request(fake.servicer, "UpdateGallery") == pb.UpdateGalleryRequest(name="default", policy=pb.DecisionPolicy(target_fpir=0.3))
    assert updated.name == "default" and updated.policy.target_fpir == pytest.approx(0.3) and updated.score_kind is fc.ScoreKind.SNORM
    assert updated.estimated_fpir == pytest.approx(0.3, rel=1e-5)  # the fake's curve meets its target exactly
    assert client.get_gallery() == updated

    after = client.identify(other_photo)[0]
    assert after.score_kind is fc.ScoreKind.SNORM and after.threshold == pytest.approx(updated.threshold)
    assert after.distance == pytest.approx(before.distance) and after.score == pytest.approx(score_of(after.distance, pb.SCORE_KIND_SNORM), rel=1e-5)
    assert after.estimated_fpir == pytest.approx(fpir_of(after.score, pb.SCORE_KIND_SNORM), rel=1e-5)
    assert after.matches[0].score == after.score and after.is_known is (after.score <= after.threshold)
    # a threshold override is on the gallery's (S-norm) scale
    assert client.identify(other_photo, threshold=after.score + 0.01)[0].identity_id == "biden"
    assert _last_request(fake.servicer, "Identify").threshold == pytest.approx(after.score + 0.01)

    fixed = client.update_gallery("default", threshold=0.55)
    assert fixed.policy.threshold == pytest.approx(0.55) and fixed.score_kind is fc.ScoreKind.DISTANCE
    assert fixed.policy.aggregation is fc.Aggregation.NEAREST
    mean = client.update_gallery("default", threshold=0.55, aggregation="mean")
    assert _last_request(fake.servicer, "UpdateGallery").policy == pb.DecisionPolicy(threshold=0.55, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    assert mean.policy.aggregation is fc.Aggregation.MEAN and client.get_gallery().policy == mean.policy
    with pytest.raises(fc.NotFound):
        client.update_gallery("nowhere", threshold=0.5)


def test_identify_results_carry_score_kind_and_estimated_fpir(client, photo):
    assert client.identify(photo)[0].estimated_fpir == 0.0  # an empty gallery: nobody to be confused with
    client.enroll("biden", photo)
    known = client.identify(photo)[0]
    assert known.score_kind is fc.ScoreKind.DISTANCE and known.score == pytest.approx(0.0, abs=1e-6)
    assert known.estimated_fpir == pytest.approx(fpir_of(known.score, pb.SCORE_KIND_DISTANCE), rel=1e-5)
    data = known.to_dict()
    assert data["score_kind"] == "DISTANCE" and data["matches"][0]["score"] == known.matches[0].score


def test_verify_and_compare_carry_the_estimated_far_when_the_model_has_a_curve(client, fake, photo, other_photo):
    client.enroll("biden", photo)
    verified = client.verify("biden", other_photo)
    assert verified.estimated_far == pytest.approx(fpir_of(verified.distance, pb.SCORE_KIND_DISTANCE), rel=1e-5)
    compared = client.compare(photo, other_photo)
    assert compared.estimated_far == pytest.approx(fpir_of(compared.distance, pb.SCORE_KIND_DISTANCE), rel=1e-5)
    fake.servicer.has_far_curve = False
    assert client.verify("biden", photo).estimated_far is None and client.compare(photo, photo).estimated_far is None
    assert client.compare(photo, photo).to_dict()["estimated_far"] is None


def test_find_duplicates(client, fake, photo, other_photo):
    assert client.find_duplicates() == fc.DuplicatesResult(pairs=(), score_kind=fc.ScoreKind.DISTANCE, threshold=THRESHOLD)
    client.enroll("biden", photo, display_name="Joe")
    client.enroll("joe", photo)
    client.enroll("obama", other_photo)
    found = client.find_duplicates(max_pairs=5)
    assert _last_request(fake.servicer, "FindDuplicates") == pb.FindDuplicatesRequest(gallery="default", max_pairs=5)
    [pair] = found.pairs
    assert (pair.identity_a, pair.display_name_a, pair.identity_b, pair.display_name_b) == ("biden", "Joe", "joe", "")
    assert pair.distance == pytest.approx(0.0, abs=1e-6) and pair.score == pair.distance
    assert pair.estimated_fpir == pytest.approx(fpir_of(0.0, pb.SCORE_KIND_DISTANCE), rel=1e-4)
    assert (found.score_kind, found.threshold) == (fc.ScoreKind.DISTANCE, THRESHOLD)
    assert found.to_dict()["pairs"][0]["identity_b"] == "joe"
    with pytest.raises(fc.InvalidArgument):
        client.find_duplicates(max_pairs=-1)
    with pytest.raises(fc.NotFound):
        client.find_duplicates("nowhere")


def test_an_unknown_score_kind_from_a_newer_server_is_a_server_error():
    from facegallery.client import _convert

    with pytest.raises(fc.ServerError, match="score kind 9"):
        _convert.face_identification(pb.FaceIdentification(score_kind=9))
    # a server from before score kinds sends UNSPECIFIED and no policy: distances, as they were
    old = _convert.gallery(pb.Gallery(name="old", threshold=0.6))
    assert old.policy is None and old.score_kind is fc.ScoreKind.DISTANCE
    # a server from before aggregations sends UNSPECIFIED: it searched nearest templates
    older = _convert.gallery(pb.Gallery(name="older", policy=pb.DecisionPolicy(threshold=0.6, normalization=pb.SCORE_NORMALIZATION_NONE)))
    assert older.policy.aggregation is fc.Aggregation.NEAREST and older.policy.describe() == "threshold 0.6"


# ---------------------------------------------------------------------------------------------
# Bulk enrollment


def test_bulk_enroll_reports_each_item_and_one_bad_item_fails_only_itself(client, photo):
    items = [
        fc.EnrollItem("biden", image=photo),
        fc.EnrollItem("broken", image=b"not an image"),
        fc.EnrollItem("", embedding=_unit(5)),
        fc.EnrollItem("vector", embedding=_unit(6)),
    ]
    results = sorted(client.bulk_enroll(items), key=lambda r: r.index)
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert [r.ok for r in results] == [True, False, False, True]
    assert [r.code for r in results] == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
    ]
    assert "decoded" in results[1].message and results[1].result is None
    assert results[0].result.identity_id == "biden" and results[0].message == ""
    assert results[0].to_dict()["code"] == "OK"


def test_bulk_enroll_reads_items_lazily_and_raises_a_client_side_failure_after_the_stream(client, fake):
    def items():
        yield fc.EnrollItem("a", embedding=_unit(7))
        yield fc.EnrollItem("b", image=object())  # cannot be encoded
        yield fc.EnrollItem("c", embedding=_unit(8))  # never sent

    results = []
    with pytest.raises(TypeError):
        for result in client.bulk_enroll(items()):
            results.append(result)
    assert [r.ok for r in results] == [True]
    assert [r.identity_id for name, r in fake.servicer.requests if name == "BulkEnroll"] == ["a"]


# ---------------------------------------------------------------------------------------------
# Errors, retries, deadlines, lifecycle


@pytest.mark.parametrize(
    ("call", "error", "code"),
    [
        (lambda c: c.get_identity("nobody"), fc.NotFound, grpc.StatusCode.NOT_FOUND),
        (lambda c: c.get_gallery("nowhere"), fc.NotFound, grpc.StatusCode.NOT_FOUND),
        (lambda c: c.create_gallery("default"), fc.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (lambda c: c.enroll("x", b"\x89PNG garbage"), fc.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (lambda c: c.enroll("x", embedding=np.ones(DIM + 1)), fc.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (
            lambda c: c.import_embeddings([], model_id="another-model"),
            fc.FailedPrecondition,
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
    ],
    ids=["identity", "gallery", "exists", "image", "embedding", "model"],
)
def test_rpc_errors_become_the_client_exception_of_their_status(client, call, error, code):
    with pytest.raises(error) as info:
        call(client)
    assert isinstance(info.value, fc.FaceGalleryClientError)
    assert info.value.code is code
    assert info.value.message and str(info.value).startswith(code.name)
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_idempotent_calls_are_retried_on_unavailable(fake):
    fake.servicer.unavailable["GetServerInfo"] = 2
    with fc.GalleryClient(fake.address, retries=3) as client:
        info = client.server_info()
    assert fake.servicer.calls["GetServerInfo"] == 3
    assert info.model.model_id == MODEL_ID and info.model.manifest["name"] == "fake"


@pytest.mark.parametrize(
    ("method", "call"),
    [("UpdateGallery", lambda c: c.update_gallery("default", threshold=0.5)), ("FindDuplicates", lambda c: c.find_duplicates())],
    ids=["update-gallery", "find-duplicates"],
)
def test_update_gallery_and_find_duplicates_are_idempotent_and_retried(fake, method, call):
    fake.servicer.unavailable[method] = 2
    with fc.GalleryClient(fake.address, retries=3) as client:
        call(client)
    assert fake.servicer.calls[method] == 3


def test_without_retries_unavailable_is_raised(fake):
    fake.servicer.unavailable["GetServerInfo"] = 1
    with fc.GalleryClient(fake.address, retries=0) as client, pytest.raises(fc.Unavailable):
        client.server_info()
    assert fake.servicer.calls["GetServerInfo"] == 1


def test_enroll_is_never_retried(fake):
    fake.servicer.unavailable["Enroll"] = 1
    with fc.GalleryClient(fake.address, retries=3) as client, pytest.raises(fc.Unavailable):
        client.enroll("a", embedding=_unit(9))
    assert fake.servicer.calls["Enroll"] == 1


def test_unreachable_server_raises_unavailable():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with fc.GalleryClient(f"127.0.0.1:{port}", retries=1, timeout=5.0) as client, pytest.raises(fc.Unavailable):
        client.list_galleries()


def test_per_call_timeout_overrides_the_client_default_and_none_means_no_deadline(fake):
    fake.servicer.delay_s = 0.5
    with fc.GalleryClient(fake.address, timeout=0.1) as client:
        with pytest.raises(fc.DeadlineExceeded):
            client.server_info()
        assert client.server_info(timeout=None).version == "0.0-fake"
        assert client.server_info(timeout=5.0).version == "0.0-fake"
    assert fc.USE_CLIENT_DEFAULT is not None and repr(fc.USE_CLIENT_DEFAULT) == "USE_CLIENT_DEFAULT"


def test_closed_client_refuses_calls_and_cannot_reopen(fake):
    client = fc.GalleryClient(fake.address)
    assert "unopened" in repr(client)
    with client:
        assert client.health() == "SERVING"
    assert client.is_closed and "closed" in repr(client)
    with pytest.raises(fc.ClientClosedError):
        client.list_galleries()
    with pytest.raises(fc.ClientClosedError):
        client.__enter__()
    client.close()  # idempotent


@pytest.mark.parametrize("kwargs", [{"retries": -1}, {"timeout": 0}, {"stream_timeout": -2.0}])
def test_invalid_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        fc.GalleryClient("localhost:1", **kwargs)


def test_wait_ready_waits_for_serving(fake):
    fake.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    with fc.GalleryClient(fake.address) as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(fc.DeadlineExceeded):
            client.wait_ready(0.3)
        timer = threading.Timer(0.2, fake.health.set, ("", health_pb2.HealthCheckResponse.SERVING))
        timer.start()
        client.wait_ready(10.0)
        timer.join()
        assert client.health() == "SERVING"


# ---------------------------------------------------------------------------------------------
# Against the real server (server/service/app.py) with the fake face pipeline of tests/fakes.py: the
# client and the real servicer agree on the wire contract.


@contextlib.contextmanager
def running_real_server(data_dir: Path, **config):
    """The real server on a free 127.0.0.1 port with the fake pipeline and its own ``data_dir``;
    yields ``(address, GalleryServer)``. ``config``: more ServerConfig fields (e.g. TLS)."""
    from fakes import FakePipeline

    from facegallery.server.service.app import ServerConfig, create_server

    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, snapshot_interval_s=None, **config)
    running = create_server(config, pipeline=FakePipeline(with_head=True, max_image_bytes=4096))
    try:
        yield f"127.0.0.1:{running.port}", running
    finally:
        running.stop(0)  # idempotent: a test may have stopped it


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    with running_real_server(tmp_path_factory.mktemp("real-server")) as (address, _):
        yield address


@pytest.fixture()
def real(real_server, request):
    """A client of the real server, on a fresh gallery named after the test."""
    with fc.GalleryClient(real_server, timeout=10.0, gallery=request.node.name[:60].replace("[", "_").replace("]", "")) as client:
        client.create_gallery(client.gallery)
        yield client


def test_real_server_identify_verify_and_enroll(real):
    from fakes import person_embedding, photo

    real.wait_ready(10.0)
    ann = real.enroll("ann", photo((200, 10, 0)), display_name="Ann", metadata={"team": "a"})
    assert ann.identity_created and ann.face.box == (0.0, 0.0, 31.0, 31.0) and len(ann.source_sha256) == 64
    real.enroll("bob", embedding=person_embedding(50, 60))

    faces = real.identify(photo((200, 10, 128), (0, 0, 0), (90, 90, 0)), top_k=2)
    by_left = {f.face.box[0]: f for f in faces}
    assert sorted(by_left) == [0.0, 64.0]
    assert by_left[0.0].identity_id == "ann" and by_left[0.0].matches[0].display_name == "Ann"
    assert by_left[0.0].distance == pytest.approx(0.1, abs=0.01)  # blue 128 -> offset 0.2 * 128 / 255
    assert by_left[64.0].identity_id is None and len(by_left[64.0].matches) == 2

    verified = real.verify("ann", photo((200, 10, 255)))
    assert verified.is_match and verified.distance == pytest.approx(0.2, abs=0.01)
    assert verified.probability_same == pytest.approx(math.exp(-verified.distance), rel=1e-5)
    compared = real.compare(photo((200, 10, 0)), photo((50, 60, 0)))
    assert not compared.is_match and compared.distance > 1.0

    [embedded] = real.embed(photo((50, 60, 0)))
    np.testing.assert_allclose(embedded.embedding, person_embedding(50, 60), atol=1e-6)
    assert real.identify_embedding(embedded.embedding).identity_id == "bob"
    assert real.server_info().model.embedding_dim == 128 and real.health() == "SERVING"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c, photo: c.identify(b"random bytes"), fc.InvalidArgument),
        (lambda c, photo: c.enroll("x", photo((0, 0, 0))), fc.InvalidArgument),  # no face
        (lambda c, photo: c.enroll("", photo((1, 2, 3))), fc.InvalidArgument),
        (lambda c, photo: c.enroll("x", embedding=np.ones(3)), fc.InvalidArgument),
        (
            lambda c, photo: c.enroll("x", photo((1, 2, 3), (4, 5, 6)), face_policy=fc.FacePolicy.REJECT_MULTIPLE),
            fc.FailedPrecondition,
        ),
        (lambda c, photo: c.identify(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), fc.ResourceExhausted),
        (lambda c, photo: c.get_identity("nobody"), fc.NotFound),
        (lambda c, photo: c.verify("nobody", photo((1, 2, 3))), fc.NotFound),
        (lambda c, photo: c.create_gallery("default"), fc.AlreadyExists),
    ],
    ids=["undecodable", "no-face", "empty-id", "vector-length", "several-faces", "too-large", "identity", "verify", "exists"],
)
def test_real_server_statuses_become_client_exceptions(real, call, error):
    from fakes import photo

    with pytest.raises(error):
        call(real, photo)


def test_real_server_refuses_embeddings_of_another_model(real):
    from fakes import FakePipeline, person_embedding

    own, other = real.server_info().model.model_id, FakePipeline("fake-b").model_id
    vector = person_embedding(50, 60)
    assert real.enroll("bob", embedding=vector).identity_created  # unset: the server's model
    assert real.enroll("bob", embedding=vector, model_id=own).template_id > 0
    with pytest.raises(fc.FailedPrecondition) as refused:
        real.enroll("bob", embedding=vector, model_id=other)
    assert own[:12] in refused.value.message and other[:12] in refused.value.message
    with pytest.raises(fc.FailedPrecondition) as refused:
        real.identify_embedding(vector, model_id=other)
    assert own[:12] in refused.value.message and other[:12] in refused.value.message
    [item] = real.bulk_enroll([fc.EnrollItem("bob", embedding=vector, model_id=other)])
    assert not item.ok and item.code is grpc.StatusCode.FAILED_PRECONDITION
    assert real.identify_embedding(vector, model_id=own).identity_id == "bob"
    assert real.identify_embedding(vector).identity_id == "bob"
    assert real.get_gallery().template_count == 2


def test_real_server_policies_scores_and_duplicates(real):
    from fakes import person_embedding, photo

    created = real.get_gallery()  # the real fixture created it with the server's default policy
    assert created.policy == fc.DecisionPolicy(
        threshold=None, target_fpir=0.01, normalization=fc.Normalization.SNORM, cohort_size=100, aggregation=fc.Aggregation.MEAN
    )
    assert created.score_kind is fc.ScoreKind.DISTANCE and created.threshold_basis  # too small for S-norm yet
    real.enroll("ann", embedding=person_embedding(200, 10), display_name="Ann")
    real.enroll("ann-again", embedding=person_embedding(200, 10, 100))
    real.enroll("bob", embedding=person_embedding(50, 60))

    fixed = real.update_gallery(threshold=0.3)
    assert fixed.policy.describe() == "threshold 0.3" and fixed.threshold == pytest.approx(0.3) and fixed.threshold_basis
    found = real.identify_embedding(person_embedding(200, 10, 255))
    assert found.identity_id in {"ann", "ann-again"} and found.score == found.distance and found.score_kind is fc.ScoreKind.DISTANCE
    assert found.threshold == pytest.approx(0.3) and math.isnan(found.estimated_fpir)  # no curve, 3 people: no estimate

    duplicates = real.find_duplicates(max_pairs=10)
    assert (duplicates.score_kind, duplicates.threshold) == (fc.ScoreKind.DISTANCE, pytest.approx(0.3))
    [pair] = duplicates.pairs
    assert {pair.identity_a, pair.identity_b} == {"ann", "ann-again"} and pair.distance == pytest.approx(0.078, abs=0.001)
    assert {pair.display_name_a, pair.display_name_b} == {"Ann", ""}

    planned = real.update_gallery(target_fpir=0.1, normalization="none", cohort_size=30)
    assert planned.policy.describe() == "target FPIR 0.1, no normalisation, mean template" and planned.policy.cohort_size == 30
    with pytest.raises(fc.InvalidArgument):
        real.update_gallery(threshold=0.5, normalization="snorm")
    with pytest.raises(fc.InvalidArgument):
        real.update_gallery(target_fpir=0.1, cohort_size=1)
    assert real.get_gallery().policy == planned.policy  # the refused updates changed nothing
    verified = real.verify("bob", photo((50, 60, 0)))
    assert verified.estimated_far is None  # the fake model has no false-match curve


def test_real_server_aggregation_decides_an_identitys_distance(real):
    from fakes import DIM as REAL_DIM

    def vector(*values: float) -> np.ndarray:
        out = np.zeros(REAL_DIM, np.float32)
        out[: len(values)] = values
        return out

    # ann: templates e0 and e1 (mean (0.5, 0.5)); bob: e2. Probe (0.6, 0.8), by hand:
    # to e1 sqrt(0.36 + 0.04) = sqrt(0.4); to e0 sqrt(0.16 + 0.64) = sqrt(0.8); to ann's mean
    # sqrt(0.01 + 0.09) = sqrt(0.1); to bob sqrt(2).
    real.enroll("ann", embedding=vector(1.0))
    second = real.enroll("ann", embedding=vector(0.0, 1.0))
    real.enroll("bob", embedding=vector(0.0, 0.0, 1.0))
    probe = vector(0.6, 0.8)

    mean = real.update_gallery(threshold=0.5, aggregation=fc.Aggregation.MEAN)
    assert mean.policy.aggregation is fc.Aggregation.MEAN and mean.policy.describe() == "threshold 0.5, mean template"
    found = real.identify_embedding(probe, top_k=2)
    assert found.identity_id == "ann" and found.distance == pytest.approx(math.sqrt(0.1), abs=1e-6)  # 0.316 <= 0.5
    assert [m.identity_id for m in found.matches] == ["ann", "bob"] and found.matches[1].distance == pytest.approx(math.sqrt(2.0), abs=1e-6)

    nearest = real.update_gallery(threshold=0.5, aggregation="nearest")
    assert nearest.policy.aggregation is fc.Aggregation.NEAREST and nearest.policy.describe() == "threshold 0.5"
    found = real.identify_embedding(probe)
    assert found.identity_id is None and found.distance == pytest.approx(math.sqrt(0.4), abs=1e-6)  # 0.632 > 0.5: unknown
    assert found.matches[0].identity_id == "ann" and found.matches[0].template_id == second.template_id

    targeted = real.update_gallery(target_fpir=0.1, normalization="none")  # a target FPIR searches mean templates by default
    assert targeted.policy.aggregation is fc.Aggregation.MEAN
    assert real.identify_embedding(probe).distance == pytest.approx(math.sqrt(0.1), abs=1e-6)
    assert real.get_gallery().policy == targeted.policy


def test_real_server_bulk_enroll_paging_export_and_import(real):
    from fakes import photo

    items = [fc.EnrollItem(f"p{i}", image=photo((10 * i + 5, 7, 0)), metadata={"i": str(i)}) for i in range(5)]
    items.insert(2, fc.EnrollItem("bad", image=b"not an image"))
    results = sorted(real.bulk_enroll(items), key=lambda r: r.index)
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert results[2].code is grpc.StatusCode.INVALID_ARGUMENT and results[2].message

    assert [i.identity_id for i in real.list_identities(page_size=2)] == [f"p{i}" for i in range(5)]
    p0 = real.get_identity("p0")
    assert p0.metadata == {"i": "0"} and p0.templates[0].source_sha256 == hashlib.sha256(photo((5, 7, 0))).hexdigest()

    gallery, templates = real.export_gallery()
    exported = list(templates)
    assert gallery.template_count == 5 and len(exported) == 5
    target = f"{real.gallery}-copy"[:100]
    assert real.import_embeddings(exported, model_id=gallery.model_id, gallery=target) == fc.ImportResult(5, 0)
    assert real.import_embeddings(exported, model_id=gallery.model_id, gallery=target) == fc.ImportResult(0, 5)
    _, copied = real.export_gallery(target)
    for a, b in zip(exported, copied, strict=True):
        np.testing.assert_array_equal(a.embedding, b.embedding)
        assert (a.identity_id, a.metadata) == (b.identity_id, b.metadata)
    with pytest.raises(fc.FailedPrecondition):
        real.import_embeddings(exported, model_id="0" * 64, gallery=target)

    assert real.delete_template(p0.templates[0].template_id) is True
    assert real.delete_identity("p1") == 1
    assert real.update_identity("p2", display_name="Two").display_name == "Two"
    assert real.get_gallery().identity_count == 3
    assert real.delete_gallery(target).deleted_templates == 5


# ---------------------------------------------------------------------------------------------
# Several servers behind one client: gRPC's round_robin over one ipv4: target, idempotent calls
# retried on another server. Real servers with their own data dirs; each holds gallery "shared"
# with an identity of its own, so a search tells which server answered.

SHARED = "shared"


@pytest.fixture()
def two_servers(tmp_path):
    from fakes import person_embedding

    with running_real_server(tmp_path / "a") as a, running_real_server(tmp_path / "b") as b:
        for (address, _), identity, colour in ((a, "on-a", (200, 10)), (b, "on-b", (50, 60))):
            with fc.GalleryClient(address, gallery=SHARED, timeout=10.0) as single:
                single.create_gallery(SHARED, threshold=1.0)
                single.enroll(identity, embedding=person_embedding(*colour))
        yield types.SimpleNamespace(addresses=(a[0], b[0]), servers=(a[1], b[1]))


def _answered_by(client: fc.GalleryClient) -> str:
    """The server that answered one search, named by its only identity."""
    from fakes import person_embedding

    return client.identify_embedding(person_embedding(100, 100)).matches[0].identity_id


def _until_seen(call, expected: set, within_s: float = 5.0) -> set:
    """Repeat ``call()`` until its answers include ``expected`` (a second connection may come
    up a call or two after the first) or ``within_s`` passed; returns the answers seen."""
    seen: set = set()
    end = time.monotonic() + within_s
    while not expected <= seen and time.monotonic() < end:
        seen.add(call())
    return seen


@pytest.mark.parametrize("join", [",".join, list], ids=["comma-string", "sequence"])
def test_several_addresses_spread_calls_round_robin_over_every_server(two_servers, join):
    with fc.GalleryClient(join(two_servers.addresses), gallery=SHARED, timeout=10.0) as client:
        assert _until_seen(lambda: _answered_by(client), {"on-a", "on-b"}) == {"on-a", "on-b"}
        answers = [_answered_by(client) for _ in range(10)]
        listed = {tuple(i.identity_id for i in client.list_identities()) for _ in range(4)}
    assert client.addresses == two_servers.addresses and client.address == ",".join(two_servers.addresses)
    assert all(a != b for a, b in zip(answers, answers[1:])), answers  # round robin: strictly in turn
    assert listed == {("on-a",), ("on-b",)}


def test_idempotent_calls_go_to_the_other_server_once_one_is_stopped(two_servers):
    with fc.GalleryClient(",".join(two_servers.addresses), gallery=SHARED, timeout=5.0) as client:
        assert _until_seen(lambda: _answered_by(client), {"on-a", "on-b"}) == {"on-a", "on-b"}
        two_servers.servers[0].stop(0)
        started = time.monotonic()
        answers = [_answered_by(client) for _ in range(10)]
        listed = [i.identity_id for i in client.list_identities()]
        assert client.get_gallery().identity_count == 1 and client.server_info().model.embedding_dim == 128
        elapsed = time.monotonic() - started
    assert answers == ["on-b"] * 10 and listed == ["on-b"]
    assert elapsed < 3.0


def test_a_server_down_from_the_start_is_skipped(two_servers):
    two_servers.servers[0].stop(0)
    started = time.monotonic()
    with fc.GalleryClient(list(two_servers.addresses), gallery=SHARED, timeout=5.0) as client:
        answers = [_answered_by(client) for _ in range(6)]
    assert answers == ["on-b"] * 6 and time.monotonic() - started < 3.0


def test_a_call_refused_unavailable_is_retried_on_the_other_server_but_enroll_never():
    with running_fake_server() as (address_a, a, _), running_fake_server() as (address_b, b, _):
        with fc.GalleryClient(f"{address_a},{address_b}", retries=3, timeout=5.0) as client:

            def both_called() -> bool:
                client.server_info()
                return a.calls["GetServerInfo"] > 0 and b.calls["GetServerInfo"] > 0

            assert _until_seen(both_called, {True}) >= {True}
            a.unavailable.update(GetServerInfo=1000, Enroll=1000)  # a refuses these from now on
            on_a, on_b = a.calls["GetServerInfo"], b.calls["GetServerInfo"]
            for _ in range(6):
                assert client.server_info().version == "0.0-fake"
            enrolled = failed = 0
            for i in range(6):
                try:
                    client.enroll(f"p{i}", embedding=_unit(i))
                    enrolled += 1
                except fc.Unavailable:
                    failed += 1
    assert b.calls["GetServerInfo"] - on_b == 6  # every call answered by b, first or after a's refusal
    assert a.calls["GetServerInfo"] - on_a >= 5  # picks alternate: 5 or 6 of the calls met a first
    assert a.calls["Enroll"] == failed == 3 and b.calls["Enroll"] == enrolled == 3  # one attempt each


def test_tls_over_several_addresses_checks_every_certificate_against_one_name(tmp_path):
    from pki import Pki

    pki = Pki(tmp_path)
    tls = {"tls_cert": pki.server_cert_path, "tls_key": pki.server_key_path}
    with running_real_server(tmp_path / "a", **tls) as (a, _), running_real_server(tmp_path / "b", **tls) as (b, _):
        for address, name in ((a, "only-a"), (b, "only-b")):
            with fc.GalleryClient(address, tls_ca=pki.ca) as single:
                single.create_gallery(name)
        # The certificates name IP 127.0.0.1 (the one host of both addresses) and DNS localhost.
        for server_name in (None, "localhost"):
            with fc.GalleryClient(f"{a},{b}", tls_ca=pki.ca, tls_server_name=server_name, timeout=5.0) as client:
                seen = _until_seen(lambda: next(g.name for g in client.list_galleries() if g.name.startswith("only-")), {"only-a", "only-b"})
            assert seen == {"only-a", "only-b"}, server_name
        with fc.GalleryClient(f"{a},{b}", tls_ca=pki.ca, tls_server_name="gallery.example", retries=0, timeout=5.0) as client:
            with pytest.raises(fc.Unavailable):  # no certificate names it
                client.server_info()


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:5001,gallery-b:5002", "not a numeric IPv4:PORT or \\[IPv6\\]:PORT address; a list of servers takes numeric"),
        ("127.0.0.1:5001,127.0.0.1", "'127.0.0.1' is not a numeric"),
        ("127.0.0.1:5001,127.0.0.1:70000", "'127.0.0.1:70000' is not a numeric"),
        ("::1:5001,::1:5002", "'::1:5001' is not a numeric"),
        ("127.0.0.1:5001,,127.0.0.1:5002", "an empty server address"),
        ("127.0.0.1:5001,", "an empty server address"),
        ("", "the server address is empty"),
        ([], "no server address"),
        (["127.0.0.1:5001,127.0.0.1:5002"], "one address per item"),
        ("127.0.0.1:5001,[::1]:5002", "mixes IPv4 and IPv6"),
        ("127.0.0.1:5001, 127.0.0.1:5001", "127.0.0.1:5001 is listed twice"),
    ],
    ids=["host-name", "no-port", "bad-port", "bare-ipv6", "empty-item", "trailing-comma", "empty", "no-items", "commas-in-item", "mixed", "twice"],
)
def test_malformed_address_lists_are_refused_when_the_client_is_made(address, message):
    with pytest.raises(ValueError, match=message):
        fc.GalleryClient(address)


def test_an_address_that_is_not_a_string_is_refused():
    with pytest.raises(TypeError):
        fc.GalleryClient(["127.0.0.1:5001", 5002])


@pytest.fixture()
def channels(monkeypatch):
    """Records ``(target, options)`` of every channel the client opens (then opened for real)."""
    opened = []

    def recording(real):
        def channel(target, *args, options=(), **kwargs):
            opened.append((target, dict(options)))
            return real(target, *args, options=options, **kwargs)

        return channel

    monkeypatch.setattr(grpc, "insecure_channel", recording(grpc.insecure_channel))
    monkeypatch.setattr(grpc, "secure_channel", recording(grpc.secure_channel))
    return opened


@pytest.mark.parametrize(
    ("address", "target", "balanced"),
    [
        ("localhost:50051", "localhost:50051", False),
        (" localhost:50051", " localhost:50051", False),  # one address: passed on as given, as before
        (["localhost:50051"], "localhost:50051", False),
        ("dns:///gallery.internal:50051", "dns:///gallery.internal:50051", True),
        ("10.0.0.5:50051, 10.0.0.6:50051", "ipv4:10.0.0.5:50051,10.0.0.6:50051", True),
        (["[fd00::5]:50051", "[fd00::6]:50051"], "ipv6:[fd00::5]:50051,[fd00::6]:50051", True),
    ],
    ids=["one", "one-as-given", "one-item", "dns", "ipv4-list", "ipv6-list"],
)
def test_one_address_keeps_its_target_and_several_become_one_round_robin_target(channels, address, target, balanced):
    with fc.GalleryClient(address, retries=2) as client:
        assert client.is_closed is False
    [(opened, options)] = channels
    config = json.loads(options["grpc.service_config"])
    assert opened == target and "grpc.default_authority" not in options
    assert config.get("loadBalancingConfig") == ([{"round_robin": {}}] if balanced else None)
    [methods] = config["methodConfig"]
    assert methods["retryPolicy"]["maxAttempts"] == 3 and methods["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert not {"Enroll", "BulkEnroll", "CreateGallery", "DeleteIdentity", "ImportEmbeddings"} & {m["method"] for m in methods["name"]}


@pytest.mark.parametrize(
    ("address", "server_name", "authority"),
    [
        ("127.0.0.1:5001", None, None),
        ("gallery.internal:5001", "gallery.internal", "gallery.internal"),
        ("127.0.0.1:5001,127.0.0.1:5002", None, "127.0.0.1"),
        ("[::1]:5001,[::1]:5002", None, "[::1]"),
        ("10.0.0.5:5001,10.0.0.6:5001", "gallery.internal", "gallery.internal"),
    ],
    ids=["one", "one-named", "one-host", "one-ipv6-host", "several-hosts-named"],
)
def test_tls_authority_is_set_only_when_the_target_cannot_name_the_certificate(channels, tmp_path, address, server_name, authority):
    from pki import Pki

    ca = Pki(tmp_path).ca
    with fc.GalleryClient(address, tls_ca=ca, tls_server_name=server_name):
        pass
    [(_, options)] = channels
    assert options.get("grpc.default_authority") == authority


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"address": "10.0.0.5:5001,10.0.0.6:5001", "tls_ca": b"pem"}, "need tls_server_name"),
        ({"address": "127.0.0.1:5001", "tls_server_name": "localhost"}, "tls_server_name needs TLS"),
        ({"address": "127.0.0.1:5001", "tls_ca": b"pem", "tls_server_name": "a,b"}, "one host name"),
    ],
    ids=["several-hosts", "no-tls", "list"],
)
def test_tls_server_name_is_required_for_several_hosts_and_refused_without_tls(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fc.GalleryClient(**kwargs)


def test_cli_server_option_and_env_take_several_addresses(two_servers):
    from click.testing import CliRunner

    from facegallery.client.cli import main

    two_servers.servers[0].stop(0)
    both = ",".join(two_servers.addresses)
    runner = CliRunner()
    for args, env in ((["--server", both], {}), ([], {"FACEGALLERY_SERVER": both})):
        result = runner.invoke(main, ["identities", "--gallery", SHARED, "--json", *args], env=env)
        assert result.exit_code == 0, result.output
        assert [json.loads(line)["identity_id"] for line in result.output.splitlines()] == ["on-b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["identities", "--server", "127.0.0.1:5001,gallery-b:5002"], "Invalid value for '--server': 'gallery-b:5002' is not a numeric"),
        (["identities", "--server", "127.0.0.1:5001,[::1]:5002"], "Invalid value for '--server'"),
        (["keys", "list", "--server", "127.0.0.1:5001,"], "Invalid value for '--server': an empty server address"),
        (["identities", "--server", "10.0.0.5:5001,10.0.0.6:5001", "--tls-ca", "CA"], "need --tls-server-name"),
    ],
    ids=["host-name", "mixed", "keys-empty-item", "tls-several-hosts"],
)
def test_cli_refuses_a_malformed_server_list_as_bad_usage(tmp_path, args, message):
    from click.testing import CliRunner

    from facegallery.client.cli import main

    (tmp_path / "ca.pem").write_bytes(b"pem")
    args = [str(tmp_path / "ca.pem") if a == "CA" else a for a in args]
    result = CliRunner().invoke(main, args, env={"FACEGALLERY_SERVER": None})
    assert result.exit_code == 2 and message in result.output, result.output
