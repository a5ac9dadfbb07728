"""One gallery's vector index, kept equal to the gallery's templates in the store.

:class:`IndexedGallery` owns the index of one gallery, the gallery's read-write lock, and its
change sequence; every template write of the gallery goes through it, so that:

* A write commits to the store first (durable on return), then applies the same change to the
  index, then returns, all under the gallery's write lock; the newest change the index holds is
  then the store's ``last_seq`` of the gallery. Should the index refuse a committed change, it is
  reloaded from the store, which has the change (snapshot.py ``open_gallery_index``), and the
  error is re-raised.
* A search holds the read lock, so it sees every write completely or not at all; searches run
  in parallel.
* A snapshot (:meth:`IndexedGallery.snapshot`) holds the read lock only while it copies the index
  in memory (``VectorIndex.copy``, about ``ntotal * d * 4`` bytes for a flat index); serializing,
  checksumming, writing and fsyncing the copy happen after the lock is released. Searches run
  beside the copy; a write waits for it, and, the lock preferring writers, so does a search that
  arrives while that write waits. A snapshot lock of its own keeps snapshots of one gallery one
  at a time and lets :meth:`IndexedGallery.delete` remove the file after an in-flight write.
  Galleries searching mean templates snapshot the means index beside it.
* The index kind follows the gallery's size (ann_index.py ``IndexPlan``: exact, then IVF-Flat
  past ``approximate_above`` templates, retrained as it grows). A rebuild never holds the lock
  while it trains: a background thread copies the vectors out under the read lock
  (``RebuildableIndex.start_rebuild``, like a snapshot's copy), builds the new index with no
  lock held (one faiss thread, ann_index.py ``IndexPlan.build``), then takes the write lock to
  replay the writes recorded meanwhile and swap it in (milliseconds). Searches and writes go on
  throughout, on the old index.

* On a store other servers write too (``store.shared``: the milvus backend, milvus_store.py)
  there are no snapshots: the index starts empty and pulls every change, and before every call
  the manager has it :meth:`IndexedGallery.sync` with the store: one small read of the gallery's
  row and its writers' heads, then, when another writer's head moved, its new changes (read by
  key), applied under the write lock. Its own writes are applied as above.

Thread-safe. Distances are Euclidean (L2); arrays are float32 embeddings of ``embedding_dim``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar
from pathlib import Path

import numpy as np

from facegallery.server.contract.errors import GalleryClosed, GalleryNotFound, NotFound
from facegallery.server.contract.timing import record, timed
from facegallery.server.gallery.decision import Aggregation, Calibration, DecisionPolicy, DecisionStatus, FalseMatchCurve
from facegallery.server.gallery.identity_means import IdentityMeans
from facegallery.server.gallery.ann_index import APPROXIMATE_ABOVE, NPROBE, IndexPlan, RebuildableIndex
from facegallery.server.gallery.index import DEFAULT_FACTORY, VectorIndex
from facegallery.server.gallery.milvus_index import MilvusIndex
from facegallery.server.gallery.open_set import OpenSetScorer, ScoredHit
from facegallery.server.gallery.owners import NO_OWNER, TemplateOwners
from facegallery.server.gallery.rwlock import ReadWriteLock
from facegallery.server.gallery.snapshot import (
    SnapshotHeader,
    means_snapshot_path,
    open_gallery_index,
    open_identity_means,
    snapshot_path,
    write_snapshot,
)
from facegallery.server.gallery.store import AddedTemplate, GalleryRecord, Head, IdempotentRequest, NewTemplate, NO_HEAD, TemplateStore

__all__ = ["IndexedGallery"]

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def _empty_index(plan: IndexPlan, dim: int) -> VectorIndex:
    """An index of no templates, of the kind ``plan`` gives a new gallery (exact)."""
    return plan.build(dim, np.zeros(0, np.int64), np.zeros((0, dim), np.float32))


def _index_plan(options: dict[str, object]) -> IndexPlan:
    """The IndexPlan of IndexedGallery's index keywords (``factory``, ``approximate_above``, ``nprobe``)."""
    return IndexPlan(options.get("factory", DEFAULT_FACTORY), options.get("approximate_above", APPROXIMATE_ABOVE), options.get("nprobe", NPROBE))  # type: ignore[arg-type]


class IndexedGallery:
    """A loaded gallery: its settings, its index, and the bookkeeping that keeps both current.

    Build one with :meth:`load` (an existing gallery) or :meth:`empty` (a gallery just created).

    Attributes
    ----------
    key : int
        The store's key of the gallery (never reused).
    name, model_id : str
        The gallery's name, and the embedding id of its templates (manifest.py
        ``ModelManifest.embedding_id``).
    threshold : float
        The gallery's L2 threshold: its fixed threshold, or the model's 1:1 one under a target
        FPIR (verify uses it).
    scorer : OpenSetScorer
        Scores and calibration under the gallery's decision policy (open_set.py).
    embedding_dim : int
        Length D of the gallery's embeddings.
    snapshot_file : Path
        Where the gallery's index snapshot is written (its means: ``gallery-<key>-means.fgidx``
        beside it).

    Parameters of the index (ann_index.py ``IndexPlan``): ``factory``, the faiss factory of exact
    indexes; ``approximate_above``, the templates (identities, for the means) from which search is
    approximate (None: always exact); ``nprobe``, IVF lists scanned per query. ``means``: the
    gallery's mean templates when already loaded (:meth:`load`), else built from the store under
    a policy of mean templates. ``owners``: the identity of each template (owners.py), when
    already read from the store, else read here. ``search_in_store``: a shared store's galleries
    are searched by the store (the milvus backend's Milvus: milvus_index.py), holding no
    embeddings in memory, instead of a faiss index of them.
    """

    def __init__(
        self,
        store: TemplateStore,
        record: GalleryRecord,
        index: VectorIndex,
        *,
        snapshot_file: Path,
        factory: str = DEFAULT_FACTORY,
        approximate_above: int | None = APPROXIMATE_ABOVE,
        nprobe: int = NPROBE,
        means: IdentityMeans | None = None,
        owners: TemplateOwners | None = None,
        curve: FalseMatchCurve | None = None,
        fallback_threshold: float | None = None,
        search_in_store: bool = False,
    ) -> None:
        self.key = record.key
        self.name = record.name
        self.model_id = record.model_id
        self.threshold = record.threshold
        self.embedding_dim = record.embedding_dim
        self.snapshot_file = snapshot_file
        self._store = store
        self._plan = _index_plan({"factory": factory, "approximate_above": approximate_above, "nprobe": nprobe})
        self._index = RebuildableIndex(index)
        self._lock = ReadWriteLock()  # index, means, applied_seq, layout, rebuilds; deleted, closed
        self._snapshot_lock = threading.Lock()  # snapshot_state and the snapshot files
        self._applied_seq = record.last_seq  # newest change the index holds
        self._layout = 0  # index swaps (rebuilds, reloads, policy changes) so far
        self._snapshot_state = (-1, -1)  # (seq, layout) on disk in a snapshot ((-1, -1): none written by us)
        self._deleted = False
        self._closed = False  # close(): every later call raises GalleryClosed
        self._version = 0  # templates added + removed since loaded (open_set.py staleness)
        self._rebuilds: set[RebuildableIndex] = set()  # indexes being rebuilt in the background
        self._means_file = means_snapshot_path(snapshot_file.parent, record.key)
        #: a store other servers write too (the milvus backend): calls first :meth:`sync`
        self._shared = bool(getattr(store, "shared", False))
        if search_in_store and not self._shared:
            raise ValueError("search_in_store needs a shared store (the milvus backend)")
        self._search_in_store = search_in_store
        self._held: dict[int, Head] = {}  # shared store: writer -> newest of its changes the index holds
        # template id -> identity key of every template (owners.py; searches group hits by it)
        self._owners = owners if owners is not None else TemplateOwners(*store.template_identity_keys(record.name))
        # mean templates (identity_means.py) under Aggregation.MEAN
        self._means = means if means is not None or record.policy.aggregation is not Aggregation.MEAN else self._build_means(record.policy)
        self.scorer = OpenSetScorer(
            record.name,
            store,
            record.policy,
            curve,
            fallback_threshold=record.threshold if fallback_threshold is None else fallback_threshold,
            identity_vectors=self._identity_vectors,
            owners=self._owners,
            applied_seq=lambda: self._applied_seq,
        )
        self.scorer.restore_calibration()

    @classmethod
    def load(cls, store: TemplateStore, record: GalleryRecord, *, index_dir: str | os.PathLike, **options: object) -> IndexedGallery:
        """The gallery of ``record`` with its index (and means) from the snapshots in ``index_dir``
        plus the store's newer changes, or rebuilt from the store (snapshot.py
        ``open_gallery_index``); an index that no longer fits its size is then rebuilt in the
        background. ``options``: the constructor's keywords (index parameters, ``curve``: the
        model's false-match curve, ``fallback_threshold``: the model's L2 threshold).

        The means and the template owners load in other threads beside the template index:
        reading, checksumming and deserializing a snapshot mostly runs without the GIL, so a 1M
        gallery of mean templates starts in about the time of one index (docs/scale.md)."""
        path = snapshot_path(index_dir, record.key)
        if getattr(store, "shared", False):
            return cls._followed(store, record, path, options)
        plan = _index_plan(options)
        with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix=f"load-{record.name}") as pool:
            means = None
            if record.policy.aggregation is Aggregation.MEAN:
                means = pool.submit(open_identity_means, store, record, means_snapshot_path(index_dir, record.key), plan)
            owners = pool.submit(store.template_identity_keys, record.name)
            index = open_gallery_index(store, record, path, plan, template_ids=lambda: owners.result()[0])
            loaded = means.result() if means is not None else None
            held = TemplateOwners(*owners.result())
        gallery = cls(store, record, index, snapshot_file=path, means=loaded, owners=held, **options)  # type: ignore[arg-type]
        with gallery._lock.write():
            gallery._schedule_rebuilds()
        return gallery

    @classmethod
    def _followed(cls, store: TemplateStore, record: GalleryRecord, path: Path, options: dict[str, object]) -> IndexedGallery:
        """A gallery of a shared store (no snapshots): empty, then every change pulled (:meth:`sync`)."""
        started = time.perf_counter()
        plan = _index_plan(options)
        none = np.zeros(0, np.int64)  # the means, if any, are built from the empty index (_build_means)
        owners = TemplateOwners(none, none)
        index = MilvusIndex(store, record.key, record.embedding_dim, owners) if options.get("search_in_store") else _empty_index(plan, record.embedding_dim)  # type: ignore[arg-type]
        gallery = cls(store, record, index, snapshot_file=path, owners=owners, **options)  # type: ignore[arg-type]
        gallery.sync()
        gallery._version = 0  # the restored calibration's age counts from the load (store's load_calibration)
        LOG.info("gallery %r: %d templates pulled from the shared store in %.3f s", record.name, gallery._index.ntotal, time.perf_counter() - started)
        return gallery

    @classmethod
    def empty(cls, store: TemplateStore, record: GalleryRecord, *, index_dir: str | os.PathLike, **options: object) -> IndexedGallery:
        """A gallery just created in the store (no templates), with an empty exact index;
        ``options`` as :meth:`load`'s."""
        plan = _index_plan(options)
        index = _empty_index(plan, record.embedding_dim)
        return cls(store, record, index, snapshot_file=snapshot_path(index_dir, record.key), **options)  # type: ignore[arg-type]

    # -- reads -------------------------------------------------------------------------------

    def _build_means(self, policy: DecisionPolicy) -> IdentityMeans | None:
        if policy.aggregation is not Aggregation.MEAN:
            return None
        if self._shared:  # from the templates this index holds, never from rows another server's change does not cover yet
            ids, x = self._index.items()
            return IdentityMeans.from_templates(self._store, self.name, ids, x, self._owners.identity_keys(ids), self._plan, held=self._holds_templates)
        return IdentityMeans.build(self._store, self.name, self.embedding_dim, self._plan)

    @property
    def _searched(self) -> VectorIndex:
        """The index searches go to: the mean templates, or the templates."""
        return self._means.index if self._means is not None else self._index

    def _identity_vectors(self, identity_id: str) -> np.ndarray:
        """The vectors standing for an identity in ``_searched`` (read lock held)."""
        if self._means is not None:
            return self._means.vector(identity_id)
        return self._store.identity_embeddings(self.name, identity_id)[1]

    def identify(self, x: np.ndarray, top_k: int, *, exclude: list[str | None] | None = None) -> tuple[list[list[ScoredHit]], Calibration]:
        """The ``top_k`` best-scored identities of each probe ``x`` ``(n, D) float32`` under the
        gallery's policy, with the calibration they are decided with (open_set.py ``score``;
        ``exclude[i]`` leaves an identity out of probe i's search). Raises NotFound when deleted."""
        calibration = self.scorer.calibration(self._read)
        with self._lock.read():
            self._check_live()
            with timed("search"):
                scored = self.scorer.score(self._searched, x, top_k, version=self._version, kind=calibration.score_kind, exclude=exclude)
        return scored, calibration

    def _read(self, fn: Callable[[VectorIndex, int], T]) -> T:
        """``fn(searched index, change counter)`` under the read lock (open_set.py ``Reader``)."""
        with self._lock.read():
            self._check_live()
            return fn(self._searched, self._version)

    def decision_status(self, *, wait_s: float | None = None) -> DecisionStatus:
        """The policy, score kind, threshold and estimated FPIR the gallery decides with now.

        ``wait_s``: the longest wait, seconds, for a recalibration after a large change (None:
        as long as it takes); past it the previous calibration is reported with ``recalibrating``
        set (open_set.py ``OpenSetScorer.latest_calibration``)."""
        if wait_s is None:
            cal, recalibrating = self.scorer.calibration(self._read), False
        else:
            cal, recalibrating = self.scorer.latest_calibration(self._read, wait_s)
        return DecisionStatus(
            self.scorer.policy, cal.score_kind, cal.threshold, cal.estimated_fpir(cal.threshold), cal.identities, cal.basis, recalibrating
        )

    def duplicates(self) -> tuple[list[tuple[str, ScoredHit]], Calibration]:
        """Every identity whose best-scored other identity is within the threshold: the gallery's
        decision rule with each identity's first template as the probe (one search per identity).
        Returns ``(identity_id, best other)`` pairs and the calibration."""
        cal = self.scorer.calibration(self._read)
        identities = self._store.get_gallery(self.name).identity_count
        found = self.scorer.leave_one_out(self._read, identities, kind=cal.score_kind)
        return [(identity, best) for identity, best in found if best is not None and best.score <= cal.threshold], cal

    def identity_embeddings(self, identity_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Template ids ``(n,) int64`` and embeddings ``(n, D) float32`` of one identity.

        Raises NotFound for an unknown identity or a deleted gallery.
        """
        with self._lock.read():
            self._check_live()
            return self._store.identity_embeddings(self.name, identity_id)

    def template_ids(self) -> np.ndarray:
        """Template ids the index holds, ascending ``(n,) int64`` (for consistency checks)."""
        with self._lock.read():
            return self._index.ids()

    # -- writes ------------------------------------------------------------------------------

    def set_policy(self, policy: DecisionPolicy, threshold: float) -> GalleryRecord:
        """Store and apply a new decision policy (checked by the caller) with the gallery's L2
        ``threshold`` (the policy's, or the model's); returns the gallery."""
        with self._lock.write():
            self._check_live()
            record = self._store.set_policy(self.name, policy, threshold)
            self.threshold = record.threshold
            if policy.aggregation is not self.scorer.policy.aggregation:
                self._means = self._build_means(policy)
                self._layout += 1
                self._schedule_rebuilds()
            self.scorer.set_policy(policy)
        return record

    def add_templates(
        self, items: Sequence[NewTemplate], *, skip_duplicates: bool = False, request: IdempotentRequest | None = None
    ) -> list[AddedTemplate | None]:
        """Store templates in one transaction, then add the stored ones to the index.

        ``items`` carry checked ``(D,) float32`` embeddings. With ``skip_duplicates`` a template
        whose identity already has the same embedding is not stored (None in the result); with
        ``request`` (one item) its Enroll idempotency key is remembered with it (store.py).
        Returns one entry per item once they are durable and searchable.

        Raises NotFound when the gallery has been deleted; EnrollReplayed when ``request``'s id
        was stored first by a concurrent call.
        """
        with self._lock.write():
            self._check_live()
            results, seq = self._store.add_templates(self.name, items, skip_duplicates=skip_duplicates, request=request)
            stored = [(r, item) for r, item in zip(results, items, strict=True) if r is not None]
            if stored:
                ids = np.array([r.template_id for r, _ in stored], dtype=np.int64)
                keys = np.array([r.identity_key for r, _ in stored], dtype=np.int64)
                x = np.stack([item.embedding for _, item in stored])
                created = {r.identity_key for r, _ in stored if r.identity_created}
                new = np.fromiter((r.identity_key in created for r, _ in stored), dtype=bool, count=len(stored))
                existing = {item.identity_id for (r, item), is_new in zip(stored, new) if not is_new}
                self._apply(seq, add=(ids, x, keys), identities=existing, created=new)
                self._held_own(seq)
        return results

    def delete_identity(self, identity_id: str) -> int:
        """Delete an identity and its templates from store and index; returns how many templates.

        Raises NotFound for an unknown identity or a deleted gallery.
        """
        with self._lock.write():
            self._check_live()
            ids, seq = self._store.delete_identity(self.name, identity_id)
            self._apply(seq, remove=ids, identities={identity_id})
            self._held_own(seq)
            self.scorer.forget(identity_id)
        return len(ids)

    def delete_template(self, template_id: int) -> bool:
        """Delete one template from store and index; True when its identity had no other and was
        deleted too. Raises NotFound for a template not in the gallery or a deleted gallery."""
        with self._lock.write():
            self._check_live()
            owner = self._store.template_owners([template_id]).get(template_id)
            identity_deleted, seq = self._store.delete_template(self.name, template_id)
            self._apply(seq, remove=np.array([template_id], dtype=np.int64), identities={owner.identity_id} if owner else set())
            self._held_own(seq)
        return identity_deleted

    def delete(self, *, only_if_empty: bool = False) -> tuple[int, int] | None:
        """Delete the gallery from the store, then its snapshot file (after an in-flight write of
        it); every later call on this object raises NotFound.

        Returns ``(deleted_identities, deleted_templates)``; with ``only_if_empty``, None (and
        nothing deleted) when the gallery holds a template, decided under the write lock so no
        concurrent enrollment is lost. Raises NotFound when already deleted.
        """
        with self._lock.write():
            self._check_live()
            if only_if_empty and self._index.ntotal > 0:
                return None
            if only_if_empty and self._shared and self._store.get_gallery(self.name).template_count > 0:  # enrolled on another server
                return None
            counts = self._store.delete_gallery(self.name)
            self._deleted = True
        with self._snapshot_lock:
            self.snapshot_file.unlink(missing_ok=True)
            self._means_file.unlink(missing_ok=True)
        return counts

    def _apply(
        self,
        seq: int,
        *,
        add: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        remove: np.ndarray | None = None,
        identities: Collection[str] = (),
        created: np.ndarray | None = None,
    ) -> None:
        """Apply committed change ``seq`` to the index and the template owners (write lock held):
        ``add`` = (template ids, x, identity keys), ``remove`` = template ids; ``identities``
        whose templates changed (their mean templates are recomputed from the store under
        Aggregation.MEAN); ``created``, a ``(len(add[0]),) bool`` mask of the added rows whose
        identity the change created (their means come from those rows). Then starts a background
        rebuild of an index that no longer fits its size (:meth:`_schedule_rebuilds`).

        Should the index refuse it, the index (and the means) are reloaded from the store, which
        has the change, and the error is re-raised.
        """
        try:
            if remove is not None:
                self._index.remove(remove)
                self._owners.remove(remove)
            if add is not None:
                self._index.add(add[0], add[1])
                self._owners.add(add[0], add[2])
            if self._means is not None:
                fresh = None if add is None or created is None else (add[0][created], add[1][created], add[2][created])
                self._means.refresh(identities, removed=remove, created=fresh)
        except Exception:
            LOG.exception("gallery %r: applying change %d to the index failed; reloading it from the store", self.name, seq)
            if self._shared:  # the next sync pulls everything into an empty index
                self._reset_followed()
                raise
            record = self._store.get_gallery(self.name)
            template_ids, identity_keys = self._store.template_identity_keys(self.name)
            self._owners.reset(template_ids, identity_keys)
            self._index = RebuildableIndex(open_gallery_index(self._store, record, self.snapshot_file, self._plan, template_ids=lambda: template_ids))
            self._means = self._build_means(self.scorer.policy)
            self._applied_seq = record.last_seq
            self._layout += 1
            raise
        self._applied_seq = seq
        self._version += (0 if remove is None else len(remove)) + (0 if add is None else len(add[0]))
        self._schedule_rebuilds()

    # -- following other servers (shared store) ----------------------------------------------

    def sync(self) -> None:
        """Bring the gallery up to date with what other servers wrote (a shared store, the
        ``milvus`` backend; nothing otherwise): its deletion, a new policy, and every change of
        another writer that its head in the store shows and the index does not hold yet
        (milvus_store.py ``pull_changes``), applied under the write lock. Costs one small read
        (``gallery_state``) when nothing changed. The manager calls it before every call on the
        gallery, so a search sees every change acknowledged anywhere before it (Strong reads).

        Raises GalleryNotFound when the gallery was deleted (or re-created) elsewhere;
        BackendUnavailable when the store cannot be reached."""
        if not self._shared:
            return
        self._check_live()
        try:
            state = self._store.gallery_state(self.name, self.key)  # type: ignore[attr-defined]
        except GalleryNotFound:
            with self._lock.write():
                self._deleted = True
            raise
        if state.policy != self.scorer.policy:
            self._adopt_policy(state.policy, state.threshold)
        if self._behind(state.heads):
            with self._lock.write():
                self._check_live()
                if self._behind(state.heads):  # not pulled by a concurrent call meanwhile
                    self._pull(state.heads)

    def _holds_templates(self, template_ids: np.ndarray) -> np.ndarray:
        """Which template ids ``(n,) int64`` the index holds, ``(n,) bool``."""
        return self._owners.identity_keys(template_ids) != NO_OWNER

    def _behind(self, heads: dict[int, Head]) -> bool:
        return any(head.seq > self._held.get(writer, NO_HEAD).seq for writer, head in heads.items())

    def _pull(self, heads: dict[int, Head]) -> None:
        """Apply the other writers' changes up to ``heads`` (write lock held); idempotent: templates
        the index holds already, and removals of templates it does not hold, are skipped."""
        means = self._means is not None  # what the changes' identities are needed for
        pulled = self._store.pull_changes(  # type: ignore[attr-defined]
            self.key, self.embedding_dim, self._held, heads, vectors=means or not self._search_in_store, identity_ids=means
        )
        new = self._owners.identity_keys(pulled.template_ids) == NO_OWNER
        removed_keys = self._owners.identity_keys(pulled.removed)
        held = removed_keys != NO_OWNER
        gone, gone_keys = pulled.removed[held], removed_keys[held]
        ids, keys, x = pulled.template_ids[new], pulled.identity_keys[new], pulled.x[new]
        if len(ids) or len(gone):
            identities: set[str] = set()  # whose means are recomputed from the store; new ones come from these rows
            created = None
            if means:
                known = self._owners.holds_identities(keys)
                new_ids = [identity for identity, is_new in zip(pulled.identity_ids, new, strict=True) if is_new]
                identities = {identity for identity, in_index in zip(new_ids, known, strict=True) if in_index}
                identities |= {identity for identity, _ in self._store.identity_names(gone_keys).values()}
                created = ~known if len(ids) else None
            self._apply(self._applied_seq, add=(ids, x, keys) if len(ids) else None, remove=gone if len(gone) else None, identities=identities, created=created)
        self._held = dict(pulled.heads)

    def _held_own(self, seq: int) -> None:
        """After this server's own change ``seq`` of a shared store: the index holds it (a gap,
        from an own change that failed after it was written, is left for the next pull)."""
        if not self._shared:
            return
        writer, head = self._store.writer, self._store.own_head(self.key)  # type: ignore[attr-defined]
        if head.seq == seq and self._held.get(writer, NO_HEAD).seq == seq - 1:
            self._held[writer] = head

    def _adopt_policy(self, policy: DecisionPolicy, threshold: float) -> None:
        """Decide with a policy another server stored (:meth:`set_policy` without the write)."""
        with self._lock.write():
            self._check_live()
            self.threshold = threshold
            if policy.aggregation is not self.scorer.policy.aggregation:
                self._means = self._build_means(policy)
                self._layout += 1
                self._schedule_rebuilds()
            self.scorer.set_policy(policy)

    def _reset_followed(self) -> None:
        """Empty the index of a shared store's gallery (write lock held): the next sync pulls all."""
        self._owners.reset(np.zeros(0, np.int64), np.zeros(0, np.int64))
        if not self._search_in_store:  # a MilvusIndex holds what the owners hold
            self._index = RebuildableIndex(_empty_index(self._plan, self.embedding_dim))
        self._means = self._build_means(self.scorer.policy)
        self._held = {}
        self._layout += 1

    def _check_live(self) -> None:
        """Raise NotFound if the gallery was deleted while the caller waited for the lock,
        GalleryClosed (UNAVAILABLE) once it is closed."""
        if self._deleted:
            raise GalleryNotFound(f"gallery {self.name!r} does not exist")
        if self._closed:
            raise GalleryClosed(f"gallery {self.name!r} is closed: the server is shutting down; retry on another server or after its restart")

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse every later call (GalleryClosed) and wait up to ``timeout_s`` seconds for a
        background recalibration, which stops at its next read, so nothing reads or writes the
        store after :meth:`GalleryManager.close` closed it. A background index rebuild is not
        waited for (a faiss training cannot be interrupted; it touches no store) and its index is
        dropped. Snapshots are still written (:meth:`snapshot`)."""
        with self._lock.write():
            self._closed = True
        self.scorer.join(timeout_s)

    # -- rebuilds ----------------------------------------------------------------------------

    def _schedule_rebuilds(self) -> None:
        """Start a background rebuild (:meth:`_rebuild`) of the template index and of the means
        index, each when its kind no longer fits its size (``IndexPlan.rebuild_factory``) and it
        is not being rebuilt already. Call with the write lock held."""
        for index in (self._index, self._means.index if self._means is not None else None):
            if index is None or index in self._rebuilds:
                continue
            factory = self._plan.rebuild_factory(index.current)
            if factory is not None:
                self._rebuilds.add(index)
                threading.Thread(target=self._rebuild, args=(index, factory), name=f"rebuild-{self.name}", daemon=True).start()

    def _holds(self, index: RebuildableIndex) -> bool:
        return index is self._index or (self._means is not None and index is self._means.index)

    def rebuilding(self) -> bool:
        """Whether a background rebuild of an index of the gallery is running."""
        with self._lock.read():
            return bool(self._rebuilds)

    def _rebuild(self, index: RebuildableIndex, factory: str) -> None:
        """Rebuild ``index`` as ``factory``: copy its vectors under the read lock, build with no
        lock held, replay the writes made meanwhile and swap under the write lock. The index is
        dropped instead when the gallery replaced it meanwhile (deleted, reloaded, new policy)."""
        started = time.perf_counter()
        try:
            with self._lock.read():
                if self._deleted or self._closed or not self._holds(index):
                    return
                ids, x = index.start_rebuild()
            copied = time.perf_counter()
            rebuilt = self._plan.build(self.embedding_dim, ids, x, factory=factory)
            del ids, x
            built = time.perf_counter()
            with self._lock.write():
                if self._deleted or self._closed or not self._holds(index):
                    return
                was = index.factory
                replayed = index.finish_rebuild(rebuilt)
                self._layout += 1
            LOG.info(
                "gallery %r: index of %d vectors rebuilt from %s as %s: copy %.2f s under the read lock, build %.1f s, %d writes replayed",
                self.name, rebuilt.ntotal, was, factory, copied - started, built - copied, replayed,
            )
        except Exception:
            LOG.exception("gallery %r: rebuilding an index as %s failed; it stays as it is", self.name, factory)
        finally:
            with self._lock.write():
                index.abandon_rebuild()  # after a swap: nothing left to abandon
                self._rebuilds.discard(index)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> SnapshotHeader | None:
        """Write an index snapshot if the index changed since the last one; returns its header.

        Copies the index (and the means index) under the read lock (``VectorIndex.copy``), then
        serializes, writes and fsyncs the copies with no lock held (snapshot.py
        ``write_snapshot``), then drops the store's change-log entries they hold. Returns None
        when nothing changed, the gallery has been deleted, or its store is shared (the index is
        pulled from the store at start-up instead). Raises OSError when a file cannot be written
        (the change log is then kept, and the next call retries).
        """
        if self._shared:
            return None
        with self._snapshot_lock:
            with self._lock.read():
                if self._deleted or (self._applied_seq, self._layout) == self._snapshot_state:
                    return None
                started = time.perf_counter()
                state = (self._applied_seq, self._layout)
                index, means = self._index.copy(), self._means.index.copy() if self._means is not None else None
            copied = time.perf_counter()
            header = write_snapshot(self.snapshot_file, index, gallery_key=self.key, gallery=self.name, last_seq=state[0])
            if means is not None:
                write_snapshot(self._means_file, means, gallery_key=self.key, gallery=self.name, last_seq=state[0])
            else:
                self._means_file.unlink(missing_ok=True)
            self._snapshot_state = state
        written = time.perf_counter()
        record("snapshot_seconds", written - started)
        try:
            self._store.prune_changes(self.name, header.last_seq)
        except NotFound:  # deleted meanwhile: delete() removes the file once we released the snapshot lock
            return None
        LOG.info(
            "wrote index snapshot of %r (%d templates as %s%s, seq %d): copy under the read lock %.1f ms, write %.1f ms",
            self.name,
            header.ntotal,
            header.factory,
            "" if means is None else f", {means.ntotal} means as {means.factory}",
            header.last_seq,
            (copied - started) * 1e3,
            (written - copied) * 1e3,
        )
        return header

    def __repr__(self) -> str:
        return f"IndexedGallery(name={self.name!r}, key={self.key}, model_id={self.model_id[:12]!r}, applied_seq={self._applied_seq})"
