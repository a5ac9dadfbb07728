"""API keys: creation, salted hashing and verification (pure stdlib; the rows live in the store).

A key is ``fg_`` + ``secrets.token_urlsafe(32)`` (43 characters of 256 random bits). The store
keeps, per key (table ``api_keys``, store.py): its ``name``, its ``key_id`` (the first
:data:`KEY_ID_CHARS` characters after ``fg_``, in clear, so verifying a key hashes one candidate
only), its :class:`Role`, the galleries it is limited to (empty = every gallery), a random salt and
the salted ``hashlib.scrypt`` hash (n=2**14, r=8, p=1) of the whole key, its creation and
revocation times. The key text itself is never stored; it is shown once, when created.

Roles are ordered: ``read`` < ``write`` < ``admin``; a key may call every method whose required
role is at most its own (the method table is in ``facegallery.server.service.auth``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import Protocol

from facegallery.server.contract.errors import InvalidInput

__all__ = [
    "KEY_PREFIX",
    "KEY_ID_CHARS",
    "Role",
    "ApiKeyRecord",
    "StoredKey",
    "KeyStore",
    "new_key",
    "key_id_of",
    "hash_key",
    "create_key",
    "verify_key",
    "revoke_key",
]

KEY_PREFIX = "fg_"
#: Characters of the key (after the prefix) stored in clear as its lookup id.
KEY_ID_CHARS = 8
#: ``hashlib.scrypt`` cost parameters (about 16 MiB and tens of milliseconds per hash).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SALT_BYTES = 16
_HASH_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY = re.compile(r"^fg_[A-Za-z0-9_-]{40,64}$")


class Role(enum.IntEnum):
    """What a key may do; a higher role includes the lower ones."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        """``"read"``, ``"write"`` or ``"admin"`` (any case). Raises InvalidInput."""
        try:
            return cls[str(name).upper()]
        except KeyError:
            raise InvalidInput(f"role must be read, write or admin, not {name!r}", field="role") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class ApiKeyRecord:
    """One key as listed (no secret): ``galleries`` empty = every gallery; ``revoked`` None = active."""

    name: str
    key_id: str
    role: Role
    galleries: tuple[str, ...]
    created: float
    revoked: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def allows(self, gallery: str) -> bool:
        """May this key see ``gallery``?"""
        return not self.galleries or gallery in self.galleries

    @classmethod
    def from_json(cls, doc: dict) -> ApiKeyRecord:
        """The record :meth:`to_json` wrote (extra keys, such as a store's salt and hash, ignored)."""
        return cls(name=doc["name"], key_id=doc["key_id"], role=Role[doc["role"].upper()], galleries=tuple(doc["galleries"]), created=doc["created"], revoked=doc["revoked"])

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "role": self.role.label,
            "galleries": list(self.galleries),
            "created": self.created,
            "revoked": self.revoked,
        }


@dataclasses.dataclass(frozen=True)
class StoredKey:
    """A key's row with its salt and hash (what verification needs)."""

    record: ApiKeyRecord
    salt: bytes
    hash: bytes


class KeyStore(Protocol):
    """The store methods keys need (``SqliteTemplateStore`` implements them)."""

    def insert_api_key(self, record: ApiKeyRecord, salt: bytes, hash: bytes) -> None: ...
    def api_keys_by_id(self, key_id: str) -> list[StoredKey]: ...
    def list_api_keys(self) -> list[ApiKeyRecord]: ...
    def revoke_api_key(self, name: str, when: float) -> ApiKeyRecord: ...
    def has_api_keys(self) -> bool: ...


def new_key() -> str:
    """A fresh random key: ``fg_`` + ``secrets.token_urlsafe(32)``."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_id_of(key: str) -> str | None:
    """The lookup id of ``key`` (its first characters after ``fg_``), or None if it is not a key."""
    if not isinstance(key, str) or not _KEY.match(key):
        return None
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + KEY_ID_CHARS]


def hash_key(key: str, salt: bytes) -> bytes:
    """The salted scrypt hash of ``key``."""
    return hashlib.scrypt(key.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=_HASH_BYTES)


def create_key(store: KeyStore, name: str, role: Role | str, galleries: Iterable[str] = (), *, now: float) -> tuple[ApiKeyRecord, str]:
    """Create and store a key; returns its record and the key text (shown once, never stored).

    Raises InvalidInput (bad name or role), AlreadyExists (the name is taken, revoked keys too).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"a key name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; got {name!r}", field="name")
    role = role if isinstance(role, Role) else Role.parse(role)
    scope = tuple(dict.fromkeys(str(g) for g in galleries))
    if any(not g for g in scope):
        raise InvalidInput("a gallery name of a key cannot be empty", field="galleries")
    key = new_key()
    key_id = key_id_of(key)
    assert key_id is not None
    salt = secrets.token_bytes(_SALT_BYTES)
    record = ApiKeyRecord(name=name, key_id=key_id, role=role, galleries=scope, created=now)
    store.insert_api_key(record, salt, hash_key(key, salt))
    return record, key


def verify_key(store: KeyStore, key: str) -> ApiKeyRecord | None:
    """The active key record ``key`` is, or None (malformed, unknown, wrong or revoked)."""
    key_id = key_id_of(key)
    if key_id is None:
        return None
    for stored in store.api_keys_by_id(key_id):
        if hmac.compare_digest(hash_key(key, stored.salt), stored.hash):
            return stored.record if stored.record.active else None
    return None


def revoke_key(store: KeyStore, name: str, *, now: float) -> ApiKeyRecord:
    """Revoke the key ``name`` (idempotent: an already revoked key keeps its time). Raises NotFound."""
    return store.revoke_api_key(name, now)

