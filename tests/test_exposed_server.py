"""Issue 9, "How it is checked": a service that can be exposed, tested against a real
``facegallery serve`` process (server_process.py) with the default dlib model and real photos.

One server per module, as an operator would run it: mutual TLS (pki.py), API keys made beforehand
with ``facegallery keys create --data-dir`` and a Prometheus endpoint (``--metrics-port``).
Galleries ``a`` and ``b`` each hold Barack Obama, enrolled from ``obama.jpg``; probes are his
``obama_small.jpg`` (a different photo) and, for a photo without a face, scikit-image's
``page.png``.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from pki import Pki
from server_process import ServerProcess, create_keys, free_port, revoke_key, serve
from test_metrics import scrape, value  # GET /metrics through prometheus_client's text parser; one sample

from facegallery.client import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

#: name -> (role, galleries) of the keys made before the server starts.
KEYS = {
    "ops": ("admin", ()),
    "door": ("read", ()),
    "a-writer": ("write", ("a",)),
    "temp": ("read", ()),  # revoked by test_a_revoked_key_is_refused_within_one_second
}
#: The stage histograms issue 9 asks for.
STAGES = ("decode", "detect", "landmarks", "align", "embed", "search", "decision")


@dataclass(frozen=True)
class Exposed:
    """The module's server and what the tests need to reach it."""

    server: ServerProcess
    data_dir: Path
    keys: dict[str, str]  # key name (KEYS) -> key
    probe: Path  # a photo of the enrolled person, not the enrollment photo
    no_face: Path


@pytest.fixture(scope="module")
def exposed(tmp_path_factory, model_dir: Path, shared_dir: Path):
    """An mTLS server with metrics on a data directory holding KEYS; galleries a and b hold Obama."""
    base = tmp_path_factory.mktemp("exposed")
    obama = shared_dir / "faces" / "face_recognition" / "barack_obama"
    data_dir = base / "data"
    keys = create_keys(data_dir, KEYS)
    with serve(data_dir, model_dir, base / "server.log", pki=Pki(base), mtls=True, metrics_port=free_port()) as server:
        with server.client(keys["ops"], timeout=60) as admin:
            for gallery in ("a", "b"):
                admin.create_gallery(gallery)
                admin.enroll("obama", obama / "obama.jpg", gallery=gallery)
        yield Exposed(server, data_dir, keys, obama / "obama_small.jpg", shared_dir / "faces" / "_noface" / "skimage" / "page.png")


def _connects(address: str, credentials: grpc.ChannelCredentials | None, timeout: float = 10.0) -> bool:
    """Whether a channel with these credentials gets to READY (TCP connected and, for TLS, the
    handshake done) rather than TRANSIENT_FAILURE; no call is made."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    settled: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    final = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    channel.subscribe(lambda state: settled.put(state) if state in final else None, try_to_connect=True)
    try:
        return settled.get(timeout=timeout) is grpc.ChannelConnectivity.READY
    except queue.Empty:
        raise AssertionError(f"the channel to {address} neither connected nor failed in {timeout} s") from None
    finally:
        channel.close()


def _server_info_code(address: str, credentials: grpc.ChannelCredentials | None, key: str) -> grpc.StatusCode:
    """Status of one raw GetServerInfo call with a valid API key (5 s deadline, no retries)."""
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    try:
        pb_grpc.GalleryServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_no_key_or_a_wrong_key_is_unauthenticated(exposed: Exposed):
    """With keys in the store, a call without a key, or with a made-up one, is UNAUTHENTICATED."""
    for key in (None, "fg_" + "x" * 43, exposed.keys["door"][:-2] + "zz"):
        with exposed.server.client(key) as client, pytest.raises(Unauthenticated) as info:
            client.identify(exposed.probe, gallery="a")
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), key


def test_a_read_key_can_identify_but_not_enroll(exposed: Exposed):
    """A read key identifies (a different photo of the enrolled person is found), and its
    Enroll is PERMISSION_DENIED: authenticated, but its role is too low, and nothing is added."""
    with exposed.server.client(exposed.keys["door"], timeout=60) as reader:
        (face,) = reader.identify(exposed.probe, gallery="a")
        assert face.identity_id == "obama" and face.distance < 0.6
        with pytest.raises(PermissionDenied) as info:
            reader.enroll("obama", exposed.probe, gallery="a")
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        assert reader.get_gallery("a").template_count == 1


def test_a_key_for_gallery_a_gets_not_found_for_gallery_b(exposed: Exposed):
    """A key limited to gallery a works there; gallery b, which exists, answers it exactly as a
    gallery that does not exist (NOT_FOUND, GALLERY_NOT_FOUND), and is not listed."""
    with exposed.server.client(exposed.keys["a-writer"], timeout=60) as client:
        assert client.identify(exposed.probe, gallery="a")[0].identity_id == "obama"
        errors = {}
        for gallery in ("b", "no-such-gallery"):
            with pytest.raises(NotFound) as info:
                client.identify(exposed.probe, gallery=gallery)
            errors[gallery] = info.value
        hidden, missing = errors["b"], errors["no-such-gallery"]
        assert (hidden.code, hidden.reason) == (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "GALLERY_NOT_FOUND")
        assert hidden.message == missing.message.replace("no-such-gallery", "b")
        assert [g.name for g in client.list_galleries()] == ["a"]


def test_a_revoked_key_is_refused_within_one_second(exposed: Exposed):
    """``facegallery keys revoke`` on the data directory of the running server: the key, which
    worked (and was cached) just before, is UNAUTHENTICATED within one second of the command's end."""
    with exposed.server.client(exposed.keys["temp"], timeout=10) as client:
        assert client.server_info().version  # verified, so the server holds it in its cache
        revoke_key(exposed.data_dir, "temp")
        revoked_at = time.monotonic()
        while True:
            try:
                client.server_info()
            except Unauthenticated:
                refused_after = time.monotonic() - revoked_at
                break
            assert time.monotonic() - revoked_at < 2.0, "the revoked key still works after 2 s"
            time.sleep(0.02)
    assert refused_after <= 1.0, f"refused only {refused_after:.2f} s after the revocation"


def test_mtls_without_a_client_certificate_fails_at_the_handshake(exposed: Exposed):
    """Under mTLS a client that trusts the server but has no certificate, or one from another CA,
    never gets a connection (the channel fails instead of becoming READY), so even a valid admin
    key gets UNAVAILABLE; with the CA-signed client certificate the channel is READY, the call OK."""
    pki, address, key = exposed.server.pki, exposed.server.address, exposed.keys["ops"]
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    rogue = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.rogue_key, certificate_chain=pki.rogue_cert)
    signed = grpc.ssl_channel_credentials(root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)
    for refused in (no_cert, rogue):
        assert not _connects(address, refused)
        assert _server_info_code(address, refused, key) is grpc.StatusCode.UNAVAILABLE
    assert _connects(address, signed)
    assert _server_info_code(address, signed, key) is grpc.StatusCode.OK


def test_a_plaintext_client_cannot_talk_to_a_tls_server(exposed: Exposed):
    """A plaintext channel to the TLS port fails instead of becoming READY, and a call, even with
    a valid admin key, is UNAVAILABLE."""
    assert not _connects(exposed.server.address, None)
    assert _server_info_code(exposed.server.address, None, exposed.keys["ops"]) is grpc.StatusCode.UNAVAILABLE


def test_metrics_count_exactly_the_calls_made(exposed: Exposed):
    """Two Identify calls, an Enroll of a photo without a face (INVALID_ARGUMENT, NO_FACE) and a
    call without a key move the call counters (and the auth failures, by reason) by exactly those
    amounts and nothing else, and the stage histograms gain observations for the stages the calls
    went through."""
    server = exposed.server
    before = scrape(server.metrics_port)
    with server.client(exposed.keys["ops"], timeout=60) as admin, server.client(None) as anonymous:
        for _ in range(2):
            assert admin.identify(exposed.probe, gallery="a")[0].identity_id == "obama"
        with pytest.raises(InvalidArgument) as info:
            admin.enroll("nobody", exposed.no_face, gallery="a")
        assert info.value.reason == "NO_FACE"
        with pytest.raises(Unauthenticated):
            anonymous.list_galleries()
    after = scrape(server.metrics_port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    calls = {
        ("Identify", "OK"): 2,
        ("Enroll", "INVALID_ARGUMENT"): 1,
        ("ListGalleries", "UNAUTHENTICATED"): 1,
    }
    for (method, code), n in calls.items():
        assert moved("facegallery_rpc_requests_total", method=method, code=code) == n, (method, code)
    series = {labels for name, labels in after.keys() | before.keys() if name == "facegallery_rpc_requests_total"}
    assert sum(moved("facegallery_rpc_requests_total", **dict(labels)) for labels in series) == sum(calls.values())
    assert moved("facegallery_rpc_duration_seconds_count", method="Identify") == 2
    assert moved("facegallery_rpc_duration_seconds_count", method="Enroll") == 1
    assert moved("facegallery_rpc_duration_seconds_count", method="ListGalleries") == 1
    failures = {reason: moved("facegallery_auth_failures_total", reason=reason) for reason in ("missing_key", "invalid_key", "permission_denied")}
    assert failures == {"missing_key": 1, "invalid_key": 0, "permission_denied": 0}

    # Each of the three image calls decodes and detects; each Identify finds a face, so it also
    # runs landmarks, align, embed, search and decision; the faceless Enroll stops after detection.
    observations = {stage: moved("facegallery_stage_duration_seconds_count", stage=stage) for stage in STAGES}
    assert observations == {"decode": 3, "detect": 3, "landmarks": 2, "align": 2, "embed": 2, "search": 2, "decision": 2}, observations
    assert all(moved("facegallery_stage_duration_seconds_sum", stage=stage) > 0 for stage in STAGES)
    assert moved("facegallery_faces_per_image_count") == 2 and moved("facegallery_faces_per_image_sum") == 2
    assert value(after, "facegallery_gallery_templates", gallery="a") == 1  # the failed Enroll stored nothing
