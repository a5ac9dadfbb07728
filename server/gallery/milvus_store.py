"""The ``milvus`` backend's :class:`~facegallery.server.gallery.store.TemplateStore`: every gallery's
data in Milvus, shared by any number of facegallery servers (docs/milvus.md).

Collections and consistency: milvus_client.py. What differs from the SQLite store:

* **Keys.** Galleries get a random 63-bit key at creation. An identity's key is a hash of
  (gallery key, identity id) (``key63``), so two servers enrolling the same new identity write one
  row. A template id is ``writer << 32 | n``: ``writer`` is a random 31-bit id of this store
  object (one per server process), ``n`` counts its templates; so ids are unique without a
  shared counter. Identities are paged in key order (hash order, not enrollment order).
* **Changes.** Milvus has no transactions or shared sequence, so every writer numbers its own
  changes per gallery (``seq`` 1, 2, ...; one change at a time per gallery, under the gallery's
  write lock): an addition is its template rows, tagged (writer, seq); a removal is a row of
  ``removals`` with the template ids, then the rows' deletion. After each change the writer
  upserts its head (gallery, writer) -> seq. A server brings its index up to date
  (:meth:`MilvusTemplateStore.pull_changes`) by reading, for each writer whose head moved past
  what it holds, the changes in between; as each writer's changes are acknowledged in order and
  reads are Strong, a server that sees a head sees every change up to it. The first pull of a
  gallery reads everything.
* **Atomicity.** A change of several rows (a batch of templates, identity rows, head) is not
  atomic: a writer that dies inside one may leave rows that no head covers yet. Those were never
  acknowledged; servers do not index them until that writer's next change (a new process is a
  new writer, so they stay unindexed), and ``facegallery migrate`` copies them. Creating one
  gallery name on two servers at once: the earlier row wins, the other call gets AlreadyExists.
  An Enroll request id sent to two servers at the same moment may enroll twice.
* **Seq numbers** in records (``GalleryRecord.last_seq``, ``StoredCalibration.seq``) are this
  process's writer's; a calibration another server stored is aged by the change in template
  count since (:meth:`load_calibration`).

Thread-safe (pymilvus clients are). Every call may raise BackendUnavailable (UNAVAILABLE).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from facegallery.server.contract.errors import (
    AlreadyExists,
    EmbeddingShapeError,
    GalleryNotFound,
    IdentityNotFound,
    KeyNotFound,
    TemplateNotFound,
)
from facegallery.server.gallery.decision import DecisionPolicy
from facegallery.server.gallery.keys import ApiKeyRecord, StoredKey
from facegallery.server.gallery.milvus_client import SEARCH_LIMIT, MilvusCollections, key63
from facegallery.server.gallery.store import (
    REQUEST_ID_RETENTION_S,
    AddedTemplate,
    Change,
    EnrollReplayed,
    NO_HEAD,
    ExportedTemplate,
    GalleryRecord,
    Head,
    IdempotentRequest,
    IdentityRecord,
    NewTemplate,
    RememberedEnroll,
    StoredCalibration,
    TemplateOwner,
    TemplateRecord,
    dump_face,
    load_face,
)
from facegallery.server.gallery.validation import check_metadata

__all__ = ["MilvusTemplateStore", "GalleryState", "PulledChanges"]

LOG = logging.getLogger(__name__)

#: Removed template ids per ``removals`` row (the ARRAY field's capacity).
_REMOVAL_ROW_IDS = 4096
#: Keys per ``in [...]`` filter.
_IN_CHUNK = 1000
#: A pull reads a writer's changes by key (template ids, removal keys) when they span at most
#: this many template ids and changes; past it, by a filter on (writer, seq), which Milvus Lite
#: answers by scanning the gallery's rows (bench/milvus_backend.py).
_PULL_BY_KEY_IDS = 16384
_PULL_BY_KEY_CHANGES = 1024
#: Rows per query-iterator page of a pull, and per batch turned into arrays.
_PULL_BATCH = 16384
#: Probes x neighbours of one Milvus search call (a batch of calibration probes is split to keep
#: each reply a few MB).
_SEARCH_HITS_PER_CALL = 65536
#: Bytes of the identities' metadata field (milvus_client.py: VARCHAR(65535)); the prefix of its packed form.
_METADATA_FIELD_BYTES = 65535
_PACKED = "b64:"
_TEMPLATE_FIELDS = ["pk", "identity_key", "identity_id", "embedding", "source_sha256", "face", "created"]
_IDENTITY_FIELDS = ["pk", "identity_id", "display_name", "metadata", "created", "updated"]


@dataclasses.dataclass(frozen=True)
class _Repair:
    """A change that failed part-way (:meth:`MilvusTemplateStore._changing`): its ``seq``, the
    gallery's dimension, the template ids it added (undone) or removed (removed again, with its
    ``removal_rows`` written again), the request id row it wrote (dropped), and the identities
    (key -> id) to delete if left without templates."""

    seq: int
    dim: int
    template_ids: list[int]
    removal_rows: list[dict[str, Any]]
    request_pk: int | None
    identities: dict[int, str]


class _Gallery(NamedTuple):
    key: int
    embedding_dim: int


class GalleryState(NamedTuple):
    """What a server checks before each call on a gallery (:meth:`MilvusTemplateStore.gallery_state`):
    its key and settings row, and each writer's newest change ``{writer: seq}``."""

    key: int
    policy: DecisionPolicy
    threshold: float
    heads: dict[int, Head]


@dataclasses.dataclass(frozen=True, eq=False)
class PulledChanges:
    """Changes of other writers (:meth:`MilvusTemplateStore.pull_changes`): templates added
    (``template_ids`` ``(n,) int64``, ``identity_keys`` ``(n,) int64``, ``identity_ids``, ``x``
    ``(n, D) float32``), template ids removed ``(m,) int64``, and the heads they bring the
    puller to."""

    template_ids: np.ndarray
    identity_keys: np.ndarray
    identity_ids: list[str]
    x: np.ndarray
    removed: np.ndarray
    heads: dict[int, Head]


class MilvusTemplateStore:
    """:class:`TemplateStore` in Milvus (module docstring).

    Parameters
    ----------
    uri, token, prefix
        As milvus_client.py's :class:`MilvusCollections`.
    """

    shared = True  # other processes write the same galleries: indexes follow them (pull_changes)

    def __init__(self, uri: str, *, token: str = "", prefix: str) -> None:
        self.milvus = MilvusCollections(uri, token=token, prefix=prefix)
        self.writer = secrets.randbits(31) | 1
        self._lock = threading.Lock()  # the counters below
        self._templates_written = 0
        self._seq: dict[int, int] = {}  # gallery key -> this writer's newest change
        self._own_heads: dict[int, Head] = {}  # gallery key -> this writer's head as committed
        self._repair_lock = threading.Lock()  # _pending, and a repair under way
        self._pending: dict[int, _Repair] = {}  # gallery key -> its change that failed part-way

    def close(self) -> None:
        """Close the connection to Milvus (its data stays there)."""
        self.milvus.close()

    def ping(self) -> None:
        """Raise BackendUnavailable unless Milvus answers now (health checks); once it does,
        repair the changes that failed part-way meanwhile (:meth:`_changing`)."""
        self.milvus.ping()
        with self._repair_lock:
            pending = list(self._pending)
        for key in pending:
            self._run_repairs(key)

    # -- galleries ---------------------------------------------------------------------------

    def _gallery_row(self, name: str) -> dict[str, Any]:
        rows = self.milvus.query(self.milvus.name("galleries"), f'name == "{name}"', ["pk", "doc"], limit=16)
        if not rows:
            raise GalleryNotFound(f"gallery {name!r} does not exist")
        return min(rows, key=lambda r: (r["doc"]["created"], r["pk"]))

    def _gallery_info(self, name: str) -> _Gallery:
        """Gallery ``name``'s key and dimension (one read; no counts). Raises NotFound."""
        row = self._gallery_row(name)
        return _Gallery(int(row["pk"]), int(row["doc"]["embedding_dim"]))

    def _record(self, row: dict[str, Any], *, counts: bool = True) -> GalleryRecord:
        doc, key = row["doc"], int(row["pk"])
        identities = self.milvus.count(self.milvus.name("identities"), f"gallery_key == {key}") if counts else 0
        templates = self.milvus.count(self.milvus.templates(doc["embedding_dim"]), f"gallery_key == {key}") if counts else 0
        with self._lock:
            seq = self._seq.get(key, 0)
        return GalleryRecord(
            key, doc["name"], doc["model_id"], doc["threshold"], doc["metric"], doc["embedding_dim"], doc["created"], seq, identities, templates,
            DecisionPolicy.from_json(doc["policy"]),
        )

    def create_gallery(
        self, name: str, *, model_id: str, threshold: float, metric: str, embedding_dim: int, policy: DecisionPolicy | None = None
    ) -> GalleryRecord:
        """Insert an empty gallery (``policy`` None: a fixed ``threshold``). Raises AlreadyExists."""
        policy = policy or DecisionPolicy.fixed(threshold)
        try:
            self._gallery_row(name)
            raise AlreadyExists(f"gallery {name!r} already exists")
        except GalleryNotFound:
            pass
        key = secrets.randbits(63) or 1
        doc = {"name": name, "model_id": model_id, "threshold": float(threshold), "metric": metric, "embedding_dim": int(embedding_dim), "created": time.time(), "policy": policy.to_json()}
        self.milvus.templates(embedding_dim)
        self.milvus.insert(self.milvus.name("galleries"), [{"pk": key, "name": name, "doc": doc}])
        winner = self._gallery_row(name)
        if int(winner["pk"]) != key:  # another server created it at the same time, first
            self.milvus.delete(self.milvus.name("galleries"), f"pk == {key}")
            raise AlreadyExists(f"gallery {name!r} already exists")
        return self._record(winner, counts=False)

    def get_gallery(self, name: str) -> GalleryRecord:
        """The gallery ``name`` with its identity and template counts. Raises NotFound."""
        return self._record(self._gallery_row(name))

    def list_galleries(self, *, counts: bool = True) -> list[GalleryRecord]:
        """Every gallery, in creation order; without ``counts`` its identity and template counts
        are 0 (two ``count(*)`` queries per gallery saved: Milvus Lite scans for them)."""
        rows = self.milvus.query(self.milvus.name("galleries"), "pk > 0", ["pk", "doc"])
        first: dict[str, dict] = {}
        for row in sorted(rows, key=lambda r: (r["doc"]["created"], r["pk"])):
            first.setdefault(row["doc"]["name"], row)
        return [self._record(row, counts=counts) for row in first.values()]

    def gallery_state(self, name: str, key: int) -> GalleryState:
        """The gallery's settings and writers' heads (two small reads: the row of the gallery with
        key ``key``, and its heads). Raises GalleryNotFound when it is gone, or ``name`` now
        names another gallery (deleted and re-created)."""
        rows = self.milvus.get(self.milvus.name("galleries"), [key], ["pk", "doc"])
        if not rows or rows[0]["doc"]["name"] != name:
            raise GalleryNotFound(f"gallery {name!r} does not exist (deleted)")
        doc = rows[0]["doc"]
        found = self.milvus.query(self.milvus.name("heads"), f"gallery_key == {key}", ["writer", "seq", "written"])
        heads = {int(r["writer"]): Head(int(r["seq"]), int(r["written"])) for r in found}
        return GalleryState(key, DecisionPolicy.from_json(doc["policy"]), doc["threshold"], heads)

    def own_head(self, key: int) -> Head:
        """This writer's head of gallery ``key`` as last committed here."""
        with self._lock:
            return self._own_heads.get(key, NO_HEAD)

    def delete_gallery(self, name: str) -> tuple[int, int]:
        """Delete a gallery (its row first: other servers stop serving it), then its data.
        Returns ``(deleted_identities, deleted_templates)``. Raises NotFound."""
        record = self.get_gallery(name)
        key = record.key
        self.milvus.delete(self.milvus.name("galleries"), f"pk == {key}")
        self.milvus.delete(self.milvus.templates(record.embedding_dim), f"gallery_key == {key}")
        for collection in ("identities", "heads", "removals", "requests", "calibrations"):
            self.milvus.delete(self.milvus.name(collection), f"gallery_key == {key}")
        with self._lock:
            self._seq.pop(key, None)
        return record.identity_count, record.template_count

    def _set_doc(self, name: str, **changes: Any) -> GalleryRecord:
        row = self._gallery_row(name)
        doc = {**row["doc"], **changes}
        self.milvus.upsert(self.milvus.name("galleries"), [{"pk": int(row["pk"]), "name": name, "doc": doc}])
        return self._record({"pk": row["pk"], "doc": doc})

    def set_policy(self, name: str, policy: DecisionPolicy, threshold: float) -> GalleryRecord:
        """Store gallery ``name``'s decision policy and L2 ``threshold``; returns the gallery. Raises NotFound."""
        return self._set_doc(name, policy=policy.to_json(), threshold=float(threshold))

    def set_model_id(self, name: str, model_id: str) -> GalleryRecord:
        """Record ``model_id`` as the model of the gallery's templates (migrations). Raises NotFound."""
        return self._set_doc(name, model_id=model_id)

    def save_calibration(self, gallery: str, calibration: StoredCalibration) -> None:
        """Keep a gallery's newest calibration (replacing the one before). Raises NotFound."""
        key = int(self._gallery_row(gallery)["pk"])
        doc = {"policy": calibration.policy, "seq": calibration.seq, "templates": calibration.templates, "calibration": calibration.calibration}
        self.milvus.upsert(self.milvus.name("calibrations"), [{"pk": key, "gallery_key": key, "doc": doc}])

    def load_calibration(self, gallery: str) -> StoredCalibration | None:
        """The newest stored calibration of a gallery, or None. Its ``seq`` is this writer's newest
        change minus the change in template count since it was stored (another server's seq
        numbers are not comparable). Raises NotFound."""
        row = self._gallery_row(gallery)
        key = int(row["pk"])
        rows = self.milvus.get(self.milvus.name("calibrations"), [key], ["doc"])
        if not rows:
            return None
        doc = rows[0]["doc"]
        age = abs(self.milvus.count(self.milvus.templates(row["doc"]["embedding_dim"]), f"gallery_key == {key}") - int(doc["templates"]))
        return StoredCalibration(doc["policy"], self._seq_of(key) - age, int(doc["templates"]), doc["calibration"])

    # -- writes ------------------------------------------------------------------------------

    def _next_seq(self, key: int) -> int:
        with self._lock:
            self._seq[key] = seq = self._seq.get(key, 0) + 1
        return seq

    def _commit_head(self, key: int, seq: int) -> None:
        with self._lock:
            head = Head(seq, self._templates_written)
        self.milvus.upsert(self.milvus.name("heads"), [{"pk": key63(key, self.writer), "gallery_key": key, "writer": self.writer, "seq": head.seq, "written": head.written}])
        with self._lock:
            self._own_heads[key] = head

    def _template_ids(self, n: int) -> np.ndarray:
        with self._lock:
            first = self._templates_written
            self._templates_written += n
        if self._templates_written >= 2**32:
            raise RuntimeError("this server process has written 2**32 templates; restart it for a new writer id")
        return (np.int64(self.writer) << np.int64(32)) | np.arange(first, first + n, dtype=np.int64)

    def add_templates(
        self, gallery: str, items: Sequence[NewTemplate], *, skip_duplicates: bool = False, request: IdempotentRequest | None = None
    ) -> tuple[list[AddedTemplate | None], int]:
        """Store templates, creating their identities as needed (store.py ``TemplateStore.add_templates``:
        the same parameters, results and errors). Durable in Milvus when it returns."""
        if request is not None and len(items) != 1:
            raise ValueError("an idempotent request adds exactly one template")
        row = self._gallery_row(gallery)
        key, dim = int(row["pk"]), int(row["doc"]["embedding_dim"])
        if request is not None and (remembered := self._remembered(key, dim, request.request_id)) is not None:
            raise EnrollReplayed(remembered)
        vectors = [np.asarray(item.embedding, dtype=np.float32).reshape(-1) for item in items]
        for n, vector in enumerate(vectors):
            if vector.shape != (dim,):
                raise EmbeddingShapeError(f"embedding must have {dim} values, got {vector.size} (item {n})")
        now = time.time()
        wanted = {item.identity_id: key63(key, item.identity_id) for item in items}
        wanted_ids = {identity_key: identity_id for identity_id, identity_key in wanted.items()}
        known = {r["identity_id"]: r for r in self.milvus.get(self.milvus.name("identities"), list(set(wanted.values())), _IDENTITY_FIELDS)}
        stored: set[tuple[int, bytes]] = set()
        if skip_duplicates and known:
            for r in self._template_rows(dim, [int(r["pk"]) for r in known.values()], ["identity_key", "embedding"]):
                stored.add((int(r["identity_key"]), np.asarray(r["embedding"], np.float32).tobytes()))
        changed: dict[int, dict[str, Any]] = {}  # identity key -> identity row to upsert
        results: list[AddedTemplate | None] = []
        keep: list[int] = []
        for n, (item, vector) in enumerate(zip(items, vectors, strict=True)):
            identity_key = wanted[item.identity_id]
            existing = known.get(item.identity_id)
            identity_created = existing is None and identity_key not in changed
            if identity_created:
                changed[identity_key] = {"pk": identity_key, "gallery_key": key, "identity_id": item.identity_id, "display_name": item.display_name,
                                         "metadata": dict(item.metadata), "created": item.created if item.created is not None else now, "updated": now, "new": True}
            else:
                if skip_duplicates and (identity_key, vector.tobytes()) in stored:
                    results.append(None)
                    continue
                if item.display_name or item.metadata:
                    entry = changed.get(identity_key)
                    if entry is None:
                        assert existing is not None
                        entry = changed[identity_key] = {**existing, "gallery_key": key, "metadata": _load_metadata(existing["metadata"]), "updated": now}
                    entry["display_name"] = item.display_name or entry["display_name"]
                    entry["metadata"].update(item.metadata)
            if skip_duplicates:
                stored.add((identity_key, vector.tobytes()))
            keep.append(n)
            results.append(AddedTemplate(-1, identity_created, identity_key))
        for entry in changed.values():
            if entry["metadata"]:
                check_metadata(entry["metadata"], what=f"the merged metadata of {entry['identity_id']!r}")
        ids = self._template_ids(len(keep))
        slots = iter(ids.tolist())
        results = [None if r is None else r._replace(template_id=next(slots)) for r in results]
        if keep:
            self._run_repairs(key)
        seq = self._next_seq(key) if keep else self._seq_of(key)
        rows = [
            {
                "pk": int(template_id), "gallery_key": key, "identity_key": wanted[items[n].identity_id], "identity_id": items[n].identity_id,
                "writer": self.writer, "seq": seq, "embedding": vectors[n].tolist(), "source_sha256": items[n].source_sha256,
                "face": dump_face(items[n].face) or "", "created": items[n].created if items[n].created is not None else now,
            }
            for template_id, n in zip(ids.tolist(), keep, strict=True)
        ]
        if not rows:  # every item was a duplicate
            return results, seq
        created = {k: e["identity_id"] for k, e in changed.items() if e.get("new")}
        request_pk = key63(key, request.request_id) if request is not None else None
        with self._changing(key, _Repair(seq, dim, ids.tolist(), [], request_pk, created)):
            if changed:
                self.milvus.upsert(self.milvus.name("identities"), [{**_identity_row(e), "gallery_key": key} for e in changed.values()])
            self.milvus.upsert(self.milvus.templates(dim), rows)  # upsert: a retried call cannot duplicate a key
            if request is not None:
                added = results[0]
                assert added is not None
                self.milvus.delete(self.milvus.name("requests"), f'gallery_key == {key} and doc["created"] < {now - REQUEST_ID_RETENTION_S}')
                doc = {"request_id": request.request_id, "fingerprint": request.fingerprint, "template_id": added.template_id,
                       "identity_created": added.identity_created, "duplicate": request.duplicate, "created": now}
                self.milvus.upsert(self.milvus.name("requests"), [{"pk": request_pk, "gallery_key": key, "doc": doc}])
            added_to = {int(r["identity_key"]) for r in rows} - set(created)
            self._keep_identities(key, {k: _identity_row(changed.get(k) or known[wanted_ids[k]]) for k in added_to})
            self._commit_head(key, seq)
        return results, seq

    # -- changes that fail part-way ----------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self, key: int, repair: _Repair) -> Iterator[None]:
        """Around the writes of change ``repair.seq`` of gallery ``key``: should one fail (Milvus
        unreachable), the change is kept to be repaired (:meth:`_run_repairs`) before this writer's
        next change of the gallery, or at the next successful :meth:`ping`: an addition is undone,
        a removal completed, then the head committed, so that no server indexes half a change and
        the head never skips one."""
        try:
            yield
        except BaseException:
            with self._repair_lock:
                self._pending[key] = repair
            raise

    def _run_repairs(self, key: int) -> None:
        """Repair gallery ``key``'s change that failed part-way, if any (:meth:`_changing`);
        raises BackendUnavailable while Milvus is still unreachable (no new change is written
        before it is repaired)."""
        with self._repair_lock:
            repair = self._pending.get(key)
            if repair is None:
                return
            if repair.removal_rows:
                self.milvus.upsert(self.milvus.name("removals"), repair.removal_rows)
            for start in range(0, len(repair.template_ids), _IN_CHUNK):
                self.milvus.delete(self.milvus.templates(repair.dim), f"pk in {repair.template_ids[start : start + _IN_CHUNK]}")
            if repair.request_pk is not None:
                self.milvus.delete(self.milvus.name("requests"), f"pk == {repair.request_pk}")
            self._drop_empty_identities(key, repair.dim, repair.identities)
            self._commit_head(key, repair.seq)
            del self._pending[key]
        LOG.warning("gallery key %d: change %d, which failed part-way, was %s", key, repair.seq, "completed" if repair.removal_rows else "undone")

    def _seq_of(self, key: int) -> int:
        with self._lock:
            return self._seq.get(key, 0)

    def _remove(self, key: int, dim: int, template_ids: list[int], identities: dict[int, str]) -> tuple[int, set[int]]:
        """One removal change: its ``removals`` rows, the templates' deletion, the rows of
        ``identities`` (key -> id) left without templates, the head. Returns the change's seq
        and the identity keys deleted."""
        self._run_repairs(key)
        seq = self._next_seq(key)
        rows = [
            {"pk": key63(key, self.writer, seq, part), "gallery_key": key, "writer": self.writer, "seq": seq, "template_ids": template_ids[start : start + _REMOVAL_ROW_IDS]}
            for part, start in enumerate(range(0, len(template_ids), _REMOVAL_ROW_IDS))
        ]
        with self._changing(key, _Repair(seq, dim, template_ids, rows, None, identities)):
            self.milvus.upsert(self.milvus.name("removals"), rows)
            for start in range(0, len(template_ids), _IN_CHUNK):
                self.milvus.delete(self.milvus.templates(dim), f"pk in {template_ids[start : start + _IN_CHUNK]}")
            emptied = self._drop_empty_identities(key, dim, identities)
            self._commit_head(key, seq)
        return seq, emptied

    def _drop_empty_identities(self, key: int, dim: int, identities: dict[int, str]) -> set[int]:
        """Delete the rows of ``identities`` (key -> id) that have no template left; returns their keys."""
        emptied = {k for k, identity_id in identities.items() if not self._template_rows(dim, [k], ["pk"])}
        for identity_key in emptied:
            self._delete_identity_row(key, dim, identity_key, identities[identity_key])
        return emptied

    def delete_template(self, gallery: str, template_id: int) -> tuple[bool, int]:
        """Delete one template; an identity left without templates is deleted too. Returns
        ``(identity_deleted, seq)``. Raises NotFound for a template not in ``gallery``."""
        record = self._gallery_info(gallery)
        rows = [r for r in self.milvus.get(self.milvus.templates(record.embedding_dim), [int(template_id)], ["gallery_key", "identity_key", "identity_id"]) if int(r["gallery_key"]) == record.key]
        if not rows:
            raise TemplateNotFound(f"template {template_id} does not exist in gallery {gallery!r}")
        identity_key = int(rows[0]["identity_key"])
        seq, emptied = self._remove(record.key, record.embedding_dim, [int(template_id)], {identity_key: str(rows[0]["identity_id"])})
        return identity_key in emptied, seq

    def delete_identity(self, gallery: str, identity_id: str) -> tuple[np.ndarray, int]:
        """Delete an identity and all its templates; returns the template ids ``(n,) int64`` and
        the change ``seq``. Raises NotFound."""
        record = self._gallery_info(gallery)
        identity_key = self._existing_identity(record.key, gallery, identity_id)
        ids = sorted(int(r["pk"]) for r in self._template_rows(record.embedding_dim, [identity_key], ["pk"]))
        if ids:
            seq, _ = self._remove(record.key, record.embedding_dim, ids, {identity_key: identity_id})
        else:  # an identity without templates (a change that failed part-way): only its row
            seq = self._seq_of(record.key)
            self._delete_identity_row(record.key, record.embedding_dim, identity_key, identity_id)
        return np.array(ids, dtype=np.int64), seq

    def _delete_identity_row(self, key: int, dim: int, identity_key: int, identity_id: str) -> None:
        """Delete an identity's row once its templates are deleted; should another server have
        enrolled a template of it meanwhile, the identity is kept (re-created without metadata),
        never a template without its identity. With :meth:`_keep_identities` on the enrolling
        side, one of the two sees the other in every order of the four writes."""
        self.milvus.delete(self.milvus.name("identities"), f"pk == {identity_key}")
        if self._template_rows(dim, [identity_key], ["pk"]):
            LOG.warning("identity %r was enrolled again while it was deleted: kept with its new templates", identity_id)
            now = time.time()
            self.milvus.upsert(self.milvus.name("identities"), [
                {"pk": identity_key, "gallery_key": key, "identity_id": identity_id, "display_name": "", "metadata": "{}", "created": now, "updated": now}
            ])

    def _keep_identities(self, key: int, rows: dict[int, dict[str, Any]]) -> None:
        """After adding templates to existing identities: re-create any whose row another
        server deleted meanwhile (:meth:`_delete_identity_row`), from ``rows`` (identity key ->
        its row as read before the write)."""
        present = {int(r["pk"]) for r in self.milvus.get(self.milvus.name("identities"), list(rows), ["pk"])}
        lost = [row for identity_key, row in rows.items() if identity_key not in present]
        if lost:
            LOG.warning("identities %s were deleted while templates were added to them: kept with the new templates", sorted(r["identity_id"] for r in lost))
            self.milvus.upsert(self.milvus.name("identities"), [{**r, "gallery_key": key} for r in lost])  # rows from _identity_row

    # -- identities --------------------------------------------------------------------------

    def _existing_identity(self, key: int, gallery: str, identity_id: str) -> int:
        identity_key = key63(key, identity_id)
        if not self.milvus.get(self.milvus.name("identities"), [identity_key], ["pk"]):
            raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
        return identity_key

    def _template_rows(self, dim: int, identity_keys: list[int], fields: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(identity_keys), _IN_CHUNK):
            out.extend(self.milvus.query(self.milvus.templates(dim), f"identity_key in {identity_keys[start : start + _IN_CHUNK]}", fields))
        return out

    def _identity_records(self, dim: int, rows: list[dict[str, Any]]) -> list[IdentityRecord]:
        counts: dict[int, int] = {}
        for r in self._template_rows(dim, [int(r["pk"]) for r in rows], ["identity_key"]):
            counts[int(r["identity_key"])] = counts.get(int(r["identity_key"]), 0) + 1
        return [
            IdentityRecord(int(r["pk"]), r["identity_id"], r["display_name"], _load_metadata(r["metadata"]), counts.get(int(r["pk"]), 0), r["created"], r["updated"])
            for r in rows
        ]

    def get_identity(self, gallery: str, identity_id: str) -> IdentityRecord:
        """One identity with all its templates (by template id). Raises NotFound."""
        record = self._gallery_info(gallery)
        identity_key = self._existing_identity(record.key, gallery, identity_id)
        (row,) = self.milvus.get(self.milvus.name("identities"), [identity_key], _IDENTITY_FIELDS)
        templates = sorted(self._template_rows(record.embedding_dim, [identity_key], _TEMPLATE_FIELDS), key=lambda r: r["pk"])
        (identity,) = self._identity_records(record.embedding_dim, [row])
        return dataclasses.replace(identity, templates=tuple(_template_record(r) for r in templates))

    def list_identities(self, gallery: str, *, after_key: int, limit: int) -> list[IdentityRecord]:
        """Up to ``limit`` identities with ``key > after_key`` in key order (no templates).

        Milvus returns rows unordered: each page reads the keys of every later identity (8 bytes
        each) and fetches the page's rows."""
        record = self._gallery_info(gallery)
        keys = sorted(int(r["pk"]) for r in self.milvus.query(self.milvus.name("identities"), f"gallery_key == {record.key} and pk > {int(after_key)}", ["pk"]))
        rows = sorted(self.milvus.get(self.milvus.name("identities"), keys[: int(limit)], _IDENTITY_FIELDS), key=lambda r: r["pk"])
        return self._identity_records(record.embedding_dim, rows)

    def update_identity(self, gallery: str, identity_id: str, *, display_name: str | None = None, metadata: dict[str, str] | None = None) -> IdentityRecord:
        """Replace the display name and/or the whole metadata map (None leaves it). Raises NotFound."""
        record = self._gallery_info(gallery)
        identity_key = self._existing_identity(record.key, gallery, identity_id)
        (row,) = self.milvus.get(self.milvus.name("identities"), [identity_key], _IDENTITY_FIELDS)
        row = {**row, "gallery_key": record.key, "updated": time.time()}
        if display_name is not None:
            row["display_name"] = display_name
        if metadata is not None:
            row["metadata"] = _dump_metadata({str(k): str(v) for k, v in metadata.items()})
        self.milvus.upsert(self.milvus.name("identities"), [row])
        return self._identity_records(record.embedding_dim, [row])[0]

    def identity_names(self, identity_keys: Iterable[int]) -> dict[int, tuple[str, str]]:
        """``(identity_id, display_name)`` of each existing identity key (others left out)."""
        rows = self.milvus.get(self.milvus.name("identities"), list({int(k) for k in identity_keys}), ["pk", "identity_id", "display_name"])
        return {int(r["pk"]): (r["identity_id"], r["display_name"]) for r in rows}

    def identity_keys(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, int]:
        """The key of each existing identity id of a gallery (others left out). Raises NotFound."""
        key = int(self._gallery_row(gallery)["pk"])
        wanted = {key63(key, i): i for i in set(identity_ids)}
        return {wanted[int(r["pk"])]: int(r["pk"]) for r in self.milvus.get(self.milvus.name("identities"), list(wanted), ["pk"])}

    def identity_sample(self, gallery: str, limit: int) -> tuple[list[str], np.ndarray]:
        """Up to ``limit`` identities with the embedding of each one's first template,
        deterministic (identities ordered by a multiplicative hash of their key, as store.py's).
        Returns ``(identity_ids, x (n, D) float32)``. Raises NotFound."""
        record = self._gallery_info(gallery)
        keys = [int(r["pk"]) for r in self.milvus.query(self.milvus.name("identities"), f"gallery_key == {record.key}", ["pk"])]
        chosen = sorted(keys, key=lambda k: ((k * 2654435761) % 4294967296, k))[: int(limit)]
        first: dict[int, tuple[int, list[float]]] = {}
        for r in self._template_rows(record.embedding_dim, chosen, ["pk", "identity_key", "embedding"]):
            owner = int(r["identity_key"])
            if owner not in first or int(r["pk"]) < first[owner][0]:
                first[owner] = (int(r["pk"]), r["embedding"])
        chosen = [k for k in chosen if k in first]
        names = self.identity_names(chosen)
        x = np.array([first[k][1] for k in chosen], dtype=np.float32).reshape(len(chosen), record.embedding_dim)
        return [names[k][0] for k in chosen], x

    # -- reads for search and the index ------------------------------------------------------

    def identity_embeddings(self, gallery: str, identity_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Template ids ``(n,) int64`` ascending and embeddings ``(n, D) float32`` of one identity. Raises NotFound."""
        found = self.identities_embeddings(gallery, [identity_id]).get(identity_id)
        if found is None:
            raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {gallery!r}")
        return found

    def identities_embeddings(self, gallery: str, identity_ids: Iterable[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """identity id -> (template ids ascending, embeddings) of each existing identity. Raises NotFound."""
        row = self._gallery_row(gallery)
        key, dim = int(row["pk"]), int(row["doc"]["embedding_dim"])
        wanted = {key63(key, i): i for i in set(identity_ids)}
        groups: dict[str, list[tuple[int, list[float]]]] = {}
        for r in self._template_rows(dim, list(wanted), ["pk", "identity_key", "embedding"]):
            groups.setdefault(wanted[int(r["identity_key"])], []).append((int(r["pk"]), r["embedding"]))
        return {identity: _stack(rows, dim) for identity, rows in groups.items()}

    def identity_templates(self, gallery: str) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Every identity with its templates: ``(identity_id, template ids, x (n, D) float32)``."""
        row = self._gallery_row(gallery)
        key, dim = int(row["pk"]), int(row["doc"]["embedding_dim"])
        groups: dict[str, list[tuple[int, list[float]]]] = {}
        for r in self.milvus.iterate(self.milvus.templates(dim), f"gallery_key == {key}", ["pk", "identity_id", "embedding"]):
            groups.setdefault(r["identity_id"], []).append((int(r["pk"]), r["embedding"]))
        for identity, rows in groups.items():
            yield (identity, *_stack(rows, dim))

    def template_owners(self, template_ids: Iterable[int]) -> dict[int, TemplateOwner]:
        """The identity of each existing template id (ids that do not exist are left out)."""
        ids = [int(i) for i in template_ids]
        rows = []
        for collection in self._template_collections():
            rows.extend(self.milvus.get(collection, ids, ["pk", "identity_key", "identity_id"]))
        names = self.identity_names(int(r["identity_key"]) for r in rows)
        return {
            int(r["pk"]): TemplateOwner(int(r["pk"]), int(r["identity_key"]), r["identity_id"], names.get(int(r["identity_key"]), (r["identity_id"], ""))[1])
            for r in rows
        }

    def _template_collections(self) -> list[str]:
        dims = {int(r["doc"]["embedding_dim"]) for r in self.milvus.query(self.milvus.name("galleries"), "pk > 0", ["doc"])}
        return [self.milvus.templates(d) for d in sorted(dims)]

    def template_identity_keys(self, gallery: str) -> tuple[np.ndarray, np.ndarray]:
        """Every template of a gallery with its identity key, ascending template ids. Raises NotFound."""
        row = self._gallery_row(gallery)
        rows = self.milvus.query(self.milvus.templates(row["doc"]["embedding_dim"]), f"gallery_key == {int(row['pk'])}", ["pk", "identity_key"])
        both = np.array([(int(r["pk"]), int(r["identity_key"])) for r in rows], dtype=np.int64).reshape(-1, 2)
        both = both[np.argsort(both[:, 0])]
        return np.ascontiguousarray(both[:, 0]), np.ascontiguousarray(both[:, 1])

    def template_ids(self, gallery: str) -> np.ndarray:
        """Every template id of a gallery, ascending ``(n,) int64``. Raises NotFound."""
        return self.template_identity_keys(gallery)[0]

    def embeddings(self, gallery: str, template_ids: Iterable[int] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Template embeddings ``(ids (n,) int64, x (n, D) float32)``, ascending ids, in one block."""
        row = self._gallery_row(gallery)
        key, dim = int(row["pk"]), int(row["doc"]["embedding_dim"])
        collection = self.milvus.templates(dim)
        if template_ids is None:
            rows = list(self.milvus.iterate(collection, f"gallery_key == {key}", ["pk", "embedding"]))
        else:
            rows = [r for r in self.milvus.get(collection, sorted(int(i) for i in template_ids), ["pk", "gallery_key", "embedding"]) if int(r["gallery_key"]) == key]
        if rows:
            yield _stack([(int(r["pk"]), r["embedding"]) for r in rows], dim)

    def pull_changes(
        self, key: int, dim: int, held: dict[int, Head], heads: dict[int, Head], *, vectors: bool = True, identity_ids: bool = True
    ) -> PulledChanges:
        """The changes of every writer ``w`` with ``held[w].seq < seq <= heads[w].seq`` (``held``:
        what the caller's index holds, ``{}`` for nothing; ``heads``: from :meth:`gallery_state`)
        of the gallery with key ``key`` and embeddings of ``dim`` (as :meth:`gallery_state` just
        found it: no read of the gallery again): the templates they added that still exist, and
        the ids they removed. Templates are read before removals (a template deleted between the
        two reads is then also among the removed). A writer's few new changes are read by key
        (their template ids and removal rows); many, or the first pull, by a filter. A gallery
        deleted meanwhile yields no rows (the next ``gallery_state`` says it is gone).

        Rows become arrays as they arrive (:class:`_CoveredRows`), so a first pull holds about
        the arrays asked for: without ``vectors`` the embeddings are not read (``x`` is
        ``(n, 0)``: searches run in Milvus, :meth:`search_templates`), without ``identity_ids``
        the identities' names are not (``[]``)."""
        lanes = [(w, held.get(w, NO_HEAD), h) for w, h in heads.items() if h.seq > held.get(w, NO_HEAD).seq]
        bounds = {w: (a.seq, h.seq) for w, a, h in lanes}
        fields = ["pk", "gallery_key", "identity_key", *(["identity_id"] if identity_ids else []), *(["embedding"] if vectors else []), "writer", "seq"]
        added = _CoveredRows(key, bounds, dim, vectors=vectors, identity_ids=identity_ids)
        removals: list[dict[str, Any]] = []
        by_filter = []
        for w, a, h in lanes:
            if held and h.written - a.written <= _PULL_BY_KEY_IDS and h.seq - a.seq <= _PULL_BY_KEY_CHANGES:
                ids = ((w << 32) | np.arange(a.written, h.written, dtype=np.int64)).tolist()
                added.take(self.milvus.get(self.milvus.templates(dim), ids, fields))
            else:
                by_filter.append(f"(writer == {w} and seq > {a.seq} and seq <= {h.seq})")
        if by_filter:
            added.take(self.milvus.iterate(self.milvus.templates(dim), f"gallery_key == {key} and ({' or '.join(by_filter)})", fields, batch=_PULL_BATCH))
        for w, a, h in lanes:  # after the templates
            if held and h.seq - a.seq <= _PULL_BY_KEY_CHANGES:
                removals.extend(self._removal_rows(key, w, range(a.seq + 1, h.seq + 1)))
        if by_filter:
            removals.extend(self.milvus.query(self.milvus.name("removals"), f"gallery_key == {key} and ({' or '.join(by_filter)})", ["writer", "seq", "template_ids"]))
        removed = {int(i) for r in removals if _within(r, bounds) for i in r["template_ids"]}
        return PulledChanges(*added.arrays(), np.array(sorted(removed), dtype=np.int64), {**held, **{w: h for w, _, h in lanes}})

    def search_templates(self, key: int, dim: int, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest templates in Milvus of each probe ``x`` ``(n, dim) float32`` among the
        gallery with key ``key`` (its partition key; exact, the collection's FLAT index), at
        Strong consistency, so every template acknowledged anywhere before the call is searched.

        Returns ``D (n, k) float32`` plain L2 distances, ascending, and ``I (n, k) int64``
        template ids, +inf and -1 past the hits found (at most milvus_client.py
        :data:`SEARCH_LIMIT`). The rows returned may include templates of a change not yet
        committed (its head not written): the caller keeps only those it holds.
        Raises BackendUnavailable when Milvus cannot be reached."""
        n, limit = len(x), min(int(k), SEARCH_LIMIT)
        D, I = np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64)
        if n == 0:
            return D, I
        collection, per_call = self.milvus.templates(dim), max(1, min(1024, _SEARCH_HITS_PER_CALL // limit))
        found = [hits for start in range(0, n, per_call) for hits in self.milvus.search(collection, x[start : start + per_call], f"gallery_key == {key}", limit)]
        for row, hits in enumerate(found):
            if hits:
                ids, squared = zip(*hits, strict=True)
                I[row, : len(ids)] = ids
                D[row, : len(ids)] = np.sqrt(np.maximum(squared, 0.0))
        return D, I

    def template_vectors(self, dim: int, template_ids: np.ndarray) -> np.ndarray:
        """The embeddings ``(n, dim) float32`` of templates ``(n,) int64``, in that order (read
        :data:`_PULL_BATCH` at a time). Raises TemplateNotFound for an id Milvus does not hold."""
        ids = np.asarray(template_ids, dtype=np.int64)
        x = np.zeros((len(ids), dim), np.float32)
        for start in range(0, len(ids), _PULL_BATCH):
            chunk = ids[start : start + _PULL_BATCH].tolist()
            rows = {int(r["pk"]): r["embedding"] for r in self.milvus.get(self.milvus.templates(dim), chunk, ["pk", "embedding"])}
            missing = [i for i in chunk if i not in rows]
            if missing:
                raise TemplateNotFound(f"templates {missing[:5]} do not exist")
            x[start : start + len(chunk)] = [rows[i] for i in chunk]
        return x

    def _removal_rows(self, key: int, writer: int, seqs: range) -> list[dict[str, Any]]:
        """The ``removals`` rows of a writer's changes ``seqs`` by key: part 0 of each, then the
        next part of every full one (over :data:`_REMOVAL_ROW_IDS` ids)."""
        fields = ["writer", "seq", "template_ids"]
        parts = {s: 0 for s in seqs}
        rows: list[dict[str, Any]] = []
        while parts:
            found = self.milvus.get(self.milvus.name("removals"), [key63(key, writer, s, p) for s, p in parts.items()], fields)
            rows.extend(found)
            parts = {int(r["seq"]): parts[int(r["seq"])] + 1 for r in found if len(r["template_ids"]) == _REMOVAL_ROW_IDS}
        return rows

    def changes_since(self, gallery: str, seq: int) -> list[Change]:
        """No change log to replay snapshots from (servers keep no snapshots): always empty."""
        self._gallery_row(gallery)
        return []

    def prune_changes(self, gallery: str, upto_seq: int) -> int:
        """Nothing to prune (:meth:`changes_since`)."""
        return 0

    def export_templates(self, gallery: str) -> Iterator[ExportedTemplate]:
        """Every template of a gallery with its identity's data, by template id (read in pages:
        unlike the SQLite store, not one consistent state while writers go on)."""
        row = self._gallery_row(gallery)
        key, dim = int(row["pk"]), int(row["doc"]["embedding_dim"])
        identities = {int(r["pk"]): r for r in self.milvus.iterate(self.milvus.name("identities"), f"gallery_key == {key}", _IDENTITY_FIELDS)}
        rows = sorted(self.milvus.iterate(self.milvus.templates(dim), f"gallery_key == {key}", ["pk", "identity_key", *_TEMPLATE_FIELDS[2:]]), key=lambda r: r["pk"])
        for r in rows:
            identity = identities.get(int(r["identity_key"]))
            if identity is None:
                continue
            embedding = np.asarray(r["embedding"], np.float32)
            yield ExportedTemplate(identity["identity_id"], identity["display_name"], _load_metadata(identity["metadata"]), int(r["pk"]),
                                   embedding, r["source_sha256"], r["created"], load_face(r["face"] or None, embedding))

    # -- enroll request ids ------------------------------------------------------------------

    def _remembered(self, key: int, dim: int, request_id: str) -> RememberedEnroll | None:
        rows = self.milvus.get(self.milvus.name("requests"), [key63(key, request_id)], ["doc"])
        if not rows or rows[0]["doc"]["created"] < time.time() - REQUEST_ID_RETENTION_S:
            return None
        doc = rows[0]["doc"]
        templates = self.milvus.get(self.milvus.templates(dim), [int(doc["template_id"])], _TEMPLATE_FIELDS)
        if not templates:
            return None
        return RememberedEnroll(request_id, doc["fingerprint"], _template_record(templates[0]), bool(doc["identity_created"]), doc["duplicate"], doc["created"])

    def remembered_enroll(self, gallery: str, request_id: str) -> RememberedEnroll | None:
        """The Enroll request remembered under ``request_id`` with its template, or None. Raises NotFound."""
        row = self._gallery_row(gallery)
        return self._remembered(int(row["pk"]), int(row["doc"]["embedding_dim"]), request_id)

    # -- API keys (keys.py) ------------------------------------------------------------------

    def _key_rows(self, expr: str) -> list[dict[str, Any]]:
        return self.milvus.query(self.milvus.name("api_keys"), expr, ["pk", "key_id", "doc"])

    def insert_api_key(self, record: ApiKeyRecord, salt: bytes, hash: bytes) -> None:
        """Store a new key's row. Raises AlreadyExists when its name is taken (revoked keys too)."""
        pk = key63("api-key", record.name)
        if self.milvus.get(self.milvus.name("api_keys"), [pk], ["pk"]):
            raise AlreadyExists(f"an API key named {record.name!r} already exists", field="name")
        doc = {**record.to_json(), "salt": salt.hex(), "hash": hash.hex()}
        self.milvus.insert(self.milvus.name("api_keys"), [{"pk": pk, "key_id": record.key_id, "doc": doc}])

    def api_keys_by_id(self, key_id: str) -> list[StoredKey]:
        """The rows (with salt and hash) whose lookup id is ``key_id``, revoked ones too."""
        if not key_id.replace("-", "").replace("_", "").isalnum():
            return []  # not an id keys.py makes (token_urlsafe characters)
        return [StoredKey(ApiKeyRecord.from_json(r["doc"]), bytes.fromhex(r["doc"]["salt"]), bytes.fromhex(r["doc"]["hash"])) for r in self._key_rows(f'key_id == "{key_id}"')]

    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key (no secrets), by name."""
        return sorted((ApiKeyRecord.from_json(r["doc"]) for r in self._key_rows("pk > 0")), key=lambda k: k.name)

    def revoke_api_key(self, name: str, when: float) -> ApiKeyRecord:
        """Mark the key ``name`` revoked at ``when`` (an already revoked key keeps its time). Raises KeyNotFound."""
        rows = self.milvus.get(self.milvus.name("api_keys"), [key63("api-key", name)], ["pk", "key_id", "doc"])
        if not rows:
            raise KeyNotFound(f"no API key named {name!r}")
        row = rows[0]
        if row["doc"]["revoked"] is None:
            row = {**row, "doc": {**row["doc"], "revoked": when}}
            self.milvus.upsert(self.milvus.name("api_keys"), [row])
        return ApiKeyRecord.from_json(row["doc"])

    def has_api_keys(self) -> bool:
        """True once any key was created (revoked ones count, as store.py's)."""
        return bool(self.milvus.query(self.milvus.name("api_keys"), "pk > 0", ["pk"], limit=1))


def _dump_metadata(metadata: dict[str, str]) -> str:
    """An identity's metadata as the text of its VARCHAR(65535) field: JSON (UTF-8 kept as is),
    or, when escaping makes it longer (control characters take 6 bytes each, so the 16 KiB that
    validation.py allows can grow past the field), ``b64:`` + base64 of its zlib-compressed JSON."""
    text = json.dumps(metadata, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) <= _METADATA_FIELD_BYTES:
        return text
    return _PACKED + base64.b64encode(zlib.compress(text.encode(), 9)).decode("ascii")


def _load_metadata(text: str) -> dict[str, str]:
    """The metadata :func:`_dump_metadata` wrote."""
    if text.startswith(_PACKED):
        text = zlib.decompress(base64.b64decode(text[len(_PACKED) :])).decode()
    return json.loads(text)


def _identity_row(row: dict[str, Any]) -> dict[str, Any]:
    """An identities row to upsert (its ``_IDENTITY_FIELDS``, metadata as JSON text) from one as
    read or as built by ``add_templates`` (metadata a dict)."""
    out = {k: row[k] for k in _IDENTITY_FIELDS}
    if isinstance(out["metadata"], dict):
        out["metadata"] = _dump_metadata(out["metadata"])
    return out


class _CoveredRows:
    """Template rows pulled for the changes ``bounds`` covers (:func:`_within`) of the gallery
    ``key``, kept as arrays batch by batch as they arrive: pymilvus gives each row as a dict, an
    embedding as a list of Python floats (~32 bytes a value), which a first pull of 1M templates
    would hold all at once (~4 GB at D = 128) instead of the 0.5 GB of the embeddings."""

    def __init__(self, key: int, bounds: dict[int, tuple[int, int]], dim: int, *, vectors: bool, identity_ids: bool) -> None:
        self._key, self._bounds, self._dim = key, bounds, dim
        self._vectors, self._identity_ids = vectors, identity_ids
        self._ids: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._names: list[str] = []
        self._x: list[np.ndarray] = []

    def take(self, rows: Iterable[dict[str, Any]]) -> None:
        """Keep the covered ones of ``rows``."""
        rows = iter(rows)
        while batch := list(itertools.islice(rows, _PULL_BATCH)):
            covered = [r for r in batch if int(r["gallery_key"]) == self._key and _within(r, self._bounds)]
            del batch
            self._ids.append(np.array([int(r["pk"]) for r in covered], dtype=np.int64))
            self._keys.append(np.array([int(r["identity_key"]) for r in covered], dtype=np.int64))
            if self._identity_ids:
                self._names.extend(r["identity_id"] for r in covered)
            if self._vectors:
                self._x.append(np.array([r["embedding"] for r in covered], dtype=np.float32).reshape(len(covered), self._dim))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """``(template_ids, identity_keys, identity_ids, x)`` by ascending template id (``x``
        ``(n, 0)`` without vectors, ``identity_ids`` empty without them)."""
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        order = np.argsort(ids, kind="stable")
        keys = np.concatenate(self._keys)[order] if self._keys else np.zeros(0, np.int64)
        names = [self._names[i] for i in order] if self._identity_ids else []
        x = np.concatenate(self._x)[order] if self._vectors and self._x else np.zeros((len(ids), self._dim if self._vectors else 0), np.float32)
        return ids[order], keys, names, x


def _within(row: dict[str, Any], bounds: dict[int, tuple[int, int]]) -> bool:
    """Whether a row's (writer, seq) falls in its writer's ``(held, head]`` of ``bounds``."""
    low, high = bounds.get(int(row["writer"]), (0, 0))
    return low < int(row["seq"]) <= high


def _stack(rows: Sequence[tuple[int, list[float]]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = sorted(rows, key=lambda r: r[0])
    return np.array([r[0] for r in rows], dtype=np.int64), np.array([r[1] for r in rows], dtype=np.float32).reshape(len(rows), dim)


def _template_record(row: dict[str, Any]) -> TemplateRecord:
    embedding = np.asarray(row["embedding"], np.float32)
    return TemplateRecord(int(row["pk"]), row["identity_id"], embedding, row["source_sha256"], load_face(row["face"] or None, embedding), row["created"])
