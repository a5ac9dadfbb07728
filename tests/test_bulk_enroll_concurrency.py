"""BulkEnroll analyses several items of a stream at once and still answers in request order.

The servicer runs over a real GalleryManager on the fake pipeline (tests/fakes.py), called
directly (no transport) where the test needs control over timing, and through a real gRPC server
for the stream limits.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from facegallery.server.face.memory_budget import MemoryBudgetExhausted
from facegallery.server.gallery.manager import GalleryManager
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.server.service.servicer import GalleryServicer
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc
from fakes import ExplodingPipeline, FakePipeline, photo

WINDOW = 3


class GatedPipeline(ExplodingPipeline):
    """Counts analyses in flight; each waits for its image's event when one is registered."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[bytes, threading.Event] = {}
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0

    def analyze(self, image, **kwargs):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            gate = self.gates.get(image)
            if gate is not None:
                assert gate.wait(5), "gate never opened"
            return super().analyze(image, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


class Context:
    """The part of a ServicerContext the servicer reads: no API key (no authentication)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


@pytest.fixture
def servicer(tmp_path):
    manager = GalleryManager.open(tmp_path, GatedPipeline(), snapshot_interval_s=None)
    manager.create_gallery("g")
    yield GalleryServicer(manager, bulk_enroll_window=WINDOW)
    manager.close()


def item(identity_id: str, data: bytes) -> pb.BulkEnrollRequest:
    return pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="g", identity_id=identity_id, image=pb.Image(data=data)))


def person(i: int) -> bytes:
    return photo((20 + 10 * i, 200 - 10 * i, 0))


def test_results_come_in_request_order_while_items_are_analysed_at_once(servicer):
    pipeline = servicer.manager.pipeline
    first = person(0)
    pipeline.gates[first] = gate = threading.Event()  # the first item finishes its analysis last
    threading.Timer(0.3, gate.set).start()
    results = list(servicer._bulk_enroll(iter([item(f"p{i}", person(i)) for i in range(6)]), Context()))
    assert [r.index for r in results] == list(range(6)) and all(r.HasField("response") for r in results)
    assert pipeline.most_running > 1  # items were analysed concurrently
    # enrolled one by one in request order: template ids and identity order follow the stream
    assert [r.response.template_id for r in results] == sorted(r.response.template_id for r in results)
    assert [i.identity_id for i in servicer.manager.list_identities("g").identities] == [f"p{i}" for i in range(6)]


def test_one_identity_is_created_once_and_duplicate_checks_see_earlier_items(servicer):
    same = photo((90, 90, 0))
    results = list(servicer._bulk_enroll(iter([item("ann", same), item("ann", photo((90, 90, 5))), item("bob", same)]), Context()))
    assert [r.response.identity_created for r in results] == [True, False, True]
    assert results[2].response.possible_duplicate.identity_id == "ann"  # bob's photo is ann's, enrolled two items before


def test_a_failing_item_fails_alone(servicer):
    stream = [item("a", person(1)), item("b", b"not an image"), item("", person(2)), item("c", b"explode"), item("d", person(3))]
    stream.insert(3, pb.BulkEnrollRequest(request=pb.EnrollRequest(gallery="g", identity_id="e", image=pb.Image(data=person(4), kind=99))))
    results = list(servicer._bulk_enroll(iter(stream), Context()))
    assert [r.index for r in results] == list(range(6))
    assert [r.WhichOneof("result") for r in results] == ["response", "error", "error", "error", "error", "response"]
    codes = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL]
    assert [r.error.code for r in results[1:5]] == [c.value[0] for c in codes]


def test_items_in_flight_are_bounded_by_the_window(servicer):
    pipeline = servicer.manager.pipeline
    gate = threading.Event()
    images = [person(i) for i in range(10)]
    for data in images:
        pipeline.gates[data] = gate
    read = []

    def messages():
        for i, data in enumerate(images):
            read.append(i)
            yield item(f"p{i}", data)

    results = []
    consumer = threading.Thread(target=lambda: results.extend(servicer._bulk_enroll(messages(), Context())))
    consumer.start()
    time.sleep(0.3)  # every analysis is held: the stream stops reading at the window
    assert len(read) == WINDOW and pipeline.most_running == WINDOW
    gate.set()
    consumer.join(5)
    assert [r.index for r in results] == list(range(10)) and all(r.HasField("response") for r in results)
    assert pipeline.most_running <= WINDOW + 1  # the window, plus the in-order enrollment re-analysing a faked image


def test_results_flow_to_a_client_that_waits_for_each_before_sending_more(servicer):
    answered = threading.Semaphore(0)

    def lock_step():
        for i in range(4):
            if i:
                assert answered.acquire(timeout=5), "the result of the previous item never came"
            yield item(f"p{i}", person(i))

    indexes = []
    for response in servicer._bulk_enroll(lock_step(), Context()):
        indexes.append(response.index)
        answered.release()
    assert indexes == [0, 1, 2, 3]


def test_an_item_refused_by_the_memory_budget_is_analysed_again_alone(servicer, monkeypatch):
    pipeline = servicer.manager.pipeline
    refused = person(5)
    calls = []
    analyze = pipeline.analyze

    def budgeted(image, **kwargs):
        calls.append(image)
        if image == refused and calls.count(image) == 1:  # the ahead analysis: the budget is held
            raise MemoryBudgetExhausted("held by the stream's other items")
        return analyze(image, **kwargs)

    monkeypatch.setattr(pipeline, "analyze", budgeted)
    results = list(servicer._bulk_enroll(iter([item("a", person(1)), item("b", refused), item("c", person(2))]), Context()))
    assert all(r.HasField("response") for r in results) and calls.count(refused) == 2


def test_the_stream_limits_still_apply(tmp_path):
    config = ServerConfig(data_dir=tmp_path, port=0, snapshot_interval_s=None, grace_s=1.0, max_streams_per_client=1, stream_idle_s=0.5)
    running = create_server(config, pipeline=FakePipeline())
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            stub = pb_grpc.GalleryServiceStub(channel)
            release = threading.Event()

            def open_stream():
                yield pb.BulkEnrollRequest(request=pb.EnrollRequest(identity_id="a", image=pb.Image(data=person(1))))
                release.wait(5)

            first = stub.BulkEnroll(open_stream(), timeout=10)
            assert next(first).HasField("response")
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.BulkEnroll(iter([pb.BulkEnrollRequest(request=pb.EnrollRequest(identity_id="b", image=pb.Image(data=person(2))))]), timeout=10))
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as idle:  # the first stream sends nothing more: ended after 0.5 s
                list(first)
            assert idle.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            release.set()
    finally:
        running.stop(1.0)
