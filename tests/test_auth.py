"""API keys (server/gallery/keys.py, server/service/auth.py, `facegallery keys`) against the real
in-process server: UNAUTHENTICATED, PERMISSION_DENIED, gallery scoping as NOT_FOUND, revocation
on a running server within a second, health and reflection open, only a hash in the store."""

from __future__ import annotations

import json
import time

import grpc
import pytest
from click.testing import CliRunner
from fakes import FakePipeline, person_embedding, photo
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from facegallery.client import EnrollItem, GalleryClient, NotFound, PermissionDenied, Unauthenticated
from facegallery.client._models import ExportedTemplate
from facegallery.client.cli import main
from facegallery.server.contract.errors import AlreadyExists, InvalidInput, KeyNotFound
from facegallery.server.gallery.keys import Role, create_key, key_id_of, revoke_key, verify_key
from facegallery.server.gallery.manager import STORE_FILE
from facegallery.server.gallery.store import SCHEMA_VERSION, SqliteTemplateStore
from facegallery.server.service.app import InsecureAddressError, ServerConfig, _check_keys, create_server
from facegallery.server.service.auth import AuthInterceptor
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

ANN = (200, 10, 0)


def _config(data_dir):
    return ServerConfig(data_dir=data_dir, host="localhost", port=0, max_workers=4, snapshot_interval_s=None, grace_s=0.5)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server whose store holds keys made before it started: admin, read, write limited to gallery a."""
    data_dir = tmp_path_factory.mktemp("auth")
    store = SqliteTemplateStore(data_dir / STORE_FILE)
    keys = {}
    for name, role, galleries in (("admin", "admin", ()), ("reader", "read", ()), ("a-writer", "write", ("a",))):
        keys[name] = create_key(store, name, role, galleries, now=time.time())[1]
    store.close()
    running = create_server(_config(data_dir), pipeline=FakePipeline())
    address = f"localhost:{running.port}"
    with GalleryClient(address, api_key=keys["admin"], timeout=10) as admin:
        for gallery in ("a", "b"):
            admin.create_gallery(gallery)
            admin.enroll("ann", photo(ANN), gallery=gallery)
    yield running, address, keys, data_dir
    running.stop(0.5)


def _raw_status(address: str, key: str | None, method: str, request):
    metadata = None if key is None else [("authorization", f"Bearer {key}")]
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            getattr(pb_grpc.GalleryServiceStub(channel), method)(request, metadata=metadata, timeout=10)
    error = info.value
    status = rpc_status.from_call(error)
    reason = None
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            found = error_details_pb2.ErrorInfo()
            if detail.Unpack(found):
                reason = found.reason
    return error.code(), error.details(), reason


def test_no_key_or_a_wrong_key_is_unauthenticated(keyed):
    _, address, keys, _ = keyed
    request = pb.IdentifyRequest(gallery="a", image=pb.Image(data=photo(ANN)))
    for key in (None, "fg_" + "x" * 43, keys["reader"][:-2] + "zz", "not-a-key"):
        code, _, reason = _raw_status(address, key, "Identify", request)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"), key
    with GalleryClient(address, timeout=10) as client, pytest.raises(Unauthenticated) as info:
        client.list_galleries()
    assert info.value.reason == "UNAUTHENTICATED"


def test_health_and_reflection_stay_open_without_a_key(keyed):
    _, address, _, _ = keyed
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for s in next(answers).list_services_response.service}
    assert "facegallery.v1.GalleryService" in names


def test_a_read_key_can_identify_but_not_enroll(keyed):
    _, address, keys, _ = keyed
    with GalleryClient(address, api_key=keys["reader"], timeout=10) as client:
        (face,) = client.identify(photo(ANN), gallery="a")
        assert face.identity_id == "ann"
        assert {g.name for g in client.list_galleries()} >= {"a", "b"}
        with pytest.raises(PermissionDenied) as info:
            client.enroll("bob", photo((10, 200, 0)), gallery="a")
        assert not isinstance(info.value, Unauthenticated)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
        with pytest.raises(PermissionDenied):
            list(client.export_gallery(gallery="a"))  # admin only (a response stream)
        with pytest.raises(PermissionDenied):
            client.create_gallery("c")


def test_a_key_for_gallery_a_sees_nothing_of_gallery_b(keyed):
    _, address, keys, _ = keyed
    request = pb.IdentifyRequest(gallery="b", image=pb.Image(data=photo(ANN)))
    scoped = _raw_status(address, keys["a-writer"], "Identify", request)
    missing = _raw_status(address, keys["admin"], "Identify", pb.IdentifyRequest(gallery="nope", image=pb.Image(data=photo(ANN))))
    assert scoped[0] is missing[0] is grpc.StatusCode.NOT_FOUND
    assert scoped[2] == missing[2] == "GALLERY_NOT_FOUND"
    assert scoped[1] == missing[1].replace("nope", "b")  # the message of a missing gallery
    with GalleryClient(address, api_key=keys["a-writer"], timeout=10) as client:
        assert [g.name for g in client.list_galleries()] == ["a"]
        assert client.identify(photo(ANN), gallery="a")[0].identity_id == "ann"
        client.enroll("bob", photo((10, 200, 0)), gallery="a")  # write
        for call in (
            lambda: client.get_gallery("b"),
            lambda: client.identify(photo(ANN), gallery="b"),
            lambda: client.get_identity("ann", gallery="b"),
            lambda: client.enroll("bob", photo((10, 200, 0)), gallery="b"),
            lambda: client.identify(photo(ANN)),  # "default" is another gallery too
        ):
            with pytest.raises(NotFound) as info:
                call()
            assert info.value.reason == "GALLERY_NOT_FOUND"
        # streams: each BulkEnroll item is checked (as if its gallery were missing), ImportEmbeddings as it arrives
        assert all(r.ok for r in client.bulk_enroll([EnrollItem("cat", photo((120, 120, 0)))], gallery="a"))
        results = list(client.bulk_enroll([EnrollItem("dan", photo((60, 30, 0))), EnrollItem("eve", photo((30, 60, 0)))], gallery="b"))
        assert [(r.ok, r.code, r.reason) for r in results] == [(False, grpc.StatusCode.NOT_FOUND, "GALLERY_NOT_FOUND")] * 2
        template = ExportedTemplate(identity_id="eve", display_name="", metadata={}, embedding=person_embedding(5, 6), template_id=0)
        model_id = client.server_info().model.model_id
        with pytest.raises(NotFound) as info:
            client.import_embeddings([template], model_id=model_id, gallery="b")
        assert info.value.reason == "GALLERY_NOT_FOUND"
        assert client.import_embeddings([template], model_id=model_id, gallery="a").imported == 1


def test_a_key_revoked_in_the_store_is_refused_within_a_second(keyed):
    _, address, _, data_dir = keyed
    runner = CliRunner()
    made = runner.invoke(main, ["keys", "create", "--data-dir", str(data_dir), "--name", "temp", "--role", "read", "--json"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)["key"]
    with GalleryClient(address, api_key=key, timeout=10) as client:
        assert client.list_galleries()
        revoked = runner.invoke(main, ["keys", "revoke", "--data-dir", str(data_dir), "temp"])
        assert revoked.exit_code == 0, revoked.output
        started = time.monotonic()
        time.sleep(1.05)
        with pytest.raises(Unauthenticated):
            client.list_galleries()
        assert time.monotonic() - started < 2.0
    listed = [json.loads(line) for line in runner.invoke(main, ["keys", "list", "--data-dir", str(data_dir), "--json"]).output.splitlines()]
    temp = next(k for k in listed if k["name"] == "temp")
    assert temp["revoked"] is not None and "key" not in temp


def test_the_cli_sends_the_api_key(keyed, monkeypatch):
    _, address, keys, _ = keyed
    runner = CliRunner()
    refused = runner.invoke(main, ["galleries", "--server", address, "--json"])
    assert refused.exit_code == 1
    ok = runner.invoke(main, ["galleries", "--server", address, "--json", "--api-key", keys["a-writer"]])
    assert ok.exit_code == 0, ok.output
    assert [json.loads(line)["name"] for line in ok.output.splitlines()] == ["a"]
    monkeypatch.setenv("FACEGALLERY_API_KEY", keys["reader"])
    assert runner.invoke(main, ["galleries", "--server", address, "--json"]).exit_code == 0


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "create", "--data-dir", str(tmp_path), "--name", "ops", "--role", "write", "--gallery", "a", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    key = printed["key"]
    assert printed["name"] == "ops" and key.startswith("fg_") and result.output.count(key) == 1
    listed = runner.invoke(main, ["keys", "list", "--data-dir", str(tmp_path), "--json"])
    assert key not in listed.output and key[3:] not in listed.output
    assert json.loads(listed.output)["role"] == "write" and json.loads(listed.output)["galleries"] == ["a"]
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(STORE_FILE))
    assert key.encode() not in stored and key[3:].encode() not in stored
    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    try:
        record = verify_key(store, key)
        assert record is not None and (record.name, record.role, record.galleries) == ("ops", Role.WRITE, ("a",))
        assert verify_key(store, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    finally:
        store.close()
    again = runner.invoke(main, ["keys", "create", "--data-dir", str(tmp_path), "--name", "ops", "--role", "read"])
    assert again.exit_code == 1 and "already exists" in again.output


def test_key_records_roles_and_revocation(tmp_path):
    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    try:
        assert not store.has_api_keys()
        record, key = create_key(store, "k", "admin", ["x", "x", "y"], now=1.0)
        assert record.galleries == ("x", "y") and record.allows("y") and not record.allows("z")
        assert key_id_of(key) == record.key_id and len(record.key_id) == 8
        assert Role.READ < Role.WRITE < Role.ADMIN
        with pytest.raises(AlreadyExists):
            create_key(store, "k", "read", now=2.0)
        with pytest.raises(InvalidInput):
            create_key(store, "bad name", "read", now=2.0)
        with pytest.raises(InvalidInput):
            create_key(store, "k2", "root", now=2.0)
        assert revoke_key(store, "k", now=3.0).revoked == 3.0
        assert revoke_key(store, "k", now=4.0).revoked == 3.0  # idempotent
        assert verify_key(store, key) is None
        assert store.has_api_keys()  # revoked keys still lock the API
        with pytest.raises(KeyNotFound):
            revoke_key(store, "nope", now=5.0)
    finally:
        store.close()


def test_verifications_are_cached_for_the_ttl_only(tmp_path):
    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    try:
        _, key = create_key(store, "k", "read", now=1.0)
        now = [0.0]
        auth = AuthInterceptor("/x/", store, ttl_s=1.0, clock=lambda: now[0])
        assert auth.enabled() and auth.verify(key) is not None
        revoke_key(store, "k", now=2.0)
        now[0] = 0.5
        assert auth.verify(key) is not None  # cached
        now[0] = 1.01
        assert auth.verify(key) is None
    finally:
        store.close()


def test_a_non_loopback_host_needs_keys_unless_insecure(tmp_path):
    exposed = ServerConfig(data_dir=tmp_path, host="0.0.0.0", port=0)
    with pytest.raises(InsecureAddressError, match="without API keys"):
        _check_keys(exposed, False)
    _check_keys(exposed, True)
    _check_keys(ServerConfig(data_dir=tmp_path, host="0.0.0.0", port=0, insecure=True), False)
    _check_keys(ServerConfig(data_dir=tmp_path, host="localhost", port=0), False)


def test_a_migrated_version_2_store_gets_the_keys_table(tmp_path):
    import sqlite3

    path = tmp_path / STORE_FILE
    SqliteTemplateStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE api_keys")
        conn.execute("PRAGMA user_version=2")
    store = SqliteTemplateStore(path)
    try:
        assert not store.has_api_keys()
        create_key(store, "k", "read", now=1.0)
        assert [r.name for r in store.list_api_keys()] == ["k"]
    finally:
        store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_keys_through_a_running_server_need_an_unlimited_admin_key(keyed):
    _, address, keys, _ = keyed
    runner = CliRunner()
    base = ["--server", address, "--api-key", keys["admin"]]
    made = runner.invoke(main, ["keys", "create", *base, "--name", "via-rpc", "--role", "write", "--gallery", "b", "--json"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.output)["key"]
    with GalleryClient(address, api_key=key, timeout=10) as client:
        assert [g.name for g in client.list_galleries()] == ["b"]
        with pytest.raises(PermissionDenied):
            client.list_keys()  # write
    listed = [json.loads(line) for line in runner.invoke(main, ["keys", "list", *base, "--json"]).output.splitlines()]
    row = next(k for k in listed if k["name"] == "via-rpc")
    assert (row["role"], row["galleries"], row["revoked"]) == ("write", ["b"], None) and key not in json.dumps(listed)
    for other in ("reader", "a-writer"):
        refused = runner.invoke(main, ["keys", "list", "--server", address, "--api-key", keys[other]])
        assert refused.exit_code == 1
    with GalleryClient(address, api_key=keys["admin"], timeout=10) as admin:
        record, scoped_admin = admin.create_key("a-admin", "admin", galleries=["a"])
        assert record.role == "admin" and record.active
        with GalleryClient(address, api_key=scoped_admin, timeout=10) as limited, pytest.raises(PermissionDenied):
            limited.create_key("escalate", "admin")  # it could mint a key for every gallery
        with pytest.raises(NotFound) as info:
            admin.revoke_key("nope")
        assert info.value.reason == "KEY_NOT_FOUND"
    revoked = runner.invoke(main, ["keys", "revoke", *base, "via-rpc", "--json"])
    assert revoked.exit_code == 0 and json.loads(revoked.output)["name"] == "via-rpc" and json.loads(revoked.output)["revoked"] > 0
    time.sleep(1.05)
    with GalleryClient(address, api_key=key, timeout=10) as client, pytest.raises(Unauthenticated):
        client.list_galleries()
