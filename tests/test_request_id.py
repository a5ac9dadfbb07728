"""Request ids (server/service/logs.py, interceptors.py, status.py, client/_exceptions.py): the
client's ``x-request-id`` or one the server makes, in the trailers of every call, in every error's
ErrorInfo, on the Python client's exceptions, and on the call's log lines (JSON and text)."""

from __future__ import annotations

import io
import json
import logging
import re

import grpc
import pytest
from fakes import FakePipeline, photo
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facegallery.client import GalleryClient, NotFound
from facegallery.client._exceptions import from_rpc_error
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.server.service.logs import MAX_REQUEST_ID_CHARS, current_request_id, log_handler, request_id_from, request_scope
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("request-id"), host="localhost", port=0, max_workers=4, snapshot_interval_s=None, grace_s=1.0)
    running = create_server(config, pipeline=FakePipeline())
    yield running
    running.stop(1.0)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        yield pb_grpc.GalleryServiceStub(channel)


@pytest.fixture
def json_lines():
    """The JSON log lines of the ``facegallery`` loggers (DEBUG and up) while the test runs, parsed."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    logger = logging.getLogger("facegallery")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def failing_call(call, request, request_id: str | None = None, *, streaming: bool = False) -> tuple[grpc.RpcError, dict[str, str]]:
    """The RpcError of a failing call (a response stream fails when read) and its ErrorInfo metadata."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call(request, metadata=None if request_id is None else [("x-request-id", request_id)], timeout=10)
        if streaming:
            list(result)
    status = rpc_status.from_call(caught.value)
    (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return caught.value, dict(info.metadata)


def trailer(call: grpc.Call) -> str | None:
    return dict(call.trailing_metadata()).get("x-request-id")


def test_an_error_carries_the_clients_request_id(stub):
    error, info = failing_call(stub.GetGallery, pb.GetGalleryRequest(name="nope"), "door-7/2025-01-01T12:00:00.123Z")
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert info == {"gallery": "nope", "request_id": "door-7/2025-01-01T12:00:00.123Z"}
    assert trailer(error) == "door-7/2025-01-01T12:00:00.123Z"
    assert from_rpc_error(error).request_id == "door-7/2025-01-01T12:00:00.123Z"


def test_a_streamed_error_carries_it_too(stub):
    error, info = failing_call(stub.ExportGallery, pb.ExportGalleryRequest(gallery="nope"), "export-1", streaming=True)
    assert (error.code(), info["request_id"], trailer(error)) == (grpc.StatusCode.NOT_FOUND, "export-1", "export-1")


def test_the_server_makes_one_when_none_is_given(stub):
    first, info = failing_call(stub.GetGallery, pb.GetGalleryRequest(name="nope"))
    second, _ = failing_call(stub.GetGallery, pb.GetGalleryRequest(name="nope"))
    assert GENERATED.fullmatch(info["request_id"]) and trailer(first) == info["request_id"]
    assert trailer(second) != info["request_id"]


@pytest.mark.parametrize("bad", ["", "x" * (MAX_REQUEST_ID_CHARS + 1)], ids=["empty", "too-long"])
def test_an_unacceptable_one_is_replaced(stub, bad):
    _, info = failing_call(stub.GetGallery, pb.GetGalleryRequest(name="nope"), bad)
    assert GENERATED.fullmatch(info["request_id"])


def test_request_id_from_accepts_printable_ascii_up_to_128_characters():
    assert request_id_from([("x-request-id", "a b~!")]) == "a b~!"
    assert request_id_from([("other", "x"), ("x-request-id", "y" * 128)]) == "y" * 128
    for bad in ("tab\there", "caf\u00e9", "y" * 129, "", b"bytes"):
        assert GENERATED.fullmatch(request_id_from([("x-request-id", bad)])), bad
    assert GENERATED.fullmatch(request_id_from(None))


def test_a_successful_call_returns_it_in_the_trailers(stub):
    _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), metadata=[("x-request-id", "info-1")], timeout=10)
    assert trailer(call) == "info-1"
    _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=10)
    assert GENERATED.fullmatch(trailer(call))


def test_the_python_client_exposes_it(server):
    with GalleryClient(f"localhost:{server.port}", timeout=10.0) as client:
        with pytest.raises(NotFound) as missing:
            client.identify(photo((200, 10, 0)), gallery="nope")
    assert GENERATED.fullmatch(missing.value.request_id)
    assert missing.value.metadata["request_id"] == missing.value.request_id


def test_the_calls_json_log_lines_carry_it(stub, json_lines):
    failing_call(stub.GetGallery, pb.GetGalleryRequest(name="nope"), "log-me-1")
    stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=[("x-request-id", "log-me-2")], timeout=10)
    lines = json_lines()
    (access,) = [line for line in lines if line.get("rpc") == "GetGallery"]
    assert access["request_id"] == "log-me-1" and access["code"] == "NOT_FOUND" and access["level"] == "INFO"
    assert access["logger"] == "facegallery.access" and access["message"].startswith("GetGallery NOT_FOUND ")
    assert access["duration_s"] >= 0 and access["peer"].startswith(("ipv4:", "ipv6:")) and "time" in access
    inside = [line for line in lines if line.get("logger") == "facegallery.server.service.status"]
    assert inside and all(line["request_id"] == "log-me-1" for line in inside)  # logged during the call
    (ok,) = [line for line in lines if line.get("rpc") == "GetServerInfo"]
    assert (ok["request_id"], ok["code"], ok["level"]) == ("log-me-2", "OK", "DEBUG")


def test_text_lines_carry_it_during_a_call_only():
    stream = io.StringIO()
    logger = logging.getLogger("facegallery.test_request_id")
    logger.addHandler(handler := log_handler("text", stream))
    logger.setLevel(logging.INFO)
    try:
        with request_scope("abc"):
            assert current_request_id() == "abc"
            logger.info("inside")
        assert current_request_id() is None
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = stream.getvalue().splitlines()
    assert inside.endswith("INFO facegallery.test_request_id: inside [request_id=abc]")
    assert outside.endswith("INFO facegallery.test_request_id: outside")
