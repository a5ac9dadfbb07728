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
    "MAX_DISPLAY_NAME_BYTES",
    "MAX_METADATA_KEYS",
    "MAX_METADATA_KEY_BYTES",
    "MAX_METADATA_VALUE_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_LIST_REPLY_BYTES",
    "check_display_name",
    "check_metadata",
    "identity_reply_bytes",
    "check_gallery_name",
    "check_identity_id",
    "MAX_REQUEST_ID_LENGTH",
    "check_request_id",
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
#: Longest display name, in UTF-8 bytes: a person's name or a short label, never a document.
MAX_DISPLAY_NAME_BYTES = 256
#: Most metadata keys per identity: metadata are a few labels (employee number, department,
#: source), not a key-value store; 64 leaves room for that and bounds the per-key overhead.
MAX_METADATA_KEYS = 64
#: Longest metadata key, in UTF-8 bytes (at least 1): a field name.
MAX_METADATA_KEY_BYTES = 128
#: Longest metadata value, in UTF-8 bytes: room for a URL or a short note, not for a file.
MAX_METADATA_VALUE_BYTES = 4096
#: Most UTF-8 bytes of one identity's whole metadata map (keys + values): 16 KiB, so one listed
#: identity (id, display name, metadata, counts) is at most about 18 KiB on the wire.
MAX_METADATA_BYTES = 16 * 1024
#: Largest identity listing reply (bytes, an upper bound of its protobuf size): pages are
#: shortened to fit. Under 1 MiB, the smallest message limit the server is run with (the test
#: servers'; the default is 96 MiB) and a quarter of gRPC's default 4 MiB, so every client can
#: read a page; a page of identities carrying the maximum metadata holds about 53 of them.
MAX_LIST_REPLY_BYTES = 1_000_000
_GALLERY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Longest Enroll idempotency key (a UUID is 36 characters).
MAX_REQUEST_ID_LENGTH = 128
_REQUEST_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_LENGTH}}}")


def check_gallery_name(name: str) -> None:
    """Raise InvalidInput unless ``name`` is 1..128 characters of ``[A-Za-z0-9_.-]``."""
    if not isinstance(name, str) or not _GALLERY_NAME.fullmatch(name):
        raise InvalidInput(f"gallery name must be 1..128 characters of [A-Za-z0-9_.-], got {name!r}", field="gallery")


def check_identity_id(identity_id: str) -> None:
    """Raise InvalidInput unless ``identity_id`` is a non-empty str of at most
    :data:`MAX_ID_LENGTH` characters without control characters (U+0000..U+001F, U+007F)."""
    if not isinstance(identity_id, str) or not identity_id:
        raise InvalidInput("identity_id must not be empty", field="identity_id")
    if len(identity_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"identity_id must be at most {MAX_ID_LENGTH} characters, got {len(identity_id)}", field="identity_id")
    if _CONTROL.search(identity_id):
        raise InvalidInput(f"identity_id must not contain control characters, got {identity_id!r}", field="identity_id")


def check_request_id(request_id: str) -> None:
    """Raise InvalidInput unless ``request_id`` (an Enroll idempotency key) is 1..
    :data:`MAX_REQUEST_ID_LENGTH` printable ASCII characters (U+0021..U+007E)."""
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidInput(
            f"request_id must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters without spaces, got {_short(request_id)}", field="request_id"
        )


def _short(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters (with an ellipsis), quoted, for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _utf8_size(text: object, what: str) -> int:
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be a string, got {type(text).__name__}")
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} {_short(text)} is not valid Unicode (lone surrogate)") from None


def check_display_name(display_name: str) -> None:
    """Raise InvalidInput unless ``display_name`` is a str of at most :data:`MAX_DISPLAY_NAME_BYTES`
    UTF-8 bytes without control characters (``""`` is allowed: no name)."""
    size = _utf8_size(display_name, "display_name")
    if size > MAX_DISPLAY_NAME_BYTES:
        raise InvalidInput(f"display_name must be at most {MAX_DISPLAY_NAME_BYTES} bytes (UTF-8), got {size}: {_short(display_name)}", field="display_name")
    if _CONTROL.search(display_name):
        raise InvalidInput(f"display_name must not contain control characters, got {_short(display_name)}", field="display_name")


def check_metadata(metadata: dict[str, str], *, what: str = "metadata") -> None:
    """Raise InvalidInput unless ``metadata`` fits the limits of one identity's map.

    At most :data:`MAX_METADATA_KEYS` keys; each key 1..:data:`MAX_METADATA_KEY_BYTES` UTF-8
    bytes without control characters; each value at most :data:`MAX_METADATA_VALUE_BYTES`;
    keys and values together at most :data:`MAX_METADATA_BYTES`. The message names the limit
    and the offending key (cut to 40 characters). ``what`` names the map in messages (e.g.
    ``"merged metadata"``).
    """
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidInput(f"{what} may have at most {MAX_METADATA_KEYS} keys, got {len(metadata)}")
    total = 0
    for key, value in metadata.items():
        key_size = _utf8_size(key, f"{what} key")
        if not 1 <= key_size <= MAX_METADATA_KEY_BYTES:
            raise InvalidInput(f"{what} key must be 1..{MAX_METADATA_KEY_BYTES} bytes (UTF-8), got {key_size}: {_short(key)}")
        if _CONTROL.search(key):
            raise InvalidInput(f"{what} key must not contain control characters, got {_short(key)}")
        value_size = _utf8_size(value, f"{what} value of key {_short(key)}:")
        if value_size > MAX_METADATA_VALUE_BYTES:
            raise InvalidInput(f"{what} value of key {_short(key)} must be at most {MAX_METADATA_VALUE_BYTES} bytes (UTF-8), got {value_size}")
        total += key_size + value_size
    if total > MAX_METADATA_BYTES:
        raise InvalidInput(f"{what} must be at most {MAX_METADATA_BYTES} bytes in all (keys + values, UTF-8), got {total}")


def _field_bytes(size: int) -> int:
    """Upper bound of a length-delimited protobuf field of ``size`` payload bytes: tag + length + payload."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def identity_reply_bytes(identity_id: str, display_name: str, metadata: dict[str, str]) -> int:
    """An upper bound of the wire size of one identity without templates as a repeated field of a
    listing reply (ids, name, metadata entries, count and two timestamps included)."""
    size = _field_bytes(len(identity_id.encode("utf-8", "surrogatepass"))) + _field_bytes(len(display_name.encode("utf-8", "surrogatepass")))
    for key, value in metadata.items():
        entry = _field_bytes(len(key.encode("utf-8", "surrogatepass"))) + _field_bytes(len(value.encode("utf-8", "surrogatepass")))
        size += _field_bytes(entry)
    size += 11 + 2 * _field_bytes(17)  # template_count (int64 varint); create/update Timestamp (seconds + nanos)
    return _field_bytes(size)


def check_top_k(top_k: int) -> None:
    """Raise InvalidInput unless 1 <= ``top_k`` <= :data:`MAX_TOP_K`."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInput(f"top_k must be 1..{MAX_TOP_K}, got {top_k}", field="top_k")


def check_max_pairs(max_pairs: int) -> None:
    """Raise InvalidInput unless 1 <= ``max_pairs`` <= :data:`MAX_DUPLICATE_PAIRS`."""
    if not 1 <= max_pairs <= MAX_DUPLICATE_PAIRS:
        raise InvalidInput(f"max_pairs must be 1..{MAX_DUPLICATE_PAIRS}, got {max_pairs}", field="max_pairs")


def score_threshold(override: float | None) -> float | None:
    """A search's threshold override on the gallery's score scale (an L2 distance, or an S-norm
    score, which can be negative): None or finite. Raises InvalidInput otherwise."""
    if override is not None and not math.isfinite(override):
        raise InvalidInput(f"threshold must be finite, got {override}", field="threshold")
    return override


def check_page_size(page_size: int) -> None:
    """Raise InvalidInput unless 1 <= ``page_size`` <= :data:`MAX_PAGE_SIZE`."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}", field="page_size")


def check_max_faces(max_faces: int) -> None:
    """Raise InvalidInput for a negative ``max_faces`` (0 means every face)."""
    if max_faces < 0:
        raise InvalidInput(f"max_faces must be >= 0, got {max_faces}", field="max_faces")


def decision_threshold(override: float | None, default: float) -> float:
    """The L2 threshold of one search: ``override`` when given, else ``default`` (the gallery's).

    Raises InvalidInput unless a given ``override`` is finite and >= 0.
    """
    if override is None:
        return float(default)
    if not (math.isfinite(override) and override >= 0):
        raise InvalidInput(f"threshold must be a finite L2 distance >= 0, got {override}", field="threshold")
    return float(override)


def check_embedding(embedding: np.ndarray | None, dim: int) -> np.ndarray:
    """``(dim,) float32`` copy of ``embedding``.

    Raises EmbeddingShapeError (INVALID_ARGUMENT) if it has another shape or non-finite values.
    """
    vector = np.asarray(embedding, dtype=np.float32)
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise EmbeddingShapeError(f"embedding must have {dim} values (float32), got shape {vector.shape}", field="embedding")
    if not np.all(np.isfinite(vector)):
        raise EmbeddingShapeError("embedding values must be finite (no NaN or infinity)", field="embedding")
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
            "embeddings of different models cannot be compared (serve the gallery with its model, or re-enroll it)",
            metadata={"gallery": gallery, "gallery_model_id": gallery_model, "other_model_id": other_model},
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
        raise InvalidInput("page_token is malformed; pass a next_page_token from a previous response", field="page_token") from None
    if key != gallery_key:
        raise InvalidInput("page_token belongs to another gallery", field="page_token")
    return after
