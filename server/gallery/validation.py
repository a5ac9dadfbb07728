"""Checks of the gallery operations' arguments, and the opaque page tokens of identity listings.

Every check raises :class:`~facegallery.server.contract.errors.InvalidInput` (INVALID_ARGUMENT) or a
subclass, except :func:`check_model` (FAILED_PRECONDITION). Distances and thresholds are
Euclidean (L2) between embeddings.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

import numpy as np

from facegallery.server.contract.errors import EmbeddingShapeError, InvalidInput, ModelMismatchError

__all__ = [
    "MAX_TOP_K",
    "MAX_PAGE_SIZE",
    "MAX_ID_LENGTH",
    "check_gallery_name",
    "check_identity_id",
    "check_top_k",
    "check_page_size",
    "check_max_faces",
    "decision_threshold",
    "score_threshold",
    "check_max_pairs",
    "check_embedding",
    "check_model",
    "encode_page_token",
    "decode_page_token",
]

#: Most candidate identities per probe.
MAX_TOP_K = 100
#: Most pairs one duplicates listing returns.
MAX_DUPLICATE_PAIRS = 10_000
#: Most identities per listed page.
MAX_PAGE_SIZE = 1000
#: Longest identity id, in characters.
MAX_ID_LENGTH = 256
_GALLERY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_gallery_name(name: str) -> None:
    """Raise InvalidInput unless ``name`` is 1..128 characters of ``[A-Za-z0-9_.-]``."""
    if not isinstance(name, str) or not _GALLERY_NAME.fullmatch(name):
        raise InvalidInput(f"gallery name must be 1..128 characters of [A-Za-z0-9_.-], got {name!r}")


def check_identity_id(identity_id: str) -> None:
    """Raise InvalidInput unless ``identity_id`` is a non-empty str of at most
    :data:`MAX_ID_LENGTH` characters without control characters (U+0000..U+001F, U+007F)."""
    if not isinstance(identity_id, str) or not identity_id:
        raise InvalidInput("identity_id must not be empty")
    if len(identity_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"identity_id must be at most {MAX_ID_LENGTH} characters, got {len(identity_id)}")
    if _CONTROL.search(identity_id):
        raise InvalidInput(f"identity_id must not contain control characters, got {identity_id!r}")


def check_top_k(top_k: int) -> None:
    """Raise InvalidInput unless 1 <= ``top_k`` <= :data:`MAX_TOP_K`."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be 1..{MAX_TOP_K}, got {top_k}")


def check_max_pairs(max_pairs: int) -> None:
    """Raise InvalidInput unless 1 <= ``max_pairs`` <= :data:`MAX_DUPLICATE_PAIRS`."""
    if not 1 <= max_pairs <= MAX_DUPLICATE_PAIRS:
        raise InvalidInput(f"max_pairs must be 1..{MAX_DUPLICATE_PAIRS}, got {max_pairs}")


def score_threshold(override: float | None) -> float | None:
    """A search's threshold override on the gallery's score scale (an L2 distance, or an S-norm
    score, which can be negative): None or finite. Raises InvalidInput otherwise."""
    if override is not None and not math.isfinite(override):
        raise InvalidInput(f"threshold must be finite, got {override}")
    return override


def check_page_size(page_size: int) -> None:
    """Raise InvalidInput unless 1 <= ``page_size`` <= :data:`MAX_PAGE_SIZE`."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")


def check_max_faces(max_faces: int) -> None:
    """Raise InvalidInput for a negative ``max_faces`` (0 means every face)."""
    if max_faces < 0:
        raise InvalidInput(f"max_faces must be >= 0, got {max_faces}")


def decision_threshold(override: float | None, default: float) -> float:
    """The L2 threshold of one search: ``override`` when given, else ``default`` (the gallery's).

    Raises InvalidInput unless a given ``override`` is finite and >= 0.
    """
    if override is None:
        return float(default)
    if not (math.isfinite(override) and override >= 0):
        raise InvalidInput(f"threshold must be a finite L2 distance >= 0, got {override}")
    return float(override)


def check_embedding(embedding: np.ndarray | None, dim: int) -> np.ndarray:
    """``(dim,) float32`` copy of ``embedding``.

    Raises EmbeddingShapeError (INVALID_ARGUMENT) if it has another shape or non-finite values.
    """
    vector = np.asarray(embedding, dtype=np.float32)
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise EmbeddingShapeError(f"embedding must have {dim} values (float32), got shape {vector.shape}")
    if not np.all(np.isfinite(vector)):
        raise EmbeddingShapeError("embedding values must be finite (no NaN or infinity)")
    return vector.copy()


def check_model(gallery: str, gallery_model: str, other_model: str, other_label: str) -> None:
    """Raise ModelMismatchError (FAILED_PRECONDITION) when ``gallery_model`` != ``other_model``.

    Model ids are embedding ids (manifest.py ``ModelManifest.embedding_id``: embedder weights,
    chip spec, metric, flip augmentation); embeddings of different ids are not comparable. The
    message names both ids in full; ``other_label`` says whose ``other_model`` is, e.g.
    ``"this server runs"``.
    """
    if gallery_model != other_model:
        raise ModelMismatchError(
            f"gallery {gallery!r} holds embeddings of model {gallery_model}, but {other_label} model {other_model}; "
            "embeddings of different models cannot be compared (serve the gallery with its model, or re-enroll it)"
        )


def encode_page_token(gallery_key: int, identity_key: int) -> str:
    """The opaque token of the page after identity store key ``identity_key`` (unpadded url-safe base64)."""
    return base64.urlsafe_b64encode(f"{gallery_key}:{identity_key}".encode()).decode().rstrip("=")


def decode_page_token(token: str, gallery_key: int) -> int:
    """The identity store key a page starts after (0 for ``""``).

    Raises InvalidInput for a malformed token or one of another gallery than ``gallery_key``.
    """
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        key, after = (int(part) for part in raw.split(":"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidInput("page_token is malformed; pass a next_page_token from a previous response") from None
    if key != gallery_key:
        raise InvalidInput("page_token belongs to another gallery")
    return after
