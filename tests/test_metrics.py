"""Prometheus metrics (service/metrics.py) and the timing sink (contract/timing.py).

The server test builds a gRPC server with the interceptors in the order the real one uses
(metrics outermost, then readiness, then errors) around the real manager and servicer with the
fake pipeline, makes a known sequence of calls, scrapes ``/metrics`` over HTTP and checks that
the counters moved by exactly those amounts.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from fakes import FakePipeline, person_embedding, photo
from prometheus_client.parser import text_string_to_metric_families

from facegallery.server.contract import timing
from facegallery.server.face.batching import BatchingEmbedder
from facegallery.server.gallery.manager import GalleryManager
from facegallery.server.service.app import SERVICE_NAME
from facegallery.server.service.interceptors import ErrorInterceptor, ReadinessInterceptor
from facegallery.server.service.metrics import STAGES, ServerMetrics, start_metrics
from facegallery.server.service.servicer import GalleryServicer
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

PREFIX = f"/{SERVICE_NAME}/"


# -- contract/timing.py ------------------------------------------------------------------------


class ListSink:
    def __init__(self) -> None:
        self.observed: list[tuple[str, float]] = []
        self.recorded: list[tuple[str, float]] = []

    def observe(self, stage, seconds):
        self.observed.append((stage, seconds))

    def record(self, name, value):
        self.recorded.append((name, value))


@pytest.fixture
def sink():
    sink = ListSink()
    previous = timing.set_sink(sink)
    yield sink
    timing.set_sink(previous)


def test_timing_is_a_no_op_without_a_sink():
    previous = timing.set_sink(None)
    try:
        timing.observe("detect", 1.0)
        timing.record("batch_size", 3)
        with timing.timed("detect"):
            pass
        assert timing.get_sink() is None
    finally:
        timing.set_sink(previous)


def test_timing_sends_observations_and_values_to_the_sink(sink):
    timing.observe("detect", 0.5)
    timing.record("batch_size", 4)
    with timing.timed("embed"):
        time.sleep(0.01)
    with pytest.raises(ZeroDivisionError), timing.timed("align"):
        1 / 0  # noqa: B018  (a failing block is still timed)
    assert sink.observed[0] == ("detect", 0.5)
    assert [s for s, _ in sink.observed] == ["detect", "embed", "align"]
    assert sink.observed[1][1] >= 0.01
    assert sink.recorded == [("batch_size", 4)]


def test_a_failing_sink_never_fails_the_caller():
    class Broken:
        def observe(self, stage, seconds):
            raise RuntimeError("sink down")

        def record(self, name, value):
            raise RuntimeError("sink down")

    previous = timing.set_sink(Broken())
    try:
        timing.observe("detect", 1.0)
        timing.record("batch_size", 1)
        with timing.timed("decode"):
            pass
    finally:
        timing.set_sink(previous)


def test_the_batcher_reports_batch_sizes_and_queue_waits(sink):
    class Embedder:
        def embed(self, chips):
            return np.zeros((len(chips), 4), np.float32)

    with BatchingEmbedder(Embedder(), max_batch_size=8, max_delay_ms=50) as batcher:
        threads = [threading.Thread(target=batcher.embed, args=(np.zeros((2, 3, 3, 3), np.uint8),)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    sizes = [v for n, v in sink.recorded if n == "batch_size"]
    waits = [v for n, v in sink.recorded if n == "batch_queue_wait_seconds"]
    assert sum(sizes) == 6 and all(1 <= s <= 8 for s in sizes)
    assert len(waits) == 3 and all(w >= 0 for w in waits)


# -- the server --------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def served(tmp_path):
    metrics = start_metrics(0)
    ready = threading.Event()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[metrics.interceptor(PREFIX), ReadinessInterceptor(ready, PREFIX), ErrorInterceptor(PREFIX)],
    )
    servicer = GalleryServicer(None)  # type: ignore[arg-type]
    pb_grpc.add_GalleryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    manager = GalleryManager.open(tmp_path, FakePipeline(), snapshot_interval_s=None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.GalleryServiceStub(channel)
    try:
        with pytest.raises(grpc.RpcError) as starting:  # before `ready`: UNAVAILABLE, counted too
            stub.ListGalleries(pb.ListGalleriesRequest())
        assert starting.value.code() is grpc.StatusCode.UNAVAILABLE
        servicer.manager = manager
        metrics.attach(manager)
        ready.set()
        yield stub, metrics, manager
    finally:
        channel.close()
        server.stop(None).wait()
        metrics.stop()
        manager.close()


def embedding(*color: int) -> pb.Embedding:
    return pb.Embedding(values=person_embedding(*color).tolist())


def test_scraped_counters_move_by_exactly_the_calls_made(served):
    stub, metrics, manager = served
    before = scrape(metrics.port)
    assert value(before, "facegallery_rpc_requests_total", method="ListGalleries", code="UNAVAILABLE") == 1

    stub.CreateGallery(pb.CreateGalleryRequest(name="g"))
    stub.Enroll(pb.EnrollRequest(gallery="g", identity_id="ann", embedding=embedding(200, 10)))
    stub.Enroll(pb.EnrollRequest(gallery="g", identity_id="bob", embedding=embedding(10, 200)))
    for _ in range(3):
        stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(gallery="g", embedding=embedding(200, 10)))
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetGallery(pb.GetGalleryRequest(name="nope"))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    identified = stub.Identify(pb.IdentifyRequest(gallery="g", image=pb.Image(data=photo((200, 10, 0), (10, 200, 0)))))
    assert len(identified.faces) == 2
    assert len(list(stub.ExportGallery(pb.ExportGalleryRequest(gallery="g")))) > 0  # a response stream
    with pytest.raises(grpc.RpcError) as missing_stream:
        list(stub.ExportGallery(pb.ExportGalleryRequest(gallery="nope")))
    assert missing_stream.value.code() is grpc.StatusCode.NOT_FOUND
    written = manager.snapshot()  # "g" and the default gallery
    assert written >= 1

    after = scrape(metrics.port)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("facegallery_rpc_requests_total", method="CreateGallery", code="OK") == 1
    assert moved("facegallery_rpc_requests_total", method="Enroll", code="OK") == 2
    assert moved("facegallery_rpc_requests_total", method="IdentifyEmbedding", code="OK") == 3
    assert moved("facegallery_rpc_requests_total", method="GetGallery", code="NOT_FOUND") == 1
    assert moved("facegallery_rpc_requests_total", method="GetGallery", code="OK") == 0
    assert moved("facegallery_rpc_requests_total", method="Identify", code="OK") == 1
    assert moved("facegallery_rpc_requests_total", method="ExportGallery", code="OK") == 1
    assert moved("facegallery_rpc_requests_total", method="ExportGallery", code="NOT_FOUND") == 1
    assert moved("facegallery_rpc_requests_total", method="ListGalleries", code="UNAVAILABLE") == 0
    total = sum(v for (name, _), v in after.items() if name == "facegallery_rpc_requests_total")
    assert total == 1 + 1 + 2 + 3 + 1 + 1 + 2

    assert moved("facegallery_rpc_duration_seconds_count", method="IdentifyEmbedding") == 3
    assert moved("facegallery_rpc_duration_seconds_count", method="GetGallery") == 1
    assert moved("facegallery_rpc_duration_seconds_sum", method="IdentifyEmbedding") > 0
    # a gallery search per Enroll (its duplicate check), IdentifyEmbedding and Identify; a
    # decision per IdentifyEmbedding and Identify
    assert moved("facegallery_stage_duration_seconds_count", stage="search") == 2 + 3 + 1
    assert moved("facegallery_stage_duration_seconds_count", stage="decision") == 4
    assert moved("facegallery_stage_duration_seconds_sum", stage="search") > 0
    for stage in STAGES:  # every stage series is exported from the start
        assert ("facegallery_stage_duration_seconds_count", (("stage", stage),)) in after
    assert moved("facegallery_faces_per_image_count") == 1
    assert moved("facegallery_faces_per_image_sum") == 2
    assert moved("facegallery_snapshot_duration_seconds_count") == written

    assert value(after, "facegallery_gallery_templates", gallery="g") == 2
    assert value(after, "facegallery_gallery_identities", gallery="g") == 2
    assert 0 <= value(after, "facegallery_snapshot_age_seconds", gallery="g") < 60
    assert value(after, "process_cpu_seconds_total") > 0


def test_metrics_servers_have_their_own_registries():
    a, b = start_metrics(0), start_metrics(0)
    try:
        a.requests.labels("Enroll", "OK").inc()
        assert value(scrape(a.port), "facegallery_rpc_requests_total", method="Enroll", code="OK") == 1
        assert value(scrape(b.port), "facegallery_rpc_requests_total", method="Enroll", code="OK") == 0
        assert timing.get_sink() is b  # the one started last
    finally:
        b.stop()
        a.stop()
    assert timing.get_sink() is None


def test_the_sink_feeds_the_histograms_and_the_model_load_gauge():
    metrics = ServerMetrics()
    metrics.observe("detect", 0.02)
    metrics.record("model_load_seconds", 1.5)
    metrics.record("batch_size", 3)
    metrics.record("unknown_value", 1)  # ignored
    get = metrics.registry.get_sample_value
    assert get("facegallery_stage_duration_seconds_count", {"stage": "detect"}) == 1
    assert get("facegallery_model_load_seconds") == 1.5
    assert get("facegallery_batch_size_sum") == 3
    assert get("facegallery_gallery_templates", {"gallery": "x"}) is None  # no manager attached
    metrics.stop()


def test_a_busy_port_is_a_clear_error():
    first = start_metrics(0)
    try:
        with pytest.raises(RuntimeError, match="cannot serve metrics"):
            start_metrics(first.port)
    finally:
        first.stop()


def test_the_pipeline_reports_every_stage(pipeline, shared_dir, sink):
    """The real pipeline on a photo: decode, detect, landmarks, align and embed are each timed once."""
    (face,) = pipeline.analyze((shared_dir / "faces" / "face_recognition" / "barack_obama" / "obama.jpg").read_bytes())
    assert [stage for stage, _ in sink.observed] == ["decode", "detect", "landmarks", "align", "embed"]
    assert all(seconds > 0 for _, seconds in sink.observed)


def test_serve_wires_the_metrics_endpoint(tmp_path):
    """ServerConfig.metrics_port (``serve --metrics-port``): the server's own calls are counted."""
    import socket

    from facegallery.server.service.app import ServerConfig, create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    running = create_server(
        ServerConfig(data_dir=tmp_path, host="localhost", port=0, metrics_port=metrics_port, snapshot_interval_s=None, grace_s=1.0), pipeline=FakePipeline()
    )
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            stub = pb_grpc.GalleryServiceStub(channel)
            stub.GetServerInfo(pb.GetServerInfoRequest())
            with pytest.raises(grpc.RpcError):
                stub.GetGallery(pb.GetGalleryRequest(name="missing"))
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("facegallery_rpc_requests_total", (("code", "OK"), ("method", "GetServerInfo")))] == 1
        assert samples[("facegallery_rpc_requests_total", (("code", "NOT_FOUND"), ("method", "GetGallery")))] == 1
        assert samples[("facegallery_gallery_identities", (("gallery", "default"),))] == 0
    finally:
        running.stop(1.0)


def test_auth_failures_are_counted_by_reason(tmp_path):
    """facegallery_auth_failures_total moves by exactly the refused calls: two without a key, one
    with a revoked key, one with a wrong key, two with a read key on write/admin methods; the
    allowed call and the NOT_FOUND of a missing gallery are not auth failures."""
    import socket

    from facegallery.server.gallery.keys import create_key, revoke_key
    from facegallery.server.gallery.manager import STORE_FILE
    from facegallery.server.gallery.store import SqliteTemplateStore
    from facegallery.server.service.app import ServerConfig, create_server

    store = SqliteTemplateStore(tmp_path / STORE_FILE)
    reader = create_key(store, "reader", "read", (), now=time.time())[1]
    revoked = create_key(store, "old", "admin", (), now=time.time())[1]
    revoke_key(store, "old", now=time.time())
    store.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    running = create_server(
        ServerConfig(data_dir=tmp_path, host="localhost", port=0, metrics_port=metrics_port, snapshot_interval_s=None, grace_s=1.0), pipeline=FakePipeline()
    )
    try:
        before = scrape(metrics_port)
        assert {value(before, "facegallery_auth_failures_total", reason=r) for r in ("missing_key", "invalid_key", "permission_denied")} == {0}
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            stub = pb_grpc.GalleryServiceStub(channel)

            def refused(call, request, key=None):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, metadata=None if key is None else [("authorization", f"Bearer {key}")], timeout=10)
                return caught.value.code()

            assert refused(stub.ListGalleries, pb.ListGalleriesRequest()) is grpc.StatusCode.UNAUTHENTICATED
            assert refused(stub.GetServerInfo, pb.GetServerInfoRequest()) is grpc.StatusCode.UNAUTHENTICATED
            assert refused(stub.ListGalleries, pb.ListGalleriesRequest(), revoked) is grpc.StatusCode.UNAUTHENTICATED
            assert refused(stub.ListGalleries, pb.ListGalleriesRequest(), "fg_wrong") is grpc.StatusCode.UNAUTHENTICATED
            assert refused(stub.Enroll, pb.EnrollRequest(identity_id="x", embedding=embedding(1, 2)), reader) is grpc.StatusCode.PERMISSION_DENIED
            assert refused(stub.CreateGallery, pb.CreateGalleryRequest(name="g"), reader) is grpc.StatusCode.PERMISSION_DENIED
            assert refused(stub.GetGallery, pb.GetGalleryRequest(name="nope"), reader) is grpc.StatusCode.NOT_FOUND
            stub.ListGalleries(pb.ListGalleriesRequest(), metadata=[("authorization", f"Bearer {reader}")], timeout=10)
        after = scrape(metrics_port)
    finally:
        running.stop(1.0)

    def moved(reason):
        return value(after, "facegallery_auth_failures_total", reason=reason) - value(before, "facegallery_auth_failures_total", reason=reason)

    assert (moved("missing_key"), moved("invalid_key"), moved("permission_denied")) == (2, 2, 2)
