"""The committed gRPC stubs are exactly what grpcio-tools generates from the .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"


def _generate_module():
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO_ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stubs_are_in_sync(tmp_path):
    protos = _generate_module().generate(tmp_path)
    assert protos, "no .proto files found"
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert len(generated) == 3 * len(protos)
    stale = [str(rel) for rel in generated if (PROTO_ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stubs out of date, run `python proto/generate.py`: {stale}"
