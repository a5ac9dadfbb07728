"""Engine exceptions to gRPC statuses: the one mapping, used by unary and streaming calls alike.

The engine's exceptions (:mod:`facegallery.server.contract.errors`) carry the *name* of their
status (``"NOT_FOUND"``); this module, inside the gRPC layer, turns it into ``grpc.StatusCode``.
An exception that is not a deliberate engine error becomes INTERNAL with a generic message, so
no internals reach a client; the caller logs its traceback.

Every error status is *rich* (:func:`rich_status`): its ``grpc-status-details-bin`` trailer holds
a ``google.rpc.Status`` whose details are a ``google.rpc.ErrorInfo`` (domain
:data:`~facegallery.server.contract.errors.ERROR_DOMAIN`, the exception's stable ``reason``,
metadata such as ``{"gallery": name}``) and, for an INVALID_ARGUMENT naming its field, a
``google.rpc.BadRequest`` field violation. Any gRPC language reads them with its
``google.rpc`` status helpers; the Python client with ``grpc_status.rpc_status.from_call``.

During a call (logs.py :func:`~facegallery.server.service.logs.request_scope`) the ErrorInfo
metadata also holds ``"request_id"``, and the status's trailers ``x-request-id``: an abort
replaces the trailers set earlier, so the status carries them itself.
"""

from __future__ import annotations

import logging
import sqlite3

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from facegallery.server.contract.errors import ERROR_DOMAIN, FaceGalleryError, StoreCorruptError
from facegallery.server.service.logs import REQUEST_ID_METADATA, current_request_id

__all__ = [
    "INTERNAL_MESSAGE",
    "REASON_INTERNAL",
    "REASON_NOT_READY",
    "REASON_STORE_DAMAGED",
    "make_status",
    "reason_of",
    "rich_status",
    "status_message",
    "status_of",
    "store_damage",
]

LOG = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal server error (the server log has the details)"

#: ErrorInfo reasons the service layer itself gives (the engine's are its exceptions' ``reason``).
REASON_INTERNAL = "INTERNAL"
REASON_NOT_READY = "NOT_READY"
REASON_STORE_DAMAGED = StoreCorruptError.reason


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc`` raised while serving ``method``.

    A :class:`FaceGalleryError` maps to ``grpc.StatusCode[exc.code]`` with the exception's message
    (logged at DEBUG); a damaged store (:func:`store_damage`) to DATA_LOSS; anything else to
    INTERNAL and :data:`INTERNAL_MESSAGE`, its traceback logged at ERROR.
    """
    if isinstance(exc, FaceGalleryError):
        LOG.debug("%s -> %s: %s", method, exc.code, exc)
        return grpc.StatusCode[exc.code], str(exc)
    if store_damage(exc) is not None:
        LOG.error("the store failed in %s", method, exc_info=exc)
        return grpc.StatusCode.DATA_LOSS, "the server's store is damaged; the server is NOT_SERVING (its log names the file and the repair options)"
    LOG.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def store_damage(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s cause/context chain that says the store is damaged, or None.

    Damage is a :class:`sqlite3.DatabaseError` other than :class:`sqlite3.OperationalError`
    ("database disk image is malformed", "file is not a database"; not "database is locked" or a
    disk I/O error), or a :class:`StoreCorruptError`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StoreCorruptError) or (isinstance(current, sqlite3.DatabaseError) and not isinstance(current, sqlite3.OperationalError)):
            return current
        current = current.__cause__ or current.__context__
    return None


def reason_of(exc: BaseException) -> str:
    """The stable ErrorInfo reason for ``exc``: its ``reason`` for an engine error, STORE_DAMAGED
    for a damaged store (:func:`store_damage`), INTERNAL for anything else."""
    if isinstance(exc, FaceGalleryError):
        return exc.reason
    if store_damage(exc) is not None:
        return REASON_STORE_DAMAGED
    return REASON_INTERNAL


def make_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    field_violations: Mapping[str, str] | None = None,
) -> grpc.Status:
    """A rich ``grpc.Status`` for ``context.abort_with_status``: ``code`` and ``message`` as
    usual, plus a ``google.rpc.Status`` trailer with an ErrorInfo (domain ``facegallery.v1``,
    ``reason``, ``metadata``) and, when ``field_violations`` (field → description) is non-empty,
    a BadRequest. During a call the ErrorInfo metadata also has ``"request_id"`` and the trailers
    ``x-request-id`` (see the module docstring)."""
    return _grpc_status(_status_proto(code, message, reason, metadata, field_violations))


def _grpc_status(proto: status_pb2.Status) -> grpc.Status:
    """``proto`` as a ``grpc.Status`` for ``abort_with_status``, plus the ``x-request-id`` trailer during a call."""
    status = rpc_status.to_status(proto)
    request_id = current_request_id()
    if request_id is None:
        return status
    return status._replace(trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_METADATA, request_id)))  # a namedtuple


def _status_proto(
    code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str] | None, field_violations: Mapping[str, str] | None
) -> status_pb2.Status:
    """The ``google.rpc.Status`` of :func:`make_status` (with ``"request_id"`` in the ErrorInfo during a call)."""
    info_metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    request_id = current_request_id()
    if request_id is not None:
        info_metadata["request_id"] = request_id
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=info_metadata)
    details = [_pack(info)]
    if field_violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=text) for field, text in field_violations.items()]
        )
        details.append(_pack(bad))
    # grpc.StatusCode.value is (int, name); google.rpc.Code uses the same numbers.
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def rich_status(exc: BaseException, method: str, request: object = None) -> grpc.Status:
    """The rich status for ``exc`` raised while serving ``method``: :func:`status_of`'s code and
    message, :func:`reason_of`'s reason, the exception's ``metadata``, plus ``"gallery"`` from the
    request when it names one, and a BadRequest field violation when the exception names its
    ``field``. ``request`` is the unary request message (None for a request stream)."""
    return _grpc_status(status_message(exc, method, request))


def status_message(exc: BaseException, method: str, request: object = None) -> status_pb2.Status:
    """:func:`rich_status` as the ``google.rpc.Status`` message itself, for a result that carries
    one per item (BulkEnrollResponse.error)."""
    code, message = status_of(exc, method)
    metadata: dict[str, str] = {}
    gallery_field = "gallery"
    names = _request_fields(request)
    if "gallery" not in names and "name" in names:
        gallery_field = "name"  # CreateGallery, GetGallery, UpdateGallery, DeleteGallery
    if gallery_field in names:
        value = getattr(request, gallery_field, "")
        if isinstance(value, str) and value:
            metadata["gallery"] = value
    violations: dict[str, str] = {}
    if isinstance(exc, FaceGalleryError):
        metadata.update(exc.metadata)
        if exc.field:
            field = gallery_field if exc.field == "gallery" else exc.field
            violations[field] = str(exc)
    return _status_proto(code, message, reason_of(exc), metadata, violations)


def _request_fields(request: object) -> frozenset[str]:
    descriptor = getattr(request, "DESCRIPTOR", None)
    fields = getattr(descriptor, "fields_by_name", None)
    return frozenset(fields) if fields else frozenset()


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
