"""An acknowledged write survives SIGKILL of the real server process; the index is rebuilt exactly.

The server runs as a separate process (``python -c`` calling ``serve`` with the fake pipeline of
tests/fakes.py, so no model is needed) and is killed with SIGKILL right after a reply while
another client thread keeps writing. The data directory is then checked directly (store holds
every acknowledged template and none of the acknowledged deletions; the index snapshot plus the
replayed change log equals the store) and through a restarted server process.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from fakes import DIM, FakePipeline
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_store import damaged_store

from facegallery.server.gallery.manager import DEFAULT_GALLERY, INDEX_DIR, STORE_FILE
from facegallery.server.gallery.snapshot import open_gallery_index, snapshot_path
from facegallery.server.gallery.store import SqliteTemplateStore
from facegallery.server.service.app import SERVICE_NAME, ServerConfig, create_server
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

TESTS_DIR = Path(__file__).resolve().parent
SERVER_SCRIPT = """
import logging, sys
from pathlib import Path
from fakes import FakePipeline
from facegallery.server.service.app import ServerConfig, serve
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
serve(ServerConfig(data_dir=Path(sys.argv[1]), port=0, snapshot_interval_s=0.3, grace_s=2.0), pipeline=FakePipeline())
"""
ACKED_BEFORE_KILL = 150


class ServerProcess:
    """``serve`` in a child process; its log lines are collected by a reader thread."""

    def __init__(self, data_dir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(data_dir)], stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = self._wait_for(r"serving model .* on localhost:(\d+)")

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def _wait_for(self, pattern: str, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.log.append(line)
            if match := re.search(pattern, line):
                return int(match.group(1))
        self.process.kill()
        pytest.fail(f"server did not log {pattern!r}:\n{''.join(self.log)}")

    def drain_log(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)


def vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32).tolist()


def writer(stub, seeds, acked: dict[int, tuple[str, int]], deleted: set[int], deleting: set[int], errors: list, stop: threading.Event) -> None:
    """Enroll embeddings (and delete every 7th acknowledged template) until the server dies.

    ``deleting`` holds the template whose deletion is in flight (it may or may not be applied).
    """
    for n, seed in enumerate(seeds):
        if stop.is_set():
            return
        identity = f"p{seed % 40}"
        try:
            reply = stub.Enroll(pb.EnrollRequest(identity_id=identity, embedding=pb.Embedding(values=vector(seed))), timeout=10)
            acked[reply.template_id] = (identity, seed)
            if n % 7 == 6:
                victim = min(set(acked) - deleted)
                deleting.add(victim)
                stub.DeleteTemplate(pb.DeleteTemplateRequest(template_id=victim), timeout=10)
                deleted.add(victim)
                deleting.discard(victim)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # the kill, nothing else, may end the loop
                errors.append(exc)
            return


def test_acknowledged_writes_survive_sigkill(tmp_path, caplog):
    data_dir = tmp_path / "data"
    server = ServerProcess(data_dir)
    acked_main: dict[int, tuple[str, int]] = {}
    acked_other: dict[int, tuple[str, int]] = {}
    deleted: set[int] = set()
    deleting: set[int] = set()
    errors: list[grpc.RpcError] = []
    stop = threading.Event()
    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        other = threading.Thread(target=writer, args=(stub, range(10_000, 20_000), acked_other, deleted, deleting, errors, stop))
        other.start()
        for seed in range(ACKED_BEFORE_KILL):
            reply = stub.Enroll(pb.EnrollRequest(identity_id=f"p{seed % 40}", embedding=pb.Embedding(values=vector(seed))), timeout=10)
            acked_main[reply.template_id] = (f"p{seed % 40}", seed)
        server.process.send_signal(signal.SIGKILL)  # right after the last reply, the other writer mid-flight
        server.process.wait(10)
        stop.set()
        other.join(10)
    assert not errors
    assert len(acked_other) > 0 and deleted, "the concurrent writer never got a reply"
    acked = {**acked_main, **acked_other}
    live = {t: v for t, v in acked.items() if t not in deleted | deleting}

    store = SqliteTemplateStore(data_dir / STORE_FILE)
    try:
        stored = set(store.template_ids(DEFAULT_GALLERY).tolist())
        assert set(live) <= stored and not (deleted & stored)
        # Only the calls in flight at the kill may have landed without a reply: one enroll and
        # one delete of the concurrent writer.
        assert len(stored - set(live) - deleting) <= 1
        blocks = list(store.embeddings(DEFAULT_GALLERY, live))
        ids = np.concatenate([b[0] for b in blocks])
        x = np.concatenate([b[1] for b in blocks])
        np.testing.assert_array_equal(x, np.array([vector(live[t][1]) for t in ids.tolist()], np.float32))
        record = store.get_gallery(DEFAULT_GALLERY)
        path = snapshot_path(data_dir / INDEX_DIR, record.key)
        assert path.is_file(), "no index snapshot was written while serving"
        with caplog.at_level(logging.INFO, logger="facegallery.server.gallery.snapshot"):
            index = open_gallery_index(store, record, path)
        assert "(snapshot)" in caplog.text  # snapshot + replayed changes, not a fallback rebuild
        assert index.ids().tolist() == sorted(stored)
    finally:
        store.close()

    restarted = ServerProcess(data_dir)
    try:
        with grpc.insecure_channel(f"localhost:{restarted.port}") as channel:
            stub = pb_grpc.GalleryServiceStub(channel)
            assert stub.GetGallery(pb.GetGalleryRequest(name=DEFAULT_GALLERY)).template_count == len(stored)
            # Search templates, not the default policy's mean templates, to find each one exactly.
            stub.UpdateGallery(pb.UpdateGalleryRequest(name=DEFAULT_GALLERY, policy=pb.DecisionPolicy(threshold=0.6)))
            for template_id, (identity, seed) in live.items():
                result = stub.IdentifyEmbedding(pb.IdentifyEmbeddingRequest(embedding=pb.Embedding(values=vector(seed)), top_k=1)).result
                assert (result.matches[0].template_id, result.identity_id, result.distance) == (template_id, identity, 0.0)
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(30) == 0
    assert "server stopped" in restarted.drain_log()


def test_a_server_on_a_damaged_store_does_not_start(tmp_path):
    data_dir = tmp_path / "data"
    damaged_store(data_dir / STORE_FILE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, str(data_dir)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert f"StoreCorruptError: the gallery store {data_dir / STORE_FILE} is damaged" in done.stderr
    assert "PRAGMA quick_check" in done.stderr and ".recover" in done.stderr
    assert "listening on" not in done.stderr  # refused before binding or loading anything


def test_a_store_failure_at_run_time_turns_health_not_serving(tmp_path, monkeypatch, caplog):
    running = create_server(ServerConfig(data_dir=tmp_path, port=0, snapshot_interval_s=None, grace_s=1.0), pipeline=FakePipeline())
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            stub = pb_grpc.GalleryServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> list[int]:
                return [health.Check(health_pb2.HealthCheckRequest(service=name)).status for name in ("", SERVICE_NAME)]

            def fail(exc):
                def raiser(*args, **kwargs):
                    raise exc

                monkeypatch.setattr(running.manager.store, "list_identities", raiser)

            stub.ListIdentities(pb.ListIdentitiesRequest())
            assert status() == [health_pb2.HealthCheckResponse.SERVING] * 2
            fail(sqlite3.OperationalError("database is locked"))  # not damage: health stays
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListIdentities(pb.ListIdentitiesRequest())
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            assert status() == [health_pb2.HealthCheckResponse.SERVING] * 2
            fail(sqlite3.DatabaseError("database disk image is malformed"))
            with caplog.at_level(logging.CRITICAL, logger="facegallery.server.service.app"):
                for _ in range(2):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.ListIdentities(pb.ListIdentitiesRequest())
                    assert caught.value.code() == grpc.StatusCode.DATA_LOSS and "damaged" in caught.value.details()
            assert status() == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
            critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
            assert len(critical) == 1 and str(tmp_path / STORE_FILE) in critical[0].getMessage()
            assert "malformed" in critical[0].getMessage() and "ListIdentities" in critical[0].getMessage()
    finally:
        running.stop(None)


def test_facegallery_serve_refuses_a_damaged_store_in_one_line(tmp_path):
    from click.testing import CliRunner

    from facegallery.server.service.cli import make_serve_command

    damaged_store(tmp_path / STORE_FILE)
    command = make_serve_command(lambda: tmp_path / "no-model")  # refused before the model is loaded
    result = CliRunner().invoke(command, ["--data-dir", str(tmp_path), "--port", "0", "--integrity-check", "full"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"Error: the gallery store {tmp_path / STORE_FILE} is damaged" in result.output and "PRAGMA integrity_check" in result.output
