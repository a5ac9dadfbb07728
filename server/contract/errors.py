"""The one exception tree of the facegallery engine.

Every error the engine raises on purpose derives from :class:`FaceGalleryError` and carries the
*name* of the gRPC status it maps to as the class attribute ``code`` (a ``str`` such as
``"INVALID_ARGUMENT"``), the way click's exceptions carry ``exit_code``. This module knows nothing
of grpc: ``facegallery.server.service.status`` turns the names into ``grpc.StatusCode`` values, in
one place, for unary and streaming calls alike; anything else becomes INTERNAL with a generic
message and a logged traceback.

    FaceGalleryError                      (INTERNAL)
    ├── InvalidInput                      (INVALID_ARGUMENT)
    │   ├── ImageDecodeError              undecodable, truncated or empty image bytes
    │   ├── NoFaceError                   no face found where one is required (enroll, verify)
    │   └── EmbeddingShapeError           vector of the wrong length or dtype
    ├── NotFound                          (NOT_FOUND)  gallery, identity or template unknown
    ├── AlreadyExists                     (ALREADY_EXISTS)
    ├── FailedPrecondition                (FAILED_PRECONDITION)
    │   ├── MultipleFacesError            several faces under the "reject" face policy
    │   └── ModelMismatchError            gallery built with another model
    ├── ResourceExhausted                 (RESOURCE_EXHAUSTED)
    │   └── ImageTooLargeError            image over the byte or pixel limit
    ├── ModelError                        (INTERNAL)  missing or corrupt model files
    └── StoreCorruptError                 (DATA_LOSS)  the SQLite store fails its integrity check
"""

from __future__ import annotations

__all__ = [
    "FaceGalleryError",
    "InvalidInput",
    "ImageDecodeError",
    "NoFaceError",
    "EmbeddingShapeError",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "MultipleFacesError",
    "ModelMismatchError",
    "ResourceExhausted",
    "ImageTooLargeError",
    "ModelError",
    "StoreCorruptError",
]


class FaceGalleryError(Exception):
    """Base of every deliberate engine error; ``code`` names the gRPC status it maps to."""

    code: str = "INTERNAL"


class InvalidInput(FaceGalleryError):
    code = "INVALID_ARGUMENT"


class ImageDecodeError(InvalidInput):
    """The bytes are not an image Pillow can decode (random, truncated, empty)."""


class NoFaceError(InvalidInput):
    """No face was detected where the operation needs one."""


class EmbeddingShapeError(InvalidInput):
    """An embedding has the wrong length, dtype, or non-finite values."""


class NotFound(FaceGalleryError):
    code = "NOT_FOUND"


class AlreadyExists(FaceGalleryError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(FaceGalleryError):
    code = "FAILED_PRECONDITION"


class MultipleFacesError(FailedPrecondition):
    """Several faces were found and the face policy rejects such images."""


class ModelMismatchError(FailedPrecondition):
    """The gallery's templates were computed by a different model than the one loaded."""


class ResourceExhausted(FaceGalleryError):
    code = "RESOURCE_EXHAUSTED"


class ImageTooLargeError(ResourceExhausted):
    """The image is over the configured byte or pixel limit."""


class StreamIdleError(FaceGalleryError):
    """A request stream sent nothing for longer than the server's idle timeout (service/streams.py)."""

    code = "DEADLINE_EXCEEDED"


class ModelError(FaceGalleryError):
    """A model directory is missing files, fails its checksums, or disagrees with its manifest."""


class StoreCorruptError(FaceGalleryError):
    """The gallery store (SQLite file) is damaged: it failed ``PRAGMA quick_check`` /
    ``integrity_check`` or SQLite reported it malformed. The message names the file, what SQLite
    reported and the repair options; the server refuses to serve such a store."""

    code = "DATA_LOSS"
