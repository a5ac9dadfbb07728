"""Regenerate the Python gRPC stubs next to the .proto files.

Run ``python proto/generate.py`` after editing a .proto file; ``tests/test_proto_stubs.py``
fails when the committed stubs differ from what this produces.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def proto_include_dirs() -> list[Path]:
    """protoc's include path for the API: this directory, protobuf's well-known types (from
    grpcio-tools) and ``google/rpc/*.proto`` (from googleapis-common-protos, whose Python package
    ships the .proto files next to the generated modules)."""
    import google.rpc
    import grpc_tools

    googleapis = Path(next(iter(google.rpc.__path__))).parent.parent
    return [PROTO_ROOT, Path(grpc_tools.__file__).parent / "_proto", googleapis]


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Compile every ``facegallery/v1/*.proto`` into ``out_dir``; returns the proto files."""
    include = proto_include_dirs()
    protos = sorted((PROTO_ROOT / "facegallery" / "v1").glob("*.proto"))
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            *(f"-I{directory}" for directory in include),
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(proto.relative_to(PROTO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return protos


if __name__ == "__main__":
    generate()
    sys.exit(0)
