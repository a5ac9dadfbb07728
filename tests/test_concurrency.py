"""16 threads identify while 4 enroll and 2 delete, through the real gRPC server (fake pipeline).

Bounded by request counts, not time. Checks: no call fails, every identification of a person
who is never deleted finds that person at the distance the fake pipeline implies (a search
never sees a half-applied write), matches are ranked and distinct, and at the end the index
holds exactly the store's templates.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from fakes import FakePipeline, person_embedding, photo

from facegallery.server.service.app import ServerConfig, create_server
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

IDENTIFIERS, ENROLLERS, DELETERS = 16, 4, 2
IDENTIFY_CALLS, ENROLL_CALLS = 40, 60  # per thread
STABLE = [(r, 30) for r in range(10, 250, 8)]  # 30 people enrolled first and never deleted


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(data_dir=tmp_path_factory.mktemp("concurrency"), port=0, max_workers=IDENTIFIERS + ENROLLERS + DELETERS + 2, snapshot_interval_s=0.2, grace_s=1.0)
    running = create_server(config, pipeline=FakePipeline())
    yield running
    running.stop(1.0)


def test_parallel_identify_enroll_delete(server):
    errors: list[BaseException] = []
    to_delete: queue.Queue[int | None] = queue.Queue()
    counts = {"identify": 0, "enroll": 0, "delete": 0}
    lock = threading.Lock()

    def run(body):
        def target(*args):
            try:
                body(*args)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        return target

    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        for i, person in enumerate(STABLE):
            stub.Enroll(pb.EnrollRequest(identity_id=f"stable{i}", image=pb.Image(data=photo((*person, 0)))))

        def identify(worker: int) -> None:
            for n in range(IDENTIFY_CALLS):
                i = (worker * IDENTIFY_CALLS + n) % len(STABLE)
                variation = 40 + n % 200
                reply = stub.Identify(pb.IdentifyRequest(image=pb.Image(data=photo((*STABLE[i], variation))), top_k=3), timeout=30)
                (face,) = reply.faces
                expected = float(np.linalg.norm(person_embedding(*STABLE[i], variation) - person_embedding(*STABLE[i])))
                assert face.identity_id == f"stable{i}" and face.distance == pytest.approx(expected, abs=1e-5)
                distances = [m.distance for m in face.matches]
                assert distances == sorted(distances) and len({m.identity_id for m in face.matches}) == len(face.matches)
                with lock:
                    counts["identify"] += 1

        def enroll(worker: int) -> None:
            for n in range(ENROLL_CALLS):
                embedding = person_embedding(worker + 1, 251, n)  # people far from the stable ones
                reply = stub.Enroll(pb.EnrollRequest(identity_id=f"w{worker}-{n % 15}", embedding=pb.Embedding(values=embedding.tolist())), timeout=30)
                if n % 2:
                    to_delete.put(reply.template_id)
                with lock:
                    counts["enroll"] += 1

        def delete(worker: int) -> None:
            while (template_id := to_delete.get()) is not None:
                try:
                    stub.DeleteTemplate(pb.DeleteTemplateRequest(template_id=template_id), timeout=30)
                except grpc.RpcError as exc:
                    # The template's identity may have been deleted as a whole by the other deleter.
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                if template_id % 5 == 0:
                    try:
                        stub.DeleteIdentity(pb.DeleteIdentityRequest(identity_id=f"w{worker}-{template_id % 15}"), timeout=30)
                    except grpc.RpcError as exc:
                        if exc.code() != grpc.StatusCode.NOT_FOUND:  # not (or no longer) enrolled
                            raise
                with lock:
                    counts["delete"] += 1

        started = time.perf_counter()
        writers = [threading.Thread(target=run(enroll), args=(w,)) for w in range(ENROLLERS)]
        deleters = [threading.Thread(target=run(delete), args=(w,)) for w in range(DELETERS)]
        readers = [threading.Thread(target=run(identify), args=(w,)) for w in range(IDENTIFIERS)]
        for thread in writers + deleters + readers:
            thread.start()
        for thread in writers:
            thread.join(120)
        for _ in deleters:
            to_delete.put(None)
        for thread in deleters + readers:
            thread.join(120)
        elapsed = time.perf_counter() - started
        assert not errors, errors[:3]
        assert counts == {"identify": IDENTIFIERS * IDENTIFY_CALLS, "enroll": ENROLLERS * ENROLL_CALLS, "delete": ENROLLERS * ENROLL_CALLS // 2}
        gallery = stub.GetGallery(pb.GetGalleryRequest(name="default"))

    manager = server.manager
    stored = manager.store.template_ids("default")
    assert manager.index_template_ids("default").tolist() == stored.tolist()
    assert gallery.template_count == len(stored) and len(stored) >= len(STABLE)
    print(
        f"\nconcurrency: {counts['identify']} identify, {counts['enroll']} enroll, {counts['delete']} delete calls "
        f"in {elapsed:.2f} s ({sum(counts.values()) / elapsed:.0f} calls/s); final gallery {len(stored)} templates"
    )
