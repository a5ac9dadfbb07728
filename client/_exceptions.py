"""The client's exception tree, keyed by gRPC status code.

Every failed call raises a subclass of :class:`FaceGalleryClientError` chosen by the status the
server (or the channel) reported; the original ``grpc.RpcError`` is chained as ``__cause__``.
Catch at any level, then branch on the stable ``reason`` the server sends (a
``google.rpc.ErrorInfo`` in the status details, e.g. ``"NO_FACE"``, ``"GALLERY_NOT_FOUND"``;
``None`` when the status carries none, e.g. a channel error)::

    try:
        client.enroll("ann", "photo.jpg")
    except InvalidArgument as exc:
        if exc.reason == "NO_FACE":
            ...
        for violation in exc.field_violations:   # google.rpc.BadRequest, e.g. ("top_k", "...")
            print(violation.field, violation.description)

    FaceGalleryClientError              any failed call; .code (grpc.StatusCode), .message,
                                        .reason, .domain, .metadata, .field_violations,
                                        .request_id
    ├── InvalidArgument                 INVALID_ARGUMENT: undecodable image, no face where one is
    │                                   required, wrong embedding length, empty or malformed id
    ├── NotFound                        NOT_FOUND: unknown gallery, identity or template
    ├── AlreadyExists                   ALREADY_EXISTS: gallery name taken
    ├── FailedPrecondition              FAILED_PRECONDITION: several faces under the reject
    │                                   policy; gallery built with another model
    ├── ResourceExhausted               RESOURCE_EXHAUSTED: image over the server's limits
    ├── Unavailable                     UNAVAILABLE: server unreachable, starting or stopping
    │                                   (idempotent calls were already retried)
    ├── DeadlineExceeded                DEADLINE_EXCEEDED: the call's timeout expired
    ├── Cancelled                       CANCELLED
    ├── Unimplemented                   UNIMPLEMENTED: the server lacks this rpc
    ├── PermissionDenied                PERMISSION_DENIED (role too low)
    │   └── Unauthenticated             UNAUTHENTICATED (no, wrong or revoked API key)
    └── ServerError                     INTERNAL, UNKNOWN, DATA_LOSS, ABORTED, OUT_OF_RANGE

:class:`ClientClosedError` (a ``RuntimeError``, not a status) is raised when a closed client is
used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "FaceGalleryClientError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Cancelled",
    "Unimplemented",
    "PermissionDenied",
    "Unauthenticated",
    "ServerError",
    "ClientClosedError",
    "FieldViolation",
]

_EMPTY: Mapping[str, str] = MappingProxyType({})
#: The trailer the server returns the call's request id in (server/service/logs.py).
REQUEST_ID_METADATA = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One ``google.rpc.BadRequest`` field violation: the request ``field`` at fault and why."""

    field: str
    description: str


class FaceGalleryClientError(Exception):
    """A call failed with a gRPC status.

    Attributes
    ----------
    code : grpc.StatusCode
        The status of this error (for the base class: whatever status was received).
    message : str
        The server's human-readable message (the status details).
    reason : str or None
        The stable, machine-readable reason of the server's ``google.rpc.ErrorInfo``
        (UPPER_SNAKE_CASE, e.g. ``"NO_FACE"``, ``"GALLERY_NOT_FOUND"``); None when the status
        carried no ErrorInfo (channel errors, older servers).
    domain : str or None
        The ErrorInfo's domain (``"facegallery.v1"``), or None.
    metadata : Mapping[str, str]
        The ErrorInfo's metadata (e.g. ``{"gallery": "staff"}``); empty when none.
    field_violations : tuple of FieldViolation
        The ``google.rpc.BadRequest`` field violations (INVALID_ARGUMENT naming a field).
    request_id : str or None
        The call's request id, to find its lines in the server's log: the ``x-request-id`` the
        client sent (e.g. ``metadata=[("x-request-id", ...)]``) or the one the server made; from
        the ErrorInfo metadata ``"request_id"``, else the ``x-request-id`` trailer, else None
        (channel errors, older servers).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = MappingProxyType(dict(metadata)) if metadata else _EMPTY
        self.field_violations = tuple(field_violations)
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(FaceGalleryClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FaceGalleryClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FaceGalleryClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FaceGalleryClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(FaceGalleryClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(FaceGalleryClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FaceGalleryClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FaceGalleryClientError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(FaceGalleryClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class PermissionDenied(FaceGalleryClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(PermissionDenied):
    """No API key, or a wrong or revoked one (UNAUTHENTICATED); a subclass of PermissionDenied."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ServerError(FaceGalleryClientError):
    code = grpc.StatusCode.INTERNAL


class ClientClosedError(RuntimeError):
    """The client was used after :meth:`GalleryClient.close` (or its ``with`` block) ended."""


_BY_CODE: dict[grpc.StatusCode, type[FaceGalleryClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.ABORTED: ServerError,
    grpc.StatusCode.OUT_OF_RANGE: ServerError,
}


def error_for_status(code: grpc.StatusCode, message: str, **info: object) -> FaceGalleryClientError:
    """The exception instance for a status ``code`` with the server's ``message``; ``info`` are
    the keyword attributes of :class:`FaceGalleryClientError` (``reason``, ``metadata``, ...)."""
    return _BY_CODE.get(code, FaceGalleryClientError)(message, code=code, **info)


def from_rpc_error(error: grpc.RpcError) -> FaceGalleryClientError:
    """Translate a ``grpc.RpcError`` (a failed ``grpc.Call``) into the client's tree, with the
    ErrorInfo and BadRequest details of its status when it has them, and its request id."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    info = rich_details(error)
    if "request_id" not in info:
        info["request_id"] = _trailer(error, REQUEST_ID_METADATA)
    return error_for_status(code, details or str(code.value[1]), **info)


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    """The trailing metadata value ``key`` of a failed call, or None."""
    try:
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - a channel error may have no trailers to read
        return None
    return next((value for name, value in trailers or () if name == key and isinstance(value, str)), None)


def rich_details(error: grpc.RpcError) -> dict[str, object]:
    """``reason``, ``domain``, ``metadata`` and ``field_violations`` from ``error``'s
    ``google.rpc.Status`` trailer (``grpc_status.rpc_status.from_call``); empty when it has none
    or it cannot be parsed (a client never fails on a malformed trailer)."""
    try:
        status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - a malformed or mismatched trailer is ignored
        return {}
    return {} if status is None else status_details(status)


def status_details(status: status_pb2.Status) -> dict[str, object]:
    """``reason``, ``domain``, ``metadata``, ``request_id`` (when the ErrorInfo metadata has one)
    and ``field_violations`` from the ErrorInfo and BadRequest details of a ``google.rpc.Status``
    (an error trailer's, or a ``BulkEnrollResponse.error``); empty when it has neither."""
    found: dict[str, object] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and "reason" not in found:
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.update(reason=info.reason or None, domain=info.domain or None, metadata=dict(info.metadata))
            if info.metadata.get("request_id"):
                found["request_id"] = info.metadata["request_id"]
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    if violations:
        found["field_violations"] = tuple(violations)
    return found
