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

Thread-safe. Distances are Euclidean (L2); arrays are float32 embeddings of ``embedding_dim``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar
from pathlib import Path

import numpy as np

from facegallery.server.contract.errors import GalleryNotFound, NotFound
from facegallery.server.contract.timing import record, timed
from facegallery.server.gallery.decision import Aggregation, Calibration, DecisionPolicy, DecisionStatus, FalseMatchCurve
from facegallery.server.gallery.identity_means import IdentityMeans
from facegallery.server.gallery.index import VectorIndex, make_index
from facegallery.server.gallery.open_set import OpenSetScorer, ScoredHit
from facegallery.server.gallery.rwlock import ReadWriteLock
from facegallery.server.gallery.snapshot import SnapshotHeader, open_gallery_index, snapshot_path, write_snapshot
from facegallery.server.gallery.store import AddedTemplate, GalleryRecord, NewTemplate, TemplateStore

__all__ = ["IndexedGallery"]

LOG = logging.getLogger(__name__)
T = TypeVar("T")


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
        Where the gallery's index snapshot is written.
    """

    def __init__(
        self, store: TemplateStore, record: GalleryRecord, index: VectorIndex, *, snapshot_file: Path, factory: str, curve: FalseMatchCurve | None = None,
        fallback_threshold: float | None = None,
    ) -> None:
        self.key = record.key
        self.name = record.name
        self.model_id = record.model_id
        self.threshold = record.threshold
        self.embedding_dim = record.embedding_dim
        self.snapshot_file = snapshot_file
        self._store = store
        self._factory = factory
        self._index = index
        self._lock = ReadWriteLock()  # index and applied_seq; deleted
        self._snapshot_lock = threading.Lock()  # snapshot_seq and the snapshot file
        self._applied_seq = record.last_seq  # newest change the index holds
        self._snapshot_seq = -1  # newest change on disk in a snapshot (-1: none written by us)
        self._deleted = False
        self._version = 0  # templates added + removed since loaded (open_set.py staleness)
        self._means = self._build_means(record.policy)  # mean templates (identity_means.py) under Aggregation.MEAN
        self.scorer = OpenSetScorer(
            record.name,
            store,
            record.policy,
            curve,
            fallback_threshold=record.threshold if fallback_threshold is None else fallback_threshold,
            identity_vectors=self._identity_vectors,
        )

    @classmethod
    def load(
        cls, store: TemplateStore, record: GalleryRecord, *, index_dir: str | os.PathLike, factory: str, **decisions: object
    ) -> IndexedGallery:
        """The gallery of ``record`` with its index from the snapshot in ``index_dir`` plus the
        store's newer changes, or rebuilt from the store (snapshot.py ``open_gallery_index``).
        ``decisions``: ``curve`` (the model's false-match curve) and ``fallback_threshold`` (the
        model's L2 threshold), as the constructor's."""
        path = snapshot_path(index_dir, record.key)
        return cls(store, record, open_gallery_index(store, record, path, factory), snapshot_file=path, factory=factory, **decisions)  # type: ignore[arg-type]

    @classmethod
    def empty(
        cls, store: TemplateStore, record: GalleryRecord, *, index_dir: str | os.PathLike, factory: str, **decisions: object
    ) -> IndexedGallery:
        """A gallery just created in the store (no templates), with an empty index of ``factory``."""
        index = make_index(record.embedding_dim, factory)
        return cls(store, record, index, snapshot_file=snapshot_path(index_dir, record.key), factory=factory, **decisions)  # type: ignore[arg-type]

    # -- reads -------------------------------------------------------------------------------

    def _build_means(self, policy: DecisionPolicy) -> IdentityMeans | None:
        if policy.aggregation is not Aggregation.MEAN:
            return None
        return IdentityMeans.build(self._store, self.name, self.embedding_dim, self._factory)

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

    def decision_status(self) -> DecisionStatus:
        """The policy, score kind, threshold and estimated FPIR the gallery decides with now."""
        cal = self.scorer.calibration(self._read)
        return DecisionStatus(self.scorer.policy, cal.score_kind, cal.threshold, cal.estimated_fpir(cal.threshold), cal.identities, cal.basis)

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
            self.scorer.set_policy(policy)
        return record

    def add_templates(self, items: Sequence[NewTemplate], *, skip_duplicates: bool = False) -> list[AddedTemplate | None]:
        """Store templates in one transaction, then add the stored ones to the index.

        ``items`` carry checked ``(D,) float32`` embeddings. With ``skip_duplicates`` a template
        whose identity already has the same embedding is not stored (None in the result).
        Returns one entry per item once they are durable and searchable.

        Raises NotFound when the gallery has been deleted.
        """
        with self._lock.write():
            self._check_live()
            results, seq = self._store.add_templates(self.name, items, skip_duplicates=skip_duplicates)
            stored = [(r.template_id, item.embedding) for r, item in zip(results, items, strict=True) if r is not None]
            if stored:
                ids = np.array([t for t, _ in stored], dtype=np.int64)
                touched = {item.identity_id for r, item in zip(results, items, strict=True) if r is not None}
                self._apply(seq, add=(ids, np.stack([e for _, e in stored])), identities=touched)
        return results

    def delete_identity(self, identity_id: str) -> int:
        """Delete an identity and its templates from store and index; returns how many templates.

        Raises NotFound for an unknown identity or a deleted gallery.
        """
        with self._lock.write():
            self._check_live()
            ids, seq = self._store.delete_identity(self.name, identity_id)
            self._apply(seq, remove=ids, identities={identity_id})
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
            counts = self._store.delete_gallery(self.name)
            self._deleted = True
        with self._snapshot_lock:
            self.snapshot_file.unlink(missing_ok=True)
        return counts

    def _apply(
        self, seq: int, *, add: tuple[np.ndarray, np.ndarray] | None = None, remove: np.ndarray | None = None, identities: Collection[str] = ()
    ) -> None:
        """Apply committed change ``seq`` to the index (write lock held): ``add`` = (ids, x),
        ``remove`` = ids; ``identities`` whose templates changed (their mean templates are
        recomputed under Aggregation.MEAN).

        Should the index refuse it, the index (and the means) are reloaded from the store, which
        has the change, and the error is re-raised.
        """
        try:
            if remove is not None:
                self._index.remove(remove)
            if add is not None:
                self._index.add(*add)
            if self._means is not None:
                self._means.refresh(identities)
        except Exception:
            LOG.exception("gallery %r: applying change %d to the index failed; reloading it from the store", self.name, seq)
            record = self._store.get_gallery(self.name)
            self._index = open_gallery_index(self._store, record, self.snapshot_file, self._factory)
            self._means = self._build_means(self.scorer.policy)
            self._applied_seq = record.last_seq
            raise
        self._applied_seq = seq
        self._version += (0 if remove is None else len(remove)) + (0 if add is None else len(add[0]))

    def _check_live(self) -> None:
        """Raise NotFound if the gallery was deleted while the caller waited for the lock."""
        if self._deleted:
            raise GalleryNotFound(f"gallery {self.name!r} does not exist")

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> SnapshotHeader | None:
        """Write an index snapshot if the index changed since the last one; returns its header.

        Copies the index under the read lock (``VectorIndex.copy``), then serializes, writes and
        fsyncs the copy with no lock held (snapshot.py ``write_snapshot``), then drops the
        store's change-log entries it holds. Returns None when nothing changed or the gallery
        has been deleted. Raises OSError when the file cannot be written (the change log is then
        kept, and the next call retries).
        """
        with self._snapshot_lock:
            with self._lock.read():
                if self._deleted or self._applied_seq == self._snapshot_seq:
                    return None
                started = time.perf_counter()
                index, seq = self._index.copy(), self._applied_seq
            copied = time.perf_counter()
            header = write_snapshot(self.snapshot_file, index, gallery_key=self.key, gallery=self.name, last_seq=seq)
            self._snapshot_seq = header.last_seq
        written = time.perf_counter()
        record("snapshot_seconds", written - started)
        try:
            self._store.prune_changes(self.name, header.last_seq)
        except NotFound:  # deleted meanwhile: delete() removes the file once we released the snapshot lock
            return None
        LOG.info(
            "wrote index snapshot of %r (%d templates, seq %d): copy under the read lock %.1f ms, write %.1f ms",
            self.name,
            header.ntotal,
            header.last_seq,
            (copied - started) * 1e3,
            (written - copied) * 1e3,
        )
        return header

    def __repr__(self) -> str:
        return f"IndexedGallery(name={self.name!r}, key={self.key}, model_id={self.model_id[:12]!r}, applied_seq={self._applied_seq})"
