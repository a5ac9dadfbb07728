"""``facegallery doctor``: offline checks of the store, its WAL, the snapshots and the model files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from facegallery.client.cli import main
from facegallery.server.contract.manifest import ModelFile
from facegallery.server.gallery import doctor
from facegallery.server.gallery.doctor import Status, diagnose
from facegallery.server.gallery.manager import INDEX_DIR, STORE_FILE, GalleryManager
from facegallery.server.gallery.ann_index import IndexPlan
from facegallery.server.gallery.snapshot import read_snapshot, snapshot_path, write_snapshot
from facegallery.server.gallery.store import SqliteTemplateStore
from fakes import DIM, FakePipeline, fake_manifest, person_embedding
from test_store import damaged_store


@pytest.fixture(autouse=True)
def _no_default_model(tmp_path, monkeypatch):
    """The default model directory (checked when --model-dir is not given) does not exist."""
    monkeypatch.setenv("FACEGALLERY_MODEL_DIR", str(tmp_path / "no-default-model"))


def _model_dir(path):
    """A tiny model directory: three small files and a model.json with their sha256."""
    path.mkdir()
    files = {}
    for key in ("embedder", "detector", "landmarks"):
        content = f"fake {key} weights".encode()
        (path / f"{key}.onnx").write_bytes(content)
        files[key] = ModelFile(f"{key}.onnx", hashlib.sha256(content).hexdigest())
    manifest = fake_manifest().with_updates(files=files)
    manifest.write(path)
    return path, manifest


def _data_dir(tmp_path, manifest=None, people=3):
    """A data directory left by a server that enrolled ``people`` embeddings and stopped."""
    pipeline = FakePipeline()
    if manifest is not None:
        pipeline.manifest = manifest
    data_dir = tmp_path / "data"
    manager = GalleryManager.open(data_dir, pipeline)
    for i in range(people):
        manager.enroll("default", f"p{i}", embedding=person_embedding(10 * i, 20))
    manager.close()
    return data_dir


def _doctor(*args):
    return CliRunner().invoke(main, ["doctor", *map(str, args)])


def test_a_healthy_data_dir_is_all_ok(tmp_path):
    model_dir, manifest = _model_dir(tmp_path / "model")
    data_dir = _data_dir(tmp_path, manifest)
    findings = diagnose(data_dir, model_dir)
    assert [f.status for f in findings] == [Status.OK] * len(findings), findings
    checks = [f.check for f in findings]
    assert checks == ["wal", "store", "gallery default", "snapshot default", "model", "model default"]
    assert "3 identities, 3 templates" in findings[2].message and "up to date" in findings[3].message
    result = _doctor("--data-dir", data_dir, "--model-dir", model_dir)
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == len(findings) + 1  # one line per check, and the summary
    assert all(line.startswith("OK ") for line in result.output.splitlines()[:-1])
    assert result.output.splitlines()[-1] == f"{len(findings)} OK, 0 WARN, 0 FAIL"
    as_json = _doctor("--data-dir", data_dir, "--model-dir", model_dir, "--json", "--full")
    assert as_json.exit_code == 0, as_json.output
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert [r["check"] for r in rows] == checks and {r["status"] for r in rows} == {"OK"}
    assert "PRAGMA integrity_check ok" in rows[1]["message"]


def test_a_damaged_store_fails_and_names_the_file(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    damaged_store(data_dir / STORE_FILE)
    result = _doctor("--data-dir", data_dir)
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("FAIL"))
    assert "store" in line and str(data_dir / STORE_FILE) in line and "PRAGMA quick_check" in line and ".recover" in line


def test_a_missing_store_fails(tmp_path):
    result = _doctor("--data-dir", tmp_path)
    assert result.exit_code == 1 and f"no store at {tmp_path / STORE_FILE}" in result.output
    assert not (tmp_path / STORE_FILE).exists()  # doctor created nothing


def test_a_corrupt_snapshot_warns_that_it_will_be_rebuilt(tmp_path):
    data_dir = _data_dir(tmp_path)
    path = snapshot_path(data_dir / INDEX_DIR, 1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    (data_dir / INDEX_DIR / "gallery-99.fgidx").write_bytes(b"of a deleted gallery")
    findings = {f.check: f for f in diagnose(data_dir)}
    assert findings["snapshot default"].status is Status.WARN
    assert "corrupt" in findings["snapshot default"].message and "rebuilt from the store" in findings["snapshot default"].message
    assert findings["index"].status is Status.WARN and "gallery-99.fgidx" in findings["index"].message
    assert _doctor("--data-dir", data_dir).exit_code == 0  # WARN only


def test_a_snapshot_behind_the_store_replays(tmp_path):
    data_dir = _data_dir(tmp_path)
    manager = GalleryManager.open(data_dir, FakePipeline())
    manager.enroll("default", "late", embedding=person_embedding(200, 1))
    manager.store.close()  # a crash: the store has the change, the snapshot (written at close) not
    (finding,) = [f for f in diagnose(data_dir) if f.check == "snapshot default"]
    assert finding.status is Status.OK and "will replay 1 change" in finding.message


def test_a_snapshot_newer_than_the_store_means_lost_writes(tmp_path):
    data_dir = _data_dir(tmp_path, people=2)
    saved = (data_dir / STORE_FILE).read_bytes()  # the store after 2 enrollments, checkpointed
    snapshot = snapshot_path(data_dir / INDEX_DIR, 1)
    manager = GalleryManager.open(data_dir, FakePipeline())
    manager.enroll("default", "lost", embedding=person_embedding(200, 1))
    manager.close()
    (data_dir / STORE_FILE).write_bytes(saved)  # as if the last commit had been lost with its WAL
    assert snapshot.exists()
    (finding,) = [f for f in diagnose(data_dir) if f.check == "snapshot default"]
    assert finding.status is Status.FAIL and "lost committed writes" in finding.message


def test_a_changed_model_file_fails(tmp_path):
    model_dir, manifest = _model_dir(tmp_path / "model")
    data_dir = _data_dir(tmp_path, manifest)
    (model_dir / "detector.onnx").write_bytes(b"tampered")
    result = _doctor("--data-dir", data_dir, "--model-dir", model_dir)
    assert result.exit_code == 1, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("FAIL"))
    assert "model" in line and str(model_dir / "detector.onnx") in line and "sha256" in line


def test_a_gallery_of_another_model_warns_with_both_ids(tmp_path):
    model_dir, manifest = _model_dir(tmp_path / "model")
    data_dir = _data_dir(tmp_path)  # the fake pipeline's own model, not the one in model_dir
    (finding,) = [f for f in diagnose(data_dir, model_dir) if f.check == "model default"]
    assert finding.status is Status.WARN
    assert FakePipeline().model_id in finding.message and manifest.embedding_id(False) in finding.message


def test_a_large_wal_warns(tmp_path, monkeypatch):
    data_dir = _data_dir(tmp_path)
    (data_dir / f"{STORE_FILE}-wal").write_bytes(b"\0" * 2048)  # not opened: check_wal only looks at the size
    monkeypatch.setattr(doctor, "WAL_WARN_BYTES", 1024)
    (finding,) = doctor.check_wal(data_dir / STORE_FILE)
    assert finding.status is Status.WARN and "checkpoint is pending" in finding.message


def test_an_approximate_snapshot_is_accepted(tmp_path):
    """A gallery past the approximate size snapshots an IVF index: doctor takes it as the server does."""
    data_dir = _data_dir(tmp_path)
    path = snapshot_path(data_dir / INDEX_DIR, 1)
    header, _ = read_snapshot(path)
    store = SqliteTemplateStore(data_dir / STORE_FILE)
    try:
        ids = store.template_ids("default")
    finally:
        store.close()
    extra = np.arange(1000, 4000)  # an IVF trains on thousands of vectors; the extras are removed again
    x = np.random.default_rng(0).normal(size=(len(ids) + len(extra), DIM)).astype(np.float32)
    ivf = IndexPlan(approximate_above=1000, nprobe=4).build(DIM, np.concatenate([ids, extra]), x)
    assert ivf.remove(extra) == len(extra) and ivf.factory.startswith("IVF")
    write_snapshot(path, ivf, gallery_key=1, gallery="default", last_seq=header.last_seq)
    (finding,) = [f for f in diagnose(data_dir) if f.check == "snapshot default"]
    assert finding.status is Status.OK and "up to date" in finding.message, finding
