"""The real gRPC server on a free port with the fake pipeline: every RPC and every error status."""

from __future__ import annotations

import io
import logging
import socket
import threading

import grpc
import numpy as np
import pytest
from fakes import DIM, FakePipeline, person_embedding, photo
from google.protobuf.field_mask_pb2 import FieldMask
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


class ExplodingPipeline(FakePipeline):
    """Fails with a programming error (not a FaceGalleryError) on one particular image."""

    def analyze(self, image, **kwargs):
        if image == b"explode":
            raise ZeroDivisionError("boom")
        return super().analyze(image, **kwargs)


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
    assert strict.faces[0].identity_id == "" and strict.faces[0].threshold == pytest.approx(0.01)
    assert stub.Identify(pb.IdentifyRequest(gallery="wire", image=image(photo((0, 0, 0))))).faces == []
    by_vector = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="wire", embedding=pb.Embedding(values=person_embedding(*BOB).tolist())))
    assert by_vector.result.identity_id == "bob" and by_vector.result.distance == pytest.approx(0.0, abs=1e-6)
    assert not by_vector.result.HasField("face")
    empty = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="default", embedding=pb.Embedding(values=person_embedding(*BOB).tolist())))
    assert empty.result.matches == [] and empty.result.distance == float("inf")

    verdict = stub.Verify(pb.VerifyRequest(gallery="wire", identity_id="ann", image=shot(ANN, 60)))
    expected = np.linalg.norm(person_embedding(*ANN, 60) - person_embedding(*ANN))
    assert verdict.is_match and verdict.distance == pytest.approx(expected, abs=1e-5) and not verdict.HasField("probability_same")
    compared = stub.Compare(pb.CompareRequest(image_a=shot(ANN), image_b=shot(BOB)))
    assert not compared.is_match and compared.distance == pytest.approx(np.linalg.norm(person_embedding(*ANN) - person_embedding(*BOB)), abs=1e-5)
    embedded = stub.Embed(pb.EmbedRequest(image=image(photo((*ANN, 0), (*BOB, 0))), max_faces=1))
    assert len(embedded.faces) == 1 and embedded.model_id == found.model_id == stub.GetServerInfo(pb.GetServerInfoRequest()).model.model_id
    np.testing.assert_allclose(embedded.faces[0].embedding.values, person_embedding(*ANN), atol=1e-7)


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
    assert [(r.index, grpc.StatusCode.OK.value[0] == r.code) for r in results] == [(0, True), (1, False), (2, True), (3, False)]
    assert results[1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and results[1].message
    exported = list(stub.ExportGallery(pb.ExportGalleryRequest(gallery="src")))
    head, templates = exported[0].gallery, [m.template for m in exported[1:]]
    assert head.name == "src" and head.template_count == len(templates) == 2
    assert [t.identity_id for t in templates] == ["ann", "bob"] and dict(templates[1].metadata) == {"x": "1"}

    def stream(model_id):
        yield pb.ImportEmbeddingsRequest(gallery="dst", model_id=model_id)
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
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and other[:12] in refused.message

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
