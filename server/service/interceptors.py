"""Server interceptors: request ids and access log lines, engine errors to gRPC statuses, and
UNAVAILABLE until the server is ready.

:class:`AccessLogInterceptor`, the outermost, gives each call its request id (the client's
``x-request-id`` metadata when acceptable, else a new one: logs.py :func:`request_id_from`), holds
it in the request-id context variable while the call runs (so inner interceptors, the servicer and
its log lines see it), returns it in the ``x-request-id`` trailer, and logs one access line per
finished call (logger ``facegallery.access``: method, status code name, duration in seconds, peer,
request id). Successful calls are logged at DEBUG, every other code at INFO: a door camera at 10
calls/s would otherwise write 860,000 INFO lines a day that say nothing went wrong.

:class:`ErrorInterceptor` is the one place where exceptions become statuses (kserve's
``interceptors.py`` pattern), so servicer methods contain no try/except:

* a :class:`~facegallery.server.contract.errors.FaceGalleryError` aborts the call with the status
  its ``code`` names and the exception's message;
* every abort is a rich status (:func:`facegallery.server.service.status.rich_status`): a
  ``google.rpc.ErrorInfo`` with the error's stable ``reason`` (and a ``google.rpc.BadRequest``
  field violation when an INVALID_ARGUMENT names its field);
* anything else is logged with its traceback and aborts with INTERNAL and a generic message (no
  internals leak to clients); the mapping is :func:`facegallery.server.service.status.status_of`;
* an exception that says the store is damaged (:func:`~facegallery.server.service.status.store_damage`)
  is also handed to ``on_store_damage`` (the server turns its health to NOT_SERVING).

:class:`ReadinessInterceptor` answers UNAVAILABLE for a service's methods until the model and the
indexes are loaded (clients retry UNAVAILABLE; the health service says NOT_SERVING meanwhile).

All work for unary and streaming handlers: a streaming response is wrapped as a generator, so
errors raised while it is being iterated are mapped (and timed) too.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from facegallery.server.service.logs import REQUEST_ID_METADATA, request_id_from, request_scope
from facegallery.server.service.status import REASON_NOT_READY, make_status, rich_status, store_damage

__all__ = ["AccessLogInterceptor", "ErrorInterceptor", "ReadinessInterceptor", "code_name", "rewrap_handler"]

LOG = logging.getLogger(__name__)
#: The access log: one line per finished call (see the module docstring).
ACCESS_LOG = logging.getLogger("facegallery.access")
_END = object()

_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def rewrap_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour replaced by ``wrap(behaviour, response_streaming)``."""
    for kind, factory in _FACTORIES.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return factory(
                wrap(behavior, handler.response_streaming),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def service_method(handler_call_details: grpc.HandlerCallDetails, service_prefix: str) -> str | None:
    """The method name (e.g. ``"Identify"``) of a call under ``service_prefix``
    (``"/facegallery.v1.GalleryService/"``), or None for another service's call (health, reflection)."""
    full = handler_call_details.method
    return full[len(service_prefix) :].lstrip("/") if full.startswith(service_prefix) else None


def code_name(context: grpc.ServicerContext, exc: BaseException | None) -> str:
    """The status code name a call ended with: the one its context holds (``context.abort`` in an
    inner interceptor sets it), else ``OK`` when the handler returned, ``CANCELLED`` when a response
    stream was closed early, ``UNKNOWN`` for any other exception."""
    try:
        code = context.code()
    except Exception:  # a context without code() (grpc < 1.38, test doubles)
        code = None
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if exc is None:
        return "OK"
    if isinstance(exc, GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class AccessLogInterceptor(grpc.ServerInterceptor):
    """Request ids and access log lines for the methods under ``service_prefix`` (see the module
    docstring); put it first in the server's list, so that every inner interceptor runs in the
    call's request-id scope.

    Parameters
    ----------
    service_prefix : str
        e.g. ``"/facegallery.v1.GalleryService/"``; other services (health, reflection) pass.
    """

    def __init__(self, service_prefix: str) -> None:
        self._prefix = service_prefix

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = service_method(handler_call_details, self._prefix)
        if handler is None or method is None:
            return handler
        request_id = request_id_from(handler_call_details.invocation_metadata)

        def finished(context: grpc.ServicerContext, started: float, exc: BaseException | None) -> None:
            duration, code, peer = time.perf_counter() - started, code_name(context, exc), context.peer()
            ACCESS_LOG.log(
                logging.DEBUG if code == "OK" else logging.INFO,
                "%s %s %.4f s %s", method, code, duration, peer,
                extra={"rpc": method, "code": code, "duration_s": round(duration, 6), "peer": peer, "request_id": request_id},
            )

        def wrap(behavior: Callable, response_streaming: bool) -> Callable:
            if response_streaming:

                @functools.wraps(behavior)
                def streaming(request: Any, context: grpc.ServicerContext):
                    started, failure, responses = time.perf_counter(), None, None
                    context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
                    try:
                        # the scope only while the handler runs: between responses this generator may be resumed anywhere
                        with request_scope(request_id):
                            responses = iter(behavior(request, context))
                        while True:
                            with request_scope(request_id):
                                response = next(responses, _END)
                            if response is _END:
                                return
                            yield response
                    except BaseException as exc:
                        failure = exc
                        raise
                    finally:
                        if hasattr(responses, "close"):
                            with request_scope(request_id):
                                responses.close()
                        finished(context, started, failure)

                return streaming

            @functools.wraps(behavior)
            def unary(request: Any, context: grpc.ServicerContext):
                started, failure = time.perf_counter(), None
                context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
                try:
                    with request_scope(request_id):
                        return behavior(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    finished(context, started, failure)

            return unary

        return rewrap_handler(handler, wrap)


def _abort_for(exc: Exception, context: grpc.ServicerContext, method: str, on_store_damage: Callable[[BaseException, str], None] | None, request: Any = None) -> None:
    if on_store_damage is not None and (damage := store_damage(exc)) is not None:
        on_store_damage(damage, method)
    context.abort_with_status(rich_status(exc, method, request))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by RPC handlers to gRPC statuses (see the module docstring).

    Parameters
    ----------
    service_prefix : str
        Only methods under this prefix (e.g. ``"/facegallery.v1.GalleryService/"``) are wrapped;
        the standard services (health, reflection) keep their own handlers untouched, since
        grpc's non-blocking health ``Watch`` handler cannot be re-wrapped.
    on_store_damage : callable (exception, method) -> None, optional
        Called, before the call is aborted, when the exception says the store is damaged.
    """

    def __init__(self, service_prefix: str, on_store_damage: Callable[[BaseException, str], None] | None = None) -> None:
        self._prefix = service_prefix
        self._on_store_damage = on_store_damage

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        method = handler_call_details.method

        def wrap(behavior: Callable, response_streaming: bool) -> Callable:
            if response_streaming:

                @functools.wraps(behavior)
                def streaming(request: Any, context: grpc.ServicerContext):
                    try:
                        yield from behavior(request, context)
                    except Exception as exc:
                        _abort_for(exc, context, method, self._on_store_damage, request)

                return streaming

            @functools.wraps(behavior)
            def unary(request: Any, context: grpc.ServicerContext):
                try:
                    return behavior(request, context)
                except Exception as exc:
                    _abort_for(exc, context, method, self._on_store_damage, request)

            return unary

        return rewrap_handler(handler, wrap)


class ReadinessInterceptor(grpc.ServerInterceptor):
    """Answers UNAVAILABLE for methods under ``service_prefix`` until ``ready`` is set.

    Parameters
    ----------
    ready : threading.Event
        Set once the server can answer (model and indexes loaded).
    service_prefix : str
        e.g. ``"/facegallery.v1.GalleryService/"``; other services (health, reflection) pass.
    """

    def __init__(self, ready: threading.Event, service_prefix: str) -> None:
        self._ready = ready
        self._prefix = service_prefix

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or self._ready.is_set() or not handler_call_details.method.startswith(self._prefix):
            return handler

        def wrap(behavior: Callable, response_streaming: bool) -> Callable:
            def unavailable(request: Any, context: grpc.ServicerContext):
                context.abort_with_status(
                    make_status(grpc.StatusCode.UNAVAILABLE, "the server is starting (loading the model and the galleries); retry shortly", REASON_NOT_READY)
                )

            if response_streaming:

                def streaming(request: Any, context: grpc.ServicerContext):
                    unavailable(request, context)
                    yield  # pragma: no cover  (abort raises)

                return streaming
            return unavailable

        return rewrap_handler(handler, wrap)
