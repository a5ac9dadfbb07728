"""``facegallery serve``: the click command that runs the gRPC server; ``facegallery doctor``, which
checks a data directory offline (gallery/doctor.py).

The client CLI's main group (client/cli.py) builds this command with :func:`make_serve_command`,
handing it the default-model bootstrap: the dlib converter lives in ``facegallery.export``, which
the server never imports. Every ``--help`` default is read from the constant the code itself uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import click

from facegallery.server.contract.errors import StoreCorruptError
from facegallery.server.face.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS
from facegallery.server.face.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from facegallery.server.face.detect import DEFAULT_MAX_DETECT_PIXELS, DEFAULT_MIN_FACE_SIZE, DetectionConfig
from facegallery.server.face.pipeline import PipelineConfig
from facegallery.server.gallery.doctor import Status, diagnose, worst
from facegallery.server.service.app import (
    DEFAULT_GRACE_S,
    DEFAULT_HOST,
    DEFAULT_MAX_WORKERS,
    DEFAULT_PORT,
    DEFAULT_SEARCH_THREADS,
    DEFAULT_SNAPSHOT_INTERVAL_S,
    InsecureAddressError,
    ServerConfig,
    default_data_dir,
    is_loopback_host,
)
from facegallery.server.service.app import serve as run_server

__all__ = ["make_doctor_command", "make_serve_command"]

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def make_serve_command(default_model: Callable[[], Path]) -> click.Command:
    """The ``serve`` click command.

    Parameters
    ----------
    default_model : callable () -> Path
        Returns the model directory served when ``--model-dir`` is not given, converting it on
        first use (``facegallery.export.dlib.default_model.ensure_default_model``); called only
        when the command runs.
    """

    @click.command("serve")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help=f"Store and index directory  [default: {default_data_dir()}]")
    @click.option("--host", default=DEFAULT_HOST, show_default=True,
                  help="Address to listen on. Without --tls-cert/--tls-key only a loopback address (localhost, 127.0.0.1, ::1) is "
                  "allowed, unless --insecure.")
    @click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
                  help="Port to listen on (0 picks a free one, logged at start).")
    @click.option("--model-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
                  help="Model directory with model.json  [default: the dlib model in $FACEGALLERY_MODEL_DIR or the user data dir, converted on first start (a few seconds)]")
    @click.option("--log-level", type=click.Choice(_LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True)
    @click.option("--max-workers", type=click.IntRange(1), default=DEFAULT_MAX_WORKERS, show_default=True, help="Calls served at once (gRPC threads).")
    @click.option("--batch-size", type=click.IntRange(1), default=DEFAULT_MAX_BATCH_SIZE, show_default=True,
                  help="Most face chips per batch across concurrent calls (1 = no batching).")
    @click.option("--batch-delay-ms", type=click.FloatRange(0), default=DEFAULT_MAX_DELAY_MS, show_default=True,
                  help="Longest wait for more chips before a batch runs (milliseconds).")
    @click.option("--min-face-size", type=click.IntRange(8), default=DEFAULT_MIN_FACE_SIZE, show_default=True, help="Smallest face to find, pixels.")
    @click.option("--max-detect-pixels", type=click.IntRange(10_000), default=DEFAULT_MAX_DETECT_PIXELS, show_default=True,
                  help="Largest image area the detector runs on; bigger photos are detected on a downscaled copy.")
    @click.option("--max-image-bytes", type=click.IntRange(1), default=DEFAULT_MAX_IMAGE_BYTES, show_default=True,
                  help="Larger images are refused with RESOURCE_EXHAUSTED.")
    @click.option("--max-image-pixels", type=click.IntRange(1), default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True,
                  help="Images with more pixels are refused with RESOURCE_EXHAUSTED.")
    @click.option("--memory-budget", type=click.IntRange(0), default=None, metavar="MB",
                  help="Working memory all image calls may hold at once, MiB (estimated from each image's header); a call "
                  "that does not fit waits up to 2 s, then gets RESOURCE_EXHAUSTED. Default: 25% of physical memory; 0 = no budget.")
    @click.option("--flip-augment", is_flag=True,
                  help="Embed each face chip and its mirror image and average (better accuracy, 2x embedding cost). "
                  "It changes the model id: galleries made without it are refused, and the other way round.")
    @click.option("--intra-op-threads", type=click.IntRange(0), default=PipelineConfig.intra_op_threads, show_default=True,
                  help="onnxruntime threads per model (0 = one per core).")
    @click.option("--search-threads", type=click.IntRange(1), default=DEFAULT_SEARCH_THREADS, show_default=True, help="faiss threads per search.")
    @click.option("--snapshot-interval", type=click.FloatRange(0, min_open=True), default=DEFAULT_SNAPSHOT_INTERVAL_S, show_default=True,
                  help="Seconds between index snapshots.")
    @click.option("--grace", type=click.FloatRange(0), default=DEFAULT_GRACE_S, show_default=True,
                  help="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
    @click.option("--integrity-check", type=click.Choice(["quick", "full"]), default=ServerConfig.integrity_check, show_default=True,
                  help="SQLite check of the store at start: quick (PRAGMA quick_check, ~0.1 s per 100,000 templates), "
                  "or full (PRAGMA integrity_check, also checks every index against its table, ~2x). A damaged store is refused.")
    @click.option("--max-streams", type=click.IntRange(1), default=ServerConfig.max_streams, show_default=True,
                  help="BulkEnroll/ImportEmbeddings streams open at once (they get threads beyond --max-workers); more are refused.")
    @click.option("--max-streams-per-client", type=click.IntRange(1), default=ServerConfig.max_streams_per_client, show_default=True,
                  help="Streams open at once from one client address.")
    @click.option("--stream-idle", type=click.FloatRange(0, min_open=True), default=ServerConfig.stream_idle_s, show_default=True,
                  help="Seconds a stream may send nothing before it is ended (DEADLINE_EXCEEDED).")
    @click.option("--max-connections", type=click.IntRange(1), default=ServerConfig.max_connections, show_default=True,
                  help="TCP connections accepted at once (per listening address).")
    @click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM server certificate (chain): serve TLS. Needs --tls-key.")
    @click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM private key of --tls-cert.")
    @click.option("--tls-client-ca", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM CA certificate(s): require mTLS, refusing at the handshake clients without a certificate signed by it.")
    @click.option("--insecure", is_flag=True,
                  help="Allow plaintext, or no API keys, on a non-loopback --host (logged as a warning): without TLS and keys "
                  "anyone who reaches the port can read and change every gallery. Create keys with `facegallery keys create --data-dir`.")
    @click.option("--metrics-port", type=click.IntRange(0, 65535), default=ServerConfig.metrics_port, show_default=True,
                  help="Serve Prometheus metrics on http://HOST:PORT/metrics (HOST = --host); 0 = off.")
    def serve(
        data_dir: Path | None,
        host: str,
        port: int,
        model_dir: Path | None,
        log_level: str,
        max_workers: int,
        batch_size: int,
        batch_delay_ms: float,
        min_face_size: int,
        max_detect_pixels: int,
        max_image_bytes: int,
        max_image_pixels: int,
        memory_budget: int | None,
        flip_augment: bool,
        intra_op_threads: int,
        search_threads: int,
        snapshot_interval: float,
        grace: float,
        integrity_check: str,
        max_streams: int,
        max_streams_per_client: int,
        stream_idle: float,
        max_connections: int,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_client_ca: Path | None,
        insecure: bool,
        metrics_port: int,
    ) -> None:
        """Run the face gallery gRPC server until SIGTERM or Ctrl-C.

        Enrolled templates are stored in DATA_DIR/gallery.sqlite3 (an acknowledged enrollment
        survives a crash); the search indexes are rebuilt or reloaded from DATA_DIR/index at start.
        """
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        if tls_client_ca is not None and tls_cert is None:
            raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        if tls_cert is None and not insecure and not is_loopback_host(host):
            raise click.UsageError(
                f"refusing to serve without TLS on the non-loopback address {host}: give --tls-cert and --tls-key, "
                "listen on localhost, or pass --insecure"
            )
        pipeline = PipelineConfig(
            intra_op_threads=intra_op_threads,
            flip_augment=flip_augment,
            detection=DetectionConfig(min_face_size=min_face_size, max_detect_pixels=max_detect_pixels),
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
            memory_budget_bytes=None if memory_budget is None else memory_budget << 20,
        )
        config = ServerConfig(
            data_dir=data_dir if data_dir is not None else default_data_dir(),
            host=host,
            port=port,
            model_dir=model_dir if model_dir is not None else default_model(),
            max_workers=max_workers,
            batch_max_size=batch_size,
            batch_max_delay_ms=batch_delay_ms,
            search_threads=search_threads,
            pipeline=pipeline,
            snapshot_interval_s=snapshot_interval,
            max_streams=max_streams,
            max_streams_per_client=max_streams_per_client,
            stream_idle_s=stream_idle,
            max_connections=max_connections,
            metrics_port=metrics_port,
            grace_s=grace,
            integrity_check=integrity_check,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            insecure=insecure,
        )
        try:
            run_server(config)
        except (StoreCorruptError, InsecureAddressError) as exc:
            raise click.ClickException(str(exc)) from exc

    return serve


def make_doctor_command(default_model_dir: Callable[[], Path]) -> click.Command:
    """The ``doctor`` click command.

    Parameters
    ----------
    default_model_dir : callable () -> Path
        Returns the default model directory (``facegallery.export.dlib.default_model.default_model_dir``),
        checked when ``--model-dir`` is not given and it exists; never converts anything.
    """

    @click.command("doctor")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help=f"Data directory to check  [default: {default_data_dir()}]")
    @click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Model directory to check (every file's sha256, and the galleries' model ids)  "
                  "[default: the default dlib model directory, when it exists]")
    @click.option("--full", is_flag=True, help="Run PRAGMA integrity_check (also every index against its table, ~2x) instead of quick_check.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per check: check, status, message.")
    def doctor(data_dir: Path | None, model_dir: Path | None, full: bool, as_json: bool) -> None:
        """Check a data directory without the server: the store (SQLite integrity check, schema,
        galleries), its WAL, the index snapshots and the model files.

        One line per check, OK, WARN or FAIL. The server may be running (SQLite lets a reader in
        while it writes). Exit 0 when nothing FAILed (WARN included), 1 on any FAIL.
        """
        data_dir = data_dir if data_dir is not None else default_data_dir()
        if model_dir is None:
            default = default_model_dir()
            model_dir = default if default.is_dir() else None
        if not data_dir.is_dir():
            raise click.ClickException(f"no data directory at {data_dir}")
        findings = diagnose(data_dir, model_dir, integrity_check="full" if full else "quick")
        width = max(len(f.check) for f in findings)
        for f in findings:
            click.echo(json.dumps(f.to_json(), ensure_ascii=False) if as_json else f"{f.status.value:<4}  {f.check:<{width}}  {f.message}")
        if not as_json:
            counts = {s: sum(f.status is s for f in findings) for s in Status}
            click.echo(f"{counts[Status.OK]} OK, {counts[Status.WARN]} WARN, {counts[Status.FAIL]} FAIL", err=True)
        if worst(findings) is Status.FAIL:
            raise SystemExit(1)

    return doctor
