"""The durable source of truth of every gallery: SQLite (stdlib ``sqlite3``) in the data directory.

Tables (schema version :data:`SCHEMA_VERSION`)::

    galleries   gallery_key, name, model_id, threshold, metric, embedding_dim, created, last_seq,
                policy (JSON decision policy, decision.py; NULL in version-1 stores: the fixed threshold)
    identities  identity_key, gallery_key, identity_id, display_name, metadata (JSON), created, updated
    templates   template_id, identity_key, gallery_key, embedding (float32 BLOB), source_sha256,
                face (JSON box/landmarks/score), created
    changes     seq, gallery_key, op ('add' | 'remove'), template_id
    api_keys    name, key_id (lookup id, in clear), role ('read' | 'write' | 'admin'), galleries
                (JSON list, [] = all), salt, hash (scrypt of the key, keys.py), created, revoked
                (NULL = active); version 3
    enroll_requests  gallery_key, request_id (an Enroll idempotency key), fingerprint (sha256 of
                the request), template_id, identity_created, duplicate (JSON of the reply's
                possible duplicate, NULL = none), created; version 4. A row is forgotten with its
                template (trigger) or after :data:`REQUEST_ID_RETENTION_S`.
    calibrations  gallery_key, policy (JSON, the policy it was computed under), seq (the
                store's newest change then), templates (then), calibration (JSON, decision.py
                ``Calibration.to_json``), created; version 5. A restarted server decides with it
                instead of recomputing (minutes at 1M templates).

``template_id`` is the id the vector index stores. It and ``seq`` are ``AUTOINCREMENT`` keys,
so neither is ever reused, even after deletions: an index snapshot that still holds a deleted
template can be brought up to date by replaying ``changes`` after the snapshot's ``seq``
(snapshot.py). ``galleries.last_seq`` is the newest change of each gallery.

Durability: WAL journal with ``synchronous=FULL``, so a write method that has returned is on
disk and survives ``kill -9`` or power loss (sqlite.org/pragma.html#pragma_synchronous). One
writer connection serialised by a lock does every write in one ``BEGIN IMMEDIATE`` transaction;
each reading thread has its own connection, and WAL lets those read while a write is under way.

Times are Unix seconds (float). Embeddings are little-endian float32.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, NoReturn, Protocol

import numpy as np

from facegallery.server.contract.errors import (
    AlreadyExists,
    EmbeddingShapeError,
    GalleryNotFound,
    IdentityNotFound,
    KeyNotFound,
    StoreCorruptError,
    TemplateNotFound,
)
from facegallery.server.contract.face import Face
from facegallery.server.gallery.decision import DecisionPolicy
from facegallery.server.gallery.keys import ApiKeyRecord, StoredKey
from facegallery.server.gallery.validation import check_metadata

__all__ = [
    "SCHEMA_VERSION",
    "INTEGRITY_CHECKS",
    "GalleryRecord",
    "TemplateRecord",
    "IdentityRecord",
    "NewTemplate",
    "TemplateBatch",
    "AddedTemplate",
    "ExportedTemplate",
    "TemplateOwner",
    "StoredCalibration",
    "Change",
    "Head",
    "NO_HEAD",
    "IdempotentRequest",
    "RememberedEnroll",
    "EnrollReplayed",
    "REQUEST_ID_RETENTION_S",
    "TemplateStore",
    "SqliteTemplateStore",
]

LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 5
#: Seconds an Enroll idempotency key is remembered (AIP-155 asks for "at least" a retry window;
#: a day covers a client that retries after an outage of hours).
REQUEST_ID_RETENTION_S = 24 * 3600.0
#: Template ids per ``IN (...)`` query (SQLite's default host-parameter limit is 32766).
_IN_CHUNK = 500
#: Rows per fetch when streaming embeddings.
_FETCH_ROWS = 4096
#: ``integrity_check`` levels of :class:`SqliteTemplateStore`: the SQLite pragma each runs.
INTEGRITY_CHECKS = {"quick": "quick_check", "full": "integrity_check", "off": None}
#: Lines of SQLite's integrity report quoted in a :class:`StoreCorruptError`.
_REPORT_LINES = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS galleries (
    gallery_key   INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL UNIQUE,
    model_id      TEXT NOT NULL,
    threshold     REAL NOT NULL,
    metric        TEXT NOT NULL,
    embedding_dim INTEGER NOT NULL,
    created       REAL NOT NULL,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    policy        TEXT
);
CREATE TABLE IF NOT EXISTS identities (
    identity_key  INTEGER PRIMARY KEY AUTOINCREMENT,
    gallery_key   INTEGER NOT NULL REFERENCES galleries(gallery_key),
    identity_id   TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    metadata      TEXT NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL,
    UNIQUE (gallery_key, identity_id)
);
CREATE TABLE IF NOT EXISTS templates (
    template_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_key  INTEGER NOT NULL REFERENCES identities(identity_key),
    gallery_key   INTEGER NOT NULL REFERENCES galleries(gallery_key),
    embedding     BLOB NOT NULL,
    source_sha256 TEXT NOT NULL,
    face          TEXT,
    created       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS templates_by_identity ON templates(identity_key);
CREATE INDEX IF NOT EXISTS templates_by_gallery_owner ON templates(gallery_key, template_id, identity_key);
CREATE TABLE IF NOT EXISTS changes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    gallery_key   INTEGER NOT NULL,
    op            TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    template_id   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_by_gallery ON changes(gallery_key, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    name          TEXT PRIMARY KEY,
    key_id        TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('read', 'write', 'admin')),
    galleries     TEXT NOT NULL,
    salt          BLOB NOT NULL,
    hash          BLOB NOT NULL,
    created       REAL NOT NULL,
    revoked       REAL
);
CREATE INDEX IF NOT EXISTS api_keys_by_id ON api_keys(key_id);
CREATE TABLE IF NOT EXISTS enroll_requests (
    gallery_key      INTEGER NOT NULL,
    request_id       TEXT NOT NULL,
    fingerprint      TEXT NOT NULL,
    template_id      INTEGER NOT NULL,
    identity_created INTEGER NOT NULL,
    duplicate        TEXT,
    created          REAL NOT NULL,
    PRIMARY KEY (gallery_key, request_id)
);
CREATE INDEX IF NOT EXISTS enroll_requests_by_template ON enroll_requests(template_id);
CREATE INDEX IF NOT EXISTS enroll_requests_by_time ON enroll_requests(created);
CREATE TABLE IF NOT EXISTS calibrations (
    gallery_key   INTEGER PRIMARY KEY,
    policy        TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    templates     INTEGER NOT NULL,
    calibration   TEXT NOT NULL,
    created       REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS enroll_requests_forget AFTER DELETE ON templates
BEGIN
    DELETE FROM enroll_requests WHERE template_id = OLD.template_id;
END;
"""


# ---------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class GalleryRecord:
    """One gallery row with its counts.

    ``model_id`` is the embedding id of the model that computed the templates (manifest.py
    ``ModelManifest.embedding_id``); ``threshold`` is an L2 distance (the fixed threshold of a
    fixed policy, else the model's 1:1 threshold, used by verify); ``created`` Unix seconds;
    ``last_seq`` the newest change (0 before the first template); ``policy`` the gallery's
    decision policy (decision.py).
    """

    key: int
    name: str
    model_id: str
    threshold: float
    metric: str
    embedding_dim: int
    created: float
    last_seq: int
    identity_count: int
    template_count: int
    policy: DecisionPolicy


@dataclasses.dataclass(frozen=True, eq=False)
class TemplateRecord:
    """One stored template.

    ``embedding`` is ``(D,) float32``; ``face`` the enrolled face (its ``embedding`` is the same
    vector) or None for imported embeddings; ``source_sha256`` hex or ``""``.
    """

    template_id: int
    identity_id: str
    embedding: np.ndarray
    source_sha256: str
    face: Face | None
    created: float


@dataclasses.dataclass(frozen=True)
class IdentityRecord:
    """One identity; ``templates`` is filled by :meth:`TemplateStore.get_identity` only.

    ``key`` is the store's enrollment-ordered row key (for paging).
    """

    key: int
    identity_id: str
    display_name: str
    metadata: dict[str, str]
    template_count: int
    created: float
    updated: float
    templates: tuple[TemplateRecord, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class NewTemplate:
    """A template to add, with the identity data it carries.

    ``display_name`` is set on the identity when it is created, or replaces it when non-empty;
    ``metadata`` is merged into the identity's. ``created`` (Unix seconds) defaults to now
    (imports keep the exported time).
    """

    identity_id: str
    embedding: np.ndarray
    display_name: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    source_sha256: str = ""
    face: Face | None = None
    created: float | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class TemplateBatch:
    """``n`` templates to import, column by column (ImportEmbeddings' bulk form of :class:`NewTemplate`).

    ``identity_ids`` ``(n,)`` str; ``embeddings`` ``(n * D,)`` float32, the embeddings one after
    the other (D is the gallery's ``embedding_dim``); ``display_names`` ``(n,)`` str (``""`` for
    none), or empty for no names. Checked by the manager, which makes :class:`NewTemplate` of them.
    """

    identity_ids: Sequence[str]
    embeddings: np.ndarray
    display_names: Sequence[str] = ()


class AddedTemplate(NamedTuple):
    """The outcome of one stored :class:`NewTemplate` (a NamedTuple: bulk imports make millions,
    at a quarter of a frozen dataclass's cost)."""

    template_id: int
    identity_created: bool
    identity_key: int


@dataclasses.dataclass(frozen=True)
class IdempotentRequest:
    """An Enroll call's idempotency key, remembered with the template it adds (add_templates).

    ``fingerprint`` identifies the request's content (hex digest, manager.py); ``duplicate`` is
    the reply's possible duplicate as a JSON-able dict (None = none), kept so that a retry gets
    the first reply whatever has been enrolled since.
    """

    request_id: str
    fingerprint: str
    duplicate: dict | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class RememberedEnroll:
    """A remembered Enroll request and the template it added, as stored now."""

    request_id: str
    fingerprint: str
    template: TemplateRecord
    identity_created: bool
    duplicate: dict | None
    created: float


class EnrollReplayed(Exception):
    """Raised by ``add_templates`` (nothing written) when its request id is already remembered:
    a concurrent retry stored it first. ``remembered`` is that request."""

    def __init__(self, remembered: RememberedEnroll) -> None:
        super().__init__(f"enroll request {remembered.request_id!r} was already stored")
        self.remembered = remembered


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedTemplate:
    """One template with its identity's data, as streamed by export. ``embedding`` (D,) float32;
    ``face`` the enrolled face (None for imported embeddings; kept by ``facegallery migrate``)."""

    identity_id: str
    display_name: str
    metadata: dict[str, str]
    template_id: int
    embedding: np.ndarray
    source_sha256: str
    created: float
    face: Face | None = None


@dataclasses.dataclass(frozen=True)
class TemplateOwner:
    """The identity a template belongs to (search-result resolution)."""

    template_id: int
    identity_key: int
    identity_id: str
    display_name: str


class StoredCalibration(NamedTuple):
    """A gallery's calibration as kept in the store: the ``policy`` JSON it was computed under,
    the store's newest change ``seq`` and the gallery's ``templates`` then, and the
    ``calibration`` JSON (decision.py ``Calibration.to_json``)."""

    policy: dict
    seq: int
    templates: int
    calibration: dict


@dataclasses.dataclass(frozen=True)
class Change:
    """One entry of the change log: template ``template_id`` was added or removed at ``seq``."""

    seq: int
    op: str
    template_id: int


class Head(NamedTuple):
    """For a store other servers write too (milvus_store.py): a writer's newest change of a
    gallery, its ``seq``, and how many templates the writer had written (its id counter) after
    it, so that the template ids of its changes after another head lie in
    ``writer << 32 | [other.written, written)`` (read by key, milvus_store.py ``pull_changes``)."""

    seq: int
    written: int


NO_HEAD = Head(0, 0)


# ---------------------------------------------------------------------------------------------
# Interface


class TemplateStore(Protocol):
    """What the gallery and the index need from a durable store: :class:`SqliteTemplateStore`
    (one server's data directory) or milvus_store.py's ``MilvusTemplateStore`` (shared by many
    servers; it adds ``shared = True``, ``writer``, ``gallery_state``, ``pull_changes`` and
    ``own_head``, which IndexedGallery uses to follow the other servers' writes).

    Every write method is durable when it returns and returns the change ``seq`` it wrote (the
    gallery's ``last_seq`` after the write). Unknown galleries, identities and templates raise
    :class:`NotFound` (gRPC NOT_FOUND).
    """

    def create_gallery(
        self, name: str, *, model_id: str, threshold: float, metric: str, embedding_dim: int, policy: DecisionPolicy | None = None
    ) -> GalleryRecord: ...
    def get_gallery(self, name: str) -> GalleryRecord: ...
    def list_galleries(self, *, counts: bool = True) -> list[GalleryRecord]: ...
    def delete_gallery(self, name: str) -> tuple[int, int]: ...
    def set_model_id(self, name: str, model_id: str) -> GalleryRecord: ...
    def set_policy(self, name: str, policy: DecisionPolicy, threshold: float) -> GalleryRecord: ...
    def identity_sample(self, gallery: str, limit: int) -> tuple[list[str], np.ndarray]: ...
    def save_calibration(self, gallery: str, calibration: StoredCalibration) -> None: ...
    def load_calibration(self, gallery: str) -> StoredCalibration | None: ...
    def identity_templates(self, gallery: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]: ...
    def identity_embeddings(self, gallery: str, identity_id: str) -> tuple[np.ndarray, np.ndarray]: ...
    def identities_embeddings(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]: ...
    def add_templates(
        self, gallery: str, items: Sequence[NewTemplate], *, skip_duplicates: bool = False, request: IdempotentRequest | None = None
    ) -> tuple[list[AddedTemplate | None], int]: ...
    def remembered_enroll(self, gallery: str, request_id: str) -> RememberedEnroll | None: ...
    def template_owners(self, template_ids: Iterable[int]) -> dict[int, TemplateOwner]: ...
    def template_identity_keys(self, gallery: str) -> tuple[np.ndarray, np.ndarray]: ...
    def identity_names(self, identity_keys: Iterable[int]) -> dict[int, tuple[str, str]]: ...
    def identity_keys(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, int]: ...
    def template_ids(self, gallery: str) -> np.ndarray: ...
    def embeddings(self, gallery: str, template_ids: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...
    def changes_since(self, gallery: str, seq: int) -> list[Change]: ...
    def prune_changes(self, gallery: str, upto_seq: int) -> int: ...
    def export_templates(self, gallery: str) -> Iterator[ExportedTemplate]: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# SQLite implementation


class SqliteTemplateStore:
    """:class:`TemplateStore` on one SQLite file (WAL, ``synchronous=FULL``).

    Parameters
    ----------
    path : path
        The database file; created with its schema when missing.

    Thread-safe: writes go through one connection under a lock; each thread reads on its own
    connection (created on first use, closed by :meth:`close`).
    """

    def __init__(self, path: str | Path, *, integrity_check: str = "quick") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if integrity_check not in INTEGRITY_CHECKS:
            raise ValueError(f"integrity_check must be one of {sorted(INTEGRITY_CHECKS)}, not {integrity_check!r}")
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = False
        existed = self.path.is_file() and self.path.stat().st_size > 0
        self._writer = self._connect()
        try:
            if existed:
                self.check_integrity(integrity_check)
            self._writer.execute("PRAGMA journal_mode=WAL")
            self._writer.execute("PRAGMA synchronous=FULL")
            self._writer.execute("PRAGMA foreign_keys=ON")
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, 2, 3, 4, SCHEMA_VERSION):
                raise RuntimeError(f"{self.path} has schema version {version}; this server reads versions 1 to {SCHEMA_VERSION}")
            # version 3 added api_keys, version 4 enroll_requests, version 5 calibrations: created here when missing
            self._writer.executescript(_SCHEMA)
            if version == 1:  # version 2 added galleries.policy; NULL keeps each gallery's fixed threshold
                self._writer.execute("ALTER TABLE galleries ADD COLUMN policy TEXT")
                LOG.info("migrated store %s from schema version 1 to %d (decision policies, API keys, enroll request ids, calibrations)", self.path, SCHEMA_VERSION)
            elif version in (2, 3, 4):
                LOG.info("migrated store %s from schema version %d to %d (API keys, enroll request ids, calibrations)", self.path, version, SCHEMA_VERSION)
            # version 5 extended templates_by_gallery to cover identity_key (template_identity_keys)
            self._writer.execute("DROP INDEX IF EXISTS templates_by_gallery")
            self._writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._writer.close()
            if isinstance(exc, sqlite3.OperationalError):  # locked, I/O error, ...: not damage
                raise
            raise StoreCorruptError(_damage_message(self.path, "opening it", [str(exc)])) from exc
        except BaseException:
            self._writer.close()
            raise
        LOG.info("opened store %s", self.path)

    def check_integrity(self, level: str = "quick") -> None:
        """Run SQLite's integrity check on the store; raise :class:`StoreCorruptError` if damaged.

        ``level``: ``"quick"`` runs ``PRAGMA quick_check`` (b-tree structure, page and record
        format, NOT NULL/CHECK constraints; not the index-to-table cross-check), ``"full"``
        ``PRAGMA integrity_check`` (also every index entry against its table row), ``"off"``
        nothing. :meth:`__init__` runs it on an existing file (``integrity_check``, default quick).

        Cost, measured on a 2-core machine on a store of 100,000 templates and identities (128-d
        float32, 82 MB, page cache warm): ``quick_check`` 0.10 s, ``integrity_check`` 0.21 s
        (both grow linearly with the file); from a cold page cache add the time to read the
        file once.

        Raises
        ------
        StoreCorruptError
            The check reported damage, or SQLite found the file malformed while checking. The
            message names the file, quotes the first lines of SQLite's report and the repair
            options.
        """
        pragma = INTEGRITY_CHECKS[level]
        if pragma is None:
            return
        started = time.perf_counter()
        try:
            rows = self._writer.execute(f"PRAGMA {pragma}({_REPORT_LINES + 1})").fetchall()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise
            raise StoreCorruptError(_damage_message(self.path, f"PRAGMA {pragma}", [str(exc)])) from exc
        report = [str(row[0]) for row in rows]
        if report != ["ok"]:
            raise StoreCorruptError(_damage_message(self.path, f"PRAGMA {pragma}", report))
        LOG.info("store %s passed PRAGMA %s in %.3f s", self.path, pragma, time.perf_counter() - started)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=10000")
        return conn

    # -- connections -------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction; committed (and fsynced) on normal exit."""
        with self._write_lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise RuntimeError("the store is closed")
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement inside sees the same committed state."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection (a WAL checkpoint happens as the last one closes)."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._readers_lock:
                for conn in self._readers:
                    conn.close()
                self._readers.clear()
            self._writer.close()
        LOG.info("closed store %s", self.path)

    # -- galleries ---------------------------------------------------------------------------

    _GALLERY_SELECT = (
        "SELECT g.gallery_key, g.name, g.model_id, g.threshold, g.metric, g.embedding_dim, g.created, g.last_seq, "
        "(SELECT COUNT(*) FROM identities i WHERE i.gallery_key = g.gallery_key), "
        "(SELECT COUNT(*) FROM templates t WHERE t.gallery_key = g.gallery_key), g.policy FROM galleries g"
    )

    def create_gallery(
        self, name: str, *, model_id: str, threshold: float, metric: str, embedding_dim: int, policy: DecisionPolicy | None = None
    ) -> GalleryRecord:
        """Insert an empty gallery. ``policy`` None: a fixed ``threshold``.

        Raises AlreadyExists (ALREADY_EXISTS) when ``name`` is taken.
        """
        policy = policy or DecisionPolicy.fixed(threshold)
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO galleries (name, model_id, threshold, metric, embedding_dim, created, policy) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (name, model_id, float(threshold), metric, int(embedding_dim), time.time(), json.dumps(policy.to_json())),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"gallery {name!r} already exists") from None
            row = conn.execute(self._GALLERY_SELECT + " WHERE g.name = ?", (name,)).fetchone()
        return _gallery_record(row)

    def get_gallery(self, name: str) -> GalleryRecord:
        """The gallery ``name`` with its identity and template counts. Raises NotFound."""
        row = self._reader().execute(self._GALLERY_SELECT + " WHERE g.name = ?", (name,)).fetchone()
        if row is None:
            raise GalleryNotFound(f"gallery {name!r} does not exist")
        return _gallery_record(row)

    def list_galleries(self, *, counts: bool = True) -> list[GalleryRecord]:
        """Every gallery, in creation order (with its counts, ``counts`` or not: they are cheap here)."""
        rows = self._reader().execute(self._GALLERY_SELECT + " ORDER BY g.gallery_key").fetchall()
        return [_gallery_record(row) for row in rows]

    def delete_gallery(self, name: str) -> tuple[int, int]:
        """Delete a gallery with its identities, templates and change log.

        Returns ``(deleted_identities, deleted_templates)``. Raises NotFound.
        """
        with self._write() as conn:
            key = _gallery_key(conn, name)
            templates = conn.execute("DELETE FROM templates WHERE gallery_key = ?", (key,)).rowcount
            identities = conn.execute("DELETE FROM identities WHERE gallery_key = ?", (key,)).rowcount
            conn.execute("DELETE FROM changes WHERE gallery_key = ?", (key,))
            conn.execute("DELETE FROM calibrations WHERE gallery_key = ?", (key,))
            conn.execute("DELETE FROM galleries WHERE gallery_key = ?", (key,))
        return identities, templates

    def set_policy(self, name: str, policy: DecisionPolicy, threshold: float) -> GalleryRecord:
        """Store gallery ``name``'s decision policy and L2 ``threshold`` (see GalleryRecord); returns the gallery. Raises NotFound."""
        with self._write() as conn:
            key = _gallery_key(conn, name)
            conn.execute("UPDATE galleries SET policy = ?, threshold = ? WHERE gallery_key = ?", (json.dumps(policy.to_json()), float(threshold), key))
            row = conn.execute(self._GALLERY_SELECT + " WHERE g.gallery_key = ?", (key,)).fetchone()
        return _gallery_record(row)

    def save_calibration(self, gallery: str, calibration: StoredCalibration) -> None:
        """Keep a gallery's newest calibration (replacing the one before). Raises NotFound."""
        with self._write() as conn:
            key = _gallery_key(conn, gallery)
            conn.execute(
                "INSERT OR REPLACE INTO calibrations (gallery_key, policy, seq, templates, calibration, created) VALUES (?, ?, ?, ?, ?, ?)",
                (key, json.dumps(calibration.policy), calibration.seq, calibration.templates, json.dumps(calibration.calibration), time.time()),
            )

    def load_calibration(self, gallery: str) -> StoredCalibration | None:
        """The calibration :meth:`save_calibration` kept for a gallery, or None. Raises NotFound."""
        conn = self._reader()
        key = conn.execute("SELECT gallery_key FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
        row = conn.execute("SELECT policy, seq, templates, calibration FROM calibrations WHERE gallery_key = ?", key).fetchone()
        return None if row is None else StoredCalibration(json.loads(row[0]), row[1], row[2], json.loads(row[3]))

    def identity_sample(self, gallery: str, limit: int) -> tuple[list[str], np.ndarray]:
        """Up to ``limit`` identities with the embedding of each one's first template.

        The sample is deterministic (identities ordered by a multiplicative hash of their key),
        so repeated calls over an unchanged gallery give the same identities. Returns
        ``(identity_ids, x (n, D) float32)``. Raises NotFound.
        """
        with self._read() as conn:
            key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
            rows = conn.execute(
                "SELECT i.identity_id, t.embedding FROM identities i JOIN templates t ON t.template_id = "
                "(SELECT MIN(template_id) FROM templates WHERE identity_key = i.identity_key) "
                "WHERE i.gallery_key = ? ORDER BY (i.identity_key * 2654435761) % 4294967296 LIMIT ?",
                (key, int(limit)),
            ).fetchall()
        x = np.stack([_embedding(r[1], dim) for r in rows]) if rows else np.zeros((0, dim), np.float32)
        return [r[0] for r in rows], x

    def set_model_id(self, name: str, model_id: str) -> GalleryRecord:
        """Record ``model_id`` as the model of gallery ``name``'s templates; returns the gallery.

        For migrations only (e.g. a legacy model id rewritten as the embedding id it stands for):
        the templates are not re-embedded. Raises NotFound.
        """
        with self._write() as conn:
            key = _gallery_key(conn, name)
            conn.execute("UPDATE galleries SET model_id = ? WHERE gallery_key = ?", (model_id, key))
            row = conn.execute(self._GALLERY_SELECT + " WHERE g.gallery_key = ?", (key,)).fetchone()
        return _gallery_record(row)

    # -- templates ---------------------------------------------------------------------------

    def add_templates(
        self, gallery: str, items: Sequence[NewTemplate], *, skip_duplicates: bool = False, request: IdempotentRequest | None = None
    ) -> tuple[list[AddedTemplate | None], int]:
        """Store templates (creating their identities as needed) in one transaction.

        Set-based, so that a bulk import of ~16k items is one transaction of a few statements
        (``executemany``) rather than five statements per item: the items' identities are looked
        up in one query, new identities, templates and change-log entries get consecutive keys
        after the ``AUTOINCREMENT`` counters (``sqlite_sequence``; the write lock makes this
        transaction the only writer) and are inserted in one ``executemany`` per table.

        Parameters
        ----------
        gallery : str
        items : sequence of NewTemplate
            Embeddings of length ``embedding_dim`` of the gallery. An identity takes the first
            of its items' ``created`` when it is created here, the last non-empty
            ``display_name`` and all ``metadata`` merged in order.
        skip_duplicates : bool
            Skip an item whose identity already has a template with exactly the same embedding,
            stored before or by an earlier item (its result is None; it changes nothing). The
            identity's stored templates are compared through the ``templates_by_identity``
            index, so the cost is that of the templates of the items' identities.
        request : IdempotentRequest, optional
            The Enroll idempotency key of a single item: remembered with its template in the same
            transaction (and keys older than :data:`REQUEST_ID_RETENTION_S` forgotten).

        Returns
        -------
        results : list of AddedTemplate or None, one per item
        seq : int
            The gallery's last change after the write.

        Raises
        ------
        NotFound
            Unknown gallery.
        EmbeddingShapeError
            An embedding of the wrong length (nothing is stored).
        InvalidInput
            An identity's metadata merged over the limits (validation.py; nothing is stored).
        EnrollReplayed
            ``request``'s id is already remembered (nothing is stored).
        """
        if request is not None and len(items) != 1:
            raise ValueError("an idempotent request adds exactly one template")
        with self._write() as conn:
            row = conn.execute("SELECT gallery_key, embedding_dim, last_seq FROM galleries WHERE name = ?", (gallery,)).fetchone()
            key, dim, seq = row or _missing(gallery)
            if request is not None:
                remembered = _remembered_enroll(conn, key, dim, request.request_id)
                if remembered is not None:
                    raise EnrollReplayed(remembered)
            blobs = _embedding_blobs(items, dim)
            now = time.time()
            known = {
                identity_id: (identity_key, metadata)
                for identity_id, identity_key, metadata in conn.execute(
                    "SELECT identity_id, identity_key, metadata FROM identities WHERE gallery_key = ? AND identity_id IN (SELECT value FROM json_each(?))",
                    (key, json.dumps(list({item.identity_id: None for item in items}))),
                )
            }
            stored: set[tuple[int, bytes]] = set()
            if skip_duplicates and known:
                stored.update(
                    conn.execute(
                        "SELECT identity_key, embedding FROM templates WHERE identity_key IN (SELECT value FROM json_each(?))",
                        (json.dumps([identity_key for identity_key, _ in known.values()]),),
                    )
                )
            identity_keys = {identity_id: identity_key for identity_id, (identity_key, _) in known.items()}
            next_identity, template_id, seq_base = (_last_key(conn, table) for table in ("identities", "templates", "changes"))
            created_identities: dict[int, list] = {}  # identity_key -> [identity_id, display_name, metadata, created]
            updated_identities: dict[int, list] = {}  # identity_key -> [identity_id, display_name, metadata]
            results: list[AddedTemplate | None] = []
            template_rows = []
            for item, blob in zip(items, blobs, strict=True):
                created = item.created if item.created is not None else now
                identity_key = identity_keys.get(item.identity_id)
                identity_created = identity_key is None
                if identity_created:
                    next_identity += 1
                    identity_key = identity_keys[item.identity_id] = next_identity
                    created_identities[identity_key] = [item.identity_id, item.display_name, dict(item.metadata), created]
                else:
                    if skip_duplicates and (identity_key, blob) in stored:
                        results.append(None)
                        continue
                    if item.display_name or item.metadata:
                        entry = created_identities.get(identity_key) or updated_identities.setdefault(
                            identity_key, [item.identity_id, "", json.loads(known[item.identity_id][1])]
                        )
                        entry[1] = item.display_name or entry[1]
                        entry[2].update(item.metadata)
                if skip_duplicates:
                    stored.add((identity_key, blob))
                template_id += 1
                template_rows.append((template_id, identity_key, key, blob, item.source_sha256, dump_face(item.face), created))
                results.append(AddedTemplate(template_id, identity_created, identity_key))
            for identity_id, _, metadata, *_ in (*created_identities.values(), *updated_identities.values()):
                if metadata:
                    check_metadata(metadata, what=f"the merged metadata of {identity_id!r}")  # in the transaction: no race
            conn.executemany(
                "INSERT INTO identities (identity_key, gallery_key, identity_id, display_name, metadata, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(k, key, i, name, _dump_metadata(m) if m else "{}", created, now) for k, (i, name, m, created) in created_identities.items()],
            )
            conn.executemany(
                "UPDATE identities SET display_name = CASE WHEN ? != '' THEN ? ELSE display_name END, metadata = ?, updated = ? WHERE identity_key = ?",
                [(name, name, _dump_metadata(m), now, k) for k, (_, name, m) in updated_identities.items()],
            )
            conn.executemany("INSERT INTO templates (template_id, identity_key, gallery_key, embedding, source_sha256, face, created) VALUES (?, ?, ?, ?, ?, ?, ?)", template_rows)
            conn.executemany(
                "INSERT INTO changes (seq, gallery_key, op, template_id) VALUES (?, ?, 'add', ?)",
                [(seq_base + n, key, row[0]) for n, row in enumerate(template_rows, start=1)],
            )
            if template_rows:
                seq = seq_base + len(template_rows)
                conn.execute("UPDATE galleries SET last_seq = ? WHERE gallery_key = ?", (seq, key))
            if request is not None:
                (added,) = results
                conn.execute("DELETE FROM enroll_requests WHERE created < ?", (now - REQUEST_ID_RETENTION_S,))
                conn.execute(
                    "INSERT INTO enroll_requests (gallery_key, request_id, fingerprint, template_id, identity_created, duplicate, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, request.request_id, request.fingerprint, added.template_id, int(added.identity_created), _dump_json(request.duplicate), now),
                )
        return results, seq

    def remembered_enroll(self, gallery: str, request_id: str) -> RememberedEnroll | None:
        """The Enroll request remembered under ``request_id`` in ``gallery`` with its template, or
        None (never sent, forgotten after :data:`REQUEST_ID_RETENTION_S`, or its template
        deleted). Raises NotFound for an unknown gallery."""
        with self._read() as conn:
            key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
            return _remembered_enroll(conn, key, dim, request_id)

    def delete_template(self, gallery: str, template_id: int) -> tuple[bool, int]:
        """Delete one template; an identity left without templates is deleted too.

        Returns ``(identity_deleted, seq)``. Raises NotFound for a template not in ``gallery``.
        """
        with self._write() as conn:
            key = _gallery_key(conn, gallery)
            row = conn.execute("SELECT identity_key FROM templates WHERE template_id = ? AND gallery_key = ?", (int(template_id), key)).fetchone()
            if row is None:
                raise TemplateNotFound(f"template {template_id} does not exist in gallery {gallery!r}")
            (identity_key,) = row
            conn.execute("DELETE FROM templates WHERE template_id = ?", (int(template_id),))
            seq = conn.execute("INSERT INTO changes (gallery_key, op, template_id) VALUES (?, 'remove', ?)", (key, int(template_id))).lastrowid
            conn.execute("UPDATE galleries SET last_seq = ? WHERE gallery_key = ?", (seq, key))
            left = conn.execute("SELECT COUNT(*) FROM templates WHERE identity_key = ?", (identity_key,)).fetchone()[0]
            if left == 0:
                conn.execute("DELETE FROM identities WHERE identity_key = ?", (identity_key,))
        return left == 0, seq

    # -- identities --------------------------------------------------------------------------

    _IDENTITY_SELECT = (
        "SELECT i.identity_key, i.identity_id, i.display_name, i.metadata, "
        "(SELECT COUNT(*) FROM templates t WHERE t.identity_key = i.identity_key), i.created, i.updated FROM identities i"
    )

    def get_identity(self, gallery: str, identity_id: str) -> IdentityRecord:
        """One identity with all its templates (oldest first). Raises NotFound."""
        with self._read() as conn:
            key = _gallery_key(conn, gallery)
            row = conn.execute(self._IDENTITY_SELECT + " WHERE i.gallery_key = ? AND i.identity_id = ?", (key, identity_id)).fetchone()
            if row is None:
                raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
            dim = conn.execute("SELECT embedding_dim FROM galleries WHERE gallery_key = ?", (key,)).fetchone()[0]
            rows = conn.execute(
                "SELECT template_id, embedding, source_sha256, face, created FROM templates WHERE identity_key = ? ORDER BY template_id",
                (row[0],),
            ).fetchall()
        templates = tuple(_template_record(identity_id, dim, *r) for r in rows)
        return dataclasses.replace(_identity_record(row), templates=templates)

    def list_identities(self, gallery: str, *, after_key: int, limit: int) -> list[IdentityRecord]:
        """Up to ``limit`` identities with ``key > after_key`` in enrollment order (no templates)."""
        with self._read() as conn:
            key = _gallery_key(conn, gallery)
            rows = conn.execute(
                self._IDENTITY_SELECT + " WHERE i.gallery_key = ? AND i.identity_key > ? ORDER BY i.identity_key LIMIT ?",
                (key, int(after_key), int(limit)),
            ).fetchall()
        return [_identity_record(row) for row in rows]

    def update_identity(
        self, gallery: str, identity_id: str, *, display_name: str | None = None, metadata: dict[str, str] | None = None
    ) -> IdentityRecord:
        """Replace the display name and/or the whole metadata map (None leaves a field as is).

        Returns the updated identity (without templates). Raises NotFound.
        """
        with self._write() as conn:
            key = _gallery_key(conn, gallery)
            row = conn.execute("SELECT identity_key FROM identities WHERE gallery_key = ? AND identity_id = ?", (key, identity_id)).fetchone()
            if row is None:
                raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
            if display_name is not None:
                conn.execute("UPDATE identities SET display_name = ? WHERE identity_key = ?", (display_name, row[0]))
            if metadata is not None:
                conn.execute("UPDATE identities SET metadata = ? WHERE identity_key = ?", (_dump_metadata(metadata), row[0]))
            conn.execute("UPDATE identities SET updated = ? WHERE identity_key = ?", (time.time(), row[0]))
            updated = conn.execute(self._IDENTITY_SELECT + " WHERE i.identity_key = ?", (row[0],)).fetchone()
        return _identity_record(updated)

    def delete_identity(self, gallery: str, identity_id: str) -> tuple[np.ndarray, int]:
        """Delete an identity and all its templates.

        Returns the deleted template ids ``(n,) int64`` and the change ``seq``. Raises NotFound.
        """
        with self._write() as conn:
            key, seq = conn.execute("SELECT gallery_key, last_seq FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
            row = conn.execute("SELECT identity_key FROM identities WHERE gallery_key = ? AND identity_id = ?", (key, identity_id)).fetchone()
            if row is None:
                raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
            ids = [r[0] for r in conn.execute("SELECT template_id FROM templates WHERE identity_key = ?", (row[0],))]
            conn.execute("DELETE FROM templates WHERE identity_key = ?", (row[0],))
            for template_id in ids:
                seq = conn.execute("INSERT INTO changes (gallery_key, op, template_id) VALUES (?, 'remove', ?)", (key, template_id)).lastrowid
            conn.execute("UPDATE galleries SET last_seq = ? WHERE gallery_key = ?", (seq, key))
            conn.execute("DELETE FROM identities WHERE identity_key = ?", (row[0],))
        return np.array(ids, dtype=np.int64), seq

    # -- reads for search and the index ------------------------------------------------------

    def identity_embeddings(self, gallery: str, identity_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Template ids ``(n,) int64`` ascending and embeddings ``(n, D) float32`` of one identity
        (:meth:`identities_embeddings` of one). Raises NotFound."""
        found = self.identities_embeddings(gallery, [identity_id]).get(identity_id)
        if found is None:  # an identity always has a template: it is deleted with its last one
            raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
        return found

    def identities_embeddings(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`identity_embeddings` of many identities in one query per :data:`_IN_CHUNK` of
        them (mean templates after a bulk import): identity id -> (template ids ``(n,) int64``
        ascending, embeddings ``(n, D) float32``); identities that do not exist are left out.
        Raises NotFound for an unknown gallery."""
        ids = list(set(identity_ids))
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with self._read() as conn:
            key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
            for start in range(0, len(ids), _IN_CHUNK):
                rows = conn.execute(
                    "SELECT i.identity_id, t.template_id, t.embedding FROM identities i JOIN templates t ON t.identity_key = i.identity_key "
                    "WHERE i.gallery_key = ? AND i.identity_id IN (SELECT value FROM json_each(?)) ORDER BY i.identity_key, t.template_id",
                    (key, json.dumps(ids[start : start + _IN_CHUNK])),
                ).fetchall()
                for identity_id, group in itertools.groupby(rows, key=lambda row: row[0]):
                    found[identity_id] = _stack([(t, b) for _, t, b in group], dim)
        return found

    def identity_templates(self, gallery: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Every identity with its templates: ``(identity_id, template ids (n,) int64, x (n, D)
        float32)``, in identity order, read in blocks of rows (keyset paging). Raises NotFound."""
        conn = self._reader()
        key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
        last, current, rows_of = (-1, -1), None, []
        while rows := conn.execute(
            "SELECT t.identity_key, i.identity_id, t.template_id, t.embedding FROM templates t JOIN identities i ON i.identity_key = t.identity_key "
            "WHERE t.gallery_key = ? AND (t.identity_key, t.template_id) > (?, ?) ORDER BY t.identity_key, t.template_id LIMIT ?",
            (key, *last, _FETCH_ROWS),
        ).fetchall():
            last = (rows[-1][0], rows[-1][2])
            for identity_key, identity_id, template_id, blob in rows:
                if identity_key != current and rows_of:
                    yield (rows_of[0][0], *_stack([(t, b) for _, t, b in rows_of], dim))
                    rows_of = []
                current = identity_key
                rows_of.append((identity_id, template_id, blob))
        if rows_of:
            yield (rows_of[0][0], *_stack([(t, b) for _, t, b in rows_of], dim))

    def template_owners(self, template_ids: Iterable[int]) -> dict[int, TemplateOwner]:
        """The identity of each existing template id (ids that do not exist are left out)."""
        ids = [int(i) for i in template_ids]
        owners: dict[int, TemplateOwner] = {}
        conn = self._reader()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            rows = conn.execute(
                "SELECT t.template_id, i.identity_key, i.identity_id, i.display_name FROM templates t "
                f"JOIN identities i ON i.identity_key = t.identity_key WHERE t.template_id IN ({','.join('?' * len(chunk))})",
                chunk,
            )
            for row in rows:
                owners[row[0]] = TemplateOwner(*row)
        return owners

    def template_identity_keys(self, gallery: str) -> tuple[np.ndarray, np.ndarray]:
        """Every template of a gallery with its identity: ``(template ids (n,) int64 ascending,
        identity keys (n,) int64)`` (owners.py ``TemplateOwners``). Raises NotFound.

        Read from the covering index ``templates_by_gallery_owner`` as one text of numbers that
        numpy parses (:func:`_int_columns`): 0.5 s per 1M templates, nearly all in SQLite without
        the GIL, where fetching 1M row tuples from the table took 1.2 s, mostly holding the GIL
        and slowing the index snapshots loading beside it."""
        with self._read() as conn:
            key = _gallery_key(conn, gallery)
            both = _int_columns(conn, ("template_id", "identity_key"), "FROM templates WHERE gallery_key = ?", (key,))
        both = both[np.argsort(both[:, 0])]
        return np.ascontiguousarray(both[:, 0]), np.ascontiguousarray(both[:, 1])

    def identity_names(self, identity_keys: Iterable[int]) -> dict[int, tuple[str, str]]:
        """``(identity_id, display_name)`` of each existing identity key (others are left out)."""
        keys = list({int(k) for k in identity_keys})
        names: dict[int, tuple[str, str]] = {}
        conn = self._reader()
        for start in range(0, len(keys), _IN_CHUNK):
            chunk = keys[start : start + _IN_CHUNK]
            rows = conn.execute(f"SELECT identity_key, identity_id, display_name FROM identities WHERE identity_key IN ({','.join('?' * len(chunk))})", chunk)
            names.update((k, (i, n)) for k, i, n in rows)
        return names

    def identity_keys(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, int]:
        """The store key of each existing identity id of a gallery (others are left out). Raises NotFound."""
        ids = list(set(identity_ids))
        conn = self._reader()
        key = conn.execute("SELECT gallery_key FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
        if not ids:
            return {}
        rows = conn.execute(
            "SELECT identity_id, identity_key FROM identities WHERE gallery_key = ? AND identity_id IN (SELECT value FROM json_each(?))", (key[0], json.dumps(ids))
        )
        return dict(rows)

    def template_ids(self, gallery: str) -> np.ndarray:
        """Every template id of a gallery, ascending, ``(n,) int64``. Raises NotFound."""
        with self._read() as conn:
            key = _gallery_key(conn, gallery)
            ids = _int_columns(conn, ("template_id",), "FROM templates WHERE gallery_key = ?", (key,))
        return np.sort(ids[:, 0])

    def embeddings(self, gallery: str, template_ids: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Template embeddings in blocks ``(ids (n,) int64, x (n, D) float32)``, ascending ids.

        ``template_ids`` restricts the output to those ids (ids not in the gallery are skipped);
        None streams the whole gallery, a block per query (keyset paging, so no transaction stays
        open between blocks). Raises NotFound.
        """
        conn = self._reader()
        key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
        if template_ids is not None:
            ids = sorted(int(i) for i in template_ids)
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                rows = conn.execute(
                    "SELECT template_id, embedding FROM templates WHERE gallery_key = ? "
                    f"AND template_id IN ({','.join('?' * len(chunk))}) ORDER BY template_id",
                    [key, *chunk],
                ).fetchall()
                if rows:
                    yield _stack(rows, dim)
            return
        last = -1
        while rows := conn.execute(
            "SELECT template_id, embedding FROM templates WHERE gallery_key = ? AND template_id > ? ORDER BY template_id LIMIT ?",
            (key, last, _FETCH_ROWS),
        ).fetchall():
            last = rows[-1][0]
            yield _stack(rows, dim)

    def changes_since(self, gallery: str, seq: int) -> list[Change]:
        """Change-log entries of a gallery with ``seq`` greater than the given one, oldest first."""
        with self._read() as conn:
            key = _gallery_key(conn, gallery)
            rows = conn.execute("SELECT seq, op, template_id FROM changes WHERE gallery_key = ? AND seq > ? ORDER BY seq", (key, int(seq))).fetchall()
        return [Change(*row) for row in rows]

    def prune_changes(self, gallery: str, upto_seq: int) -> int:
        """Drop change-log entries up to ``upto_seq`` (an index snapshot holds them); returns the count."""
        with self._write() as conn:
            key = _gallery_key(conn, gallery)
            return conn.execute("DELETE FROM changes WHERE gallery_key = ? AND seq <= ?", (key, int(upto_seq))).rowcount

    def export_templates(self, gallery: str) -> Iterator[ExportedTemplate]:
        """Every template of a gallery with its identity's data, by template id.

        Reads on a connection of its own inside one read transaction, so the stream is one
        consistent state of the gallery while writers go on (WAL). Raises NotFound at the first
        ``next()`` when the gallery is unknown. Close the iterator to release the connection.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            key, dim = conn.execute("SELECT gallery_key, embedding_dim FROM galleries WHERE name = ?", (gallery,)).fetchone() or _missing(gallery)
            cursor = conn.execute(
                "SELECT i.identity_id, i.display_name, i.metadata, t.template_id, t.embedding, t.source_sha256, t.created, t.face "
                "FROM templates t JOIN identities i ON i.identity_key = t.identity_key WHERE t.gallery_key = ? ORDER BY t.template_id",
                (key,),
            )
            while rows := cursor.fetchmany(_FETCH_ROWS):
                for identity_id, display_name, metadata, template_id, blob, sha, created, face in rows:
                    embedding = _embedding(blob, dim)
                    yield ExportedTemplate(identity_id, display_name, json.loads(metadata), template_id, embedding, sha, created, load_face(face, embedding))
        finally:
            conn.close()


# ---------------------------------------------------------------------------------------------
# Helpers

    # -- API keys (keys.py) ------------------------------------------------------------------

    _KEY_SELECT = "SELECT name, key_id, role, galleries, created, revoked, salt, hash FROM api_keys"

    def insert_api_key(self, record: ApiKeyRecord, salt: bytes, hash: bytes) -> None:
        """Store a new key's row. Raises AlreadyExists when its name is taken (revoked keys too)."""
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO api_keys (name, key_id, role, galleries, salt, hash, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.name, record.key_id, record.role.label, json.dumps(list(record.galleries)), salt, hash, record.created),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"an API key named {record.name!r} already exists", field="name") from None

    def api_keys_by_id(self, key_id: str) -> list[StoredKey]:
        """The rows (with salt and hash) whose lookup id is ``key_id``, revoked ones too."""
        rows = self._reader().execute(self._KEY_SELECT + " WHERE key_id = ?", (key_id,)).fetchall()
        return [StoredKey(_key_record(row[:6]), bytes(row[6]), bytes(row[7])) for row in rows]

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key (no secrets), by name."""
        return [_key_record(row[:6]) for row in self._reader().execute(self._KEY_SELECT + " ORDER BY name").fetchall()]

    def revoke_api_key(self, name: str, when: float) -> ApiKeyRecord:
        """Mark the key ``name`` revoked at ``when`` (an already revoked key keeps its time). Raises KeyNotFound."""
        with self._write() as conn:
            conn.execute("UPDATE api_keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (when, name))
            row = conn.execute(self._KEY_SELECT + " WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise KeyNotFound(f"no API key named {name!r}")
        return _key_record(row[:6])

    def has_api_keys(self) -> bool:
        """True once any key was created (revoked ones count: revoking every key locks the API, it
        does not open it again)."""
        return self._reader().execute("SELECT 1 FROM api_keys LIMIT 1").fetchone() is not None


def _key_record(row: tuple) -> ApiKeyRecord:
    name, key_id, role, galleries, created, revoked = row
    return ApiKeyRecord.from_json({"name": name, "key_id": key_id, "role": role, "galleries": json.loads(galleries), "created": created, "revoked": revoked})


def _damage_message(path: Path, during: str, report: list[str]) -> str:
    """The one message of a damaged store: the file, what SQLite reported, the repair options."""
    lines = [line.strip() for row in report for line in row.splitlines() if line.strip() and not line.startswith("*** in database")]
    lines = lines[:_REPORT_LINES] + (["(more)"] if len(lines) > _REPORT_LINES else [])
    return (
        f"the gallery store {path} is damaged; SQLite reported ({during}): {'; '.join(lines)}. "
        f"The server refuses to serve it. Repair: stop the server and restore {path.name} from a backup "
        f"(or enroll again from a `facegallery export-gallery` file of a good copy, with `facegallery import-embeddings`, "
        f"into an empty data directory), or salvage what is readable with "
        f"`sqlite3 {path} .recover | sqlite3 {path}.recovered` and move {path.name}.recovered in its place "
        f"(delete the index/ snapshots next to it, they are rebuilt)"
    )


def _gallery_record(row: tuple) -> GalleryRecord:
    """A galleries row (``_GALLERY_SELECT``) as a record; a NULL policy is the fixed threshold."""
    *fields, policy = row
    threshold = fields[3]
    return GalleryRecord(*fields, policy=DecisionPolicy.from_json(json.loads(policy)) if policy else DecisionPolicy.fixed(threshold))


def _missing(gallery: str) -> NoReturn:
    raise GalleryNotFound(f"gallery {gallery!r} does not exist")


def _gallery_key(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT gallery_key FROM galleries WHERE name = ?", (name,)).fetchone()
    if row is None:
        _missing(name)
    return row[0]


def _embedding_blobs(items: Sequence[NewTemplate], dim: int) -> list[bytes]:
    """Each item's embedding as a little-endian float32 BLOB of ``dim * 4`` bytes (one copy of
    the whole batch, then a slice per item); EmbeddingShapeError names the first of another length."""
    if not items:
        return []
    vectors = [np.asarray(item.embedding, dtype="<f4").reshape(-1) for item in items]
    for n, vector in enumerate(vectors):
        if vector.shape != (dim,):
            raise EmbeddingShapeError(f"embedding must have {dim} values, got {vector.size} (item {n})")
    raw = np.stack(vectors).tobytes()
    width = dim * 4
    return [raw[start : start + width] for start in range(0, len(raw), width)]


def _int_columns(conn: sqlite3.Connection, columns: Sequence[str], rows: str, params: tuple) -> np.ndarray:
    """Integer ``columns`` of ``SELECT <columns> <rows>`` as an ``(n, len(columns)) int64`` array,
    rows in no particular order.

    SQLite joins the values into one comma-separated text (``group_concat``) and numpy parses it,
    so no Python object is made per row."""
    value = " || ',' || ".join(columns)
    (text,) = conn.execute(f"SELECT group_concat(v, ',') FROM (SELECT {value} AS v {rows})", params).fetchone()
    flat = np.fromstring(text, dtype=np.int64, sep=",") if text else np.zeros(0, np.int64)
    return flat.reshape(-1, len(columns))


def _last_key(conn: sqlite3.Connection, table: str) -> int:
    """The largest ``AUTOINCREMENT`` key ``table`` has ever used (0 before its first row)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)).fetchone()
    return int(row[0]) if row else 0


def _embedding(blob: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)
    if vector.shape != (dim,):
        raise RuntimeError(f"stored embedding has {vector.size} values, gallery says {dim}")
    return vector


def _stack(rows: Sequence[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").astype(np.float32).reshape(len(rows), dim)
    return ids, x


def _dump_metadata(metadata: dict[str, str]) -> str:
    return json.dumps({str(k): str(v) for k, v in metadata.items()}, sort_keys=True)


def _dump_json(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _remembered_enroll(conn: sqlite3.Connection, gallery_key: int, dim: int, request_id: str) -> RememberedEnroll | None:
    row = conn.execute(
        "SELECT r.fingerprint, r.identity_created, r.duplicate, r.created, i.identity_id, t.template_id, t.embedding, t.source_sha256, "
        "t.face, t.created FROM enroll_requests r JOIN templates t ON t.template_id = r.template_id "
        "JOIN identities i ON i.identity_key = t.identity_key WHERE r.gallery_key = ? AND r.request_id = ? AND r.created >= ?",
        (gallery_key, request_id, time.time() - REQUEST_ID_RETENTION_S),
    ).fetchone()
    if row is None:
        return None
    fingerprint, identity_created, duplicate, created, identity_id, *template = row
    record = _template_record(identity_id, dim, *template)
    return RememberedEnroll(request_id, fingerprint, record, bool(identity_created), None if duplicate is None else json.loads(duplicate), created)


def dump_face(face: Face | None) -> str | None:
    """An enrolled face's box, landmarks and score as JSON (None for none; :func:`load_face`)."""
    if face is None:
        return None
    return json.dumps({"box": np.asarray(face.box, float).tolist(), "landmarks": np.asarray(face.landmarks, float).tolist(), "score": float(face.score)})


def load_face(face_json: str | None, embedding: np.ndarray) -> Face | None:
    """The enrolled face :func:`dump_face` stored (None for none), with its ``(D,) float32`` embedding."""
    if face_json is None:
        return None
    data = json.loads(face_json)
    return Face(
        box=np.asarray(data["box"], np.float32),
        landmarks=np.asarray(data["landmarks"], np.float32).reshape(-1, 2),
        score=float(data["score"]),
        embedding=embedding,
    )


def _template_record(identity_id: str, dim: int, template_id: int, blob: bytes, sha: str, face_json: str | None, created: float) -> TemplateRecord:
    embedding = _embedding(blob, dim)
    return TemplateRecord(template_id, identity_id, embedding, sha, load_face(face_json, embedding), created)


def _identity_record(row: tuple) -> IdentityRecord:
    key, identity_id, display_name, metadata, count, created, updated = row
    return IdentityRecord(key, identity_id, display_name, json.loads(metadata), count, created, updated)
