"""The server's log lines (text, or one JSON object per line) and the request id they carry.

:func:`configure_logging` installs the root handler ``facegallery serve`` logs through
(``--log-level``, ``--log-format``). A JSON line (python-json-logger) has the fields ``time``
(ISO 8601, UTC), ``level``, ``logger`` and ``message``, plus ``request_id`` while a call is
served and, on the access line of a finished call (interceptors.py, logger ``facegallery.access``),
``rpc``, ``code``, ``duration_s`` (seconds) and ``peer``::

    {"level": "INFO", "logger": "facegallery.access", "message": "GetGallery NOT_FOUND 0.0012 s ipv4:127.0.0.1:51234",
     "rpc": "GetGallery", "code": "NOT_FOUND", "duration_s": 0.001204, "peer": "ipv4:127.0.0.1:51234",
     "request_id": "5f0c...", "time": "2025-01-01T12:00:00.123456+00:00"}

A text line is ``TIME LEVEL LOGGER: MESSAGE``, followed by ``[request_id=...]`` during a call.

Request ids: a client may name its call with the metadata :data:`REQUEST_ID_METADATA`
(``x-request-id``: printable ASCII, at most :data:`MAX_REQUEST_ID_CHARS` characters); anything
else is ignored and the server makes one (:func:`request_id_from`, a uuid4 in hex). The id is in
a context variable while the call's handler runs (:func:`request_scope`, read with
:func:`current_request_id`), so every line logged meanwhile carries it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from collections.abc import Iterable, Iterator
from typing import IO, Literal

from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "DEFAULT_LOG_FORMAT",
    "DEFAULT_LOG_LEVEL",
    "LogFormat",
    "LogLevel",
    "MAX_REQUEST_ID_CHARS",
    "REQUEST_ID_METADATA",
    "configure_logging",
    "current_request_id",
    "log_handler",
    "request_id_from",
    "request_scope",
]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
DEFAULT_LOG_LEVEL: LogLevel = "INFO"
DEFAULT_LOG_FORMAT: LogFormat = "text"
#: gRPC metadata key of the request id, sent by the client (optional) and returned in the trailers.
REQUEST_ID_METADATA = "x-request-id"
#: Longest request id a client may set, characters.
MAX_REQUEST_ID_CHARS = 128

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("facegallery_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the call being served by this thread, or None outside a call."""
    return _REQUEST_ID.get()


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """:func:`current_request_id` is ``request_id`` while the block runs."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def request_id_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The client's ``x-request-id`` from the call's invocation metadata when it is acceptable
    (1 to :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters), else a new uuid4 in hex."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
            return value
    return uuid.uuid4().hex


class _RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the call being served) to records that do not carry one already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request_id = current_request_id()
            if request_id is not None:
                record.request_id = request_id
        return True


class _TextFormatter(logging.Formatter):
    """:data:`_TEXT_FORMAT`, then ``[request_id=...]`` when the record has one."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} [request_id={request_id}]"


def log_handler(log_format: LogFormat, stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``log_format`` lines (see the module docstring) to ``stream`` (default stderr)."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"}, timestamp="time"))
    elif log_format == "text":
        handler.setFormatter(_TextFormatter(_TEXT_FORMAT))
    else:
        raise ValueError(f"log format must be 'text' or 'json', not {log_format!r}")
    handler.addFilter(_RequestIdFilter())
    return handler


def configure_logging(level: LogLevel, log_format: LogFormat) -> None:
    """Log at ``level`` and above to stderr in ``log_format``; like :func:`logging.basicConfig`,
    nothing changes when the root logger already has handlers (an embedding application's)."""
    logging.basicConfig(level=level, handlers=[log_handler(log_format)])
