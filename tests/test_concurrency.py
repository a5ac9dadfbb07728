"""Concurrency: parallel calls through the real gRPC server, and snapshots beside searches.

* 16 threads identify while 4 enroll and 2 delete (fake pipeline). Bounded by request counts,
  not time. Checks: no call fails, every identification of a person who is never deleted finds
  that person at the distance the fake pipeline implies (a search never sees a half-applied
  write), matches are ranked and distinct, and at the end the index holds exactly the store's
  templates.
* While a snapshot of a large gallery is being written, a write and the searches behind it
  complete (ordering by events, not timings).
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from fakes import FakePipeline, person_embedding, photo

from facegallery.server.gallery import indexed_gallery
from facegallery.server.gallery.index import DEFAULT_FACTORY, make_index
from facegallery.server.gallery.indexed_gallery import IndexedGallery
from facegallery.server.gallery.snapshot import read_snapshot
from facegallery.server.gallery.store import NewTemplate, SqliteTemplateStore
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


def test_a_snapshot_write_does_not_stall_a_write_or_the_searches_behind_it(tmp_path, monkeypatch):
    """200k templates of d=128 (a 100 MB index). The snapshot's serialization and file write are
    held open by a patched writer; meanwhile a write and searches complete. Were the gallery's
    lock held across them, the write would wait for the snapshot, and the searches (the lock
    prefers writers) for the write."""
    n, d = 200_000, 128
    store = SqliteTemplateStore(tmp_path / "gallery.sqlite3")
    record = store.create_gallery("g", model_id="m" * 64, threshold=0.6, metric="euclidean", embedding_dim=d)
    index = make_index(d)
    index.add(10**9 + np.arange(n), np.random.default_rng(0).random((n, d), dtype=np.float32))  # ids no template has
    gallery = IndexedGallery(store, record, index, snapshot_file=tmp_path / "g.fgidx", factory=DEFAULT_FACTORY)
    ann, bob = person_embedding(200, 10), person_embedding(10, 200)
    gallery.add_templates([NewTemplate("ann", ann)])
    seq_before = store.get_gallery("g").last_seq

    writing, release = threading.Event(), threading.Event()
    real_write = indexed_gallery.write_snapshot

    def held_write(path, index, **header):
        writing.set()
        assert release.wait(30), "the test never released the snapshot write"
        return real_write(path, index, **header)

    monkeypatch.setattr(indexed_gallery, "write_snapshot", held_write)
    headers, found, errors = [], [], []

    def run(body):
        def target():
            try:
                body()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        return threading.Thread(target=target)

    snapshotter = run(lambda: headers.append(gallery.snapshot()))
    snapshotter.start()
    assert writing.wait(30), "the snapshot never reached its write"
    writer = run(lambda: gallery.add_templates([NewTemplate("bob", bob)]))
    searchers = [run(lambda: found.extend(gallery.identify(np.stack([ann, bob]), 1)[0] for _ in range(3))) for _ in range(4)]
    writer.start()
    for thread in searchers:
        thread.start()
    deadline = time.monotonic() + 10
    for thread in [writer, *searchers]:
        thread.join(max(0.0, deadline - time.monotonic()))
    stalled = [thread for thread in [writer, *searchers] if thread.is_alive()]
    still_writing = snapshotter.is_alive()
    release.set()
    for thread in [snapshotter, *stalled]:
        thread.join(30)
    assert not stalled, f"{len(stalled)} of the write and 4 search threads waited for the snapshot's file write"
    assert still_writing and not errors, errors[:3]
    assert len(found) == 4 * 3 and all(hits[0][0].hit.identity_id == "ann" for hits in found)
    assert gallery.identify(bob[None], 1)[0][0][0].hit.identity_id == "bob"  # the write is searchable

    (header,) = headers
    assert (header.last_seq, header.ntotal) == (seq_before, n + 1)  # the state copied, without the later write
    assert read_snapshot(tmp_path / "g.fgidx")[0] == header
    assert [c.seq for c in store.changes_since("g", 0)] == [store.get_gallery("g").last_seq]  # the write's change is kept
    assert gallery.template_ids().size == n + 2
    store.close()
