"""The client's exception tree, keyed by gRPC status code.

Every failed call raises a subclass of :class:`FaceGalleryClientError` chosen by the status the
server (or the channel) reported; the original ``grpc.RpcError`` is chained as ``__cause__``.
Catch at any level::

    FaceGalleryClientError              any failed call; .code (grpc.StatusCode), .message
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
    ├── PermissionDenied                PERMISSION_DENIED / UNAUTHENTICATED
    └── ServerError                     INTERNAL, UNKNOWN, DATA_LOSS, ABORTED, OUT_OF_RANGE

:class:`ClientClosedError` (a ``RuntimeError``, not a status) is raised when a closed client is
used.
"""

from __future__ import annotations

import grpc

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
    "ServerError",
    "ClientClosedError",
]


class FaceGalleryClientError(Exception):
    """A call failed with a gRPC status.

    Attributes
    ----------
    code : grpc.StatusCode
        The status of this error (for the base class: whatever status was received).
    message : str
        The server's human-readable message (the status details).
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

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
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
    grpc.StatusCode.DATA_LOSS: ServerError,
    grpc.StatusCode.ABORTED: ServerError,
    grpc.StatusCode.OUT_OF_RANGE: ServerError,
}


def error_for_status(code: grpc.StatusCode, message: str) -> FaceGalleryClientError:
    """The exception instance for a status ``code`` with the server's ``message``."""
    return _BY_CODE.get(code, FaceGalleryClientError)(message, code=code)


def from_rpc_error(error: grpc.RpcError) -> FaceGalleryClientError:
    """Translate a ``grpc.RpcError`` (a failed ``grpc.Call``) into the client's tree."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    return error_for_status(code, details or str(code.value[1]))
