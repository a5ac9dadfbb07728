"""``facegallery serve --backend milvus``: the server side of the milvus backend (app.py, cli.py,
settings.py; the store itself is tests/test_milvus_backend.py's).

* Two real ``facegallery serve --backend milvus`` processes on one Milvus Lite (the session's,
  conftest.py) with the default dlib model and real LFW photos: what one acknowledges the other
  finds at once, a delete likewise, and a client given both addresses fails over when one is
  killed (kill -9) in the middle of a stream of enrollments, losing no acknowledged template.
* A Milvus that goes away and comes back under one running server (in-process, fake pipeline, an
  API key made with ``facegallery keys create --backend milvus``): calls fail with UNAVAILABLE
  (``BACKEND_UNAVAILABLE``, also in the key check) and health is NOT_SERVING while it is down,
  then calls succeed and health is SERVING again, without restarting the server.
* The settings and the ``keys`` command's options, and a Milvus unreachable at start.

Cost: the process test starts two servers (~5 s each on 2 cores) and enrolls :data:`PHOTOS`
photos twice (each enrollment through A followed by an identification through B, then the
failover stream), about 0.1 s per photo and step: the issue's 200 photos cost about 40 s more
than 30 would.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from server_process import HOST, ServerProcess, _wait_for_port, clean_env, facegallery_command, stop

from facegallery.client import GalleryClient, InvalidArgument, NotFound, Unauthenticated, Unavailable

pytest.importorskip("pymilvus", reason="the milvus backend's tests need the test extra (pymilvus, milvus-lite)")

#: LFW photos enrolled in each phase of the two-server test (the issue asks 200; see the module docstring).
PHOTOS = 200
#: Acknowledged enrollments of the failover stream before server A is killed.
KILL_AFTER = PHOTOS // 3
#: Seconds a server gets to report SERVING, and that health gets to change.
START_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------
# helpers


@contextmanager
def _milvus_serve(name: str, base: Path, model_dir: Path, uri: str, prefix: str, *extra: str) -> Iterator[ServerProcess]:
    """``facegallery serve --backend milvus`` on 127.0.0.1 (a free port) with ``extra``
    arguments, SIGTERM at the end (server_process.serve for the embedded backend). Its
    ``--data-dir`` must stay uncreated."""
    log_path = base / f"{name}.log"
    command = facegallery_command() + ["serve", "--backend", "milvus", "--milvus-uri", uri, "--milvus-prefix", prefix, *extra]
    command += ["--host", HOST, "--port", "0", "--data-dir", str(base / f"{name}-data"), "--model-dir", str(model_dir)]
    command += ["--max-workers", "4", "--grace", "2"]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    try:
        server = ServerProcess(process, _wait_for_port(process, log_path), log_path, None, False, None)
        with server.client() as client:
            client.wait_ready(START_TIMEOUT_S)
        yield server
    except Exception:
        print(f"--- end of the server log {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        if process.poll() is None:
            stop(process)


def _lfw_photos(shared_dir: Path, count: int) -> list[tuple[str, bytes]]:
    """``(identity id, JPEG bytes)`` of the first photo of the first LFW people (sorted), byte-distinct;
    a few more than ``count`` since the detector may find no face in some."""
    seen: set[str] = set()
    out: list[tuple[str, bytes]] = []
    for person in sorted((shared_dir / "faces" / "lfw").iterdir()):
        files = sorted(person.glob("*.jpg"))
        if not files:
            continue
        data = files[0].read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((person.name.lower(), data))
        if len(out) >= count + 10:
            break
    return out


def _wait_health(client: GalleryClient, status: str, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
    """Seconds until both health services ("" and the GalleryService) report ``status``."""
    started = time.monotonic()
    while True:
        states = {client.health(timeout=5), client.health(service="facegallery.v1.GalleryService", timeout=5)}
        if states == {status}:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"health is {states}, not {status}, after {timeout_s} s"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# two server processes on one Milvus


@pytest.mark.slow  # two model-loading servers and 200 photos enrolled twice: ~150 s on 2 cores
def test_two_servers_share_the_galleries_and_a_client_fails_over(tmp_path, model_dir, shared_dir, milvus_uri, milvus_prefix):
    photos = _lfw_photos(shared_dir, PHOTOS)
    # B leaves searches to Milvus (--milvus-search milvus, milvus_index.py): every identify on B below is Milvus's
    b_searches = ("--milvus-search", "milvus")
    with _milvus_serve("a", tmp_path, model_dir, milvus_uri, milvus_prefix) as a, _milvus_serve("b", tmp_path, model_dir, milvus_uri, milvus_prefix, *b_searches) as b:
        with a.client(timeout=60) as on_a, b.client(timeout=60) as on_b:
            on_a.create_gallery("lfw", threshold=0.6)  # fixed: the decision is the nearest identity within 0.6
            enrolled: dict[str, int] = {}
            for identity_id, photo in photos:
                if len(enrolled) == PHOTOS:
                    break
                try:
                    ack = on_a.enroll(identity_id, photo, gallery="lfw")
                except InvalidArgument as exc:  # a photo whose face the detector misses
                    assert exc.reason == "NO_FACE", exc
                    continue
                enrolled[identity_id] = ack.template_id
                found = on_b.identify(photo, gallery="lfw", top_k=1)  # right after the ack, on the other server
                assert identity_id in {face.identity_id for face in found}, (identity_id, found)
            assert len(enrolled) == PHOTOS
            gallery = on_b.get_gallery("lfw")
            assert (gallery.identity_count, gallery.template_count) == (PHOTOS, PHOTOS)

            gone, photo = next((i, p) for i, p in photos if i in enrolled)
            assert on_a.delete_identity(gone, gallery="lfw") == 1
            with pytest.raises(NotFound):
                on_b.get_identity(gone, gallery="lfw")
            assert gone not in {face.identity_id for face in on_b.identify(photo, gallery="lfw")}
            assert on_b.get_gallery("lfw").template_count == PHOTOS - 1

            # kill -9 A in the middle of a stream of enrollments through a client of both
            on_a.create_gallery("failover", threshold=0.6)
            usable = [(i, p) for i, p in photos if i in enrolled]
            acked: dict[str, int] = {}
            failed: list[str] = []
            killed = threading.Event()
            acked_after_kill: list[str] = []

            def stream() -> None:
                with GalleryClient([a.address, b.address], timeout=30, gallery="failover") as both:
                    for identity_id, photo in usable:
                        was_killed = killed.is_set()
                        try:
                            acked[identity_id] = both.enroll(identity_id, photo).template_id
                        except Unavailable:  # the call A was serving, or the first to meet its closed connection
                            failed.append(identity_id)
                            continue
                        if was_killed:
                            acked_after_kill.append(identity_id)

            worker = threading.Thread(target=stream)
            worker.start()
            deadline = time.monotonic() + 120
            while len(acked) < KILL_AFTER and worker.is_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            a.process.send_signal(signal.SIGKILL)
            a.process.wait(10)
            killed.set()
            worker.join(180)
            assert not worker.is_alive()
            print(f"failover: {len(acked)} acknowledged ({len(acked_after_kill)} after the kill), failed: {failed}")
            assert len(acked) >= KILL_AFTER and len(failed) <= 3, (len(acked), failed)
            assert len(acked_after_kill) >= len(usable) - KILL_AFTER - 4, (acked_after_kill, failed)  # B took over
            for identity_id, template_id in acked.items():  # every acknowledged template is on B
                identity = on_b.get_identity(identity_id, gallery="failover")
                assert template_id in {t.template_id for t in identity.templates}, identity_id
            counts = on_b.get_gallery("failover")
            # a call A stored but could not answer before it died may be there too (never acknowledged)
            assert len(acked) <= counts.template_count <= len(acked) + len(failed)
            assert counts.identity_count == counts.template_count
    assert a.process.returncode == -signal.SIGKILL
    assert not (tmp_path / "a-data").exists() and not (tmp_path / "b-data").exists()  # nothing on local disk
    assert "Milvus at " + milvus_uri in (tmp_path / "a.log").read_text()
    assert f"Milvus at {milvus_uri} (collections {milvus_prefix}_*), searched by Milvus" in (tmp_path / "b.log").read_text()


# ---------------------------------------------------------------------------------------------
# Milvus down and back under one server


def test_milvus_down_and_back_turns_health_and_calls_without_a_restart(tmp_path):
    from fakes import FakePipeline, photo
    from milvus_server import MilvusLite

    from facegallery.client.cli import main
    from facegallery.server.service.app import ServerConfig, create_server

    milvus = MilvusLite(tmp_path / "milvus").start()
    running = None
    try:
        created = CliRunner().invoke(
            main, ["keys", "create", "--backend", "milvus", "--milvus-uri", milvus.uri, "--milvus-prefix", "down", "--name", "ops", "--role", "admin", "--json"]
        )
        assert created.exit_code == 0, created.output
        key = next(json.loads(line) for line in created.output.splitlines() if line.startswith("{"))["key"]
        config = ServerConfig(backend="milvus", milvus_uri=milvus.uri, milvus_prefix="down", host="127.0.0.1", port=0, data_dir=tmp_path / "unused")
        running = create_server(config, pipeline=FakePipeline())
        running.manager.store.milvus.timeout_s = 3.0  # a ping or call of a Milvus that is gone fails within 3 s
        assert running.backend_health is not None
        with GalleryClient(f"127.0.0.1:{running.port}", timeout=20, retries=0, api_key=key) as client:
            with GalleryClient(f"127.0.0.1:{running.port}", retries=0) as keyless, pytest.raises(Unauthenticated):  # the keys are in Milvus
                keyless.identify(photo((200, 10, 0)))
            client.enroll("ann", photo((200, 10, 0)))
            assert client.identify(photo((200, 10, 0)))[0].identity_id == "ann"
            assert client.health() == "SERVING"

            milvus.stop()
            failures = []
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # past the key check's 1 s cache: that path too
                with pytest.raises(Unavailable) as info:
                    client.identify(photo((200, 10, 0)))
                failures.append((info.value.code, info.value.reason))
                time.sleep(0.3)
            assert set(failures) == {(grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")}
            with pytest.raises(Unavailable):
                client.enroll("bob", photo((10, 200, 0)))
            _wait_health(client, "NOT_SERVING")
            assert running.backend_health.answering is False

            milvus.start()
            _wait_health(client, "SERVING", timeout_s=60)  # the same server: no restart
            assert client.identify(photo((200, 10, 0)))[0].identity_id == "ann"
            client.enroll("bob", photo((10, 200, 0)))
            assert client.get_gallery().template_count == 2
        running.stop(1)
        assert not running.backend_health._thread.is_alive()
        assert not (tmp_path / "unused").exists()
    finally:
        if running is not None:
            running.stop(1)
        milvus.stop()


# ---------------------------------------------------------------------------------------------
# settings, the keys command, an unreachable Milvus at start


@pytest.fixture
def serve_settings(monkeypatch, tmp_path):
    """``invoke(*args, env=None)``: ``facegallery serve`` with run_server replaced; returns (result, ServerConfig or None)."""
    from facegallery.server.service import cli

    ran = []
    monkeypatch.setattr(cli, "run_server", ran.append)
    monkeypatch.setattr(cli, "configure_logging", lambda level, fmt: None)
    command = cli.make_serve_command(lambda: tmp_path)

    def invoke(*args: str, env: dict[str, str] | None = None):
        ran.clear()
        result = CliRunner().invoke(command, list(args), env={**{k: None for k in clean_env_keys()}, **(env or {})}, catch_exceptions=False)
        return result, (ran[0] if ran else None)

    return invoke


def clean_env_keys() -> list[str]:
    import os

    return [k for k in os.environ if k.startswith("FACEGALLERY_")]


def test_backend_settings_from_flags_env_and_file_and_the_token_stays_hidden(serve_settings, tmp_path):
    result, server = serve_settings()
    assert result.exit_code == 0, result.output
    assert (server.backend, server.milvus_uri, server.milvus_token, server.milvus_prefix) == ("embedded", "http://127.0.0.1:19530", "", "facegallery")

    config = tmp_path / "serve.toml"
    config.write_text('backend = "milvus"\nmilvus_uri = "http://milvus:19530"\n')
    env = {"FACEGALLERY_MILVUS_TOKEN": "root:s3cret-token", "FACEGALLERY_MILVUS_PREFIX": "site_a"}
    result, server = serve_settings("--config", str(config), env=env)
    assert result.exit_code == 0, result.output
    assert (server.backend, server.milvus_uri, server.milvus_token, server.milvus_prefix) == ("milvus", "http://milvus:19530", "root:s3cret-token", "site_a")
    assert "s3cret" not in repr(server)
    assert server.milvus_search == "server"
    _, server = serve_settings("--backend", "embedded", "--milvus-uri", "https://m:443", "--milvus-token", "x:y", "--milvus-prefix", "p2", "--milvus-search", "Milvus", env=env)
    assert (server.backend, server.milvus_uri, server.milvus_token, server.milvus_prefix, server.milvus_search) == ("embedded", "https://m:443", "x:y", "p2", "milvus")

    help_text = serve_settings("--help", "--config", str(config), env=env)[0].output
    assert "--milvus-token" in help_text and "s3cret" not in help_text
    assert "http://milvus:19530" in help_text  # the other defaults in effect are shown

    bad = serve_settings("--milvus-prefix", "has-dash")[0]
    assert bad.exit_code == 2 and "milvus_prefix" in bad.output
    bad = serve_settings(env={"FACEGALLERY_BACKEND": "cassandra"})[0]
    assert bad.exit_code == 2 and "backend" in bad.output and "FACEGALLERY_BACKEND" in bad.output
    bad = serve_settings("--milvus-search", "elsewhere")[0]
    assert bad.exit_code == 2 and "--milvus-search" in bad.output and "elsewhere" in bad.output


def test_an_unreachable_milvus_at_start_is_one_error_line_naming_it(monkeypatch, tmp_path):
    from server_process import free_port

    from facegallery.server.service import cli

    monkeypatch.setattr(cli, "configure_logging", lambda level, fmt: None)
    uri = f"http://127.0.0.1:{free_port()}"
    command = cli.make_serve_command(lambda: tmp_path)
    started = time.monotonic()
    result = CliRunner().invoke(command, ["--backend", "milvus", "--milvus-uri", uri, "--port", "0", "--data-dir", str(tmp_path / "d")], env={k: None for k in clean_env_keys()})
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: Milvus at {uri} cannot be reached") and "Traceback" not in result.output
    assert "--milvus-uri" in result.output and time.monotonic() - started < 20
    assert not (tmp_path / "d").exists()


def test_the_keys_command_on_milvus(milvus_uri, milvus_prefix, tmp_path):
    from facegallery.client.cli import main
    from facegallery.server.gallery.milvus_store import MilvusTemplateStore

    target = ["--backend", "milvus", "--milvus-uri", milvus_uri, "--milvus-prefix", milvus_prefix]
    runner = CliRunner()
    env = {k: None for k in clean_env_keys()} | {"FACEGALLERY_SERVER": "127.0.0.1:1"}  # --backend milvus beats it, as --data-dir does
    created = runner.invoke(main, ["keys", "create", *target, "--name", "door", "--role", "read"], env=env)
    assert created.exit_code == 0, created.output
    listed = runner.invoke(main, ["keys", "list", *target, "--json"], env=env)
    assert listed.exit_code == 0 and '"name": "door"' in listed.output
    store = MilvusTemplateStore(milvus_uri, prefix=milvus_prefix)
    try:
        assert store.has_api_keys() and [r.name for r in store.list_api_keys()] == ["door"]
    finally:
        store.close()
    assert runner.invoke(main, ["keys", "revoke", "door", *target], env=env).exit_code == 0
    both = runner.invoke(main, ["keys", "list", *target, "--data-dir", str(tmp_path)], env=env)
    assert both.exit_code == 2 and "--data-dir" in both.output
    down = runner.invoke(main, ["keys", "list", "--backend", "milvus", "--milvus-uri", "http://127.0.0.1:1"], env=env)
    assert down.exit_code == 1 and "Milvus at http://127.0.0.1:1 cannot be reached" in down.output
