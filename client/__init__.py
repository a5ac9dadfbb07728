"""Python client of the facegallery gRPC service.

::

    from facegallery.client import GalleryClient

    with GalleryClient("localhost:50051") as client:
        client.enroll("ann", "photos/ann.jpg", display_name="Ann")
        for face in client.identify("visitor.jpg"):
            print(face.face.box, face.identity_id or "unknown", face.distance)

Results are frozen dataclasses (never protobufs); failures raise the exceptions below, keyed by
gRPC status code. Distances are Euclidean (L2) between embeddings: lower is more similar. A
gallery decides 1:N searches with its decision policy (a fixed L2 threshold, or a target FPIR;
each identity's nearest template or its mean template, ``Aggregation``) on scores of its
``ScoreKind``: a probe matches when ``score <= threshold``, and each answer
carries its estimated FPIR. Verify and compare match when ``distance <= threshold`` (0.6 for the
default dlib model).
"""

from facegallery.client._client import (
    DEFAULT_ADDRESS,
    DEFAULT_GALLERY,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    USE_CLIENT_DEFAULT,
    GalleryClient,
    UseClientDefault,
)
from facegallery.client._exceptions import (
    AlreadyExists,
    Cancelled,
    ClientClosedError,
    DeadlineExceeded,
    FaceGalleryClientError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from facegallery.client._models import (
    Aggregation,
    ApiKey,
    BulkEnrollItem,
    CompareResult,
    DecisionPolicy,
    DuplicatePair,
    DuplicatesResult,
    EmbeddedFace,
    EnrollItem,
    EnrollResult,
    ExportedTemplate,
    Face,
    FaceIdentification,
    FacePolicy,
    Gallery,
    GalleryDeletion,
    Identity,
    ImageInput,
    ImageKind,
    ImportResult,
    Match,
    ModelInfo,
    Normalization,
    ScoreKind,
    ServerInfo,
    Template,
    VerifyResult,
)

__all__ = [
    "Aggregation",
    "AlreadyExists",
    "ApiKey",
    "BulkEnrollItem",
    "Cancelled",
    "ClientClosedError",
    "CompareResult",
    "DEFAULT_ADDRESS",
    "DEFAULT_GALLERY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "DeadlineExceeded",
    "DecisionPolicy",
    "DuplicatePair",
    "DuplicatesResult",
    "EmbeddedFace",
    "EnrollItem",
    "EnrollResult",
    "ExportedTemplate",
    "Face",
    "FaceGalleryClientError",
    "FaceIdentification",
    "FacePolicy",
    "FailedPrecondition",
    "FieldViolation",
    "Gallery",
    "GalleryClient",
    "GalleryDeletion",
    "Identity",
    "ImageInput",
    "ImageKind",
    "ImportResult",
    "InvalidArgument",
    "Match",
    "ModelInfo",
    "Normalization",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ScoreKind",
    "ServerError",
    "ServerInfo",
    "Template",
    "USE_CLIENT_DEFAULT",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UseClientDefault",
    "VerifyResult",
]

# Show the public path in reprs and tracebacks (facegallery.client.GalleryClient), as httpx does.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
