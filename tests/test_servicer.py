"""The real gRPC server on a free port with the fake pipeline: every RPC and every error status."""

from __future__ import annotations

import dataclasses
import io
import logging
import socket
import threading

import grpc
import numpy as np
import pytest
from fakes import DIM, ExplodingPipeline, FakePipeline, person_embedding, photo
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from facegallery.server.service.app import SERVICE_NAME, ServerConfig, create_server
from facegallery.server.service.status import INTERNAL_MESSAGE
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

ANN, BOB, CAT = (200, 10), (10, 200), (120, 120)
MAX_MESSAGE = 1 << 20
MAX_IMAGE = 200_000




def config(data_dir, port=0):
    return ServerConfig(data_dir=data_dir, host="localhost", port=port, max_workers=8, max_message_bytes=MAX_MESSAGE, snapshot_interval_s=None, grace_s=1.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = create_server(config(tmp_path_factory.mktemp("servicer")), pipeline=ExplodingPipeline(max_image_bytes=MAX_IMAGE))
    yield running
    running.stop(1.0)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"localhost:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GalleryServiceStub(channel)


def image(data: bytes, kind=pb.IMAGE_KIND_PHOTO) -> pb.Image:
    return pb.Image(data=data, kind=kind)


def shot(person, variation=0) -> pb.Image:
    return image(photo((*person, variation)))


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def noise_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}


def test_server_info(stub, server):
    info = stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (info.model.model_id, info.model.embedding_dim, info.model.chip_size) == (server.manager.pipeline.model_id, DIM, 150)
    assert info.model.model_id == server.manager.model.embedding_id(False) != server.manager.model.files["embedder"].sha256
    assert info.model.threshold == pytest.approx(0.6) and not info.model.has_head and info.version


def test_enroll_identify_verify_compare_embed(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="wire"))
    ann = stub.Enroll(pb.EnrollRequest(gallery="wire", identity_id="ann", display_name="Ann", metadata={"k": "v"}, image=shot(ANN)))
    assert ann.identity_created and ann.template_id > 0 and len(ann.source_sha256) == 64
    assert (ann.face.box.right, len(ann.face.landmarks), ann.face.score) == (31.0, 5, 1.0)
    bob = stub.Enroll(pb.EnrollRequest(gallery="wire", identity_id="bob", embedding=pb.Embedding(values=person_embedding(*BOB).tolist())))
    assert not bob.HasField("face") and bob.source_sha256 == ""
    dup = stub.Enroll(pb.EnrollRequest(gallery="wire", identity_id="ann-again", image=shot(ANN, 100)))
    assert dup.possible_duplicate.identity_id == "ann" and dup.possible_duplicate.template_id == ann.template_id
    stub.DeleteIdentity(pb.DeleteIdentityRequest(gallery="wire", identity_id="ann-again"))

    found = stub.Identify(pb.IdentifyRequest(gallery="wire", image=image(photo((*CAT, 0), (*ANN, 60), (*BOB, 30))), top_k=2))
    assert [f.identity_id for f in found.faces] == ["", "ann", "bob"]
    assert found.faces[1].matches[0].display_name == "Ann" and found.faces[1].threshold == pytest.approx(0.6)
    assert found.faces[0].distance > 0.6 and len(found.faces[0].matches) == 2 and found.faces[2].face.box.left == 64.0
    strict = stub.Identify(pb.IdentifyRequest(gallery="wire", image=shot(ANN, 60), threshold=0.01))
    assert not strict.faces[0].HasField("identity_id") and strict.faces[0].threshold == pytest.approx(0.01)
    assert stub.Identify(pb.IdentifyRequest(gallery="wire", image=image(photo((0, 0, 0))))).faces == []
    by_vector = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="wire", embedding=pb.Embedding(values=person_embedding(*BOB).tolist())))
    assert by_vector.result.identity_id == "bob" and by_vector.result.distance == pytest.approx(0.0, abs=1e-6)
    assert not by_vector.result.HasField("face")
    empty = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="default", embedding=pb.Embedding(values=person_embedding(*BOB).tolist())))
    assert empty.result.matches == [] and not empty.result.HasField("distance") and not empty.result.HasField("score")

    verdict = stub.Verify(pb.VerifyRequest(gallery="wire", identity_id="ann", image=shot(ANN, 60)))
    expected = np.linalg.norm(person_embedding(*ANN, 60) - person_embedding(*ANN))
    assert verdict.is_match and verdict.distance == pytest.approx(expected, abs=1e-5) and not verdict.HasField("probability_same")
    assert not verdict.HasField("estimated_far")  # the fake model has no false-match curve
    compared = stub.Compare(pb.CompareRequest(image_a=shot(ANN), image_b=shot(BOB)))
    assert not compared.HasField("estimated_far")
    assert not compared.is_match and compared.distance == pytest.approx(np.linalg.norm(person_embedding(*ANN) - person_embedding(*BOB)), abs=1e-5)
    embedded = stub.Embed(pb.EmbedRequest(image=image(photo((*ANN, 0), (*BOB, 0))), max_faces=1))
    assert len(embedded.faces) == 1 and embedded.model_id == found.model_id == stub.GetServerInfo(pb.GetServerInfoRequest()).model.model_id
    np.testing.assert_allclose(embedded.faces[0].embedding.values, person_embedding(*ANN), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Open-set decisions: policies, scores, FPIR/FAR estimates, duplicates

# A false-match curve F1(d) for the model (model.json "false_match"), linear between the points.
CURVE = {"distances": [0.0, 0.1, 0.2, 1.0, 1.5], "rates": [0.0, 1e-4, 1e-3, 0.1, 0.9], "pairs": 1000, "data": "test pairs"}


def curve_rate(distance: float) -> float:
    return float(np.interp(distance, CURVE["distances"], CURVE["rates"]))


def gallery_fpir(distance: float, identities: int) -> float:
    """FPIR of a gallery of independent identities at ``distance``: 1 - (1 - F1(d))^N."""
    return 1.0 - (1.0 - curve_rate(distance)) ** identities


def embedding(*color) -> pb.Embedding:
    return pb.Embedding(values=person_embedding(*color).tolist())


def import_people(stub, gallery: str, people: dict[str, tuple]) -> None:
    """ImportEmbeddings of ``identity_id -> (red, green[, blue])`` people (no display names)."""
    model_id = stub.GetServerInfo(pb.GetServerInfoRequest()).model.model_id

    def stream():
        yield pb.ImportEmbeddingsRequest(header=pb.ImportEmbeddingsHeader(gallery=gallery, model_id=model_id))
        for identity_id, color in people.items():
            yield pb.ImportEmbeddingsRequest(template=pb.ExportedTemplate(identity_id=identity_id, embedding=embedding(*color)))

    assert stub.ImportEmbeddings(stream()).imported == len(people)


def test_galleries_report_their_policy_and_what_they_decide_with(stub):
    default = stub.CreateGallery(pb.CreateGalleryRequest(name="pol-default"))
    assert default.policy == pb.DecisionPolicy(
        target_fpir=0.01, normalization=pb.SCORE_NORMALIZATION_SNORM, cohort_size=100, aggregation=pb.TEMPLATE_AGGREGATION_MEAN
    )
    # an empty gallery is too small for S-norm and the fake model has no false-match curve: the model's threshold
    assert default.score_kind == pb.SCORE_KIND_DISTANCE and default.threshold == pytest.approx(0.6)
    assert default.estimated_fpir == 0.0 and "model's threshold" in default.threshold_basis  # empty: nobody to confuse

    shorthand = stub.CreateGallery(pb.CreateGalleryRequest(name="pol-fixed", threshold=0.5))
    explicit = stub.CreateGallery(pb.CreateGalleryRequest(name="pol-fixed2", policy=pb.DecisionPolicy(threshold=0.5)))
    for fixed in (shorthand, explicit):
        assert fixed.policy == pb.DecisionPolicy(threshold=0.5, normalization=pb.SCORE_NORMALIZATION_NONE, aggregation=pb.TEMPLATE_AGGREGATION_NEAREST)  # no k
        assert (fixed.threshold, fixed.score_kind, fixed.estimated_fpir) == (pytest.approx(0.5), pb.SCORE_KIND_DISTANCE, 0.0)
        assert fixed.threshold_basis

    plain = stub.CreateGallery(
        pb.CreateGalleryRequest(name="pol-plain", policy=pb.DecisionPolicy(target_fpir=0.05, normalization=pb.SCORE_NORMALIZATION_NONE, cohort_size=7))
    )
    # an UNSPECIFIED aggregation with a target FPIR is MEAN, as in the default policy
    assert plain.policy == pb.DecisionPolicy(target_fpir=0.05, normalization=pb.SCORE_NORMALIZATION_NONE, cohort_size=7, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    snormed = stub.CreateGallery(pb.CreateGalleryRequest(name="pol-snorm", policy=pb.DecisionPolicy(target_fpir=0.02)))
    assert snormed.policy == pb.DecisionPolicy(target_fpir=0.02, normalization=pb.SCORE_NORMALIZATION_SNORM, cohort_size=100, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    nearest = stub.CreateGallery(
        pb.CreateGalleryRequest(name="pol-nearest", policy=pb.DecisionPolicy(target_fpir=0.02, aggregation=pb.TEMPLATE_AGGREGATION_NEAREST))
    )
    assert nearest.policy == pb.DecisionPolicy(target_fpir=0.02, normalization=pb.SCORE_NORMALIZATION_SNORM, cohort_size=100, aggregation=pb.TEMPLATE_AGGREGATION_NEAREST)
    fixed_mean = stub.CreateGallery(
        pb.CreateGalleryRequest(name="pol-fixed-mean", policy=pb.DecisionPolicy(threshold=0.5, aggregation=pb.TEMPLATE_AGGREGATION_MEAN))
    )
    assert fixed_mean.policy == pb.DecisionPolicy(threshold=0.5, normalization=pb.SCORE_NORMALIZATION_NONE, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    assert fixed_mean.threshold == pytest.approx(0.5) and fixed_mean.score_kind == pb.SCORE_KIND_DISTANCE

    listed = {g.name: g for g in stub.ListGalleries(pb.ListGalleriesRequest()).galleries}
    assert listed["pol-plain"] == plain and listed["pol-fixed"] == shorthand
    assert listed["pol-nearest"] == nearest and listed["pol-fixed-mean"] == fixed_mean
    assert stub.GetGallery(pb.GetGalleryRequest(name="pol-snorm")) == snormed
    head = next(iter(stub.ExportGallery(pb.ExportGalleryRequest(gallery="pol-plain")))).gallery
    assert head.policy == plain.policy and head.threshold_basis == plain.threshold_basis


def test_policies_out_of_range_are_invalid_argument(stub):
    policy = pb.DecisionPolicy
    cases = [
        pb.CreateGalleryRequest(name="bad-both", threshold=0.5, policy=policy(target_fpir=0.01)),
        pb.CreateGalleryRequest(name="bad-both2", threshold=0.5, policy=policy()),  # both set, even an empty policy
        pb.CreateGalleryRequest(name="bad-neg", threshold=-0.5),
        pb.CreateGalleryRequest(name="bad-zero", policy=policy(threshold=0.0)),
        pb.CreateGalleryRequest(name="bad-snorm-fixed", policy=policy(threshold=0.5, normalization=pb.SCORE_NORMALIZATION_SNORM)),
        pb.CreateGalleryRequest(name="bad-k-fixed", policy=policy(threshold=0.5, cohort_size=10)),
        pb.CreateGalleryRequest(name="bad-fpir", policy=policy(target_fpir=1.5)),
        pb.CreateGalleryRequest(name="bad-fpir0", policy=policy(target_fpir=0.0)),
        pb.CreateGalleryRequest(name="bad-k", policy=policy(target_fpir=0.01, cohort_size=1)),
        pb.CreateGalleryRequest(name="bad-k2", policy=policy(target_fpir=0.01, cohort_size=1001)),
        pb.CreateGalleryRequest(name="bad-norule", policy=policy(cohort_size=50)),
        pb.CreateGalleryRequest(name="bad-enum", policy=policy(target_fpir=0.01, normalization=7)),
        pb.CreateGalleryRequest(name="bad-agg-norule", policy=policy(aggregation=pb.TEMPLATE_AGGREGATION_MEAN)),
        pb.CreateGalleryRequest(name="bad-agg-enum", policy=policy(target_fpir=0.01, aggregation=7)),
        pb.CreateGalleryRequest(name="bad-agg-enum2", policy=policy(threshold=0.5, aggregation=-1)),
    ]
    for request in cases:
        code, details = status_of(stub.CreateGallery, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, (request, code, details)
    listed = {g.name for g in stub.ListGalleries(pb.ListGalleriesRequest()).galleries}
    assert not {r.name for r in cases} & listed  # none was created
    stub.CreateGallery(pb.CreateGalleryRequest(name="upd-bad"))
    bad_updates = (
        policy(),
        policy(normalization=pb.SCORE_NORMALIZATION_NONE),
        policy(aggregation=pb.TEMPLATE_AGGREGATION_NEAREST),
        policy(threshold=0.5, aggregation=3),
        policy(target_fpir=2.0),
        policy(threshold=float("nan")),
    )
    for bad in bad_updates:
        code, details = status_of(stub.UpdateGallery, pb.UpdateGalleryRequest(name="upd-bad", policy=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details, (bad, code, details)
    assert "rule" in status_of(stub.UpdateGallery, pb.UpdateGalleryRequest(name="upd-bad"))[1]
    code, details = status_of(stub.UpdateGallery, pb.UpdateGalleryRequest(name="nope", policy=policy(threshold=0.5)))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def unit(*values: float) -> np.ndarray:
    """A ``(DIM,)`` embedding with ``values`` first and zeros after."""
    vector = np.zeros(DIM, np.float32)
    vector[: len(values)] = values
    return vector


def test_template_aggregation_decides_which_distance_an_identity_has(stub):
    # ann has two templates, e0 and e1; bob one, e2. The probe (0.8, 0.6) is, by hand:
    #   to ann's nearest template e0:          sqrt(0.2^2 + 0.6^2)  = sqrt(0.4) ~ 0.632
    #   to ann's other template e1:            sqrt(0.8^2 + 0.4^2)  = sqrt(0.8) ~ 0.894
    #   to ann's mean template (0.5, 0.5):     sqrt(0.3^2 + 0.1^2)  = sqrt(0.1) ~ 0.316
    #   to bob (e2, his only template, so also his mean): sqrt(0.64 + 0.36 + 1) = sqrt(2)
    probe = pb.IdentifyEmbeddingRequest(gallery="agg", embedding=pb.Embedding(values=unit(0.8, 0.6).tolist()), top_k=2)
    mean = pb.DecisionPolicy(threshold=0.6, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    created = stub.CreateGallery(pb.CreateGalleryRequest(name="agg", policy=mean))
    assert created.policy.aggregation == pb.TEMPLATE_AGGREGATION_MEAN
    first, second = (
        stub.Enroll(pb.EnrollRequest(gallery="agg", identity_id="ann", embedding=pb.Embedding(values=unit(*e).tolist()))) for e in ((1.0,), (0.0, 1.0))
    )
    stub.Enroll(pb.EnrollRequest(gallery="agg", identity_id="bob", embedding=pb.Embedding(values=unit(0.0, 0.0, 1.0).tolist())))
    assert first.template_id < second.template_id

    by_mean = stub.IdentifyEmbedding(probe).result
    assert [m.identity_id for m in by_mean.matches] == ["ann", "bob"]
    assert by_mean.distance == pytest.approx(np.sqrt(0.1), abs=1e-6) and by_mean.identity_id == "ann"  # 0.316 <= 0.6: ann
    assert by_mean.matches[0].template_id == first.template_id  # the mean stands under ann's first template
    assert by_mean.matches[1].distance == pytest.approx(np.sqrt(2.0), abs=1e-6)

    nearest = stub.UpdateGallery(pb.UpdateGalleryRequest(name="agg", policy=pb.DecisionPolicy(threshold=0.6)))  # UNSPECIFIED: NEAREST
    assert nearest.policy == pb.DecisionPolicy(threshold=0.6, normalization=pb.SCORE_NORMALIZATION_NONE, aggregation=pb.TEMPLATE_AGGREGATION_NEAREST)
    by_nearest = stub.IdentifyEmbedding(probe).result
    assert by_nearest.distance == pytest.approx(np.sqrt(0.4), abs=1e-6) and not by_nearest.HasField("identity_id")  # 0.632 > 0.6: unknown
    assert by_nearest.matches[0].identity_id == "ann" and by_nearest.matches[0].template_id == first.template_id
    toward_second = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="agg", embedding=pb.Embedding(values=unit(0.0, 1.0).tolist()))).result
    assert toward_second.distance == pytest.approx(0.0, abs=1e-6) and toward_second.matches[0].template_id == second.template_id

    # a target FPIR with UNSPECIFIED aggregation searches mean templates again
    targeted = stub.UpdateGallery(pb.UpdateGalleryRequest(name="agg", policy=pb.DecisionPolicy(target_fpir=0.1)))
    assert targeted.policy.aggregation == pb.TEMPLATE_AGGREGATION_MEAN
    assert stub.IdentifyEmbedding(probe).result.distance == pytest.approx(np.sqrt(0.1), abs=1e-6)
    # the mean follows the identity's templates: without e1 ann's mean is e0
    stub.DeleteTemplate(pb.DeleteTemplateRequest(gallery="agg", template_id=second.template_id))
    assert stub.IdentifyEmbedding(probe).result.distance == pytest.approx(np.sqrt(0.4), abs=1e-6)


def test_update_gallery_changes_how_later_searches_decide(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="upd", threshold=0.5))
    stub.Enroll(pb.EnrollRequest(gallery="upd", identity_id="ann", image=shot(ANN)))
    probe = pb.IdentifyRequest(gallery="upd", image=shot(ANN, 60))  # L2 distance 0.2 * 60 / 255 ~ 0.047
    assert stub.Identify(probe).faces[0].identity_id == "ann"

    strict = stub.UpdateGallery(pb.UpdateGalleryRequest(name="upd", policy=pb.DecisionPolicy(threshold=0.01)))
    assert strict.policy.threshold == pytest.approx(0.01) and strict.threshold == pytest.approx(0.01) and strict.identity_count == 1
    [face] = stub.Identify(probe).faces
    assert not face.HasField("identity_id") and face.threshold == pytest.approx(0.01) and face.matches[0].identity_id == "ann"
    assert stub.UpdateGallery(pb.UpdateGalleryRequest(name="upd", policy=pb.DecisionPolicy(threshold=0.01))) == strict  # idempotent

    targeted = stub.UpdateGallery(pb.UpdateGalleryRequest(name="upd", policy=pb.DecisionPolicy(target_fpir=0.2, normalization=pb.SCORE_NORMALIZATION_NONE)))
    assert targeted.policy == pb.DecisionPolicy(target_fpir=0.2, normalization=pb.SCORE_NORMALIZATION_NONE, cohort_size=100, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    assert targeted.score_kind == pb.SCORE_KIND_DISTANCE and targeted.threshold == pytest.approx(0.6)  # no curve: the model's
    assert stub.GetGallery(pb.GetGalleryRequest(name="upd")) == targeted
    assert stub.Identify(probe).faces[0].identity_id == "ann"


def test_identify_carries_scores_on_the_gallery_scale_and_a_threshold_override_on_it(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="scores", threshold=0.6))
    for identity_id, person in (("ann", ANN), ("bob", BOB)):
        stub.Enroll(pb.EnrollRequest(gallery="scores", identity_id=identity_id, image=shot(person)))
    [known, unknown] = stub.Identify(pb.IdentifyRequest(gallery="scores", image=image(photo((*ANN, 120), (*CAT, 0))), top_k=2)).faces
    assert known.identity_id == "ann" and known.score_kind == pb.SCORE_KIND_DISTANCE
    assert known.score == known.distance == known.matches[0].score == known.matches[0].distance  # distance scale: score = distance
    assert [m.score for m in known.matches] == sorted(m.score for m in known.matches)
    # two people and no false-match curve: nothing to estimate an FPIR from
    assert not known.HasField("estimated_fpir") and not unknown.HasField("estimated_fpir")
    assert not unknown.HasField("identity_id") and unknown.score > 0.6 and unknown.matches[0].score == unknown.score
    # an override is on the score scale: any finite value, even a negative one, is a threshold
    [refused] = stub.Identify(pb.IdentifyRequest(gallery="scores", image=shot(ANN), threshold=-1.0)).faces
    assert not refused.HasField("identity_id") and refused.threshold == -1.0
    by_vector = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="scores", embedding=embedding(*BOB), threshold=-1.0))
    assert not by_vector.result.HasField("identity_id") and by_vector.result.score == pytest.approx(0.0, abs=1e-6)
    code, _ = status_of(stub.Identify, pb.IdentifyRequest(gallery="scores", image=shot(ANN), threshold=float("inf")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    stub.CreateGallery(pb.CreateGalleryRequest(name="scores-empty"))
    empty = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="scores-empty", embedding=embedding(*CAT))).result
    assert empty.matches == [] and not empty.HasField("score") and empty.HasField("estimated_fpir") and empty.estimated_fpir == 0.0  # nobody to be confused with


def test_find_duplicates_lists_pairs_the_policy_would_confuse(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="dups", threshold=0.6))
    assert list(stub.FindDuplicates(pb.FindDuplicatesRequest(gallery="dups")).pairs) == []  # empty gallery: none, not an error
    stub.Enroll(pb.EnrollRequest(gallery="dups", identity_id="ann", display_name="Ann", image=shot(ANN)))
    stub.Enroll(pb.EnrollRequest(gallery="dups", identity_id="ann-2", display_name="Ann again", image=shot(ANN, 100)))
    stub.Enroll(pb.EnrollRequest(gallery="dups", identity_id="bob", image=shot(BOB)))
    found = stub.FindDuplicates(pb.FindDuplicatesRequest(gallery="dups"))
    assert found.score_kind == pb.SCORE_KIND_DISTANCE and found.threshold == pytest.approx(0.6)
    [pair] = found.pairs
    names = {(pair.identity_a, pair.display_name_a), (pair.identity_b, pair.display_name_b)}
    assert names == {("ann", "Ann"), ("ann-2", "Ann again")}
    expected = float(np.linalg.norm(person_embedding(*ANN) - person_embedding(*ANN, 100)))
    assert pair.distance == pytest.approx(expected, abs=1e-5) and pair.score == pair.distance
    assert not pair.HasField("estimated_fpir")  # three people and no false-match curve: nothing to estimate from

    assert stub.FindDuplicates(pb.FindDuplicatesRequest(gallery="dups", max_pairs=1)).pairs == found.pairs
    for max_pairs in (-1, 10001):
        code, details = status_of(stub.FindDuplicates, pb.FindDuplicatesRequest(gallery="dups", max_pairs=max_pairs))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_pairs" in details
    code, details = status_of(stub.FindDuplicates, pb.FindDuplicatesRequest(gallery="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in details


def test_a_big_snorm_gallery_decides_on_snorm_scores(stub):
    # 301 people: enough for S-norm with the gallery as cohort and a leave-one-out estimate of FPIR 0.01
    people = {f"p{i}": (i % 250, i // 250 + 1) for i in range(300)}
    people["p0-again"] = (0, 1, 150)  # p0 enrolled a second time, 0.2 * 150 / 255 away
    stub.CreateGallery(pb.CreateGalleryRequest(name="big", policy=pb.DecisionPolicy(target_fpir=0.01, cohort_size=50)))
    import_people(stub, "big", people)

    gallery = stub.GetGallery(pb.GetGalleryRequest(name="big"))
    assert gallery.score_kind == pb.SCORE_KIND_SNORM and gallery.identity_count == 301
    assert gallery.estimated_fpir == pytest.approx(0.01, abs=0.005) and "leave-one-out" in gallery.threshold_basis
    assert gallery.threshold < 0  # S-norm: well below the cohort's typical score

    found = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="big", embedding=embedding(1, 1, 100), top_k=3)).result
    assert found.identity_id == "p1" and found.score_kind == pb.SCORE_KIND_SNORM and found.threshold == gallery.threshold
    assert found.score < gallery.threshold and found.score != pytest.approx(found.distance)
    assert [m.score for m in found.matches] == sorted(m.score for m in found.matches) and found.matches[0].score == found.score
    assert 0.0 < found.estimated_fpir < gallery.estimated_fpir
    stranger = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="big", embedding=embedding(251, 251))).result
    assert not stranger.HasField("identity_id") and stranger.score > gallery.threshold and stranger.estimated_fpir > gallery.estimated_fpir
    lenient = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="big", embedding=embedding(251, 251), threshold=stranger.score))
    assert lenient.result.identity_id == stranger.matches[0].identity_id  # the override is an S-norm score too

    duplicates = stub.FindDuplicates(pb.FindDuplicatesRequest(gallery="big"))
    assert duplicates.score_kind == pb.SCORE_KIND_SNORM and duplicates.threshold == gallery.threshold
    assert {duplicates.pairs[0].identity_a, duplicates.pairs[0].identity_b} == {"p0", "p0-again"}
    assert all(p.score <= duplicates.threshold for p in duplicates.pairs)
    assert [p.score for p in duplicates.pairs] == sorted(p.score for p in duplicates.pairs)


def test_estimates_from_the_models_false_match_curve(tmp_path):
    pipeline = FakePipeline()
    pipeline.manifest = dataclasses.replace(pipeline.manifest, false_match=CURVE)  # not part of the model id
    running = create_server(config(tmp_path), pipeline=pipeline)
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as ch:
            stub = pb_grpc.GalleryServiceStub(ch)
            for i in range(3):
                stub.Enroll(pb.EnrollRequest(identity_id=f"p{i}", embedding=embedding(40 * i + 5, 9)))
            gallery = stub.GetGallery(pb.GetGalleryRequest(name="default"))  # the default policy: target FPIR 0.01
            per_comparison = 1.0 - (1.0 - 0.01) ** (1 / 3)
            expected = float(np.interp(per_comparison, CURVE["rates"], CURVE["distances"]))
            assert gallery.score_kind == pb.SCORE_KIND_DISTANCE and gallery.threshold == pytest.approx(expected, rel=1e-4)
            assert gallery.estimated_fpir == pytest.approx(0.01, rel=1e-3) and "test pairs" in gallery.threshold_basis

            result = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(embedding=embedding(45, 9, 255))).result
            assert result.identity_id == "p1" and result.distance == pytest.approx(0.2, abs=0.01)
            assert result.estimated_fpir == pytest.approx(gallery_fpir(result.distance, 3), rel=1e-3)

            verified = stub.Verify(pb.VerifyRequest(identity_id="p1", image=shot((45, 9), 255)))
            assert verified.HasField("estimated_far") and verified.estimated_far == pytest.approx(curve_rate(verified.distance), rel=1e-3)
            compared = stub.Compare(pb.CompareRequest(image_a=shot(ANN), image_b=shot(ANN, 128)))
            assert compared.estimated_far == pytest.approx(curve_rate(compared.distance), rel=1e-3)
    finally:
        running.stop(1.0)


def test_identities_and_templates(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="people", threshold=0.5))
    for i in range(5):
        stub.Enroll(pb.EnrollRequest(gallery="people", identity_id=f"p{i}", embedding=pb.Embedding(values=person_embedding(i, 77).tolist())))
    seen, token = [], ""
    while True:
        page = stub.ListIdentities(pb.ListIdentitiesRequest(gallery="people", page_size=2, page_token=token))
        seen += [i.identity_id for i in page.identities]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"p{i}" for i in range(5)]
    updated = stub.UpdateIdentity(
        pb.UpdateIdentityRequest(gallery="people", identity=pb.Identity(identity_id="p1", display_name="Pat", metadata={"a": "b"}), update_mask=FieldMask(paths=["metadata"]))
    )
    assert (updated.display_name, dict(updated.metadata)) == ("", {"a": "b"})
    got = stub.GetIdentity(pb.GetIdentityRequest(gallery="people", identity_id="p1"))
    assert got.template_count == 1 and got.templates[0].identity_id == "p1" and got.create_time.seconds > 0
    assert stub.DeleteTemplate(pb.DeleteTemplateRequest(gallery="people", template_id=got.templates[0].template_id)).identity_deleted
    assert stub.GetGallery(pb.GetGalleryRequest(name="people")).identity_count == 4
    assert stub.DeleteGallery(pb.DeleteGalleryRequest(name="people")).deleted_templates == 4


def test_export_import_and_bulk_enroll(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="src"))
    requests = [
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="src", identity_id="ann", image=shot(ANN))),
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="src", identity_id="ann", image=image(b"not an image"))),
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="src", identity_id="bob", image=shot(BOB), metadata={"x": "1"})),
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="src", identity_id="", image=shot(CAT))),
    ]
    results = list(stub.BulkEnroll(iter(requests)))
    assert [(r.index, r.WhichOneof("result")) for r in results] == [(0, "response"), (1, "error"), (2, "response"), (3, "error")]
    assert results[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and results[1].error.message
    info = error_details_pb2.ErrorInfo()
    assert results[1].error.details[0].Unpack(info) and (info.reason, info.domain) == ("IMAGE_UNDECODABLE", "facegallery.v1")
    exported = list(stub.ExportGallery(pb.ExportGalleryRequest(gallery="src")))
    head, templates = exported[0].gallery, [m.template for m in exported[1:]]
    assert head.name == "src" and head.template_count == len(templates) == 2
    assert [t.identity_id for t in templates] == ["ann", "bob"] and dict(templates[1].metadata) == {"x": "1"}

    def stream(model_id):
        yield pb.ImportEmbeddingsRequest(header=pb.ImportEmbeddingsHeader(gallery="dst", model_id=model_id))
        for t in templates:
            yield pb.ImportEmbeddingsRequest(template=t)

    assert stub.ImportEmbeddings(stream(head.model_id)).imported == 2
    assert stub.ImportEmbeddings(stream(head.model_id)).skipped == 2
    copied = stub.GetIdentity(pb.GetIdentityRequest(gallery="dst", identity_id="bob"))
    assert dict(copied.metadata) == {"x": "1"} and copied.templates[0].source_sha256 == templates[1].source_sha256
    code, _ = status_of(stub.ImportEmbeddings, stream("f" * 64))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


def test_embeddings_carry_the_model_id_they_came_from(stub, server):
    own, other = server.manager.pipeline.model_id, FakePipeline("fake-b").model_id
    assert own != other
    stub.CreateGallery(pb.CreateGalleryRequest(name="models"))
    vector = pb.Embedding(values=person_embedding(*BOB).tolist())
    assert stub.Enroll(pb.EnrollRequest(gallery="models", identity_id="bob", embedding=vector)).identity_created  # unset: the server's
    assert stub.Enroll(pb.EnrollRequest(gallery="models", identity_id="bob", embedding=vector, model_id=own)).template_id > 0
    # an image is embedded by the server's own model: a model_id beside it plays no part
    assert stub.Enroll(pb.EnrollRequest(gallery="models", identity_id="ann", image=shot(ANN), model_id=other)).identity_created

    for call, request in [
        (stub.Enroll, pb.EnrollRequest(gallery="models", identity_id="bob", embedding=vector, model_id=other)),
        (stub.IdentifyEmbedding, pb.IdentifyEmbeddingRequest(gallery="models", embedding=vector, model_id=other)),
    ]:
        code, details = status_of(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (request, code, details)
        assert own[:12] in details and other[:12] in details, details
    [refused] = stub.BulkEnroll(iter([pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="models", identity_id="bob", embedding=vector, model_id=other))]))
    assert refused.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and other[:12] in refused.error.message

    assert stub.GetGallery(pb.GetGalleryRequest(name="models")).template_count == 3  # the refused ones stored nothing
    for model_id in ("", own):
        found = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="models", embedding=vector, model_id=model_id))
        assert found.result.identity_id == "bob" and found.result.distance == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Error statuses, each from a real bad input


def test_invalid_argument(stub):
    cases = [
        (stub.Enroll, pb.EnrollRequest(identity_id="x", image=image(b"\xff\xd8 truncated jpeg"))),
        (stub.Enroll, pb.EnrollRequest(identity_id="x", image=image(photo((0, 0, 0))))),  # no face
        (stub.Enroll, pb.EnrollRequest(identity_id="", image=shot(ANN))),
        (stub.Enroll, pb.EnrollRequest(identity_id="x" * 257, image=shot(ANN))),
        (stub.Enroll, pb.EnrollRequest(identity_id="x", embedding=pb.Embedding(values=[0.1] * (DIM - 1)))),
        (stub.Enroll, pb.EnrollRequest(identity_id="x", embedding=pb.Embedding(values=[float("nan")] * DIM))),
        (stub.Enroll, pb.EnrollRequest(identity_id="x")),  # neither image nor embedding
        (stub.Identify, pb.IdentifyRequest(image=shot(ANN), top_k=101)),
        (stub.Identify, pb.IdentifyRequest()),  # no image
        (stub.Verify, pb.VerifyRequest(identity_id="x", image=shot(ANN), threshold=-1.0)),
        (stub.Compare, pb.CompareRequest(image_a=shot(ANN), image_b=image(photo((0, 0, 0))))),
        (stub.CreateGallery, pb.CreateGalleryRequest(name="bad name!")),
        (stub.ListIdentities, pb.ListIdentitiesRequest(page_token="garbage")),
        (stub.UpdateIdentity, pb.UpdateIdentityRequest(identity=pb.Identity(identity_id="x"), update_mask=FieldMask(paths=["templates"]))),
    ]
    for call, request in cases:
        code, details = status_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (request, code, details)
        assert details
    assert "no face" in status_of(stub.Enroll, cases[1][1])[1]
    assert "128 values" in status_of(stub.Enroll, cases[4][1])[1]


def test_not_found(stub):
    stub.Enroll(pb.EnrollRequest(gallery="", identity_id="nf-ann", image=shot(ANN)))
    cases = [
        (stub.GetGallery, pb.GetGalleryRequest(name="nope")),
        (stub.Identify, pb.IdentifyRequest(gallery="nope", image=shot(ANN))),
        (stub.Verify, pb.VerifyRequest(identity_id="nobody", image=shot(ANN))),
        (stub.GetIdentity, pb.GetIdentityRequest(identity_id="nobody")),
        (stub.DeleteIdentity, pb.DeleteIdentityRequest(identity_id="nobody")),
        (stub.DeleteTemplate, pb.DeleteTemplateRequest(template_id=987654)),
        (stub.DeleteGallery, pb.DeleteGalleryRequest(name="nope")),
    ]
    for call, request in cases:
        code, details = status_of(call, request)
        assert code == grpc.StatusCode.NOT_FOUND and ("nope" in details or "nobody" in details or "987654" in details), details
    code, _ = status_of(lambda r: list(stub.ExportGallery(r)), pb.ExportGalleryRequest(gallery="nope"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_already_exists(stub):
    stub.CreateGallery(pb.CreateGalleryRequest(name="twice"))
    code, details = status_of(stub.CreateGallery, pb.CreateGalleryRequest(name="twice"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "twice" in details
    assert status_of(stub.CreateGallery, pb.CreateGalleryRequest(name="default"))[0] == grpc.StatusCode.ALREADY_EXISTS


def test_failed_precondition_several_faces(stub):
    request = pb.EnrollRequest(identity_id="group", image=image(photo((*ANN, 0), (*BOB, 0))), face_policy=pb.FACE_POLICY_REJECT_MULTIPLE)
    code, details = status_of(stub.Enroll, request)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "several faces" in details
    request.face_policy = pb.FACE_POLICY_LARGEST
    assert stub.Enroll(request).face.box.left == 0.0


def test_resource_exhausted(stub):
    big_image = noise_png(300)
    assert MAX_IMAGE < len(big_image) < MAX_MESSAGE
    code, details = status_of(stub.Embed, pb.EmbedRequest(image=image(big_image)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MAX_IMAGE) in details
    huge = noise_png(700)
    assert len(huge) > MAX_MESSAGE
    assert status_of(stub.Identify, pb.IdentifyRequest(image=image(huge)))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_internal_error_is_generic_and_logged(stub, caplog):
    with caplog.at_level(logging.ERROR, logger="facegallery.server.service.interceptors"):
        code, details = status_of(stub.Embed, pb.EmbedRequest(image=image(b"explode")))
    assert code == grpc.StatusCode.INTERNAL and details == INTERNAL_MESSAGE and "boom" not in details
    assert "ZeroDivisionError" in caplog.text and "/facegallery.v1.GalleryService/Embed" in caplog.text


def test_model_mismatch_after_restart_with_another_model(tmp_path):
    first_model, second_model = FakePipeline("fake-a").model_id, FakePipeline("fake-b").model_id
    first = create_server(config(tmp_path), pipeline=FakePipeline("fake-a"))
    with grpc.insecure_channel(f"localhost:{first.port}") as ch:
        pb_grpc.GalleryServiceStub(ch).Enroll(pb.EnrollRequest(identity_id="ann", image=shot(ANN)))
    first.stop(1.0)
    second = create_server(config(tmp_path), pipeline=FakePipeline("fake-b"))
    try:
        with grpc.insecure_channel(f"localhost:{second.port}") as ch:
            stub = pb_grpc.GalleryServiceStub(ch)
            for call, request in [
                (stub.Identify, pb.IdentifyRequest(image=shot(ANN))),
                (stub.Enroll, pb.EnrollRequest(identity_id="bob", image=shot(BOB))),
                (stub.Verify, pb.VerifyRequest(identity_id="ann", image=shot(ANN))),
            ]:
                code, details = status_of(call, request)
                assert code == grpc.StatusCode.FAILED_PRECONDITION and first_model[:12] in details and second_model[:12] in details, details
            # an embedding of the gallery's own model needs no pipeline: searching with it works
            vector = pb.Embedding(values=person_embedding(*ANN).tolist())
            found = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(embedding=vector, model_id=first_model))
            assert found.result.identity_id == "ann"
            code, details = status_of(stub.IdentifyEmbedding, pb.IdentifyEmbeddingRequest(embedding=vector))  # unset: the server's
            assert code == grpc.StatusCode.FAILED_PRECONDITION and first_model[:12] in details and second_model[:12] in details
            assert stub.GetGallery(pb.GetGalleryRequest(name="default")).template_count == 1
    finally:
        second.stop(1.0)


class SlowLoadingPipeline(FakePipeline):
    """Blocks the server's start-up (the manager reads ``manifest``) until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        super().__init__()
        self.release = release

    @property
    def manifest(self):
        self.release.wait(30)
        return self._manifest

    @manifest.setter
    def manifest(self, value):
        self._manifest = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_unavailable_and_not_serving_until_loaded(tmp_path):
    release = threading.Event()
    port = free_port()
    started = {}
    thread = threading.Thread(target=lambda: started.setdefault("server", create_server(config(tmp_path, port), pipeline=SlowLoadingPipeline(release))))
    thread.start()
    try:
        with grpc.insecure_channel(f"localhost:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), wait_for_ready=True, timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            code, details = status_of(pb_grpc.GalleryServiceStub(ch).GetServerInfo, pb.GetServerInfoRequest())
            assert code == grpc.StatusCode.UNAVAILABLE and "starting" in details
            release.set()
            thread.join(10)
            assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == health_pb2.HealthCheckResponse.SERVING
            assert pb_grpc.GalleryServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest()).model.embedding_dim == DIM
    finally:
        release.set()
        thread.join(10)
        if "server" in started:
            started["server"].stop(1.0)


def test_metadata_over_the_limits_is_invalid_argument_and_full_metadata_lists_in_pages(stub):
    from facegallery.server.gallery.validation import MAX_LIST_REPLY_BYTES, MAX_METADATA_KEYS, MAX_PAGE_SIZE

    stub.CreateGallery(pb.CreateGalleryRequest(name="bounded"))

    def full(i: int) -> dict[str, str]:  # every limit at once: 64 keys of 128 bytes, 16 KiB in all
        keys = [f"{i}-{j:02d}".ljust(128, "k") for j in range(MAX_METADATA_KEYS)]
        return dict(zip(keys, ["é" * 2048] * 2 + [""] * (MAX_METADATA_KEYS - 2), strict=True))

    over = {"big": "v" * 4097}
    code, message = status_of(stub.Enroll, pb.EnrollRequest(gallery="bounded", identity_id="x", metadata=over, embedding=embedding(1, 2)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "value of key 'big' must be at most 4096 bytes" in message
    code, message = status_of(stub.Enroll, pb.EnrollRequest(gallery="bounded", identity_id="x", display_name="n" * 257, image=shot(ANN)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "display_name must be at most 256 bytes" in message

    count = 120  # over two pages of such identities under the test server's 1 MiB message limit
    requests = (
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="bounded", identity_id=f"p{i:03d}", display_name="é" * 128, metadata=full(i), embedding=embedding(i, 5)))
        for i in range(count)
    )
    assert all(r.HasField("response") for r in stub.BulkEnroll(requests))
    (refused,) = stub.BulkEnroll(iter([pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="bounded", identity_id="p000", metadata={"x": ""}, embedding=embedding(1, 5)))]))
    assert refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "at most 64 keys" in refused.error.message  # merged with p000's 64
    identity = pb.Identity(identity_id="p001", metadata={"k\n": "v"})
    code, message = status_of(stub.UpdateIdentity, pb.UpdateIdentityRequest(gallery="bounded", identity=identity, update_mask=FieldMask(paths=["metadata"])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "control characters" in message

    seen, token = [], ""
    while True:
        page = stub.ListIdentities(pb.ListIdentitiesRequest(gallery="bounded", page_size=MAX_PAGE_SIZE, page_token=token))
        assert 0 < len(page.identities) < count and page.ByteSize() <= MAX_LIST_REPLY_BYTES < MAX_MESSAGE
        assert all(dict(r.metadata) == full(int(r.identity_id[1:])) for r in page.identities)
        seen += [r.identity_id for r in page.identities]
        if not (token := page.next_page_token):
            break
    assert seen == [f"p{i:03d}" for i in range(count)]
