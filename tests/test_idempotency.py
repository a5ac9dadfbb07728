"""Enroll's idempotency key (EnrollRequest.request_id): a retry returns the first reply and adds
no template; the key with another request is FAILED_PRECONDITION (REQUEST_ID_REUSED); keys are
per gallery, survive a restart, are forgotten with their template and after 24 hours."""

from __future__ import annotations

import threading

import grpc
import pytest
from fakes import FakePipeline, person_embedding, photo

from facegallery.client import EnrollItem, FailedPrecondition, GalleryClient, InvalidArgument
from facegallery.server.gallery import store as store_module
from facegallery.server.gallery.manager import STORE_FILE
from facegallery.server.gallery.store import REQUEST_ID_RETENTION_S, IdempotentRequest, NewTemplate, SqliteTemplateStore
from facegallery.server.service.app import ServerConfig, create_server

BOB, ANN = (10, 200, 0), (200, 10, 0)


def _start(data_dir):
    config = ServerConfig(data_dir=data_dir, host="localhost", port=0, max_workers=8, snapshot_interval_s=None, grace_s=1.0)
    return create_server(config, pipeline=FakePipeline())


@pytest.fixture()
def server(tmp_path):
    running = _start(tmp_path)
    yield running
    running.stop(1.0)


@pytest.fixture()
def client(server):
    with GalleryClient(f"localhost:{server.port}", timeout=10.0) as c:
        yield c


def test_a_retried_enroll_returns_the_first_reply_and_stores_one_template(client):
    first = client.enroll("bob", photo(BOB), display_name="Bob", request_id="req-1")
    again = client.enroll("bob", photo(BOB), display_name="Bob", request_id="req-1")
    assert (again.template_id, again.identity_created, again.source_sha256) == (first.template_id, True, first.source_sha256)
    assert list(again.face.box) == list(first.face.box)
    assert client.get_gallery().template_count == 1
    other = client.enroll("bob", photo(BOB), display_name="Bob", request_id="req-2")  # a new key: a new template
    assert other.template_id != first.template_id and not other.identity_created
    assert client.get_gallery().template_count == 2


def test_the_first_reply_keeps_its_possible_duplicate(client):
    client.enroll("bob", embedding=person_embedding(*BOB))
    first = client.enroll("robert", embedding=person_embedding(*BOB), request_id="dup")
    assert first.possible_duplicate is not None and first.possible_duplicate.identity_id == "bob"
    client.delete_identity("bob")
    again = client.enroll("robert", embedding=person_embedding(*BOB), request_id="dup")
    assert again.possible_duplicate == first.possible_duplicate and again.template_id == first.template_id


def test_the_same_key_with_another_request_is_refused(client):
    client.enroll("bob", embedding=person_embedding(*BOB), request_id="k")
    for changed in (
        {"identity_id": "ann", "embedding": person_embedding(*BOB)},
        {"identity_id": "bob", "embedding": person_embedding(*ANN)},
        {"identity_id": "bob", "embedding": person_embedding(*BOB), "metadata": {"site": "b"}},
    ):
        with pytest.raises(FailedPrecondition) as info:
            client.enroll(request_id="k", **changed)
        assert info.value.reason == "REQUEST_ID_REUSED" and "'k'" in str(info.value)
    assert client.get_gallery().template_count == 1


def test_keys_are_per_gallery(client):
    client.create_gallery("other")
    a = client.enroll("bob", embedding=person_embedding(*BOB), request_id="same")
    b = client.enroll("bob", embedding=person_embedding(*BOB), request_id="same", gallery="other")
    assert a.template_id != b.template_id and b.identity_created


@pytest.mark.parametrize("bad", ["has space", "x" * 129, "é"])
def test_a_malformed_key_is_invalid_argument(client, bad):
    with pytest.raises(InvalidArgument) as info:
        client.enroll("bob", embedding=person_embedding(*BOB), request_id=bad)
    assert [v.field for v in info.value.field_violations] == ["request_id"]


def test_concurrent_retries_store_one_template(client):
    replies, errors = [], []

    def call():
        try:
            replies.append(client.enroll("ann", photo(ANN), request_id="race"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({r.template_id for r in replies}) == 1 and client.get_gallery().template_count == 1
    assert sum(r.identity_created for r in replies) == 6  # every reply is the first one's


def test_a_deleted_template_forgets_its_key(client):
    first = client.enroll("bob", embedding=person_embedding(*BOB), request_id="gone")
    client.delete_template(first.template_id)
    again = client.enroll("bob", embedding=person_embedding(*BOB), request_id="gone")
    assert again.template_id != first.template_id and again.identity_created


def test_bulk_enroll_items_are_idempotent_too(client):
    items = [EnrollItem("bob", embedding=person_embedding(*BOB), request_id="bulk-0"), EnrollItem("ann", photo(ANN), request_id="bulk-1")]
    first = [i.result.template_id for i in client.bulk_enroll(items)]
    again = [i.result.template_id for i in client.bulk_enroll(items)]
    assert first == again and client.get_gallery().template_count == 2


def test_keys_survive_a_restart(tmp_path):
    running = _start(tmp_path)
    try:
        with GalleryClient(f"localhost:{running.port}", timeout=10.0) as c:
            first = c.enroll("bob", embedding=person_embedding(*BOB), request_id="durable")
    finally:
        running.stop(1.0)
    running = _start(tmp_path)
    try:
        with GalleryClient(f"localhost:{running.port}", timeout=10.0) as c:
            assert c.enroll("bob", embedding=person_embedding(*BOB), request_id="durable").template_id == first.template_id
            assert c.get_gallery().template_count == 1
    finally:
        running.stop(1.0)


def test_keys_are_forgotten_after_the_retention_period(tmp_path, monkeypatch):
    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    try:
        store.create_gallery("g", model_id="m" * 64, threshold=0.6, metric="euclidean", embedding_dim=3)
        item = NewTemplate("bob", person_embedding(*BOB)[:3].copy())
        store.add_templates("g", [item], request=IdempotentRequest("old", "f1"))
        assert store.remembered_enroll("g", "old").fingerprint == "f1"
        now = store_module.time.time()
        monkeypatch.setattr(store_module.time, "time", lambda: now + REQUEST_ID_RETENTION_S + 1)
        assert store.remembered_enroll("g", "old") is None  # past retention: unknown, even before pruning
        store.add_templates("g", [item], request=IdempotentRequest("new", "f2"))  # prunes the old row
        with store._read() as conn:
            assert [r[0] for r in conn.execute("SELECT request_id FROM enroll_requests")] == ["new"]
    finally:
        store.close()


def test_the_raw_api_replays_with_the_same_template_id(server):
    from facegallery.v1 import gallery_service_pb2 as pb
    from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        request = pb.EnrollRequest(identity_id="ann", image=pb.Image(data=photo(ANN)), request_id="raw")
        assert stub.Enroll(request) == stub.Enroll(request)
