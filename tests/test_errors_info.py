"""Rich error statuses: every error carries a google.rpc.ErrorInfo with a stable reason (and a
google.rpc.BadRequest for bad fields), on the wire and on the Python client's exceptions."""

from __future__ import annotations

import re
import threading

import grpc
import pytest
from fakes import DIM, ExplodingPipeline, person_embedding, photo
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facegallery.client import EnrollItem, FieldViolation, GalleryClient, InvalidArgument, NotFound
from facegallery.server.contract import errors
from facegallery.server.contract.errors import ERROR_DOMAIN
from facegallery.server.face.memory_budget import MemoryBudgetExhausted
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.server.service.interceptors import ReadinessInterceptor
from facegallery.server.service.status import INTERNAL_MESSAGE
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

ANN, BOB = (200, 10), (10, 200)
MAX_IMAGE = 200_000




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("errinfo"), host="localhost", port=0, max_workers=8, max_message_bytes=1 << 20, snapshot_interval_s=None, grace_s=1.0)
    running = create_server(config, pipeline=ExplodingPipeline(max_image_bytes=MAX_IMAGE))
    yield running
    running.stop(1.0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        stub.CreateGallery(pb.CreateGalleryRequest(name="known"))
        stub.Enroll(pb.EnrollRequest(gallery="known", identity_id="ann", image=pb.Image(data=photo((*ANN, 0)))))
        yield stub


def rich(call, *args, **kwargs):
    """(code, ErrorInfo, {field: description}) of a failing call."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    error = caught.value
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} {error.details()!r} carries no google.rpc.Status"
    assert status.code == error.code().value[0] and status.message == error.details()
    info, violations = None, {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update((v.field, v.description) for v in bad.field_violations)
    assert info is not None and info.domain == ERROR_DOMAIN
    return error.code(), info, violations


def vector(n=DIM):
    return pb.Embedding(values=person_embedding(*BOB).tolist()[:n])


def image(data: bytes) -> pb.Image:
    return pb.Image(data=data)


# ---------------------------------------------------------------------------------------------


def test_identify_in_a_gallery_that_does_not_exist_is_gallery_not_found(stub):
    code, info, _ = rich(stub.Identify, pb.IdentifyRequest(gallery="nope", image=image(photo((*ANN, 0)))))
    assert (code, info.reason, info.metadata["gallery"]) == (grpc.StatusCode.NOT_FOUND, "GALLERY_NOT_FOUND", "nope")
    assert re.fullmatch(r"[0-9a-f]{32}", info.metadata["request_id"])  # made by the server: the client sent none


def test_enroll_without_a_face_is_no_face(stub):
    code, info, _ = rich(stub.Enroll, pb.EnrollRequest(gallery="known", identity_id="x", image=image(photo((0, 0, 0)))))
    assert (code, info.reason, info.metadata["gallery"]) == (grpc.StatusCode.INVALID_ARGUMENT, "NO_FACE", "known")


def test_bad_top_k_names_the_field_in_a_bad_request(stub):
    code, info, violations = rich(stub.Identify, pb.IdentifyRequest(gallery="known", image=image(photo((*ANN, 0))), top_k=1000))
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert list(violations) == ["top_k"] and "top_k" in violations["top_k"]


def test_undecodable_image_is_image_undecodable(stub):
    code, info, violations = rich(stub.Embed, pb.EmbedRequest(image=image(b"not an image at all")))
    assert (code, info.reason, violations) == (grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_UNDECODABLE", {})


@pytest.mark.parametrize(
    ("method", "request_", "code", "reason", "field"),
    [
        ("GetIdentity", pb.GetIdentityRequest(gallery="known", identity_id="ghost"), grpc.StatusCode.NOT_FOUND, "IDENTITY_NOT_FOUND", None),
        ("DeleteTemplate", pb.DeleteTemplateRequest(gallery="known", template_id=987654), grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND", None),
        ("GetGallery", pb.GetGalleryRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "GALLERY_NOT_FOUND", None),
        ("CreateGallery", pb.CreateGalleryRequest(name="known"), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS", None),
        ("CreateGallery", pb.CreateGalleryRequest(name="bad name!"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "name"),
        ("Enroll", pb.EnrollRequest(gallery="known", identity_id="", image=image(photo((*ANN, 1)))), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "identity_id"),
        ("Enroll", pb.EnrollRequest(gallery="known", identity_id="x", embedding=vector(3)), grpc.StatusCode.INVALID_ARGUMENT, "EMBEDDING_SHAPE", "embedding"),
        ("ListIdentities", pb.ListIdentitiesRequest(gallery="known", page_size=10**6), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "page_size"),
        ("Identify", pb.IdentifyRequest(gallery="known", image=image(photo((*ANN, 0))), threshold=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "threshold"),
        (
            "Enroll",
            pb.EnrollRequest(gallery="known", identity_id="x", image=image(photo((*ANN, 2), (*BOB, 2))), face_policy=pb.FACE_POLICY_REJECT_MULTIPLE),
            grpc.StatusCode.FAILED_PRECONDITION,
            "MULTIPLE_FACES",
            None,
        ),
        ("IdentifyEmbedding", pb.IdentifyEmbeddingRequest(gallery="known", embedding=vector(), model_id="f" * 64), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_MISMATCH", None),
        ("Embed", pb.EmbedRequest(image=image(b"\x89PNG" + bytes(MAX_IMAGE))), grpc.StatusCode.RESOURCE_EXHAUSTED, "IMAGE_TOO_LARGE", None),
        ("Embed", pb.EmbedRequest(image=image(b"explode")), grpc.StatusCode.INTERNAL, "INTERNAL", None),
    ],
)
def test_every_error_status_carries_its_reason(stub, method, request_, code, reason, field):
    got_code, info, violations = rich(getattr(stub, method), request_)
    assert (got_code, info.reason) == (code, reason)
    assert list(violations) == ([field] if field else [])


def test_internal_errors_keep_their_generic_message(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(image=image(b"explode")))
    assert caught.value.details() == INTERNAL_MESSAGE and "boom" not in str(rpc_status.from_call(caught.value))


def test_model_mismatch_names_both_models(stub):
    _, info, _ = rich(stub.IdentifyEmbedding, pb.IdentifyEmbeddingRequest(gallery="known", embedding=vector(), model_id="f" * 64))
    assert info.metadata["gallery"] == "known" and info.metadata["other_model_id"] == "f" * 64 and len(info.metadata["gallery_model_id"]) == 64


def test_streaming_calls_carry_reasons_too(stub):
    _, info, _ = rich(lambda r: list(stub.ExportGallery(r)), pb.ExportGalleryRequest(gallery="nope"))
    assert info.reason == "GALLERY_NOT_FOUND"


def test_the_client_exceptions_expose_reason_metadata_and_field_violations(server):
    with GalleryClient(f"localhost:{server.port}", timeout=10.0) as client:
        with pytest.raises(NotFound) as missing:
            client.identify(photo((*ANN, 0)), gallery="nope")
        assert (missing.value.reason, missing.value.domain, missing.value.metadata["gallery"]) == ("GALLERY_NOT_FOUND", ERROR_DOMAIN, "nope")
        assert missing.value.metadata["request_id"] == missing.value.request_id
        assert missing.value.field_violations == ()
        with pytest.raises(InvalidArgument) as no_face:
            client.enroll("x", photo((0, 0, 0)), gallery="known")
        assert no_face.value.reason == "NO_FACE"
        with pytest.raises(InvalidArgument) as bad:
            client.identify(photo((*ANN, 0)), gallery="known", top_k=1000)
        assert bad.value.reason == "INVALID_ARGUMENT"
        assert [v.field for v in bad.value.field_violations] == ["top_k"] and isinstance(bad.value.field_violations[0], FieldViolation)
        assert str(bad.value).startswith("INVALID_ARGUMENT: ")  # unchanged rendering


def _reasons(status) -> list[str]:
    """The ErrorInfo reasons in a google.rpc.Status's details."""
    reasons = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reasons.append(info.reason)
    return reasons


def test_bulk_enroll_items_carry_the_status_enroll_would_have_had(stub, server):
    requests = [
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="known", identity_id="bulk-ok", image=image(photo((*BOB, 3))))),
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="known", identity_id="bulk-no-face", image=image(photo((0, 0, 0))))),
        pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="nope", identity_id="bulk-x", image=image(photo((*BOB, 3))))),
    ]
    results = list(stub.BulkEnroll(iter(requests)))
    assert results[0].WhichOneof("result") == "response" and results[0].response.identity_id == "bulk-ok"
    failed = [(r.error.code, _reasons(r.error)) for r in results[1:]]
    assert failed == [(grpc.StatusCode.INVALID_ARGUMENT.value[0], ["NO_FACE"]), (grpc.StatusCode.NOT_FOUND.value[0], ["GALLERY_NOT_FOUND"])]
    info = error_details_pb2.ErrorInfo()
    assert results[2].error.details[0].Unpack(info) and info.metadata["gallery"] == "nope"  # the item's own request
    with GalleryClient(f"localhost:{server.port}", timeout=10.0) as client:
        items = list(client.bulk_enroll([EnrollItem("bulk-ok2", photo((*BOB, 4))), EnrollItem("bulk-nf", photo((0, 0, 0)))], gallery="known"))
    assert [(i.ok, i.reason) for i in items] == [(True, None), (False, "NO_FACE")]


def test_not_ready_is_unavailable_with_reason_not_ready():
    ready = threading.Event()

    class Servicer(pb_grpc.GalleryServiceServicer):
        pass

    from concurrent import futures

    srv = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[ReadinessInterceptor(ready, "/facegallery.v1.GalleryService/")])
    pb_grpc.add_GalleryServiceServicer_to_server(Servicer(), srv)
    port = srv.add_insecure_port("localhost:0")
    srv.start()
    try:
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            code, info, _ = rich(pb_grpc.GalleryServiceStub(channel).GetServerInfo, pb.GetServerInfoRequest())
        assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "NOT_READY")
    finally:
        srv.stop(None)


def _error_classes():
    seen, todo = [], [errors.FaceGalleryError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_every_error_class_has_a_stable_upper_snake_reason():
    classes = set(_error_classes()) | {MemoryBudgetExhausted}
    for cls in classes:
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", cls.reason), cls
    # a subclass that means something more specific says so in its reason
    specific = [c for c in classes if c.__module__ in (errors.__name__, MemoryBudgetExhausted.__module__) and c.__bases__[0] not in (Exception, errors.FaceGalleryError)]
    for cls in specific:
        assert cls.reason != cls.__bases__[0].reason, cls
    assert errors.InvalidInput("x", field="top_k").field == "top_k"
    assert errors.GalleryNotFound("x", metadata={"gallery": 1}).metadata == {"gallery": "1"}
