"""Issue 9: a second-language client. tests/node/client.js (@grpc/grpc-js, @grpc/proto-loader)
talks to a real ``facegallery serve`` process over TLS with an API key made by ``facegallery keys
create``: it enrolls a real photo, identifies the same photo and a photo of someone else, and
reads the ``NO_FACE`` reason of a failed Enroll from the google.rpc.Status in the error's trailers.

Skipped when ``node`` or ``npm`` is not on PATH; the npm packages are installed by node_tools.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from node_tools import NODE_DIR, PROTO_ROOT, node_executable, node_modules, proto_include_dirs
from pki import Pki
from server_process import clean_env, create_key, serve

IDENTITY = "obama"


@pytest.fixture(scope="module")
def node() -> str:
    """``node``, with tests/node's packages installed; skips (before any server starts) without node or npm."""
    executable = node_executable()
    node_modules()
    return executable


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, model_dir: Path):
    """A TLS server (no client certificates) whose store holds one write key; yields (server, key)."""
    base = tmp_path_factory.mktemp("node")
    data_dir = base / "data"
    key = create_key(data_dir, "node-door", "write")
    with serve(data_dir, model_dir, base / "server.log", pki=Pki(base)) as server:
        yield server, key


def test_the_node_client_enrolls_identifies_and_reads_the_no_face_reason(node: str, tls_server, shared_dir: Path):
    """The same photo enrolled and identified from Node comes back as the enrolled identity at a
    near-zero distance; someone else comes back unknown: the proto3 `optional` identity_id unset
    (null in Node), the distance to the nearest identity set. Enroll of a photo without a face
    fails with INVALID_ARGUMENT, and the ErrorInfo decoded in Node says NO_FACE in domain
    facegallery.v1. The Python client, with the same key, sees the one template Node enrolled."""
    server, key = tls_server
    faces = shared_dir / "faces"
    # protobuf's well-known types and google/rpc/*.proto (googleapis-common-protos), beside proto/
    includes = [arg for directory in proto_include_dirs() if directory != PROTO_ROOT for arg in ("--include", str(directory))]
    command = [
        node, str(NODE_DIR / "client.js"), "--address", server.address, "--ca", str(server.pki.ca_path),
        "--proto-dir", str(PROTO_ROOT), *includes, "--identity", IDENTITY,
        "--photo", str(faces / "face_recognition/barack_obama/obama_small.jpg"), "--no-face", str(faces / "_noface/skimage/page.png"),
        "--stranger", str(faces / "face_recognition/kit_harington/john2.jpeg"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env(FACEGALLERY_API_KEY=key))
    assert done.returncode == 0, f"client.js failed ({done.returncode}):\n{done.stderr}\n{server.log_tail()}"
    steps = {line["step"]: line for line in map(json.loads, done.stdout.splitlines())}
    print(f"\nclient.js output: {json.dumps(steps)}")

    assert steps["enroll"]["identity_id"] == IDENTITY and steps["enroll"]["identity_created"] is True
    (face,) = steps["identify"]["faces"]
    assert face["identity_id"] == IDENTITY
    assert 0 <= face["distance"] < 0.1
    assert face["estimated_fpir"] is None or 0 <= face["estimated_fpir"] <= 1
    (stranger,) = steps["identify_stranger"]["faces"]
    assert stranger["identity_id"] is None and stranger["distance"] > 0.6
    failed = steps["enroll_no_face"]
    assert (failed["code"], failed["reason"], failed["domain"]) == ("INVALID_ARGUMENT", "NO_FACE", "facegallery.v1")

    with server.client(key) as client:
        assert client.get_identity(IDENTITY).template_count == 1
