"""Server interceptors: engine errors to gRPC statuses, and UNAVAILABLE until the server is ready.

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

Both work for unary and streaming handlers: a streaming response is wrapped as a generator, so
errors raised while it is being iterated are mapped too.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from facegallery.server.service.status import REASON_NOT_READY, make_status, rich_status, store_damage

__all__ = ["ErrorInterceptor", "ReadinessInterceptor", "rewrap_handler"]

LOG = logging.getLogger(__name__)

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
