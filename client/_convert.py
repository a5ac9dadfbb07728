"""Translation between the generated protobuf messages and the client's dataclasses.

The only client module besides ``_client.py`` that touches ``gallery_service_pb2``; users never
see a protobuf.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from facegallery.client._exceptions import ServerError, status_details
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
    Identity,
    ImageKind,
    Match,
    ModelInfo,
    Normalization,
    ScoreKind,
    ServerInfo,
    Template,
    VerifyResult,
)
from facegallery.v1 import gallery_service_pb2 as pb

_IMAGE_KIND = {
    ImageKind.PHOTO: pb.IMAGE_KIND_PHOTO,
    ImageKind.FACE_CROP: pb.IMAGE_KIND_FACE_CROP,
    ImageKind.ALIGNED_CHIP: pb.IMAGE_KIND_ALIGNED_CHIP,
}
_FACE_POLICY = {
    FacePolicy.LARGEST: pb.FACE_POLICY_LARGEST,
    FacePolicy.REJECT_MULTIPLE: pb.FACE_POLICY_REJECT_MULTIPLE,
}
_NORMALIZATION = {
    Normalization.NONE: pb.SCORE_NORMALIZATION_NONE,
    Normalization.SNORM: pb.SCORE_NORMALIZATION_SNORM,
}
_NORMALIZATION_OF = {v: k for k, v in _NORMALIZATION.items()}
_AGGREGATION = {
    Aggregation.NEAREST: pb.TEMPLATE_AGGREGATION_NEAREST,
    Aggregation.MEAN: pb.TEMPLATE_AGGREGATION_MEAN,
}
# UNSPECIFIED comes only from servers that predate aggregations, which search nearest templates.
_AGGREGATION_OF = {v: k for k, v in _AGGREGATION.items()}
# UNSPECIFIED comes only from servers that predate score kinds, whose scores are distances.
_SCORE_KIND_OF = {
    pb.SCORE_KIND_UNSPECIFIED: ScoreKind.DISTANCE,
    pb.SCORE_KIND_DISTANCE: ScoreKind.DISTANCE,
    pb.SCORE_KIND_SNORM: ScoreKind.SNORM,
}
# google.rpc.Code integer -> grpc.StatusCode (BulkEnrollResponse.error.code carries the integer).
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


# ---------------------------------------------------------------------------------------------
# Requests


def encode_image(image: Any) -> bytes:
    """Bytes to send for an image argument.

    Parameters
    ----------
    image : str | os.PathLike | bytes | bytearray | memoryview | PIL.Image.Image | numpy.ndarray
        A path is read and sent byte for byte (so the server's ``source_sha256`` equals the
        file's SHA-256); bytes are sent as is; a PIL image or a ``(H, W)`` / ``(H, W, 1|3|4)``
        uint8 array (grey / RGB / RGBA) is encoded to lossless PNG.

    Raises
    ------
    TypeError
        An unsupported type, or an array that is not uint8.
    ValueError
        An array of an unsupported shape, or empty bytes.
    OSError
        A path that cannot be read.
    """
    if isinstance(image, (str, os.PathLike)):
        return Path(os.fspath(image)).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("the image is empty (0 bytes)")
        return data
    if isinstance(image, Image.Image):
        return _png(image if image.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _png(_array_image(image))
    raise TypeError(
        f"unsupported image type {type(image).__name__}: expected a path, bytes, a PIL image or a uint8 numpy array"
    )


def _array_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, got shape {array.shape}")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_message(image: Any, kind: ImageKind) -> pb.Image:
    """``pb.Image`` for an image argument (see :func:`encode_image`)."""
    return pb.Image(data=encode_image(image), kind=_IMAGE_KIND[ImageKind(kind)])


def embedding_message(embedding: Any) -> pb.Embedding:
    """``pb.Embedding`` of a ``(D,)`` float array-like.

    Raises
    ------
    ValueError
        Not one-dimensional, empty, or with non-finite values.
    """
    vector = np.asarray(embedding, dtype=np.float32)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"an embedding must be a non-empty (D,) vector, got shape {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise ValueError("an embedding must have finite values only")
    return pb.Embedding(values=vector.tolist())


def enroll_request(item: EnrollItem, gallery: str) -> pb.EnrollRequest:
    """``pb.EnrollRequest`` of one :class:`EnrollItem` (exactly one of image / embedding;
    ``model_id`` only with an embedding)."""
    if (item.image is None) == (item.embedding is None):
        raise ValueError("give exactly one of image and embedding")
    if item.model_id is not None and item.embedding is None:
        raise ValueError("model_id names the model of an embedding; an image is embedded by the server's own model")
    request = pb.EnrollRequest(
        gallery=gallery,
        identity_id=item.identity_id,
        display_name=item.display_name,
        metadata=metadata_dict(item.metadata),
        face_policy=_FACE_POLICY[FacePolicy(item.face_policy)],
        request_id=item.request_id or "",
    )
    if item.image is not None:
        request.image.CopyFrom(image_message(item.image, item.kind))
    else:
        request.embedding.CopyFrom(embedding_message(item.embedding))
        request.model_id = item.model_id or ""
    return request


def policy_message(
    *,
    threshold: float | None = None,
    target_fpir: float | None = None,
    normalization: Normalization | str | None = None,
    cohort_size: int | None = None,
    aggregation: Aggregation | str | None = None,
) -> pb.DecisionPolicy | None:
    """``pb.DecisionPolicy`` of the policy keywords of ``create_gallery`` / ``update_gallery``.

    None when every keyword is None (the server's default policy). The server checks the ranges.

    Raises
    ------
    ValueError
        Both ``threshold`` and ``target_fpir``; ``normalization``, ``cohort_size`` or
        ``aggregation`` without a rule; an unknown ``normalization`` or ``aggregation``.
    """
    if threshold is not None and target_fpir is not None:
        raise ValueError("give either threshold or target_fpir, not both")
    if threshold is None and target_fpir is None:
        if normalization is not None or cohort_size is not None or aggregation is not None:
            raise ValueError("normalization, cohort_size and aggregation need a target_fpir (or a threshold)")
        return None
    message = pb.DecisionPolicy()
    if threshold is not None:
        message.threshold = threshold
    else:
        message.target_fpir = target_fpir
    if normalization is not None:
        message.normalization = _NORMALIZATION[Normalization(normalization)]
    if cohort_size is not None:
        message.cohort_size = cohort_size
    if aggregation is not None:
        message.aggregation = _AGGREGATION[Aggregation(aggregation)]
    return message


def exported_template_message(template: ExportedTemplate) -> pb.ExportedTemplate:
    """``pb.ExportedTemplate`` of an :class:`ExportedTemplate`."""
    message = pb.ExportedTemplate(
        identity_id=template.identity_id,
        display_name=template.display_name,
        metadata=dict(template.metadata),
        template_id=template.template_id,
        embedding=embedding_message(template.embedding),
        source_sha256=template.source_sha256,
    )
    if template.create_time is not None:
        message.create_time.FromDatetime(template.create_time)
    return message


# ---------------------------------------------------------------------------------------------
# Replies


def _f32(value: float) -> float:
    """A proto float32 as the Python float with the same shortest decimal form (0.6, not
    0.6000000238418579): the same float32 value, but what a person or JSON reader expects."""
    return float(str(np.float32(value)))


def _time(message: Any, field: str) -> datetime.datetime | None:
    if not message.HasField(field):
        return None
    return getattr(message, field).ToDatetime(tzinfo=datetime.timezone.utc)


def _embedding(message: pb.Embedding) -> np.ndarray:
    """``(D,) float32`` values of a ``pb.Embedding``."""
    return np.asarray(message.values, dtype=np.float32)


def face(message: pb.Face) -> Face:
    """:class:`Face` of a ``pb.Face`` (pixels, float)."""
    box = message.box
    return Face(
        box=(_f32(box.left), _f32(box.top), _f32(box.right), _f32(box.bottom)),
        landmarks=tuple((_f32(p.x), _f32(p.y)) for p in message.landmarks),
        score=_f32(message.score),
    )


def _optional_face(parent: Any, field: str) -> Face | None:
    return face(getattr(parent, field)) if parent.HasField(field) else None


def score_kind(value: int) -> ScoreKind:
    """:class:`ScoreKind` of a proto ``ScoreKind`` (UNSPECIFIED, from an older server: distance).

    Raises
    ------
    ServerError
        A value this client does not know (a newer server).
    """
    try:
        return _SCORE_KIND_OF[value]
    except KeyError:
        raise ServerError(f"the server sent an unknown score kind {value}; upgrade the client") from None


def match(message: pb.Match) -> Match:
    return Match(
        identity_id=message.identity_id,
        display_name=message.display_name,
        distance=_f32(message.distance),
        template_id=int(message.template_id),
        score=_f32(message.score),
    )


def face_identification(message: pb.FaceIdentification) -> FaceIdentification:
    return FaceIdentification(
        face=_optional_face(message, "face"),
        matches=tuple(match(m) for m in message.matches),
        identity_id=message.identity_id if message.HasField("identity_id") else None,
        distance=_optional_float(message, "distance", math.inf),
        threshold=_f32(message.threshold),
        score=_optional_float(message, "score", math.inf),
        score_kind=score_kind(message.score_kind),
        estimated_fpir=_optional_float(message, "estimated_fpir", math.nan),
    )


def enroll_result(message: pb.EnrollResponse) -> EnrollResult:
    return EnrollResult(
        identity_id=message.identity_id,
        template_id=int(message.template_id),
        face=_optional_face(message, "face"),
        identity_created=bool(message.identity_created),
        possible_duplicate=match(message.possible_duplicate) if message.HasField("possible_duplicate") else None,
        source_sha256=message.source_sha256,
    )


def bulk_enroll_item(message: pb.BulkEnrollResponse) -> BulkEnrollItem:
    if message.WhichOneof("result") != "error":
        return BulkEnrollItem(index=int(message.index), ok=True, code=grpc.StatusCode.OK, message="", result=enroll_result(message.response))
    status = message.error
    return BulkEnrollItem(
        index=int(message.index),
        ok=False,
        code=_STATUS_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN),
        message=status.message,
        result=None,
        reason=status_details(status).get("reason"),
    )


def _optional_float(message: Any, field: str, unset: float | None = None) -> float | None:
    """A proto3 ``optional float`` field as float32-rounded Python float, or ``unset``."""
    return _f32(getattr(message, field)) if message.HasField(field) else unset


def verify_result(message: pb.VerifyResponse) -> VerifyResult:
    return VerifyResult(
        identity_id=message.identity_id,
        distance=_f32(message.distance),
        threshold=_f32(message.threshold),
        is_match=bool(message.is_match),
        face=_optional_face(message, "face"),
        probability_same=_optional_float(message, "probability_same"),
        estimated_far=_optional_float(message, "estimated_far"),
    )


def compare_result(message: pb.CompareResponse) -> CompareResult:
    return CompareResult(
        distance=_f32(message.distance),
        threshold=_f32(message.threshold),
        is_match=bool(message.is_match),
        face_a=_optional_face(message, "face_a"),
        face_b=_optional_face(message, "face_b"),
        probability_same=_optional_float(message, "probability_same"),
        estimated_far=_optional_float(message, "estimated_far"),
    )


def embedded_face(message: pb.EmbeddedFace) -> EmbeddedFace:
    return EmbeddedFace(
        face=_optional_face(message, "face"),
        embedding=_embedding(message.embedding),
    )


def decision_policy(message: pb.DecisionPolicy) -> DecisionPolicy | None:
    """:class:`DecisionPolicy` of a gallery's ``pb.DecisionPolicy``; None when it has no rule."""
    rule = message.WhichOneof("rule")
    if rule is None:
        return None
    return DecisionPolicy(
        threshold=_f32(message.threshold) if rule == "threshold" else None,
        target_fpir=_f32(message.target_fpir) if rule == "target_fpir" else None,
        normalization=_NORMALIZATION_OF.get(message.normalization, Normalization.NONE),
        cohort_size=int(message.cohort_size),
        aggregation=_AGGREGATION_OF.get(message.aggregation, Aggregation.NEAREST),
    )


def gallery(message: pb.Gallery) -> Gallery:
    return Gallery(
        name=message.name,
        model_id=message.model_id,
        threshold=_f32(message.threshold),
        metric=message.metric,
        embedding_dim=int(message.embedding_dim),
        identity_count=int(message.identity_count),
        template_count=int(message.template_count),
        create_time=_time(message, "create_time"),
        policy=decision_policy(message.policy) if message.HasField("policy") else None,
        score_kind=score_kind(message.score_kind),
        estimated_fpir=_optional_float(message, "estimated_fpir", math.nan),
        threshold_basis=message.threshold_basis,
        recalibrating=message.recalibrating,
    )


def duplicate_pair(message: pb.DuplicatePair) -> DuplicatePair:
    return DuplicatePair(
        identity_a=message.identity_a,
        display_name_a=message.display_name_a,
        identity_b=message.identity_b,
        display_name_b=message.display_name_b,
        score=_f32(message.score),
        distance=_f32(message.distance),
        estimated_fpir=_optional_float(message, "estimated_fpir", math.nan),
    )


def duplicates_result(message: pb.FindDuplicatesResponse) -> DuplicatesResult:
    return DuplicatesResult(
        pairs=tuple(duplicate_pair(p) for p in message.pairs),
        score_kind=score_kind(message.score_kind),
        threshold=_f32(message.threshold),
    )


def template(message: pb.Template) -> Template:
    return Template(
        template_id=int(message.template_id),
        identity_id=message.identity_id,
        source_sha256=message.source_sha256,
        face=_optional_face(message, "face"),
        create_time=_time(message, "create_time"),
    )


def identity(message: pb.Identity) -> Identity:
    return Identity(
        identity_id=message.identity_id,
        display_name=message.display_name,
        metadata=dict(message.metadata),
        template_count=int(message.template_count),
        templates=tuple(template(t) for t in message.templates),
        create_time=_time(message, "create_time"),
        update_time=_time(message, "update_time"),
    )


def exported_template(message: pb.ExportedTemplate) -> ExportedTemplate:
    return ExportedTemplate(
        identity_id=message.identity_id,
        display_name=message.display_name,
        metadata=dict(message.metadata),
        template_id=int(message.template_id),
        embedding=_embedding(message.embedding),
        source_sha256=message.source_sha256,
        create_time=_time(message, "create_time"),
    )


def server_info(message: pb.GetServerInfoResponse) -> ServerInfo:
    model = message.model
    return ServerInfo(
        version=message.version,
        model=ModelInfo(
            name=model.name,
            version=model.version,
            model_id=model.model_id,
            embedding_dim=int(model.embedding_dim),
            metric=model.metric,
            threshold=_f32(model.threshold),
            chip_size=int(model.chip_size),
            has_head=bool(model.has_head),
            manifest=json.loads(model.manifest_json) if model.manifest_json else {},
        ),
    )


def metadata_dict(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A str -> str dict of a metadata argument (None -> empty).

    Raises
    ------
    TypeError
        A key or value that is not a str.
    """
    result = dict(metadata or {})
    for key, value in result.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
    return result


#: KeyRole values <-> the role names of ``ApiKey.role``.
KEY_ROLES = {"read": pb.KEY_ROLE_READ, "write": pb.KEY_ROLE_WRITE, "admin": pb.KEY_ROLE_ADMIN}


def api_key(message: pb.ApiKey) -> ApiKey:
    role = next((name for name, value in KEY_ROLES.items() if value == message.role), "unspecified")
    return ApiKey(
        name=message.name,
        key_id=message.key_id,
        role=role,
        galleries=tuple(message.galleries),
        create_time=_time(message, "create_time"),
        revoke_time=_time(message, "revoke_time"),
    )
