"""Shared fixtures: the ../shared data directory and the converted default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"test data directory {SHARED_DIR} is missing (it sits beside the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """The uri of a Milvus Lite server (tests/milvus_server.py) shared by the session; each test
    gets collections of its own through :func:`milvus_prefix`."""
    pytest.importorskip("pymilvus", reason="the milvus backend's tests need the test extra (pymilvus, milvus-lite)")
    from milvus_server import MilvusLite

    server = MilvusLite(tmp_path_factory.mktemp("milvus") / "data").start()
    yield server.uri
    server.stop()


@pytest.fixture
def milvus_prefix(milvus_uri) -> str:
    """The collection prefix of the session's tests, its collections emptied for this test (a new
    prefix per test would cost Milvus Lite ~0.6 s per collection created)."""
    from pymilvus import MilvusClient

    from facegallery.server.gallery.milvus_client import GRPC_OPTIONS

    prefix = "tests"
    client = MilvusClient(uri=milvus_uri, grpc_options=GRPC_OPTIONS)
    try:
        for name in client.list_collections():
            if name.startswith(prefix + "_"):
                client.delete(name, filter="pk > 0")
    finally:
        client.close()
    return prefix


@pytest.fixture(scope="session")
def golden(shared_dir: Path) -> list[dict]:
    """dlib 20.0.1's own outputs, one dict per image (see ../shared/README.md)."""
    lines = (shared_dir / "golden_dlib" / "golden.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _converter_fingerprint() -> str:
    """Hash of the conversion code, so a cached test model is rebuilt when the converter changes."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted((root / "export" / "dlib").glob("*.py")) + [root / "export" / "onnx_common.py"]:
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default dlib model, converted once and cached under tests/.model-cache (git-ignored)."""
    from facegallery.export.dlib.default_model import ensure_default_model

    cache = Path(__file__).resolve().parent / ".model-cache" / f"dlib_resnet_v1-{_converter_fingerprint()}"
    return ensure_default_model(cache)


@pytest.fixture(scope="session")
def pipeline(model_dir: Path):
    """A FacePipeline on the default model with default settings."""
    from facegallery.server.face.pipeline import FacePipeline

    return FacePipeline.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests run torch on one thread: on the shared 2-core CI machine a second thread
    makes small training steps several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
