"""A real ``facegallery serve`` process for the tests that drive the server as users do
(test_exposed_server.py, test_node_client.py): API keys made with ``facegallery keys`` on the data
directory, TLS or mTLS from a test PKI (pki.py), an optional Prometheus endpoint.

The server listens on 127.0.0.1 port 0 and the bound port is read from its start-up log line
("listening on 127.0.0.1:PORT"); the metrics endpoint needs a port given in advance
(:func:`free_port`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pki import Pki

from facegallery.client import DeadlineExceeded, GalleryClient

__all__ = ["HOST", "ServerProcess", "clean_env", "create_key", "create_keys", "facegallery_command", "free_port", "revoke_key", "serve"]

HOST = "127.0.0.1"
#: Seconds a server gets to log its port and then report SERVING (the model is already converted).
START_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"listening on \S+?:(\d+) ")


def facegallery_command() -> list[str]:
    """The ``facegallery`` console script of this venv (or the one on PATH)."""
    exe = Path(sys.executable).with_name("facegallery")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("facegallery")
    assert found, "the facegallery console script is not installed (pip install -e .)"
    return [found]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without its ``FACEGALLERY_*`` variables (a developer's
    FACEGALLERY_CONFIG, FACEGALLERY_API_KEY, ... must not reach the commands under test), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FACEGALLERY_")} | extra


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for ``--metrics-port``, which has no "pick one")."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _keys(*args: str) -> str:
    """Run ``facegallery keys ARGS`` and return its standard output."""
    done = subprocess.run(facegallery_command() + ["keys", *args], capture_output=True, text=True, timeout=60, env=clean_env())
    assert done.returncode == 0, f"facegallery keys {' '.join(args)} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def create_key(data_dir: Path, name: str, role: str, galleries: tuple[str, ...] = ()) -> str:
    """``facegallery keys create --data-dir DATA_DIR --name NAME --role ROLE [--gallery G ...] --json``:
    the new key, as printed once."""
    gallery_args = (a for g in galleries for a in ("--gallery", g))
    created = json.loads(_keys("create", "--data-dir", str(data_dir), "--name", name, "--role", role, *gallery_args, "--json"))
    assert created["name"] == name and created["key"].startswith("fg_"), created
    return created["key"]


def create_keys(data_dir: Path, keys: Mapping[str, tuple[str, tuple[str, ...]]]) -> dict[str, str]:
    """:func:`create_key` for each ``name -> (role, galleries)``: the first alone (it creates the
    store), the others as concurrent commands. Returns ``name -> key``."""
    (first, (role, galleries)), *others = keys.items()
    created = {first: create_key(data_dir, first, role, galleries)}
    with ThreadPoolExecutor(max_workers=len(others) or 1) as pool:
        pending = {name: pool.submit(create_key, data_dir, name, role, galleries) for name, (role, galleries) in others}
    return created | {name: future.result() for name, future in pending.items()}


def revoke_key(data_dir: Path, name: str) -> None:
    """``facegallery keys revoke NAME --data-dir DATA_DIR`` (a server may be running on it)."""
    _keys("revoke", name, "--data-dir", str(data_dir))


@dataclass(frozen=True)
class ServerProcess:
    """A running server: where it listens, how to reach it, and its log."""

    process: subprocess.Popen
    port: int
    log_path: Path
    pki: Pki | None
    mtls: bool
    metrics_port: int | None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, api_key: str | None = None, **kwargs) -> GalleryClient:
        """A GalleryClient with this server's TLS settings (CA, and the client certificate under
        mTLS) and the given key."""
        tls = {}
        if self.pki is not None:
            tls["tls_ca"] = self.pki.ca_path
            if self.mtls:
                tls.update(tls_cert=self.pki.client_cert_path, tls_key=self.pki.client_key_path)
        return GalleryClient(self.address, api_key=api_key, **tls, **kwargs)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _wait_for_port(process: subprocess.Popen, log_path: Path) -> int:
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        found = _LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"the server logged no 'listening on' line in {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def serve(
    data_dir: Path, model_dir: Path, log_path: Path, *, pki: Pki | None = None, mtls: bool = False, metrics_port: int | None = None
) -> Iterator[ServerProcess]:
    """Run ``facegallery serve`` on 127.0.0.1 until the block ends (then SIGTERM, its graceful stop).

    Parameters
    ----------
    data_dir, model_dir : Path
        ``--data-dir`` and ``--model-dir``. Keys the data directory holds make the server require them.
    log_path : Path
        The server's stdout and stderr.
    pki : Pki, optional
        Serve TLS with ``pki``'s server certificate; None = plaintext.
    mtls : bool
        Also require client certificates signed by ``pki``'s CA (``--tls-client-ca``).
    metrics_port : int, optional
        ``--metrics-port``.

    Yields the server once its health is SERVING.
    """
    command = facegallery_command() + ["serve", "--host", HOST, "--port", "0", "--data-dir", str(data_dir), "--model-dir", str(model_dir)]
    command += ["--max-workers", "4", "--grace", "2"]
    if pki is not None:
        command += ["--tls-cert", str(pki.server_cert_path), "--tls-key", str(pki.server_key_path)]
        if mtls:
            command += ["--tls-client-ca", str(pki.ca_path)]
    if metrics_port is not None:
        command += ["--metrics-port", str(metrics_port)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    try:
        server = ServerProcess(process, _wait_for_port(process, log_path), log_path, pki, mtls, metrics_port)
        with server.client() as client:  # health is open without a key
            try:
                client.wait_ready(START_TIMEOUT_S)
            except DeadlineExceeded:
                raise AssertionError(f"the server did not become SERVING:\n{server.log_tail()}") from None
        try:
            yield server
        except Exception:  # shown by pytest with the failing fixture or test ("Captured stderr")
            print(f"--- end of the server log {log_path}:\n{server.log_tail()}", file=sys.stderr)
            raise
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the server drains gracefully), then SIGKILL after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
