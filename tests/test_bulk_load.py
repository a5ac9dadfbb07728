"""Bulk load: ``import-embeddings`` / ``export-gallery`` of .npz, .parquet and JSON Lines files,
ImportEmbeddings batches, resuming, and a kill -9 of the server during an .npz import.

The server is the real one with the fake pipeline (tests/fakes.py): in process for the round
trips, a child process (test_durability.py's ServerProcess) for the kill.
"""

from __future__ import annotations

import signal
import sqlite3
import threading

import grpc
import numpy as np
import pytest
from click.testing import CliRunner
from fakes import DIM, FakePipeline
from test_durability import ServerProcess

from facegallery.client import FailedPrecondition, GalleryClient, Unavailable
from facegallery.client.cli import main
from facegallery.client.embedding_files import EmbeddingTable, ExportFileError, read_table
from facegallery.server.gallery.manager import STORE_FILE
from facegallery.server.service.app import ServerConfig, create_server
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

OTHER_MODEL = "f" * 64


def table(n: int, *, seed: int = 0, per_identity: int = 3, names: bool = True, model_id: str | None = None) -> EmbeddingTable:
    """``n`` seeded templates, ``per_identity`` consecutive ones per identity, names "Person k"."""
    x = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    ids = [f"p{i // per_identity:05d}" for i in range(n)]
    return EmbeddingTable(ids, x, [f"Person {i // per_identity}" for i in range(n)] if names else None, model_id)


def pairs(t: EmbeddingTable) -> list[tuple[str, bytes]]:
    """The table's (identity id, embedding bytes), sorted: what two galleries must agree on."""
    return sorted(zip(t.identity_ids, (row.tobytes() for row in t.embeddings), strict=True))


@pytest.fixture()
def server(tmp_path):
    running = create_server(ServerConfig(data_dir=tmp_path / "data", host="127.0.0.1", port=0, snapshot_interval_s=None), pipeline=FakePipeline())
    yield f"127.0.0.1:{running.port}"
    running.stop(0)


@pytest.fixture()
def client(server):
    with GalleryClient(server) as c:
        yield c


def cli(server: str, *args: str):
    return CliRunner().invoke(main, [*args, "--server", server], catch_exceptions=False)


def exported(client: GalleryClient, gallery: str) -> EmbeddingTable:
    g, templates = client.export_gallery(gallery)
    return EmbeddingTable.from_templates(templates, g.model_id)


@pytest.mark.parametrize("suffix", [".npz", ".parquet", ".jsonl"])
def test_export_then_import_round_trip_keeps_ids_names_and_embeddings(server, client, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    source = table(500)
    assert client.import_embeddings(source, gallery="src", batch_size=128).imported == 500  # no model id: the server's
    path = tmp_path / f"gallery{suffix}"

    result = cli(server, "export-gallery", str(path), "--gallery", "src")
    assert result.exit_code == 0, result.output
    if suffix != ".jsonl":
        on_disk = read_table(path)
        assert pairs(on_disk) == pairs(source) and on_disk.model_id == client.server_info().model.model_id
    result = cli(server, "import-embeddings", str(path), "--gallery", "dst", "--batch-size", "100", "--json")
    assert result.exit_code == 0, result.output
    assert '"imported": 500' in result.stdout

    copy = exported(client, "dst")
    assert pairs(copy) == pairs(source)
    assert dict(zip(copy.identity_ids, copy.display_names, strict=True)) == dict(zip(source.identity_ids, source.display_names, strict=True))
    again = cli(server, "import-embeddings", str(path), "--gallery", "dst", "--json")
    assert '"skipped": 500' in again.stdout


def test_a_table_of_another_model_is_refused_and_creates_no_gallery(server, client, tmp_path):
    path = tmp_path / "other.npz"
    t = table(10, model_id=OTHER_MODEL)
    np.savez(path, embeddings=t.embeddings, identity_ids=np.array(t.identity_ids), model_id=np.array(OTHER_MODEL))
    result = cli(server, "import-embeddings", str(path), "--gallery", "fresh")
    assert result.exit_code == 1 and "FAILED_PRECONDITION" in result.output and OTHER_MODEL in result.output
    assert "0 of 10 templates were stored" in result.output
    with pytest.raises(FailedPrecondition):
        client.import_embeddings(t, gallery="default")
    assert "fresh" not in {g.name for g in client.list_galleries()}


def test_a_malformed_batch_is_invalid_argument(server, client):
    model_id = client.server_info().model.model_id
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.GalleryServiceStub(channel)

        def call(batch: pb.TemplateBatch):
            header = pb.ImportEmbeddingsRequest(header=pb.ImportEmbeddingsHeader(gallery="default", model_id=model_id))
            with pytest.raises(grpc.RpcError) as caught:
                stub.ImportEmbeddings(iter([header, pb.ImportEmbeddingsRequest(batch=batch)]))
            return caught.value.code(), caught.value.details()

        two = np.zeros((2, DIM), "<f4")
        assert call(pb.TemplateBatch(identity_ids=["a"], embeddings=two.tobytes()))[0] == grpc.StatusCode.INVALID_ARGUMENT  # 2 rows, 1 id
        assert call(pb.TemplateBatch(identity_ids=["a", "b"], embeddings=two.tobytes()[:-1]))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert call(pb.TemplateBatch(identity_ids=["a", "b"], display_names=["A"], embeddings=two.tobytes()))[0] == grpc.StatusCode.INVALID_ARGUMENT
        assert call(pb.TemplateBatch(identity_ids=["a", ""], embeddings=two.tobytes()))[0] == grpc.StatusCode.INVALID_ARGUMENT
        nan = two.copy()
        nan[1, 3] = np.nan
        assert "row 1" in call(pb.TemplateBatch(identity_ids=["a", "b"], embeddings=nan.tobytes()))[1]
    assert client.get_gallery("default").template_count == 0


def test_an_npz_without_required_arrays_is_refused(server, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, vectors=np.zeros((2, DIM), np.float32))
    result = cli(server, "import-embeddings", str(path))
    assert result.exit_code == 1 and "'embeddings'" in result.output
    with pytest.raises(ExportFileError, match="float32"):
        np.savez(path, embeddings=np.zeros(3), identity_ids=np.array(["a", "b", "c"]))
        read_table(path)


def test_resuming_an_interrupted_import_stores_no_duplicate(client):
    full = table(1000, names=False)
    first = EmbeddingTable(full.identity_ids[:640], full.embeddings[:640])  # what an interrupted import had acknowledged
    assert client.import_embeddings(first, batch_size=64).imported == 640
    acknowledged: list[int] = []
    result = client.import_embeddings(full, batch_size=64, progress=acknowledged.append)
    assert (result.imported, result.skipped) == (360, 640)
    assert acknowledged == [*range(64, 1000, 64), 1000]
    assert pairs(exported(client, "default")) == pairs(full)


def test_single_templates_and_batches_mix_in_one_stream(server, client):
    model_id = client.server_info().model.model_id
    t = table(6, names=False)
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.GalleryServiceStub(channel)
        messages = [
            pb.ImportEmbeddingsRequest(header=pb.ImportEmbeddingsHeader(gallery="mixed", model_id=model_id)),
            pb.ImportEmbeddingsRequest(template=pb.ExportedTemplate(identity_id=t.identity_ids[0], embedding=pb.Embedding(values=t.embeddings[0].tolist()))),
            pb.ImportEmbeddingsRequest(batch=pb.TemplateBatch(identity_ids=t.identity_ids, embeddings=t.embeddings.astype("<f4").tobytes())),
        ]
        reply = stub.ImportEmbeddings(iter(messages))
    assert (reply.imported, reply.skipped) == (6, 1)  # the batch's first template was sent alone before it
    assert pairs(exported(client, "mixed")) == pairs(t)


@pytest.mark.slow  # two server processes and 12k templates: ~13 s on 2 busy cores
def test_kill_9_during_an_npz_import_loses_no_acknowledged_batch(tmp_path):
    data_dir = tmp_path / "data"
    full = table(12_000, names=False, per_identity=2)
    server = ServerProcess(data_dir)
    acknowledged: list[int] = []
    killed = threading.Event()

    def kill_after_some_batches(count: int) -> None:
        acknowledged.append(count)
        if len(acknowledged) == 8:  # mid-import: later batches are in flight or not yet sent
            server.process.send_signal(signal.SIGKILL)
            killed.set()

    with GalleryClient(f"localhost:{server.port}") as client, pytest.raises(Unavailable):
        client.import_embeddings(full, batch_size=500, progress=kill_after_some_batches)
    server.process.wait(10)
    assert killed.is_set() and acknowledged[-1] == 4000

    with sqlite3.connect(data_dir / STORE_FILE) as conn:  # the store directly: every acknowledged template, once
        rows = conn.execute("SELECT i.identity_id, t.embedding FROM templates t JOIN identities i USING (identity_key)").fetchall()
    stored = sorted(rows)
    assert len(set(stored)) == len(stored) and acknowledged[-1] <= len(stored) < len(full)
    prefix = EmbeddingTable(full.identity_ids[: acknowledged[-1]], full.embeddings[: acknowledged[-1]])
    assert set(pairs(prefix)) <= set(stored)

    server = ServerProcess(data_dir)  # restarted: the same command finishes the import
    try:
        with GalleryClient(f"localhost:{server.port}") as client:
            result = client.import_embeddings(full, batch_size=4000)
            assert (result.imported, result.skipped) == (len(full) - len(stored), len(stored))
            assert pairs(exported(client, "default")) == pairs(full)
    finally:
        server.process.kill()
        server.process.wait(10)
