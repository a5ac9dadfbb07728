"""Building and running the gRPC server: configuration, start-up, health, graceful shutdown.

:func:`create_server` binds the port and starts answering at once (health NOT_SERVING, gallery
calls UNAVAILABLE), loads the model and every gallery's index, then switches health to SERVING.
:func:`serve` runs that until SIGTERM/SIGINT, then stops accepting calls, lets in-flight calls
finish within a grace period, writes index snapshots and closes the store.

Store integrity: before the model is loaded the store runs SQLite's ``PRAGMA quick_check``
(``integrity_check="full"``: ``PRAGMA integrity_check``); a damaged store raises
:class:`~facegallery.server.contract.errors.StoreCorruptError` naming the file and the repair
options, and the server does not start. A damaged store found at run time (a
``sqlite3.DatabaseError`` that is not an ``OperationalError`` such as "database is locked") turns
health NOT_SERVING for good and is logged once, at CRITICAL.

API keys: once the store holds a key, every GalleryService call needs one (auth.py; health and
reflection stay open); a non-loopback host needs TLS and keys, or ``insecure``.

Interceptors, outermost first: request id and access log, metrics (with ``metrics_port``),
readiness, API keys (auth.py; a key store that fails, such as a Milvus that does not answer,
gives its error's status), errors to statuses (interceptors.py).

Data directory layout (``ServerConfig.data_dir``): ``gallery.sqlite3`` (the store) and
``index/`` (index snapshots), see ``facegallery.server.gallery.manager``.

Backends (``ServerConfig.backend``): ``"embedded"`` (the default) keeps the galleries in
``data_dir`` as above; ``"milvus"`` keeps them in the Milvus at ``milvus_uri``
(``facegallery.server.gallery.milvus_store``), shared by every server pointed at it, with nothing
on local disk (no store check, no snapshots). A Milvus that cannot be reached at start raises
:class:`~facegallery.server.contract.errors.BackendUnavailable` (naming the uri) before the model
is loaded; at run time a daemon thread pings it every :data:`BACKEND_PING_INTERVAL_S` seconds and
health is NOT_SERVING while it does not answer, SERVING again once it does (calls meanwhile fail
with UNAVAILABLE, reason ``BACKEND_UNAVAILABLE``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from facegallery.server.contract.errors import BackendUnavailable, ModelError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.contract.paths import user_data_dir
from facegallery.server.face.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS, BatchingEmbedder
from facegallery.server.gallery.ann_index import APPROXIMATE_ABOVE, NPROBE
from facegallery.server.gallery.index import DEFAULT_FACTORY, set_search_threads
from facegallery.server.gallery.manager import DEFAULT_MILVUS_PREFIX, STORE_FILE, FaceAnalyzer, GalleryManager, open_milvus_store
from facegallery.server.gallery.store import SqliteTemplateStore
from facegallery.server.service.auth import AuthInterceptor
from facegallery.server.service.interceptors import AccessLogInterceptor, ErrorInterceptor, ReadinessInterceptor
from facegallery.server.service.metrics import ServerMetrics, start_metrics
from facegallery.server.service.servicer import DEFAULT_BULK_ENROLL_WINDOW, GalleryServicer
from facegallery.server.service.streams import StreamLimiter
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from facegallery.server.face.pipeline import PipelineConfig

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_MAX_WORKERS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_GRACE_S",
    "DEFAULT_SNAPSHOT_INTERVAL_S",
    "BACKENDS",
    "MILVUS_SEARCHES",
    "DEFAULT_MILVUS_URI",
    "DEFAULT_MILVUS_PREFIX",
    "BACKEND_PING_INTERVAL_S",
    "SERVICE_NAME",
    "default_data_dir",
    "ServerConfig",
    "GalleryServer",
    "InsecureAddressError",
    "is_loopback_host",
    "create_server",
    "serve",
]

LOG = logging.getLogger(__name__)

#: Loopback only: without API keys the API has no authentication, so exposing it is an explicit choice
#: (``--host 0.0.0.0`` / ``[::]``). "localhost" binds both 127.0.0.1 and ::1.
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 50051
#: gRPC handler threads = calls served at once.
DEFAULT_MAX_WORKERS = 16
#: Largest request/response (bytes); above the pipeline's 64 MiB image limit (decode.py).
DEFAULT_MAX_MESSAGE_BYTES = 96 * 1024 * 1024
#: Seconds in-flight calls get to finish on shutdown.
DEFAULT_GRACE_S = 10.0
#: Seconds between index snapshots of changed galleries.
DEFAULT_SNAPSHOT_INTERVAL_S = 300.0
#: faiss OpenMP threads per search: requests already run in parallel on the gRPC threads.
DEFAULT_SEARCH_THREADS = 1
#: ``ServerConfig.backend`` values: SQLite in the data directory, or a shared Milvus (docs/milvus.md).
BACKENDS = ("embedded", "milvus")
#: ``ServerConfig.milvus_search`` values: a faiss index per gallery in memory, or Milvus's own search.
MILVUS_SEARCHES = ("server", "milvus")
#: The Milvus of the milvus backend when none is given (a local Milvus standalone or ``milvus-lite server``).
DEFAULT_MILVUS_URI = "http://127.0.0.1:19530"
#: Seconds between pings of the milvus backend's store by the health monitor.
BACKEND_PING_INTERVAL_S = 1.0
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GalleryService"].full_name


def default_data_dir() -> Path:
    """``<user data dir>/facegallery`` (platformdirs), e.g. ``~/.local/share/facegallery``."""
    return user_data_dir()


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything the server is built from (defaults are the module constants).

    Attributes
    ----------
    data_dir : Path
        Store and index snapshots (the embedded backend; unused by the milvus backend).
    backend : str
        ``"embedded"`` (SQLite store in ``data_dir``) or ``"milvus"`` (the galleries in the Milvus
        at ``milvus_uri``, shared with every server pointed at it; see the module docstring).
    milvus_uri, milvus_token, milvus_prefix : str
        With the milvus backend: the Milvus (``http://host:19530``), its ``user:password`` or API
        key (``""``: none; secret, never logged or shown by ``repr``), and the prefix of the
        collection names (several deployments can share one Milvus).
    milvus_search : str
        With the milvus backend, where searches run (:data:`MILVUS_SEARCHES`): ``"server"`` (each
        gallery's embeddings in a faiss index in this server's memory, fastest) or ``"milvus"``
        (Milvus searches them; the server holds 16 bytes per template, for galleries larger than
        its memory; docs/milvus.md).
    host, port : str, int
        Where to listen; port 0 picks a free port (tests).
    model_dir : Path or None
        A model directory (``facegallery.server.contract.manifest``). Required unless
        :func:`create_server` is handed a ready pipeline; ``facegallery serve`` resolves the
        default model (converted on first use by ``facegallery.export.dlib``) before building this.
    max_workers : int
        gRPC handler threads.
    max_message_bytes : int
        Largest gRPC message either way; larger ones fail with RESOURCE_EXHAUSTED.
    batch_max_size, batch_max_delay_ms : int, float
        Dynamic batching of embedding across concurrent calls (``facegallery.server.face.batching``); size 1 disables it.
    search_threads : int
        faiss OpenMP threads per search.
    pipeline : PipelineConfig or None
        Image limits, detection, onnxruntime threads and flip augmentation (pipeline.py; the
        flip augmentation is part of the server's model id); None = its defaults.
    index_factory : str
        faiss factory string of new indexes (``facegallery.server.gallery.index``).
    snapshot_interval_s : float or None
        Seconds between background index snapshots; None = only at shutdown.
    grace_s : float
        Seconds in-flight calls get on shutdown.
    integrity_check : str
        SQLite check of the store at start: ``"quick"`` (``PRAGMA quick_check``, about 0.1 s per
        100,000 templates) or ``"full"`` (``PRAGMA integrity_check``, about twice that).
    max_streams, max_streams_per_client : int
        Client streams (BulkEnroll, ImportEmbeddings) open at once, in total and from one peer
        address; more are refused with RESOURCE_EXHAUSTED (streams.py). The handler pool has
        ``max_workers + max_streams`` threads, so unary calls always have ``max_workers``.
    stream_idle_s : float
        A stream that sends no message for this long ends with DEADLINE_EXCEEDED.
    max_connections : int
        TCP connections the server accepts at once (per listening address; gRPC's
        ``grpc.max_allowed_incoming_connections``).
    approximate_above : int
        A gallery searches an approximate IVF index from this many templates (and its mean
        templates from this many identities), exact search below (gallery/ann_index.py); 0 = always exact.
    nprobe : int
        IVF lists an approximate search visits (recall@1 0.994 at 64 on face-like data, docs/scale.md).
    bulk_enroll_window : int
        Items of one BulkEnroll stream whose images are analysed at once (servicer.py).
    metrics_port : int
        Serve Prometheus metrics on ``http://host:metrics_port/metrics`` (metrics.py); 0 = off.
    handshake_timeout_s, connection_idle_s : float
        A connection that has not finished its HTTP/2 handshake after ``handshake_timeout_s`` is
        closed; one with no call for ``connection_idle_s`` is closed with GOAWAY (clients reconnect).
    tls_cert, tls_key : Path or None
        PEM server certificate (chain) and private key: serve TLS. Both or neither.
    tls_client_ca : Path or None
        PEM CA certificate(s) for mTLS: clients without a certificate signed by them are refused at
        the TLS handshake. Requires ``tls_cert``/``tls_key``.
    insecure : bool
        Allow plaintext, or no API keys, on a non-loopback ``host`` (logged as a WARNING). Without
        it, a non-loopback host needs TLS *and* API keys in the store (``facegallery keys create
        --data-dir``; auth.py), else it refuses to start (:class:`InsecureAddressError`).
    """

    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    backend: str = "embedded"
    milvus_uri: str = DEFAULT_MILVUS_URI
    milvus_token: str = dataclasses.field(default="", repr=False)
    milvus_prefix: str = DEFAULT_MILVUS_PREFIX
    milvus_search: str = "server"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model_dir: Path | None = None
    max_workers: int = DEFAULT_MAX_WORKERS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    batch_max_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    search_threads: int = DEFAULT_SEARCH_THREADS
    pipeline: PipelineConfig | None = None
    index_factory: str = DEFAULT_FACTORY
    snapshot_interval_s: float | None = DEFAULT_SNAPSHOT_INTERVAL_S
    grace_s: float = DEFAULT_GRACE_S
    integrity_check: str = "quick"
    max_streams: int = 8
    max_streams_per_client: int = 4
    stream_idle_s: float = 30.0
    max_connections: int = 1000
    handshake_timeout_s: float = 10.0
    connection_idle_s: float = 600.0
    approximate_above: int = APPROXIMATE_ABOVE
    nprobe: int = NPROBE
    bulk_enroll_window: int = DEFAULT_BULK_ENROLL_WINDOW
    metrics_port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False


class GalleryServer:
    """A started server; unpacks as ``server, port, manager = create_server(config)``.

    Attributes: ``server`` (grpc.Server), ``port`` (int, the bound port), ``manager``
    (GalleryManager), ``health`` (grpc_health HealthServicer), ``backend_health`` (the milvus
    backend's health monitor, stopped by :meth:`stop`; None for the embedded backend).
    """

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        manager: GalleryManager,
        health_servicer: health.HealthServicer,
        embedder: BatchingEmbedder | None,
        metrics: ServerMetrics | None = None,
        backend_health: _BackendHealth | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.manager = manager
        self.health = health_servicer
        self._embedder = embedder
        self._metrics = metrics
        #: the milvus backend's health monitor (None for the embedded store)
        self.backend_health = backend_health
        self._stopped = False

    def __iter__(self):
        return iter((self.server, self.port, self.manager))

    def stop(self, grace_s: float | None = DEFAULT_GRACE_S) -> None:
        """Graceful shutdown: health NOT_SERVING, refuse new calls, wait up to ``grace_s``
        seconds for in-flight ones (None = cancel them), then snapshot and close (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        started = time.perf_counter()
        if self.backend_health is not None:
            self.backend_health.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        LOG.info("in-flight calls drained in %.2f s", time.perf_counter() - started)
        if self._metrics is not None:
            self._metrics.stop()
        self.manager.close()
        if self._embedder is not None:
            self._embedder.close()
        LOG.info("server stopped")


def create_server(config: ServerConfig, *, pipeline: FaceAnalyzer | None = None) -> GalleryServer:
    """Bind, start, load the model and the galleries, then report SERVING.

    Parameters
    ----------
    config : ServerConfig
    pipeline : optional
        A ready face pipeline (tests pass a fake); None loads ``config.model_dir`` with a
        batching embedder.

    Returns
    -------
    GalleryServer
        Started and SERVING; unpacks as ``(server, port, manager)``. Stop it with its
        :meth:`GalleryServer.stop` (or ``server.stop()`` then ``manager.close()``).

    Raises
    ------
    RuntimeError
        The address cannot be bound, or a TLS file cannot be read.
    InsecureAddressError
        No TLS, or no API key in the store, on a non-loopback host without ``config.insecure``
        (raised before binding).
    ModelError
        The model directory is missing or corrupt.
    StoreCorruptError
        The store fails its integrity check (``config.integrity_check``).
    BackendUnavailable
        With the milvus backend: the Milvus at ``config.milvus_uri`` cannot be reached (raised
        before binding).
    """
    if config.integrity_check not in ("quick", "full"):
        raise ValueError(f"integrity_check must be 'quick' or 'full', not {config.integrity_check!r}")
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {config.backend!r}")
    if config.milvus_search not in MILVUS_SEARCHES:
        raise ValueError(f"milvus_search must be one of {', '.join(MILVUS_SEARCHES)}, not {config.milvus_search!r}")
    credentials = _server_credentials(config)  # before anything else: a refused address fails fast
    milvus = config.backend == "milvus"
    store_path = Path(config.data_dir) / STORE_FILE
    has_keys = False
    if milvus:  # before binding and loading the model: an unreachable Milvus fails fast
        has_keys = _milvus_has_keys(config)
    elif store_path.is_file():  # before binding and loading the model: a damaged store fails fast
        checked = SqliteTemplateStore(store_path, integrity_check=config.integrity_check)
        try:
            has_keys = checked.has_api_keys()
        finally:
            checked.close()
    _check_keys(config, has_keys)
    ready = threading.Event()
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    store_failed = _StoreFailure(_milvus_location(config) if milvus else store_path, health_servicer)
    metrics = start_metrics(config.metrics_port, addr=config.host) if config.metrics_port else None  # before the model load it times
    prefix = f"/{SERVICE_NAME}/"
    auth = AuthInterceptor(prefix, on_failure=None if metrics is None else metrics.auth_failed)  # its store is set below, before `ready`
    interceptors = [
        AccessLogInterceptor(prefix),  # outermost: every inner one runs in the call's request-id scope
        *([] if metrics is None else [metrics.interceptor(prefix)]),  # sees the final status code
        ReadinessInterceptor(ready, prefix),
        auth,
        ErrorInterceptor(prefix, on_store_damage=store_failed),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers + config.max_streams, thread_name_prefix="grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ("grpc.max_allowed_incoming_connections", config.max_connections),
            ("grpc.server_handshake_timeout_ms", int(config.handshake_timeout_s * 1000)),
            ("grpc.max_connection_idle_ms", int(config.connection_idle_s * 1000)),
        ],
    )
    streams = StreamLimiter(config.max_streams, config.max_streams_per_client)
    servicer = GalleryServicer(None, streams=streams, stream_idle_s=config.stream_idle_s, bulk_enroll_window=config.bulk_enroll_window)  # type: ignore[arg-type]  # manager set below, before `ready`
    pb_grpc.add_GalleryServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        port, failure = 0, exc
    else:
        failure = None
    if port == 0:
        if metrics is not None:
            metrics.stop()
        raise RuntimeError(f"cannot listen on {address}" + (f": {failure}" if failure else "")) from failure
    server.start()
    LOG.info("listening on %s:%d (%s, starting)", config.host, port, _transport(config))
    embedder = None
    try:
        set_search_threads(config.search_threads)
        if pipeline is None:
            pipeline, embedder = _load_pipeline(config)
        index_options: dict[str, object] = {
            "index_factory": config.index_factory,
            "approximate_above": config.approximate_above or None,
            "nprobe": config.nprobe,
        }
        if milvus:
            manager = GalleryManager.open_milvus(
                config.milvus_uri, pipeline, token=config.milvus_token, prefix=config.milvus_prefix, search_in_store=config.milvus_search == "milvus", **index_options
            )
        else:
            manager = GalleryManager.open(
                config.data_dir,
                pipeline,
                integrity_check="off",  # checked above
                snapshot_interval_s=config.snapshot_interval_s,
                **index_options,
            )
    except BaseException:
        server.stop(None)
        if embedder is not None:
            embedder.close()
        if metrics is not None:
            metrics.stop()
        raise
    servicer.manager = manager
    auth.store = manager.store
    if metrics is not None:
        metrics.attach(manager)
    ready.set()
    if not store_failed.failed:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    backend_health = _BackendHealth(manager.store, health_servicer, lambda: store_failed.failed).start() if milvus else None
    location = _milvus_location(config) + (", searched by Milvus" if config.milvus_search == "milvus" else "") if milvus else config.data_dir
    LOG.info("serving model %s (%s) from %s on %s:%d", manager.model.name, manager.pipeline.model_id[:12], location, config.host, port)
    return GalleryServer(server, port, manager, health_servicer, embedder, metrics, backend_health)


class InsecureAddressError(RuntimeError):
    """Plaintext on a non-loopback address without ``insecure=True`` (``--insecure``)."""


#: Hosts that only this machine reaches; anything else needs TLS or ``insecure``.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (``[::1]`` too)."""
    if host.lower() in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or None (plaintext; refused off loopback unless insecure)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise RuntimeError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
    if config.tls_cert is None:
        if config.tls_client_ca is not None:
            raise RuntimeError("--tls-client-ca needs --tls-cert and --tls-key")
        if not is_loopback_host(config.host):
            if not config.insecure:
                raise InsecureAddressError(
                    f"refusing to serve without TLS on the non-loopback address {config.host}: "
                    "give --tls-cert and --tls-key, listen on localhost, or pass --insecure"
                )
            LOG.warning("serving without TLS on a non-loopback address (%s): anyone who reaches it can read and change every gallery", config.host)
        return None
    cert = _read_pem(config.tls_cert, "TLS certificate")
    key = _read_pem(config.tls_key, "TLS private key")  # type: ignore[arg-type]
    client_ca = None if config.tls_client_ca is None else _read_pem(config.tls_client_ca, "TLS client CA")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _check_keys(config: ServerConfig, has_keys: bool) -> None:
    """A non-loopback host needs API keys in the store (auth.py), unless ``insecure``."""
    if has_keys:
        LOG.info("API keys required: the store holds keys (auth.py)")
        return
    if is_loopback_host(config.host):
        return
    if not config.insecure:
        raise InsecureAddressError(
            f"refusing to serve on the non-loopback address {config.host} without API keys: create one with "
            f"`facegallery keys create {_keys_target(config)} --name admin --role admin`, listen on localhost, or pass --insecure"
        )
    LOG.warning("serving without API keys on a non-loopback address (%s): anyone who reaches it can read and change every gallery", config.host)


def _keys_target(config: ServerConfig) -> str:
    """The ``facegallery keys`` options naming the store of ``config`` (never the Milvus token)."""
    if config.backend != "milvus":
        return f"--data-dir {config.data_dir}"
    prefix = "" if config.milvus_prefix == DEFAULT_MILVUS_PREFIX else f" --milvus-prefix {config.milvus_prefix}"
    token = " --milvus-token ..." if config.milvus_token else ""
    return f"--backend milvus --milvus-uri {config.milvus_uri}{prefix}{token}"


def _milvus_location(config: ServerConfig) -> str:
    return f"Milvus at {config.milvus_uri} (collections {config.milvus_prefix}_*)"


def _milvus_has_keys(config: ServerConfig) -> bool:
    """Whether the Milvus of ``config`` holds API keys (its collections are created when missing);
    raises BackendUnavailable when it cannot be reached."""
    store = open_milvus_store(config.milvus_uri, token=config.milvus_token, prefix=config.milvus_prefix)
    try:
        return store.has_api_keys()
    finally:
        store.close()


def _transport(config: ServerConfig) -> str:
    if config.tls_cert is None:
        return "plaintext"
    return "TLS, client certificates required" if config.tls_client_ca is not None else "TLS"


class _BackendHealth:
    """The milvus backend's health monitor: a daemon thread that pings the store every
    ``interval_s`` seconds and sets health NOT_SERVING (``""`` and the service) while the ping
    fails, SERVING again once it answers (unless ``failed_for_good()``: a damaged store). Each
    change is logged once; nothing it meets stops it, or the server."""

    def __init__(
        self, store, health_servicer: health.HealthServicer, failed_for_good=lambda: False, interval_s: float = BACKEND_PING_INTERVAL_S
    ) -> None:
        self._store = store
        self._health = health_servicer
        self._failed_for_good = failed_for_good
        self.interval_s = interval_s
        #: whether the last ping was answered (the server starts SERVING: its start-up just read the store)
        self.answering = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="backend-health", daemon=True)

    def start(self) -> _BackendHealth:
        """Start pinging (every ``interval_s`` seconds, the first after one interval); returns self."""
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (waits up to ``timeout_s`` for a ping under way); idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # never let the monitor die: log, and try again next time
                LOG.exception("the backend health check failed unexpectedly")

    def check(self) -> bool:
        """Ping the store once and update health; True when it answered."""
        try:
            self._store.ping()
        except BackendUnavailable as exc:
            answering, why = False, str(exc)
        except Exception as exc:  # an unexpected failure of the ping is still a store that does not answer
            answering, why = False, f"{type(exc).__name__}: {exc}"
        else:
            answering, why = True, ""
        if answering == self.answering or self._stop.is_set():  # set() on changes only: it notifies every watcher
            return answering
        self.answering = answering
        serving = answering and not self._failed_for_good()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)
        if answering:
            LOG.warning("the gallery store answers again%s", ": health is SERVING" if serving else "")
        else:
            LOG.error("the gallery store does not answer (%s): health is NOT_SERVING; calls fail with UNAVAILABLE until it is back", why)
        return answering


class _StoreFailure:
    """``on_store_damage`` of the error interceptor: health NOT_SERVING for good, logged once."""

    def __init__(self, path: Path | str, health_servicer: health.HealthServicer) -> None:
        self._path = path
        self._health = health_servicer
        self._lock = threading.Lock()
        self.failed = False

    def __call__(self, exc: BaseException, method: str) -> None:
        with self._lock:
            if self.failed:
                return
            self.failed = True
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        LOG.critical(
            "THE GALLERY STORE %s IS DAMAGED: %s raised %s: %s. Health is now NOT_SERVING. Stop the server and start it "
            "again: its integrity check at start (facegallery serve --integrity-check full) names the damage and the repair options",
            self._path, method, type(exc).__name__, exc, exc_info=exc,
        )


def _load_pipeline(config: ServerConfig):
    """The face pipeline of ``config.model_dir`` with a batching embedder. Raises ModelError."""
    from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

    if config.model_dir is None:
        raise ModelError("no model directory: ServerConfig.model_dir is required when no pipeline is given")
    model_dir = Path(config.model_dir)
    pipeline_config = config.pipeline or PipelineConfig()
    embedder = None
    if config.batch_max_size > 1:
        manifest = ModelManifest.load(model_dir, verify=False)  # from_model_dir verifies checksums
        # One batch per core at once, each one onnxruntime run (batching.py), when runs use one
        # thread each; else one batch at a time on all of the run's threads.
        workers = (os.cpu_count() or 1) if pipeline_config.intra_op_threads == 1 else 1
        embedder = BatchingEmbedder(
            FacePipeline.load_embedder(model_dir, manifest, pipeline_config, parallel_runs=1),
            max_batch_size=config.batch_max_size,
            max_delay_ms=config.batch_max_delay_ms,
            workers=workers,
        )
    try:
        return FacePipeline.from_model_dir(model_dir, pipeline_config, embedder=embedder), embedder
    except BaseException:
        if embedder is not None:
            embedder.close()
        raise


def serve(config: ServerConfig, *, pipeline: FaceAnalyzer | None = None) -> None:
    """Run the server until SIGTERM or SIGINT, then shut down gracefully (see the module docstring).

    Must be called from the main thread (signal handlers).
    """
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        LOG.info("received %s: shutting down (grace %.1f s)", signal.Signals(signum).name, config.grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = create_server(config, pipeline=pipeline)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            running.stop(config.grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
