"""Prometheus metrics (``prometheus_client``): calls, latencies, pipeline stages, batching, galleries.

:func:`start_metrics` serves ``/metrics`` over HTTP from a dedicated
:class:`~prometheus_client.CollectorRegistry` (not the library's global one, so that a process,
e.g. the tests, can run several servers) and installs the process's timing sink
(``facegallery.server.contract.timing``), through which the face and gallery layers report stage
durations without importing Prometheus. :class:`MetricsInterceptor` counts and times the calls;
it is meant to be the *outermost* interceptor so that it sees the final status (the one
:class:`~facegallery.server.service.interceptors.ErrorInterceptor` aborted with, or UNAVAILABLE
from the readiness interceptor).

Metrics (seconds and counts per the Prometheus naming conventions):

=============================================  =========  ============================================
``facegallery_rpc_requests_total``             counter    ``method`` (e.g. ``Identify``), ``code``
                                                          (``OK``, ``NOT_FOUND``, ...)
``facegallery_rpc_duration_seconds``           histogram  ``method``; to the end of a response stream
``facegallery_stage_duration_seconds``         histogram  ``stage``: decode, detect, landmarks, align,
                                                          embed, search, decision
``facegallery_batch_size``                     histogram  chips per embedder run (batching.py)
``facegallery_batch_queue_wait_seconds``       histogram  a request's wait for its batch to start
``facegallery_faces_per_image``                histogram  faces found by Identify / Embed
``facegallery_snapshot_duration_seconds``      histogram  one gallery's index snapshot (copy + write)
``facegallery_snapshot_age_seconds``           gauge      ``gallery``: since its snapshot file was
                                                          written (absent without one; an unchanged
                                                          gallery is not rewritten)
``facegallery_gallery_templates``              gauge      ``gallery``, read from the store at scrape
``facegallery_gallery_identities``             gauge      ``gallery``, read from the store at scrape
``facegallery_model_load_seconds``             gauge      loading the model (if loaded after
                                                          :func:`start_metrics`)
``facegallery_auth_failures_total``            counter    ``reason``: ``missing_key`` (no or malformed
                                                          ``authorization``), ``invalid_key`` (unknown,
                                                          wrong or revoked: the store does not tell them
                                                          apart), ``permission_denied`` (role too low,
                                                          or a gallery-limited key on the key RPCs)
``process_*``, ``python_*``                    various    prometheus_client's process/platform/GC
=============================================  =========  ============================================

Only methods under the service prefix are counted (health and reflection are not). The timing
sink is process-wide: with several servers in one process the one started last receives stage
measurements.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from facegallery.server.contract import timing
from facegallery.server.gallery.snapshot import snapshot_path
from facegallery.server.service.auth import AUTH_FAILURE_REASONS
from facegallery.server.service.interceptors import code_name, rewrap_handler, service_method

if TYPE_CHECKING:
    from facegallery.server.gallery.manager import GalleryManager

__all__ = ["STAGES", "MetricsInterceptor", "ServerMetrics", "start_metrics"]

LOG = logging.getLogger(__name__)

#: The pipeline and engine stages reported through ``contract/timing.py``.
STAGES = ("decode", "detect", "landmarks", "align", "embed", "search", "decision")

_RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_FACE_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
_SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Longest wait of a scrape for the store's gallery counts.
_COLLECT_TIMEOUT_S = 5.0


class ServerMetrics:
    """The metrics of one server, in their own registry; also the timing sink (``observe``/``record``).

    Parameters
    ----------
    manager : GalleryManager, optional
        Read at scrape time for the per-gallery gauges; may be given later with :meth:`attach`
        (the server builds its interceptors before the model and the galleries are loaded).
    registry : CollectorRegistry, optional
        A new one by default.
    """

    def __init__(self, manager: GalleryManager | None = None, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.manager = manager
        r = self.registry
        self.requests = Counter("facegallery_rpc_requests", "gRPC calls by method and final status code.", ["method", "code"], registry=r)
        self.rpc_duration = Histogram(
            "facegallery_rpc_duration_seconds", "gRPC call latency by method (to the end of a response stream).", ["method"], buckets=_RPC_BUCKETS, registry=r
        )
        self.stage_duration = Histogram(
            "facegallery_stage_duration_seconds", "Duration of one pipeline or engine stage of a call.", ["stage"], buckets=_STAGE_BUCKETS, registry=r
        )
        self.batch_size = Histogram("facegallery_batch_size", "Face chips per embedder run of the dynamic batcher.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_wait = Histogram(
            "facegallery_batch_queue_wait_seconds", "Time an embedding request waited for its batch to start.", buckets=_WAIT_BUCKETS, registry=r
        )
        self.faces_per_image = Histogram("facegallery_faces_per_image", "Faces found in one image by Identify and Embed.", buckets=_FACE_BUCKETS, registry=r)
        self.snapshot_duration = Histogram(
            "facegallery_snapshot_duration_seconds", "Writing one gallery's index snapshot (copy and write).", buckets=_SNAPSHOT_BUCKETS, registry=r
        )
        self.model_load = Gauge("facegallery_model_load_seconds", "Seconds the face model took to load.", registry=r)
        self.auth_failures = Counter(
            "facegallery_auth_failures", "GalleryService calls refused by API-key authentication or authorisation, by reason.", ["reason"], registry=r
        )
        for reason in AUTH_FAILURE_REASONS:  # every reason series exists from the start (0)
            self.auth_failures.labels(reason)
        for stage in STAGES:  # every stage series exists from the start (0 observations)
            self.stage_duration.labels(stage)
        self._values: dict[str, Callable[[float], None]] = {
            "batch_size": self.batch_size.observe,
            "batch_queue_wait_seconds": self.batch_wait.observe,
            "faces_per_image": self.faces_per_image.observe,
            "snapshot_seconds": self.snapshot_duration.observe,
            "model_load_seconds": self.model_load.set,
        }
        # The store keeps one SQLite connection per thread: scrapes (a new HTTP thread each) read it
        # from this one thread, so that they do not open a connection apiece.
        self._collector_thread = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-collect")
        r.register(_GalleryCollector(self))
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- the timing sink (contract/timing.py) --------------------------------------------------

    def observe(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage).observe(seconds)

    def record(self, name: str, value: float) -> None:
        setter = self._values.get(name)
        if setter is not None:
            setter(value)

    # -- wiring --------------------------------------------------------------------------------

    def attach(self, manager: GalleryManager) -> None:
        """The manager the per-gallery gauges are read from."""
        self.manager = manager

    def interceptor(self, service_prefix: str) -> MetricsInterceptor:
        """A :class:`MetricsInterceptor` feeding these metrics; put it first in the server's list."""
        return MetricsInterceptor(self, service_prefix)

    def auth_failed(self, reason: str) -> None:
        """Count one call refused by the auth interceptor (``on_failure`` of auth.py's
        :class:`~facegallery.server.service.auth.AuthInterceptor`); ``reason`` is one of
        :data:`~facegallery.server.service.auth.AUTH_FAILURE_REASONS`."""
        self.auth_failures.labels(reason).inc()

    def install(self) -> None:
        """Make this the process's timing sink."""
        timing.set_sink(self)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` (0 = a free port) from a daemon thread; returns the port.

        ``"localhost"`` binds 127.0.0.1 (prometheus_client binds one address family only)."""
        if addr == "localhost":
            addr = "127.0.0.1"
        with self._lock:
            if self._http is not None:
                raise RuntimeError("the metrics endpoint is already running")
            try:
                self._http, self._http_thread = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as exc:
                raise RuntimeError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        LOG.info("serving Prometheus metrics on http://%s:%d/metrics", addr, self.port)
        return self.port

    @property
    def port(self) -> int:
        """The bound port of the endpoint (0 before :meth:`serve`)."""
        return 0 if self._http is None else int(self._http.server_port)

    def stop(self) -> None:
        """Stop the endpoint and uninstall the timing sink if it is this one (idempotent)."""
        if timing.get_sink() is self:
            timing.set_sink(None)
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5.0)
        self._collector_thread.shutdown(wait=False)

    def gallery_counts(self) -> list[tuple[str, int, int, float | None]]:
        """``(gallery, templates, identities, snapshot age in seconds or None)`` of every gallery."""
        manager = self.manager
        if manager is None:
            return []
        now = time.time()
        rows = []
        for record in manager.list_galleries():
            try:
                age: float | None = max(0.0, now - snapshot_path(manager.index_dir, record.key).stat().st_mtime)
            except OSError:
                age = None
            rows.append((record.name, record.template_count, record.identity_count, age))
        return rows


class _GalleryCollector:
    """Per-gallery gauges, read from the store at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []  # no collect() at registration (the manager may not exist yet)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        templates = GaugeMetricFamily("facegallery_gallery_templates", "Templates enrolled in the gallery.", labels=["gallery"])
        identities = GaugeMetricFamily("facegallery_gallery_identities", "Identities enrolled in the gallery.", labels=["gallery"])
        ages = GaugeMetricFamily(
            "facegallery_snapshot_age_seconds", "Seconds since the gallery's index snapshot file was written (written only after changes).", labels=["gallery"]
        )
        try:
            rows = self._metrics._collector_thread.submit(self._metrics.gallery_counts).result(timeout=_COLLECT_TIMEOUT_S)
        except Exception:  # a scrape must not fail because the store is busy, closed or damaged
            LOG.warning("reading the gallery counts for /metrics failed", exc_info=True)
            rows = []
        for name, n_templates, n_identities, age in rows:
            templates.add_metric([name], n_templates)
            identities.add_metric([name], n_identities)
            if age is not None:
                ages.add_metric([name], age)
        yield templates
        yield identities
        yield ages


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times the calls of methods under ``service_prefix``, unary and streaming.

    The code is :func:`~facegallery.server.service.interceptors.code_name`'s: the one the
    handler's context ends with (set by ``context.abort`` in the inner interceptors), ``OK`` when
    the handler returned without one, ``CANCELLED`` when a response stream was closed early, else
    ``UNKNOWN``.
    """

    def __init__(self, metrics: ServerMetrics, service_prefix: str) -> None:
        self._metrics = metrics
        self._prefix = service_prefix

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = service_method(handler_call_details, self._prefix)
        if handler is None or method is None:
            return handler
        requests, duration = self._metrics.requests, self._metrics.rpc_duration.labels(method)

        def done(context: grpc.ServicerContext, started: float, exc: BaseException | None) -> None:
            duration.observe(time.perf_counter() - started)
            requests.labels(method, code_name(context, exc)).inc()

        def wrap(behavior: Callable, response_streaming: bool) -> Callable:
            if response_streaming:

                @functools.wraps(behavior)
                def streaming(request: Any, context: grpc.ServicerContext):
                    started, failure = time.perf_counter(), None
                    try:
                        yield from behavior(request, context)
                    except BaseException as exc:
                        failure = exc
                        raise
                    finally:
                        done(context, started, failure)

                return streaming

            @functools.wraps(behavior)
            def unary(request: Any, context: grpc.ServicerContext):
                started, failure = time.perf_counter(), None
                try:
                    return behavior(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    done(context, started, failure)

            return unary

        return rewrap_handler(handler, wrap)


def start_metrics(port: int, manager: GalleryManager | None = None, *, addr: str = "127.0.0.1") -> ServerMetrics:
    """Serve ``/metrics`` on ``addr:port`` and install the timing sink; returns the handle.

    ``handle.interceptor(prefix)`` gives the call interceptor, ``handle.attach(manager)`` sets the
    manager later (None now), ``handle.port`` the bound port (``port=0``: a free one),
    ``handle.stop()`` stops the endpoint. Raises RuntimeError when the address cannot be bound.
    """
    metrics = ServerMetrics(manager)
    try:
        metrics.serve(port, addr)
    except BaseException:
        metrics.stop()
        raise
    metrics.install()
    return metrics
