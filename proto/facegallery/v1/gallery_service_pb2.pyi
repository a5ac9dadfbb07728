import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_KIND_UNSPECIFIED: _ClassVar[ImageKind]
    IMAGE_KIND_PHOTO: _ClassVar[ImageKind]
    IMAGE_KIND_FACE_CROP: _ClassVar[ImageKind]
    IMAGE_KIND_ALIGNED_CHIP: _ClassVar[ImageKind]

class FacePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FACE_POLICY_UNSPECIFIED: _ClassVar[FacePolicy]
    FACE_POLICY_LARGEST: _ClassVar[FacePolicy]
    FACE_POLICY_REJECT_MULTIPLE: _ClassVar[FacePolicy]

class ScoreNormalization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_NORMALIZATION_UNSPECIFIED: _ClassVar[ScoreNormalization]
    SCORE_NORMALIZATION_NONE: _ClassVar[ScoreNormalization]
    SCORE_NORMALIZATION_SNORM: _ClassVar[ScoreNormalization]

class ScoreKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCORE_KIND_UNSPECIFIED: _ClassVar[ScoreKind]
    SCORE_KIND_DISTANCE: _ClassVar[ScoreKind]
    SCORE_KIND_SNORM: _ClassVar[ScoreKind]

class TemplateAggregation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEMPLATE_AGGREGATION_UNSPECIFIED: _ClassVar[TemplateAggregation]
    TEMPLATE_AGGREGATION_NEAREST: _ClassVar[TemplateAggregation]
    TEMPLATE_AGGREGATION_MEAN: _ClassVar[TemplateAggregation]

class KeyRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_ROLE_UNSPECIFIED: _ClassVar[KeyRole]
    KEY_ROLE_READ: _ClassVar[KeyRole]
    KEY_ROLE_WRITE: _ClassVar[KeyRole]
    KEY_ROLE_ADMIN: _ClassVar[KeyRole]
IMAGE_KIND_UNSPECIFIED: ImageKind
IMAGE_KIND_PHOTO: ImageKind
IMAGE_KIND_FACE_CROP: ImageKind
IMAGE_KIND_ALIGNED_CHIP: ImageKind
FACE_POLICY_UNSPECIFIED: FacePolicy
FACE_POLICY_LARGEST: FacePolicy
FACE_POLICY_REJECT_MULTIPLE: FacePolicy
SCORE_NORMALIZATION_UNSPECIFIED: ScoreNormalization
SCORE_NORMALIZATION_NONE: ScoreNormalization
SCORE_NORMALIZATION_SNORM: ScoreNormalization
SCORE_KIND_UNSPECIFIED: ScoreKind
SCORE_KIND_DISTANCE: ScoreKind
SCORE_KIND_SNORM: ScoreKind
TEMPLATE_AGGREGATION_UNSPECIFIED: TemplateAggregation
TEMPLATE_AGGREGATION_NEAREST: TemplateAggregation
TEMPLATE_AGGREGATION_MEAN: TemplateAggregation
KEY_ROLE_UNSPECIFIED: KeyRole
KEY_ROLE_READ: KeyRole
KEY_ROLE_WRITE: KeyRole
KEY_ROLE_ADMIN: KeyRole

class Image(_message.Message):
    __slots__ = ("data", "kind")
    DATA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    kind: ImageKind
    def __init__(self, data: _Optional[bytes] = ..., kind: _Optional[_Union[ImageKind, str]] = ...) -> None: ...

class BoundingBox(_message.Message):
    __slots__ = ("left", "top", "right", "bottom")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    left: float
    top: float
    right: float
    bottom: float
    def __init__(self, left: _Optional[float] = ..., top: _Optional[float] = ..., right: _Optional[float] = ..., bottom: _Optional[float] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("x", "y")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ...) -> None: ...

class Face(_message.Message):
    __slots__ = ("box", "landmarks", "score")
    BOX_FIELD_NUMBER: _ClassVar[int]
    LANDMARKS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    box: BoundingBox
    landmarks: _containers.RepeatedCompositeFieldContainer[Point]
    score: float
    def __init__(self, box: _Optional[_Union[BoundingBox, _Mapping]] = ..., landmarks: _Optional[_Iterable[_Union[Point, _Mapping]]] = ..., score: _Optional[float] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("identity_id", "display_name", "distance", "template_id", "score")
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    identity_id: str
    display_name: str
    distance: float
    template_id: int
    score: float
    def __init__(self, identity_id: _Optional[str] = ..., display_name: _Optional[str] = ..., distance: _Optional[float] = ..., template_id: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class DecisionPolicy(_message.Message):
    __slots__ = ("threshold", "target_fpir", "normalization", "cohort_size", "aggregation")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPIR_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    COHORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    target_fpir: float
    normalization: ScoreNormalization
    cohort_size: int
    aggregation: TemplateAggregation
    def __init__(self, threshold: _Optional[float] = ..., target_fpir: _Optional[float] = ..., normalization: _Optional[_Union[ScoreNormalization, str]] = ..., cohort_size: _Optional[int] = ..., aggregation: _Optional[_Union[TemplateAggregation, str]] = ...) -> None: ...

class Gallery(_message.Message):
    __slots__ = ("name", "model_id", "threshold", "metric", "embedding_dim", "identity_count", "template_count", "create_time", "policy", "score_kind", "estimated_fpir", "threshold_basis", "recalibrating")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FPIR_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_BASIS_FIELD_NUMBER: _ClassVar[int]
    RECALIBRATING_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_id: str
    threshold: float
    metric: str
    embedding_dim: int
    identity_count: int
    template_count: int
    create_time: _timestamp_pb2.Timestamp
    policy: DecisionPolicy
    score_kind: ScoreKind
    estimated_fpir: float
    threshold_basis: str
    recalibrating: bool
    def __init__(self, name: _Optional[str] = ..., model_id: _Optional[str] = ..., threshold: _Optional[float] = ..., metric: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., identity_count: _Optional[int] = ..., template_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy: _Optional[_Union[DecisionPolicy, _Mapping]] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., estimated_fpir: _Optional[float] = ..., threshold_basis: _Optional[str] = ..., recalibrating: _Optional[bool] = ...) -> None: ...

class Template(_message.Message):
    __slots__ = ("template_id", "identity_id", "source_sha256", "face", "create_time")
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    template_id: int
    identity_id: str
    source_sha256: str
    face: Face
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, template_id: _Optional[int] = ..., identity_id: _Optional[str] = ..., source_sha256: _Optional[str] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("identity_id", "display_name", "metadata", "template_count", "templates", "create_time", "update_time")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    identity_id: str
    display_name: str
    metadata: _containers.ScalarMap[str, str]
    template_count: int
    templates: _containers.RepeatedCompositeFieldContainer[Template]
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, identity_id: _Optional[str] = ..., display_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., template_count: _Optional[int] = ..., templates: _Optional[_Iterable[_Union[Template, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateGalleryRequest(_message.Message):
    __slots__ = ("name", "threshold", "policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    threshold: float
    policy: DecisionPolicy
    def __init__(self, name: _Optional[str] = ..., threshold: _Optional[float] = ..., policy: _Optional[_Union[DecisionPolicy, _Mapping]] = ...) -> None: ...

class UpdateGalleryRequest(_message.Message):
    __slots__ = ("name", "policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy: DecisionPolicy
    def __init__(self, name: _Optional[str] = ..., policy: _Optional[_Union[DecisionPolicy, _Mapping]] = ...) -> None: ...

class GetGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListGalleriesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGalleriesResponse(_message.Message):
    __slots__ = ("galleries",)
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    galleries: _containers.RepeatedCompositeFieldContainer[Gallery]
    def __init__(self, galleries: _Optional[_Iterable[_Union[Gallery, _Mapping]]] = ...) -> None: ...

class DeleteGalleryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteGalleryResponse(_message.Message):
    __slots__ = ("deleted_identities", "deleted_templates")
    DELETED_IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    DELETED_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    deleted_identities: int
    deleted_templates: int
    def __init__(self, deleted_identities: _Optional[int] = ..., deleted_templates: _Optional[int] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("gallery", "identity_id", "display_name", "metadata", "image", "embedding", "face_policy", "model_id", "request_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    FACE_POLICY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity_id: str
    display_name: str
    metadata: _containers.ScalarMap[str, str]
    image: Image
    embedding: Embedding
    face_policy: FacePolicy
    model_id: str
    request_id: str
    def __init__(self, gallery: _Optional[str] = ..., identity_id: _Optional[str] = ..., display_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., face_policy: _Optional[_Union[FacePolicy, str]] = ..., model_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("identity_id", "template_id", "face", "identity_created", "possible_duplicate", "source_sha256")
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_CREATED_FIELD_NUMBER: _ClassVar[int]
    POSSIBLE_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    identity_id: str
    template_id: int
    face: Face
    identity_created: bool
    possible_duplicate: Match
    source_sha256: str
    def __init__(self, identity_id: _Optional[str] = ..., template_id: _Optional[int] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., identity_created: _Optional[bool] = ..., possible_duplicate: _Optional[_Union[Match, _Mapping]] = ..., source_sha256: _Optional[str] = ...) -> None: ...

class BulkEnrollRequest(_message.Message):
    __slots__ = ("request",)
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request: EnrollRequest
    def __init__(self, request: _Optional[_Union[EnrollRequest, _Mapping]] = ...) -> None: ...

class BulkEnrollResponse(_message.Message):
    __slots__ = ("index", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    response: EnrollResponse
    error: _status_pb2.Status
    def __init__(self, index: _Optional[int] = ..., response: _Optional[_Union[EnrollResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class IdentifyRequest(_message.Message):
    __slots__ = ("gallery", "image", "top_k", "threshold", "max_faces")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    image: Image
    top_k: int
    threshold: float
    max_faces: int
    def __init__(self, gallery: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., top_k: _Optional[int] = ..., threshold: _Optional[float] = ..., max_faces: _Optional[int] = ...) -> None: ...

class FaceIdentification(_message.Message):
    __slots__ = ("face", "matches", "identity_id", "distance", "threshold", "score", "score_kind", "estimated_fpir")
    FACE_FIELD_NUMBER: _ClassVar[int]
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FPIR_FIELD_NUMBER: _ClassVar[int]
    face: Face
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    identity_id: str
    distance: float
    threshold: float
    score: float
    score_kind: ScoreKind
    estimated_fpir: float
    def __init__(self, face: _Optional[_Union[Face, _Mapping]] = ..., matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., identity_id: _Optional[str] = ..., distance: _Optional[float] = ..., threshold: _Optional[float] = ..., score: _Optional[float] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., estimated_fpir: _Optional[float] = ...) -> None: ...

class IdentifyResponse(_message.Message):
    __slots__ = ("faces", "model_id")
    FACES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[FaceIdentification]
    model_id: str
    def __init__(self, faces: _Optional[_Iterable[_Union[FaceIdentification, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class IdentifyEmbeddingRequest(_message.Message):
    __slots__ = ("gallery", "embedding", "top_k", "threshold", "model_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    embedding: Embedding
    top_k: int
    threshold: float
    model_id: str
    def __init__(self, gallery: _Optional[str] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., top_k: _Optional[int] = ..., threshold: _Optional[float] = ..., model_id: _Optional[str] = ...) -> None: ...

class IdentifyEmbeddingResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FaceIdentification
    def __init__(self, result: _Optional[_Union[FaceIdentification, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("gallery", "identity_id", "image", "threshold")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity_id: str
    image: Image
    threshold: float
    def __init__(self, gallery: _Optional[str] = ..., identity_id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., threshold: _Optional[float] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("identity_id", "distance", "threshold", "is_match", "face", "probability_same", "estimated_far")
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IS_MATCH_FIELD_NUMBER: _ClassVar[int]
    FACE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_SAME_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FAR_FIELD_NUMBER: _ClassVar[int]
    identity_id: str
    distance: float
    threshold: float
    is_match: bool
    face: Face
    probability_same: float
    estimated_far: float
    def __init__(self, identity_id: _Optional[str] = ..., distance: _Optional[float] = ..., threshold: _Optional[float] = ..., is_match: _Optional[bool] = ..., face: _Optional[_Union[Face, _Mapping]] = ..., probability_same: _Optional[float] = ..., estimated_far: _Optional[float] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("image_a", "image_b", "threshold")
    IMAGE_A_FIELD_NUMBER: _ClassVar[int]
    IMAGE_B_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    image_a: Image
    image_b: Image
    threshold: float
    def __init__(self, image_a: _Optional[_Union[Image, _Mapping]] = ..., image_b: _Optional[_Union[Image, _Mapping]] = ..., threshold: _Optional[float] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("distance", "threshold", "is_match", "face_a", "face_b", "probability_same", "estimated_far")
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IS_MATCH_FIELD_NUMBER: _ClassVar[int]
    FACE_A_FIELD_NUMBER: _ClassVar[int]
    FACE_B_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_SAME_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FAR_FIELD_NUMBER: _ClassVar[int]
    distance: float
    threshold: float
    is_match: bool
    face_a: Face
    face_b: Face
    probability_same: float
    estimated_far: float
    def __init__(self, distance: _Optional[float] = ..., threshold: _Optional[float] = ..., is_match: _Optional[bool] = ..., face_a: _Optional[_Union[Face, _Mapping]] = ..., face_b: _Optional[_Union[Face, _Mapping]] = ..., probability_same: _Optional[float] = ..., estimated_far: _Optional[float] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("image", "max_faces")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_FACES_FIELD_NUMBER: _ClassVar[int]
    image: Image
    max_faces: int
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., max_faces: _Optional[int] = ...) -> None: ...

class EmbeddedFace(_message.Message):
    __slots__ = ("face", "embedding")
    FACE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    face: Face
    embedding: Embedding
    def __init__(self, face: _Optional[_Union[Face, _Mapping]] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("faces", "model_id")
    FACES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    faces: _containers.RepeatedCompositeFieldContainer[EmbeddedFace]
    model_id: str
    def __init__(self, faces: _Optional[_Iterable[_Union[EmbeddedFace, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class FindDuplicatesRequest(_message.Message):
    __slots__ = ("gallery", "max_pairs")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    MAX_PAIRS_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    max_pairs: int
    def __init__(self, gallery: _Optional[str] = ..., max_pairs: _Optional[int] = ...) -> None: ...

class DuplicatePair(_message.Message):
    __slots__ = ("identity_a", "display_name_a", "identity_b", "display_name_b", "score", "distance", "estimated_fpir")
    IDENTITY_A_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_A_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_B_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_B_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FPIR_FIELD_NUMBER: _ClassVar[int]
    identity_a: str
    display_name_a: str
    identity_b: str
    display_name_b: str
    score: float
    distance: float
    estimated_fpir: float
    def __init__(self, identity_a: _Optional[str] = ..., display_name_a: _Optional[str] = ..., identity_b: _Optional[str] = ..., display_name_b: _Optional[str] = ..., score: _Optional[float] = ..., distance: _Optional[float] = ..., estimated_fpir: _Optional[float] = ...) -> None: ...

class FindDuplicatesResponse(_message.Message):
    __slots__ = ("pairs", "score_kind", "threshold")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    SCORE_KIND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[DuplicatePair]
    score_kind: ScoreKind
    threshold: float
    def __init__(self, pairs: _Optional[_Iterable[_Union[DuplicatePair, _Mapping]]] = ..., score_kind: _Optional[_Union[ScoreKind, str]] = ..., threshold: _Optional[float] = ...) -> None: ...

class GetIdentityRequest(_message.Message):
    __slots__ = ("gallery", "identity_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity_id: str
    def __init__(self, gallery: _Optional[str] = ..., identity_id: _Optional[str] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ("gallery", "page_size", "page_token")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    page_size: int
    page_token: str
    def __init__(self, gallery: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities", "next_page_token")
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[Identity]
    next_page_token: str
    def __init__(self, identities: _Optional[_Iterable[_Union[Identity, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UpdateIdentityRequest(_message.Message):
    __slots__ = ("gallery", "identity", "update_mask")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity: Identity
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, gallery: _Optional[str] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteIdentityRequest(_message.Message):
    __slots__ = ("gallery", "identity_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    identity_id: str
    def __init__(self, gallery: _Optional[str] = ..., identity_id: _Optional[str] = ...) -> None: ...

class DeleteIdentityResponse(_message.Message):
    __slots__ = ("deleted_templates",)
    DELETED_TEMPLATES_FIELD_NUMBER: _ClassVar[int]
    deleted_templates: int
    def __init__(self, deleted_templates: _Optional[int] = ...) -> None: ...

class DeleteTemplateRequest(_message.Message):
    __slots__ = ("gallery", "template_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    template_id: int
    def __init__(self, gallery: _Optional[str] = ..., template_id: _Optional[int] = ...) -> None: ...

class DeleteTemplateResponse(_message.Message):
    __slots__ = ("identity_deleted",)
    IDENTITY_DELETED_FIELD_NUMBER: _ClassVar[int]
    identity_deleted: bool
    def __init__(self, identity_deleted: _Optional[bool] = ...) -> None: ...

class ExportGalleryRequest(_message.Message):
    __slots__ = ("gallery",)
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    def __init__(self, gallery: _Optional[str] = ...) -> None: ...

class ExportedTemplate(_message.Message):
    __slots__ = ("identity_id", "display_name", "metadata", "template_id", "embedding", "source_sha256", "create_time")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IDENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    identity_id: str
    display_name: str
    metadata: _containers.ScalarMap[str, str]
    template_id: int
    embedding: Embedding
    source_sha256: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, identity_id: _Optional[str] = ..., display_name: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., template_id: _Optional[int] = ..., embedding: _Optional[_Union[Embedding, _Mapping]] = ..., source_sha256: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExportGalleryResponse(_message.Message):
    __slots__ = ("gallery", "template")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    gallery: Gallery
    template: ExportedTemplate
    def __init__(self, gallery: _Optional[_Union[Gallery, _Mapping]] = ..., template: _Optional[_Union[ExportedTemplate, _Mapping]] = ...) -> None: ...

class ImportEmbeddingsHeader(_message.Message):
    __slots__ = ("gallery", "model_id")
    GALLERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    gallery: str
    model_id: str
    def __init__(self, gallery: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class TemplateBatch(_message.Message):
    __slots__ = ("identity_ids", "display_names", "embeddings")
    IDENTITY_IDS_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAMES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    identity_ids: _containers.RepeatedScalarFieldContainer[str]
    display_names: _containers.RepeatedScalarFieldContainer[str]
    embeddings: bytes
    def __init__(self, identity_ids: _Optional[_Iterable[str]] = ..., display_names: _Optional[_Iterable[str]] = ..., embeddings: _Optional[bytes] = ...) -> None: ...

class ImportEmbeddingsRequest(_message.Message):
    __slots__ = ("header", "template", "batch")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    header: ImportEmbeddingsHeader
    template: ExportedTemplate
    batch: TemplateBatch
    def __init__(self, header: _Optional[_Union[ImportEmbeddingsHeader, _Mapping]] = ..., template: _Optional[_Union[ExportedTemplate, _Mapping]] = ..., batch: _Optional[_Union[TemplateBatch, _Mapping]] = ...) -> None: ...

class ImportEmbeddingsResponse(_message.Message):
    __slots__ = ("imported", "skipped")
    IMPORTED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    imported: int
    skipped: int
    def __init__(self, imported: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "model_id", "embedding_dim", "metric", "threshold", "chip_size", "has_head", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CHIP_SIZE_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    model_id: str
    embedding_dim: int
    metric: str
    threshold: float
    chip_size: int
    has_head: bool
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., model_id: _Optional[str] = ..., embedding_dim: _Optional[int] = ..., metric: _Optional[str] = ..., threshold: _Optional[float] = ..., chip_size: _Optional[int] = ..., has_head: _Optional[bool] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "model")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: ModelInfo
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("name", "key_id", "role", "galleries", "create_time", "revoke_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    key_id: str
    role: KeyRole
    galleries: _containers.RepeatedScalarFieldContainer[str]
    create_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., key_id: _Optional[str] = ..., role: _Optional[_Union[KeyRole, str]] = ..., galleries: _Optional[_Iterable[str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "role", "galleries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    GALLERIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: KeyRole
    galleries: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., role: _Optional[_Union[KeyRole, str]] = ..., galleries: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
