"""Result and input types of the facegallery client: frozen dataclasses, never protobufs.

Units everywhere: boxes and landmarks are pixels of the decoded original image after EXIF
orientation; distances are Euclidean (L2) distances between embeddings, lower is more similar;
a probe matches an identity when ``distance <= threshold``; times are timezone-aware UTC
``datetime`` objects. Every result has ``to_dict()`` giving plain JSON-serialisable values
(tuples -> lists, arrays -> lists of floats, datetimes -> ISO 8601 strings, enums -> names).
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import os
from collections.abc import Mapping
from typing import Any, Union

import grpc
import numpy as np
import PIL.Image

__all__ = [
    "ImageKind",
    "FacePolicy",
    "ImageInput",
    "Face",
    "Match",
    "FaceIdentification",
    "EnrollResult",
    "EnrollItem",
    "BulkEnrollItem",
    "VerifyResult",
    "CompareResult",
    "EmbeddedFace",
    "Gallery",
    "GalleryDeletion",
    "Template",
    "Identity",
    "ExportedTemplate",
    "ImportResult",
    "ModelInfo",
    "ServerInfo",
]

#: What the client accepts as an image: a file path (sent byte for byte), encoded bytes (sent as
#: is), a PIL image or a ``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)`` uint8 array (grey / RGB /
#: RGBA), both of which are encoded to PNG on the client.
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, PIL.Image.Image, np.ndarray]


class ImageKind(enum.Enum):
    """What an image contains, i.e. which server pipeline stages run (proto ``ImageKind``)."""

    #: A photo: detect every face, then landmarks, alignment and embedding.
    PHOTO = "photo"
    #: An already cropped face: no detection, landmarks are searched in the whole image.
    FACE_CROP = "face_crop"
    #: An aligned face chip of the model's chip size (150x150 for the default model), embedded as is.
    ALIGNED_CHIP = "aligned_chip"


class FacePolicy(enum.Enum):
    """How enrollment treats an image with several faces (proto ``FacePolicy``)."""

    #: Enroll the largest face (by box area).
    LARGEST = "largest"
    #: Refuse images with more than one face (:class:`~facegallery.client.FailedPrecondition`).
    REJECT_MULTIPLE = "reject_multiple"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.ravel()]
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, grpc.StatusCode):
        return value.name
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no infinity: an empty gallery's distance (+inf) becomes null.
        return None
    return value


class _Result:
    """Mixin: ``to_dict()`` for dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (recursively); +inf distances -> None."""
        return _jsonable(self)


@dataclasses.dataclass(frozen=True)
class Face(_Result):
    """One detected face.

    Attributes
    ----------
    box : tuple of 4 float
        left, top, right, bottom in pixels of the decoded original image after EXIF orientation
        (inclusive, dlib rectangle convention).
    landmarks : tuple of (x, y) float pairs
        The 5 points of dlib's ``shape_predictor_5_face_landmarks`` in pixels: 0-1 one eye's outer
        and inner corners, 2-3 the other eye's, 4 the base of the nose.
    score : float
        Detector confidence (raw MMOD score, typically 0..1.2); 0.0 when detection was skipped.
    """

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def area(self) -> float:
        """Box area in square pixels (inclusive rectangle)."""
        left, top, right, bottom = self.box
        return max(0.0, right - left + 1) * max(0.0, bottom - top + 1)


@dataclasses.dataclass(frozen=True)
class Match(_Result):
    """A candidate identity for a probe face.

    Attributes
    ----------
    identity_id, display_name : str
    distance : float
        L2 distance between the probe and this identity's nearest template.
    template_id : int
        The template that gave ``distance``.
    """

    identity_id: str
    display_name: str
    distance: float
    template_id: int


@dataclasses.dataclass(frozen=True)
class FaceIdentification(_Result):
    """The 1:N search result for one probe face.

    Attributes
    ----------
    face : Face or None
        The probe face; None for :meth:`GalleryClient.identify_embedding`.
    matches : tuple of Match
        Candidates nearest first (at most ``top_k``), including those over the threshold; empty
        when the gallery is empty.
    identity_id : str or None
        The decision: the nearest identity when its distance <= ``threshold``, None = unknown.
    distance : float
        L2 distance to the nearest identity; ``inf`` when the gallery is empty.
    threshold : float
        The L2 distance threshold the decision used.
    """

    face: Face | None
    matches: tuple[Match, ...]
    identity_id: str | None
    distance: float
    threshold: float

    @property
    def is_known(self) -> bool:
        """True when the probe was identified (``identity_id`` is not None)."""
        return self.identity_id is not None


@dataclasses.dataclass(frozen=True)
class EnrollResult(_Result):
    """The outcome of one enrollment.

    Attributes
    ----------
    identity_id : str
    template_id : int
        The new template's id.
    face : Face or None
        The enrolled face; None when an embedding was enrolled.
    identity_created : bool
        True when this enrollment created the identity.
    possible_duplicate : Match or None
        The nearest *other* identity when it is within the gallery threshold (a likely duplicate
        enrollment of the same person under another id).
    source_sha256 : str
        Hex SHA-256 of the image bytes the server received; empty for embeddings.
    """

    identity_id: str
    template_id: int
    face: Face | None
    identity_created: bool
    possible_duplicate: Match | None
    source_sha256: str


@dataclasses.dataclass(frozen=True)
class EnrollItem:
    """One enrollment of :meth:`GalleryClient.bulk_enroll` (an input, not a result).

    Exactly one of ``image`` and ``embedding`` must be given.

    Attributes
    ----------
    identity_id : str
        The caller's id for the person (1..256 characters).
    image : ImageInput or None
        A path (read when the item is sent), bytes, a PIL image or a uint8 array.
    embedding : (D,) float32 array-like or None
        A precomputed embedding of the server model's dimension.
    display_name : str
        Set on creation, or updated when non-empty.
    metadata : mapping of str to str
        Merged into the identity's metadata.
    kind : ImageKind
    face_policy : FacePolicy
    model_id : str or None
        With ``embedding`` only: the model id it was computed with (``ModelInfo.model_id`` of the
        server that embedded it, or ``Gallery.model_id`` of the gallery it was exported from);
        the gallery must hold the same model. None = the server's own model.
    """

    identity_id: str
    image: Any = None
    embedding: Any = None
    display_name: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kind: ImageKind = ImageKind.PHOTO
    face_policy: FacePolicy = FacePolicy.LARGEST
    model_id: str | None = None


@dataclasses.dataclass(frozen=True)
class BulkEnrollItem(_Result):
    """The result of one item of :meth:`GalleryClient.bulk_enroll`.

    Attributes
    ----------
    index : int
        Position of the item in the request stream (0-based).
    ok : bool
        True when the item was enrolled.
    code : grpc.StatusCode
        ``OK``, or the status :meth:`GalleryClient.enroll` would have raised for this item.
    message : str
        Error message when not ``ok``; empty otherwise.
    result : EnrollResult or None
        The enrollment when ``ok``.
    """

    index: int
    ok: bool
    code: grpc.StatusCode
    message: str
    result: EnrollResult | None


@dataclasses.dataclass(frozen=True)
class VerifyResult(_Result):
    """1:1 verification of the largest face of an image against one identity.

    Attributes
    ----------
    identity_id : str
    distance : float
        L2 distance between the probe's largest face and the identity's nearest template.
    threshold : float
        L2 distance threshold used.
    is_match : bool
        ``distance <= threshold``.
    face : Face
        The probe face that was compared.
    probability_same : float or None
        P(same person) from the model's learned head; None when the model has no head.
    """

    identity_id: str
    distance: float
    threshold: float
    is_match: bool
    face: Face | None
    probability_same: float | None


@dataclasses.dataclass(frozen=True)
class CompareResult(_Result):
    """Comparison of the largest faces of two images (no gallery involved).

    Attributes
    ----------
    distance : float
        L2 distance between the two faces' embeddings.
    threshold : float
    is_match : bool
        ``distance <= threshold``.
    face_a, face_b : Face
    probability_same : float or None
        P(same person) from the model's learned head; None when the model has no head.
    """

    distance: float
    threshold: float
    is_match: bool
    face_a: Face | None
    face_b: Face | None
    probability_same: float | None


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddedFace(_Result):
    """A detected face with its embedding.

    Attributes
    ----------
    face : Face
    embedding : (D,) float32 ndarray
        The model's embedding of the aligned face chip (D = 128 for the default model).
    """

    face: Face | None
    embedding: np.ndarray


@dataclasses.dataclass(frozen=True)
class Gallery(_Result):
    """A gallery of enrolled identities.

    Attributes
    ----------
    name : str
    model_id : str
        Model id (64 hex digits) of the pipeline that computed the gallery's templates: a sha256
        over everything that changes an embedding (embedder, chip, metric, flip augmentation).
    threshold : float
        Default decision threshold (L2 distance) for searches of this gallery.
    metric : str
        ``"euclidean"``.
    embedding_dim : int
    identity_count, template_count : int
    create_time : datetime or None
    """

    name: str
    model_id: str
    threshold: float
    metric: str
    embedding_dim: int
    identity_count: int
    template_count: int
    create_time: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class GalleryDeletion(_Result):
    """What :meth:`GalleryClient.delete_gallery` removed."""

    deleted_identities: int
    deleted_templates: int


@dataclasses.dataclass(frozen=True)
class Template(_Result):
    """A stored embedding of one enrolled face (the embedding itself is only exported).

    Attributes
    ----------
    template_id : int
    identity_id : str
    source_sha256 : str
        Hex SHA-256 of the source image bytes; empty for imported embeddings.
    face : Face or None
        The enrolled face; None for imported embeddings.
    create_time : datetime or None
    """

    template_id: int
    identity_id: str
    source_sha256: str
    face: Face | None
    create_time: datetime.datetime | None


@dataclasses.dataclass(frozen=True)
class Identity(_Result):
    """An enrolled person.

    Attributes
    ----------
    identity_id : str
        The caller's own id.
    display_name : str
    metadata : dict of str to str
    template_count : int
    templates : tuple of Template
        Filled by :meth:`GalleryClient.get_identity`; empty in
        :meth:`GalleryClient.list_identities`.
    create_time, update_time : datetime or None
    """

    identity_id: str
    display_name: str
    metadata: dict[str, str]
    template_count: int
    templates: tuple[Template, ...]
    create_time: datetime.datetime | None
    update_time: datetime.datetime | None


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedTemplate(_Result):
    """One exported template with its identity's data (input of ``import_embeddings`` too).

    Attributes
    ----------
    identity_id, display_name : str
    metadata : dict of str to str
    template_id : int
        The id in the exporting gallery (the importing gallery assigns its own).
    embedding : (D,) float32 ndarray
    source_sha256 : str
        Hex SHA-256 of the source image; empty when unknown.
    create_time : datetime or None
    """

    identity_id: str
    display_name: str
    metadata: dict[str, str]
    template_id: int
    embedding: np.ndarray
    source_sha256: str = ""
    create_time: datetime.datetime | None = None


@dataclasses.dataclass(frozen=True)
class ImportResult(_Result):
    """Counts of :meth:`GalleryClient.import_embeddings`.

    Attributes
    ----------
    imported : int
    skipped : int
        Templates already present (same identity and embedding).
    """

    imported: int
    skipped: int


@dataclasses.dataclass(frozen=True)
class ModelInfo(_Result):
    """The model a server runs.

    Attributes
    ----------
    name, version : str
    model_id : str
        The server's model id (64 hex digits): a sha256 over everything that changes an
        embedding (embedder file, embedding_dim, metric, chip, embedder input and the server's
        flip augmentation, which ``manifest`` does not hold). Galleries record it.
    embedding_dim : int
    metric : str
    threshold : float
        Default decision threshold (L2 distance).
    chip_size : int
        Side of the aligned face chip in pixels.
    has_head : bool
        True when the model has a learned same-person head (``probability_same``).
    manifest : dict
        The parsed ``model.json``.
    """

    name: str
    version: str
    model_id: str
    embedding_dim: int
    metric: str
    threshold: float
    chip_size: int
    has_head: bool
    manifest: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ServerInfo(_Result):
    """Server version and its model."""

    version: str
    model: ModelInfo

