"""`buf lint` of the API with the committed proto/buf.yaml (STANDARD and COMMENTS rules, the
exceptions named and justified in that file).

buf runs as a protoc plugin (``protoc-gen-buf-lint`` from the npm package @bufbuild/buf, installed
by tests/node_tools.py), so ``google/rpc/status.proto`` comes from the googleapis-common-protos
Python package on protoc's include path instead of the Buf Schema Registry, which CI cannot reach.
Skipped where Node.js is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from node_tools import node_modules, proto_include_dirs

from facegallery.v1 import gallery_service_pb2 as pb

PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
API = "facegallery/v1/gallery_service.proto"


def buf_lint(proto_root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """protoc with buf's lint plugin over ``proto_root``/API; returncode 0 when clean, else the
    violations (file:line:column:message) on stderr."""
    plugin = node_modules() / ".bin" / "protoc-gen-buf-lint"
    includes = [proto_root, *(d for d in proto_include_dirs() if d != PROTO_ROOT)]
    options = json.dumps({"input_config": str(PROTO_ROOT / "buf.yaml")})
    command = [
        sys.executable, "-m", "grpc_tools.protoc",
        *(f"-I{d}" for d in includes),
        f"--plugin=protoc-gen-buf-lint={plugin}",
        f"--buf-lint_out={tmp_path}",
        f"--buf-lint_opt={options}",
        API,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_the_api_is_buf_lint_clean(tmp_path):
    done = buf_lint(PROTO_ROOT, tmp_path)
    assert done.returncode == 0, f"buf lint found problems (see proto/buf.yaml):\n{done.stderr}"


def test_buf_lint_reports_an_undocumented_field(tmp_path):
    """The check can fail: the same API with one field's comment removed is refused, naming it."""
    text = (PROTO_ROOT / API).read_text()
    comment = "  // The gallery's name (1..128 characters of [A-Za-z0-9_.-]).\n"
    assert text.count(comment) == 1
    broken = tmp_path / "proto" / API
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(comment, ""))
    done = buf_lint(tmp_path / "proto", tmp_path)
    assert done.returncode != 0
    assert 'Field "name" should have a non-empty comment for documentation' in done.stderr, done.stderr


def test_the_api_names_its_packages_for_other_languages():
    options = pb.DESCRIPTOR.GetOptions()
    assert options.go_package.endswith("/facegallery/v1;facegalleryv1")
    assert (options.java_package, options.java_multiple_files) == ("dev.facegallery.v1", True)
