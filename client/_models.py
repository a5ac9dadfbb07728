"""Result and input types of the facegallery client: frozen dataclasses, never protobufs.

Units everywhere: boxes and landmarks are pixels of the decoded original image after EXIF
orientation; distances are Euclidean (L2) distances between embeddings, lower is more similar;
times are timezone-aware UTC ``datetime`` objects. A 1:N search decides on *scores* of the
gallery's :class:`ScoreKind` (the distance itself, or an S-norm score; lower is more similar on
both): a probe matches when ``score <= threshold``, both on that scale; 1:1 calls (verify,
compare) decide on ``distance <= threshold``. FPIR (false-positive identification rate) is the
probability that a person who is not enrolled is matched to someone in the gallery; FAR the 1:1
false-accept rate. Every result has ``to_dict()`` giving plain JSON-serialisable values (tuples ->
lists, arrays -> lists of floats, datetimes -> ISO 8601 strings, enums -> names, non-finite floats
-> None).
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
    "ApiKey",
    "ImageKind",
    "FacePolicy",
    "Normalization",
    "Aggregation",
    "ScoreKind",
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
    "DecisionPolicy",
    "Gallery",
    "GalleryDeletion",
    "DuplicatePair",
    "DuplicatesResult",
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


class Normalization(enum.Enum):
    """Score normalisation of a target-FPIR decision policy (proto ``ScoreNormalization``)."""

    #: No normalisation: scores are L2 distances.
    NONE = "none"
    #: Symmetric S-norm with the gallery's own identities as the cohort (used once the gallery is
    #: big enough to be its own cohort; until then the gallery decides on distances).
    SNORM = "snorm"


class Aggregation(enum.Enum):
    """How a 1:N search turns an identity's templates into one distance (proto ``TemplateAggregation``)."""

    #: The distance to the identity's nearest template.
    NEAREST = "nearest"
    #: The distance to the mean of the identity's templates (one vector per identity).
    MEAN = "mean"


class ScoreKind(enum.Enum):
    """The scale of a score and of the threshold it is compared with (proto ``ScoreKind``)."""

    #: The L2 distance between embeddings (typically 0..1.5).
    DISTANCE = "distance"
    #: An S-norm score: dimensionless, roughly cohort standard deviations from the cohort's mean
    #: distance; negative = closer than the gallery's typical pair.
    SNORM = "snorm"


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
        L2 distance between the probe and this identity: its nearest template, or the mean of
        its templates in a gallery of :attr:`Aggregation.MEAN`.
    template_id : int
        The template that gave ``distance`` (under ``Aggregation.MEAN`` the identity's first
        template, which stands for its mean).
    score : float
        This identity's score on the search's :class:`ScoreKind` scale (lower is more similar):
        ``distance`` itself, or its S-norm score.
    """

    identity_id: str
    display_name: str
    distance: float
    template_id: int
    score: float


@dataclasses.dataclass(frozen=True)
class FaceIdentification(_Result):
    """The 1:N search result for one probe face.

    Attributes
    ----------
    face : Face or None
        The probe face; None for :meth:`GalleryClient.identify_embedding`.
    matches : tuple of Match
        Candidates ranked by score, most similar first (at most ``top_k``), including those over
        the threshold; empty when the gallery is empty.
    identity_id : str or None
        The decision: the best-ranked identity when its ``score <= threshold``, None = unknown.
    distance : float
        L2 distance to the best-ranked identity; ``inf`` when the gallery is empty.
    threshold : float
        The threshold the decision used, on the ``score_kind`` scale.
    score : float
        Score of the best-ranked identity on the ``score_kind`` scale; ``inf`` when the gallery
        is empty.
    score_kind : ScoreKind
        The scale of ``score``, ``threshold`` and the matches' scores.
    estimated_fpir : float
        Estimated probability (0..1) that a person who is not enrolled gets a score this good
        against someone in the gallery: small = a confident match. 0.0 for an empty gallery;
        ``nan`` when there is nothing to estimate it from.
    """

    face: Face | None
    matches: tuple[Match, ...]
    identity_id: str | None
    distance: float
    threshold: float
    score: float
    score_kind: ScoreKind
    estimated_fpir: float

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
        The best-scoring *other* identity when its score is within the gallery's threshold (a
        likely duplicate enrollment of the same person under another id).
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
    request_id : str or None
        Idempotency key (1..128 printable ASCII characters, e.g. ``str(uuid.uuid4())``): the
        server answers a repeated request with the same key with the first reply instead of
        enrolling again (for 24 hours, while the template exists); the same key with a different
        request is ``FailedPrecondition`` (reason ``REQUEST_ID_REUSED``). None = no key.
    """

    identity_id: str
    image: Any = None
    embedding: Any = None
    display_name: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    kind: ImageKind = ImageKind.PHOTO
    face_policy: FacePolicy = FacePolicy.LARGEST
    model_id: str | None = None
    request_id: str | None = None


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
    reason : str or None
        When not ``ok``: the stable reason :meth:`GalleryClient.enroll`'s exception would have had
        (e.g. ``"NO_FACE"``, see :attr:`FaceGalleryClientError.reason`); None when ``ok``.
    """

    index: int
    ok: bool
    code: grpc.StatusCode
    message: str
    result: EnrollResult | None
    reason: str | None = None


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
    estimated_far : float or None
        Estimated 1:1 false-accept rate at ``distance`` (the fraction of pairs of different
        people at least this close) from the model's false-match curve; None when the model has
        none.
    """

    identity_id: str
    distance: float
    threshold: float
    is_match: bool
    face: Face | None
    probability_same: float | None
    estimated_far: float | None


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
    estimated_far : float or None
        Estimated 1:1 false-accept rate at ``distance``; None when the model has no
        false-match curve.
    """

    distance: float
    threshold: float
    is_match: bool
    face_a: Face | None
    face_b: Face | None
    probability_same: float | None
    estimated_far: float | None


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
class DecisionPolicy(_Result):
    """How a gallery decides whether a probe is one of its identities (1:N).

    Exactly one of ``threshold`` and ``target_fpir`` is set.

    Attributes
    ----------
    threshold : float or None
        A fixed decision threshold on the L2 distance.
    target_fpir : float or None
        A target FPIR in (0, 1): the server keeps the threshold where about this fraction of
        people who are not enrolled would be matched to someone, as the gallery changes.
    normalization : Normalization
        Score normalisation of a target-FPIR policy; ``NONE`` with a fixed threshold.
    cohort_size : int
        k of S-norm (cohort identities per side) of a target-FPIR policy; 0 with a fixed threshold.
    aggregation : Aggregation
        How an identity's templates give its distance to a probe, with either rule: its nearest
        template, or the mean of its templates. ``NEAREST`` from a server that predates it.
    """

    threshold: float | None
    target_fpir: float | None
    normalization: Normalization
    cohort_size: int
    aggregation: Aggregation

    @property
    def kind(self) -> str:
        """``"threshold"`` or ``"target_fpir"``."""
        return "threshold" if self.threshold is not None else "target_fpir"

    def describe(self) -> str:
        """One line for people: ``"threshold 0.6"`` or ``"target FPIR 0.01, S-norm k=100, mean template"``."""
        mean = ", mean template" if self.aggregation is Aggregation.MEAN else ""
        if self.threshold is not None:
            return f"threshold {self.threshold:g}{mean}"
        norm = f"S-norm k={self.cohort_size}" if self.normalization is Normalization.SNORM else "no normalisation"
        return f"target FPIR {self.target_fpir:g}, {norm}{mean}"


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
        The threshold the gallery decides with now, on the ``score_kind`` scale (the policy's
        own for a fixed threshold, derived from the gallery's contents for a target FPIR).
    metric : str
        ``"euclidean"``.
    embedding_dim : int
    identity_count, template_count : int
    create_time : datetime or None
    policy : DecisionPolicy or None
        The gallery's decision policy; None from a server that predates policies.
    score_kind : ScoreKind
        The scale of ``threshold`` and of the scores of searches of this gallery now.
    estimated_fpir : float
        Estimated FPIR (0..1) at ``threshold`` for ``identity_count`` people; ``nan`` when there
        is nothing to estimate it from.
    threshold_basis : str
        What ``estimated_fpir`` rests on, for people (e.g. "leave-one-out searches of ...").
    recalibrating : bool
        The threshold is being recomputed after a large change (a bulk import): ``threshold``,
        ``score_kind``, ``estimated_fpir`` and ``threshold_basis`` are the previous
        calibration's; searches wait for the new one.
    """

    name: str
    model_id: str
    threshold: float
    metric: str
    embedding_dim: int
    identity_count: int
    template_count: int
    create_time: datetime.datetime | None
    policy: DecisionPolicy | None
    score_kind: ScoreKind
    estimated_fpir: float
    threshold_basis: str
    recalibrating: bool = False


@dataclasses.dataclass(frozen=True)
class GalleryDeletion(_Result):
    """What :meth:`GalleryClient.delete_gallery` removed."""

    deleted_identities: int
    deleted_templates: int


@dataclasses.dataclass(frozen=True)
class DuplicatePair(_Result):
    """Two different identities of a gallery that its policy would take for the same person.

    Attributes
    ----------
    identity_a, display_name_a, identity_b, display_name_b : str
    score : float
        The pair's score on the :class:`DuplicatesResult`'s ``score_kind`` scale (<= its
        threshold).
    distance : float
        L2 distance from ``identity_a``'s first template to ``identity_b`` (its nearest template,
        or the mean of its templates under :attr:`Aggregation.MEAN`).
    estimated_fpir : float
        Estimated FPIR at ``score`` (0..1): how often a stranger scores this well; ``nan`` when
        there is nothing to estimate it from.
    """

    identity_a: str
    display_name_a: str
    identity_b: str
    display_name_b: str
    score: float
    distance: float
    estimated_fpir: float


@dataclasses.dataclass(frozen=True)
class DuplicatesResult(_Result):
    """The likely duplicate enrollments of a gallery (:meth:`GalleryClient.find_duplicates`).

    Attributes
    ----------
    pairs : tuple of DuplicatePair
        Most similar first; empty when no pair is within the threshold.
    score_kind : ScoreKind
        The scale of the pairs' scores and of ``threshold``.
    threshold : float
        The gallery's threshold the pairs were selected with.
    """

    pairs: tuple[DuplicatePair, ...]
    score_kind: ScoreKind
    threshold: float


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



@dataclasses.dataclass(frozen=True)
class ApiKey(_Result):
    """An API key as listed (never its secret).

    Attributes
    ----------
    name : str
    key_id : str
        The first 8 characters after ``fg_`` of the key (its lookup id).
    role : str
        ``"read"``, ``"write"`` or ``"admin"``.
    galleries : tuple of str
        The galleries the key is limited to; empty = every gallery.
    create_time : datetime or None
    revoke_time : datetime or None
        None while the key is active.
    """

    name: str
    key_id: str
    role: str
    galleries: tuple[str, ...]
    create_time: datetime.datetime | None
    revoke_time: datetime.datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoke_time is None
