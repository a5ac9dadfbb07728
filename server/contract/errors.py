"""The one exception tree of the facegallery engine.

Every error the engine raises on purpose derives from :class:`FaceGalleryError` and carries the
*name* of the gRPC status it maps to as the class attribute ``code`` (a ``str`` such as
``"INVALID_ARGUMENT"``), the way click's exceptions carry ``exit_code``, and a stable, machine-readable
``reason`` (UPPER_SNAKE_CASE, e.g. ``"NO_FACE"``) that the service sends as the ``reason`` of a
``google.rpc.ErrorInfo`` (domain :data:`ERROR_DOMAIN`). Reasons are API: a client program branches
on them, so they are never renamed; a subclass overrides its parent's. This module knows nothing
of grpc: ``facegallery.server.service.status`` turns the names into ``grpc.StatusCode`` values and
rich statuses, in one place, for unary and streaming calls alike; anything else becomes INTERNAL
with a generic message and a logged traceback.

Every error also takes two optional keywords: ``field`` (the request field at fault, sent as a
``google.rpc.BadRequest`` field violation for INVALID_ARGUMENT) and ``metadata`` (``str`` →
``str``, added to the ErrorInfo's metadata, e.g. ``{"gallery": name}``).

    FaceGalleryError                      (INTERNAL)             INTERNAL
    ├── InvalidInput                      (INVALID_ARGUMENT)     INVALID_ARGUMENT
    │   ├── ImageDecodeError              undecodable, truncated or empty image bytes: IMAGE_UNDECODABLE
    │   ├── NoFaceError                   no face where one is required (enroll, verify): NO_FACE
    │   └── EmbeddingShapeError           vector of the wrong length or dtype: EMBEDDING_SHAPE
    ├── NotFound                          (NOT_FOUND)            NOT_FOUND
    │   ├── GalleryNotFound               GALLERY_NOT_FOUND
    │   ├── IdentityNotFound              IDENTITY_NOT_FOUND
    │   ├── TemplateNotFound              TEMPLATE_NOT_FOUND
    │   └── KeyNotFound                   KEY_NOT_FOUND
    ├── AlreadyExists                     (ALREADY_EXISTS)       ALREADY_EXISTS
    ├── FailedPrecondition                (FAILED_PRECONDITION)  FAILED_PRECONDITION
    │   ├── MultipleFacesError            several faces under the "reject" face policy: MULTIPLE_FACES
    │   ├── ModelMismatchError            gallery built with another model: MODEL_MISMATCH
    │   └── RequestIdReusedError          an Enroll request_id sent again with another request: REQUEST_ID_REUSED
    ├── ResourceExhausted                 (RESOURCE_EXHAUSTED)   RESOURCE_EXHAUSTED
    │   ├── ImageTooLargeError            image over the byte or pixel limit: IMAGE_TOO_LARGE
    │   └── TooManyStreams                stream cap (server or per client) reached: TOO_MANY_STREAMS
    │   (face/memory_budget.py MemoryBudgetExhausted: MEMORY_BUDGET_EXHAUSTED)
    ├── StreamIdleError                   (DEADLINE_EXCEEDED)    STREAM_IDLE
    ├── GalleryClosed                     (UNAVAILABLE)  the engine is shutting down: NOT_READY
    ├── BackendUnavailable                (UNAVAILABLE)  the shared store (Milvus) cannot be reached: BACKEND_UNAVAILABLE
    ├── ModelError                        (INTERNAL)  missing or corrupt model files: MODEL_ERROR
    └── StoreCorruptError                 (DATA_LOSS)  the store fails its integrity check: STORE_DAMAGED

Statuses not raised as engine errors: NOT_READY (UNAVAILABLE while the server starts; the engine
raises it as GalleryClosed once it is closing) and INTERNAL (any unexpected exception) come from
``facegallery.server.service``.
"""

from __future__ import annotations

#: The ``domain`` of every ``google.rpc.ErrorInfo`` the server sends.
ERROR_DOMAIN = "facegallery.v1"

__all__ = [
    "ERROR_DOMAIN",
    "FaceGalleryError",
    "InvalidInput",
    "ImageDecodeError",
    "NoFaceError",
    "EmbeddingShapeError",
    "NotFound",
    "GalleryNotFound",
    "IdentityNotFound",
    "TemplateNotFound",
    "KeyNotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "MultipleFacesError",
    "ModelMismatchError",
    "RequestIdReusedError",
    "ResourceExhausted",
    "ImageTooLargeError",
    "TooManyStreams",
    "StreamIdleError",
    "GalleryClosed",
    "BackendUnavailable",
    "ModelError",
    "StoreCorruptError",
]


class FaceGalleryError(Exception):
    """Base of every deliberate engine error; ``code`` names the gRPC status it maps to and
    ``reason`` is its stable ErrorInfo reason.

    Parameters
    ----------
    *args
        As for :class:`Exception` (the first is the message).
    field : str, optional
        The request field at fault (``"top_k"``, ``"identity_id"``, ``"gallery"``, ...).
    metadata : dict of str to str, optional
        Extra ErrorInfo metadata, e.g. ``{"gallery": name}``.
    """

    code: str = "INTERNAL"
    reason: str = "INTERNAL"

    def __init__(self, *args: object, field: str | None = None, metadata: dict[str, str] | None = None) -> None:
        super().__init__(*args)
        self.field = field
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}


class InvalidInput(FaceGalleryError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"


class ImageDecodeError(InvalidInput):
    """The bytes are not an image Pillow can decode (random, truncated, empty)."""

    reason = "IMAGE_UNDECODABLE"


class NoFaceError(InvalidInput):
    """No face was detected where the operation needs one."""

    reason = "NO_FACE"


class EmbeddingShapeError(InvalidInput):
    """An embedding has the wrong length, dtype, or non-finite values."""

    reason = "EMBEDDING_SHAPE"


class NotFound(FaceGalleryError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"


class GalleryNotFound(NotFound):
    """No gallery of that name (or one the caller may not see)."""

    reason = "GALLERY_NOT_FOUND"


class IdentityNotFound(NotFound):
    """No identity of that id in the gallery."""

    reason = "IDENTITY_NOT_FOUND"


class TemplateNotFound(NotFound):
    """No template of that id in the gallery."""

    reason = "TEMPLATE_NOT_FOUND"


class KeyNotFound(NotFound):
    """No API key of that name."""

    reason = "KEY_NOT_FOUND"


class AlreadyExists(FaceGalleryError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(FaceGalleryError):
    code = "FAILED_PRECONDITION"
    reason = "FAILED_PRECONDITION"


class MultipleFacesError(FailedPrecondition):
    """Several faces were found and the face policy rejects such images."""

    reason = "MULTIPLE_FACES"


class ModelMismatchError(FailedPrecondition):
    """The gallery's templates were computed by a different model than the one loaded."""

    reason = "MODEL_MISMATCH"


class RequestIdReusedError(FailedPrecondition):
    """An Enroll idempotency key (request_id) came back with a different request."""

    reason = "REQUEST_ID_REUSED"


class ResourceExhausted(FaceGalleryError):
    code = "RESOURCE_EXHAUSTED"
    reason = "RESOURCE_EXHAUSTED"


class ImageTooLargeError(ResourceExhausted):
    """The image is over the configured byte or pixel limit."""

    reason = "IMAGE_TOO_LARGE"


class TooManyStreams(ResourceExhausted):
    """The server's stream cap, in all or per client, is reached (service/streams.py)."""

    reason = "TOO_MANY_STREAMS"


class StreamIdleError(FaceGalleryError):
    """A request stream sent nothing for longer than the server's idle timeout (service/streams.py)."""

    code = "DEADLINE_EXCEEDED"
    reason = "STREAM_IDLE"


class GalleryClosed(FaceGalleryError):
    """The gallery engine is closing (GalleryManager.close: the server shuts down); another
    server, or this one once restarted, can take the call."""

    code = "UNAVAILABLE"
    reason = "NOT_READY"


class BackendUnavailable(FaceGalleryError):
    """The shared store of the ``milvus`` backend (gallery/milvus_client.py) cannot be reached or
    timed out; nothing was acknowledged, and the call can be retried once it is back (the server
    reports NOT_SERVING meanwhile)."""

    code = "UNAVAILABLE"
    reason = "BACKEND_UNAVAILABLE"


class ModelError(FaceGalleryError):
    """A model directory is missing files, fails its checksums, or disagrees with its manifest."""

    reason = "MODEL_ERROR"


class StoreCorruptError(FaceGalleryError):
    """The gallery store (SQLite file) is damaged: it failed ``PRAGMA quick_check`` /
    ``integrity_check`` or SQLite reported it malformed. The message names the file, what SQLite
    reported and the repair options; the server refuses to serve such a store."""

    code = "DATA_LOSS"
    reason = "STORE_DAMAGED"
