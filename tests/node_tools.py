"""Node.js for the tests: ``node`` and the npm packages of tests/node (its committed
package-lock.json: @grpc/grpc-js, @grpc/proto-loader, protobufjs, @bufbuild/buf).

:func:`node_modules` installs them with ``npm ci`` when they are missing or older than the lock
file, once per test session even with parallel test processes (a file lock), and skips the
calling test when ``node`` or ``npm`` is not on PATH. Example: ``node_modules() / ".bin" / "buf"``.
:func:`proto_include_dirs` is the include path those tools need for the API's .proto files.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["NODE_DIR", "PROTO_ROOT", "node_executable", "node_modules", "proto_include_dirs"]

#: tests/node: package.json, package-lock.json, client.js.
NODE_DIR = Path(__file__).resolve().parent / "node"
#: The repository's proto/ directory (facegallery/v1/gallery_service.proto, generate.py).
PROTO_ROOT = Path(__file__).resolve().parents[1] / "proto"
#: Seconds ``npm ci`` may take (a cold download of every package, buf's binary included).
NPM_CI_TIMEOUT_S = 600


def node_executable() -> str:
    """Path of ``node``; skips the calling test when it is not on PATH."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: the Node.js tests need Node.js 18.3 or later")
    return node


def _installed(modules: Path, lock: Path) -> bool:
    """Whether ``npm ci`` ran since package-lock.json last changed (npm writes its hidden lock file last)."""
    hidden = modules / ".package-lock.json"
    return hidden.is_file() and hidden.stat().st_mtime >= lock.stat().st_mtime


@functools.cache
def node_modules() -> Path:
    """tests/node/node_modules, installed with ``npm ci`` if needed; skips without node or npm.

    Raises
    ------
    pytest.fail.Exception
        ``npm ci`` failed (its output is in the message).
    """
    node_executable()
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not on PATH: the Node.js tests install their packages with `npm ci`")
    modules, lock = NODE_DIR / "node_modules", NODE_DIR / "package-lock.json"
    # The lock file is the lock: test processes running in parallel wait here for the first one's
    # install (flock needs no write access, and the file is never replaced by npm ci).
    with lock.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not _installed(modules, lock):
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S
            )
            if done.returncode != 0:
                pytest.fail(f"`npm ci` in {NODE_DIR} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return modules


def proto_include_dirs() -> list[Path]:
    """The include path of the API's .proto files, as proto/generate.py compiles them: proto/,
    protobuf's well-known types and the directory holding ``google/rpc/status.proto``."""
    spec = importlib.util.spec_from_file_location("proto_generate", PROTO_ROOT / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.proto_include_dirs()
