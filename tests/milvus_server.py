"""A ``milvus-lite server`` process on a free loopback port for the tests of the milvus backend
(started by the tests themselves; ``.ci/run`` only installs it, with the test extra).

:class:`MilvusLite` can be stopped and started again on the same port and data directory (the
"Milvus down and back" test).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from server_process import free_port

__all__ = ["MilvusLite"]

#: Seconds Milvus Lite gets to accept connections after it is started.
START_TIMEOUT_S = 60.0


class MilvusLite:
    """``milvus-lite server --data-dir DIR --host 127.0.0.1 --port PORT``; ``uri`` for pymilvus."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._log = data_dir.parent / f"milvus-lite-{self.port}.log"

    def start(self) -> MilvusLite:
        exe = Path(sys.executable).with_name("milvus-lite")
        command = str(exe) if exe.is_file() else shutil.which("milvus-lite")
        assert command, "milvus-lite is not installed (pip install -e '.[test]' brings it)"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(
                [command, "server", "--data-dir", str(self.data_dir), "--host", "127.0.0.1", "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with {self.process.returncode}: {self._log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"milvus-lite did not accept connections on port {self.port} within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
