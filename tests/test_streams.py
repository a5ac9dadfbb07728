"""Client streams cannot starve the server (service/streams.py): the caps, the idle timeout, and a
starvation probe against the real gRPC server (idle BulkEnroll streams from one client while
another client calls)."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest
from fakes import FakePipeline, person_embedding

from facegallery.server.contract.errors import ResourceExhausted, StreamIdleError
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.server.service.streams import StreamLimiter, peer_host, with_idle_timeout
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc


def test_limiter_caps_streams_in_total_and_per_client():
    limiter = StreamLimiter(max_streams=3, max_per_client=2)
    with limiter.slot("ipv4:10.0.0.1:5000"), limiter.slot("ipv4:10.0.0.1:5001"):
        with pytest.raises(ResourceExhausted, match="per client"):
            with limiter.slot("ipv4:10.0.0.1:5002"):
                pass
        with limiter.slot("ipv6:[::1]:7000"):
            with pytest.raises(ResourceExhausted, match="its limit"):
                with limiter.slot("ipv6:[::2]:7000"):
                    pass
    with limiter.slot("ipv4:10.0.0.1:5003"), limiter.slot("ipv4:10.0.0.1:5004"):  # slots are given back
        pass
    assert peer_host("ipv4:10.0.0.1:5000") == "ipv4:10.0.0.1" and peer_host("ipv6:[::1]:7000") == "ipv6:[::1]"


def test_idle_timeout_passes_messages_and_ends_a_silent_stream():
    assert list(with_idle_timeout(iter([1, 2, 3]), 1.0, "test")) == [1, 2, 3]
    feed: queue.Queue = queue.Queue()
    feed.put("first")

    def slow():
        while (item := feed.get()) is not None:
            yield item

    messages = with_idle_timeout(slow(), 0.3, "BulkEnroll")
    assert next(messages) == "first"
    started = time.monotonic()
    with pytest.raises(StreamIdleError, match="BulkEnroll: no message for 0.3 s"):
        next(messages)
    assert 0.25 < time.monotonic() - started < 2
    feed.put(None)  # lets the reader thread finish

    def broken():
        yield 1
        raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError, match="stream broke"):
        list(with_idle_timeout(broken(), 1.0, "test"))


def test_idle_streams_from_one_client_leave_others_served(tmp_path):
    config = ServerConfig(
        data_dir=tmp_path, host="localhost", port=0, max_workers=4, max_streams=8, max_streams_per_client=4, stream_idle_s=2.0, snapshot_interval_s=None, grace_s=1.0
    )
    running = create_server(config, pipeline=FakePipeline())
    hostile = grpc.insecure_channel(f"localhost:{running.port}")
    polite = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stop = threading.Event()

        def silent():  # a request stream that never sends
            stop.wait(30)
            return
            yield

        calls = [pb_grpc.GalleryServiceStub(hostile).BulkEnroll(silent(), timeout=20) for _ in range(32)]
        refused, ended = [], []

        def drain(call):
            try:
                list(call)
            except grpc.RpcError as exc:
                (refused if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else ended).append(exc.code())

        drains = [threading.Thread(target=drain, args=(c,)) for c in calls]
        for t in drains:
            t.start()
        time.sleep(0.5)
        stub = pb_grpc.GalleryServiceStub(polite)
        started = time.monotonic()
        stub.Enroll(pb.EnrollRequest(identity_id="ann", embedding=pb.Embedding(values=person_embedding(200, 10))), timeout=1.0)
        assert stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(embedding=pb.Embedding(values=person_embedding(200, 10))), timeout=1.0).result.identity_id == "ann"
        assert time.monotonic() - started < 1.0
        for t in drains:
            t.join(10)
        # 4 streams of the client were admitted and ended by the idle timeout; the other 28 refused at once
        assert len(refused) == 28 and ended == [grpc.StatusCode.DEADLINE_EXCEEDED] * 4
        stop.set()
    finally:
        hostile.close()
        polite.close()
        running.stop(1.0)


def test_connection_cap_and_handshake_timeout(tmp_path):
    """``max_connections`` caps the connections of one listening address; a TCP connection that never
    starts its HTTP/2 handshake is closed after ``handshake_timeout_s``."""
    import socket

    config = ServerConfig(data_dir=tmp_path, host="127.0.0.1", port=0, max_connections=2, handshake_timeout_s=1.0, snapshot_interval_s=None, grace_s=1.0)
    running = create_server(config, pipeline=FakePipeline())
    channels = [grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(3)]
    try:
        ready = []
        for channel in channels:
            try:
                grpc.channel_ready_future(channel).result(timeout=2)
                ready.append(True)
            except grpc.FutureTimeoutError:
                ready.append(False)
        assert ready == [True, True, False]
        for channel in channels:
            channel.close()
        idle = socket.create_connection(("127.0.0.1", running.port))
        idle.settimeout(5)
        started = time.monotonic()
        while idle.recv(1024):  # the server may send its settings frame first; socket.timeout fails the test
            pass
        assert time.monotonic() - started < 4  # closed by the handshake timeout, not the 5 s socket timeout
        idle.close()
    finally:
        running.stop(1.0)
