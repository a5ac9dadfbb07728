"""Galleries of enrolled identities: enroll, identify (1:N), verify (1:1), and their bookkeeping.

:class:`GalleryManager` is the domain layer the gRPC servicer calls; it knows nothing about the
transport. It owns the store (store.py, the truth), one vector index per gallery (index.py,
derived from the store) and the face pipeline (pipeline.py), and keeps them consistent:

* A write commits to the store first (durable on return), then applies the same change to the
  index, then returns, all under the gallery's write lock. A search holds the gallery's read
  lock, so it sees every write completely or not at all; searches run in parallel.
* A gallery records the model that computed its templates (``model_id``, the embedder's
  sha256). Enrolling into or searching a gallery of another model raises
  :class:`ModelMismatchError` (FAILED_PRECONDITION) instead of comparing unrelated embeddings.
* Index snapshots are written by :meth:`GalleryManager.snapshot` (periodically and on close);
  start-up loads them and replays newer changes (index.py).

Distances are Euclidean (L2) between embeddings; a probe matches an identity when the distance
to its nearest template is <= the threshold (0.6 for the default dlib model).
Results are the frozen dataclasses of results.py; arguments are checked by validation.py.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from facegallery.server.contract.errors import AlreadyExists, InvalidInput, MultipleFacesError, NoFaceError, NotFound
from facegallery.server.contract.face import Face, ImageKind
from facegallery.server.gallery.index import DEFAULT_FACTORY, IdentityHit, VectorIndex, make_index, open_gallery_index, search_identities, write_snapshot
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.gallery.results import Comparison, EnrollResult, GalleryDeletion, IdentityPage, Identification, ImportResult, Match, Verification
from facegallery.server.gallery.rwlock import ReadWriteLock
from facegallery.server.gallery.store import ExportedTemplate, GalleryRecord, IdentityRecord, NewTemplate, SqliteTemplateStore, TemplateStore
from facegallery.server.gallery.validation import (
    check_embedding,
    check_gallery_name,
    check_identity_id,
    check_max_faces,
    check_model,
    check_page_size,
    check_top_k,
    decision_threshold,
    decode_page_token,
    encode_page_token,
    gallery_threshold,
)

__all__ = [
    "DEFAULT_GALLERY",
    "DEFAULT_TOP_K",
    "DEFAULT_PAGE_SIZE",
    "STORE_FILE",
    "INDEX_DIR",
    "FaceAnalyzer",
    "FacePolicy",
    "GalleryManager",
    "snapshot_path",
]

LOG = logging.getLogger(__name__)

#: The gallery that always exists.
DEFAULT_GALLERY = "default"
#: Candidate identities per probe when the caller gives none (at most validation.MAX_TOP_K).
DEFAULT_TOP_K = 5
#: Identities per listed page when the caller gives none (at most validation.MAX_PAGE_SIZE).
DEFAULT_PAGE_SIZE = 100
#: Imported templates per store transaction.
_IMPORT_BATCH = 256
#: Data directory layout.
STORE_FILE = "gallery.sqlite3"
INDEX_DIR = "index"
_SNAPSHOT_SUFFIX = ".fgidx"


class FaceAnalyzer(Protocol):
    """The face pipeline surface the gallery uses (``facegallery.server.face.pipeline.FacePipeline``)."""

    manifest: ModelManifest

    def analyze(self, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, max_faces: int = 0) -> list[Face]: ...

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None: ...


class FacePolicy(enum.Enum):
    """How enrollment treats an image with several faces (proto ``FacePolicy``)."""

    LARGEST = "largest"  # enroll the largest face by box area
    REJECT_MULTIPLE = "reject_multiple"  # MultipleFacesError (FAILED_PRECONDITION)


# ---------------------------------------------------------------------------------------------
# Per-gallery state


class _Gallery:
    """A loaded gallery: its immutable settings, index, lock and snapshot bookkeeping."""

    def __init__(self, record: GalleryRecord, index: VectorIndex) -> None:
        self.key = record.key
        self.name = record.name
        self.model_id = record.model_id
        self.threshold = record.threshold
        self.embedding_dim = record.embedding_dim
        self.index = index
        self.lock = ReadWriteLock()
        self.applied_seq = record.last_seq  # newest change the index holds
        self.snapshot_seq = -1  # newest change on disk in a snapshot (-1: none written by us)
        self.deleted = False

    def check_live(self) -> None:
        """Raise NotFound if the gallery was deleted while the caller waited for the lock."""
        if self.deleted:
            raise NotFound(f"gallery {self.name!r} does not exist")


# ---------------------------------------------------------------------------------------------
# The manager


class GalleryManager:
    """Every gallery of one data directory, served with one face model.

    Parameters
    ----------
    store : TemplateStore
        The durable store; the manager closes it in :meth:`close`.
    pipeline : FaceAnalyzer
        The loaded face pipeline; its ``manifest.model_id`` is the server's model.
    index_dir : path
        Where index snapshots live (``gallery-<key>.fgidx``).
    index_factory : str
        faiss factory string of new indexes (index.py).
    snapshot_interval_s : float, optional
        Seconds between background snapshots of changed galleries; None disables them
        (:meth:`close` still writes one).

    Loads every gallery's index (snapshot + replay, or rebuild) and creates the ``default``
    gallery if missing. Thread-safe.
    """

    def __init__(
        self,
        store: TemplateStore,
        pipeline: FaceAnalyzer,
        *,
        index_dir: str | Path,
        index_factory: str = DEFAULT_FACTORY,
        snapshot_interval_s: float | None = None,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.index_dir = Path(index_dir)
        self.index_factory = index_factory
        self._lock = threading.Lock()  # guards _galleries and gallery creation/deletion
        self._galleries: dict[str, _Gallery] = {}
        self._closed = threading.Event()
        self.index_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for record in store.list_galleries():
            index = open_gallery_index(store, record, self._snapshot_path(record.key), index_factory)
            self._galleries[record.name] = _Gallery(record, index)
        self._remove_stale_snapshots()
        if DEFAULT_GALLERY not in self._galleries:
            self.create_gallery(DEFAULT_GALLERY)
        LOG.info("loaded %d galleries in %.2f s", len(self._galleries), time.perf_counter() - started)
        self._snapshotter: threading.Thread | None = None
        if snapshot_interval_s is not None:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, args=(snapshot_interval_s,), name="index-snapshots", daemon=True)
            self._snapshotter.start()

    @classmethod
    def open(cls, data_dir: str | Path, pipeline: FaceAnalyzer, **options: object) -> GalleryManager:
        """A manager over ``data_dir`` (``gallery.sqlite3`` + ``index/``); ``options`` as the constructor's."""
        data_dir = Path(data_dir)
        store = SqliteTemplateStore(data_dir / STORE_FILE)
        try:
            return cls(store, pipeline, index_dir=data_dir / INDEX_DIR, **options)  # type: ignore[arg-type]
        except BaseException:
            store.close()
            raise

    @property
    def model(self) -> ModelManifest:
        """The manifest of the loaded model."""
        return self.pipeline.manifest

    # -- galleries ---------------------------------------------------------------------------

    def create_gallery(self, name: str, *, threshold: float | None = None) -> GalleryRecord:
        """Create an empty gallery bound to the loaded model.

        Parameters
        ----------
        name : str
            1..128 characters of ``[A-Za-z0-9_.-]``.
        threshold : float, optional
            Decision threshold (L2 distance, > 0); default the model's.

        Raises
        ------
        InvalidInput
            Malformed name or threshold (INVALID_ARGUMENT).
        AlreadyExists
            The name is taken (ALREADY_EXISTS).
        """
        check_gallery_name(name)
        threshold = gallery_threshold(threshold, self.model.threshold)
        with self._lock:
            record = self.store.create_gallery(
                name, model_id=self.model.model_id, threshold=threshold, metric=self.model.metric, embedding_dim=self.model.embedding_dim
            )
            self._galleries[name] = _Gallery(record, make_index(record.embedding_dim, self.index_factory))
        LOG.info("created gallery %r (threshold %.3f)", name, threshold)
        return record

    def get_gallery(self, name: str) -> GalleryRecord:
        """The gallery with its identity and template counts. Raises NotFound / InvalidInput."""
        self._gallery(name)
        return self.store.get_gallery(name)

    def list_galleries(self) -> list[GalleryRecord]:
        """Every gallery, in creation order."""
        return self.store.list_galleries()

    def delete_gallery(self, name: str) -> GalleryDeletion:
        """Delete a gallery with its identities, templates and snapshot. Raises NotFound.

        Deleting ``default`` empties it: it is recreated at once, bound to the loaded model.
        """
        gallery = self._gallery(name)
        with self._lock, gallery.lock.write():
            gallery.check_live()
            identities, templates = self.store.delete_gallery(name)
            gallery.deleted = True
            del self._galleries[name]
            self._snapshot_path(gallery.key).unlink(missing_ok=True)
        LOG.info("deleted gallery %r (%d identities, %d templates)", name, identities, templates)
        if name == DEFAULT_GALLERY:
            self.create_gallery(DEFAULT_GALLERY)
        return GalleryDeletion(identities, templates)

    # -- enrollment --------------------------------------------------------------------------

    def enroll(
        self,
        gallery: str,
        identity_id: str,
        *,
        image: bytes | None = None,
        embedding: np.ndarray | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        display_name: str = "",
        metadata: dict[str, str] | None = None,
        face_policy: FacePolicy = FacePolicy.LARGEST,
    ) -> EnrollResult:
        """Add one template to an identity, creating the identity on its first template.

        Parameters
        ----------
        gallery, identity_id : str
        image : bytes, optional
            An encoded image (kind says what it contains); exactly one of image / embedding.
        embedding : (D,) float32, optional
            A precomputed embedding of the loaded model.
        display_name : str
            Set on creation, or replaces the current one when non-empty.
        metadata : dict[str, str], optional
            Merged into the identity's metadata.
        face_policy : FacePolicy
            LARGEST enrolls the largest face; REJECT_MULTIPLE refuses images with several.

        Returns
        -------
        EnrollResult
            Returned once the template is durably stored and searchable.

        Raises
        ------
        InvalidInput
            Malformed ids, both or neither source (INVALID_ARGUMENT).
        ImageDecodeError, NoFaceError, EmbeddingShapeError
            Undecodable image, no face, wrong-length or non-finite embedding (INVALID_ARGUMENT).
        MultipleFacesError, ModelMismatchError
            Several faces under REJECT_MULTIPLE; gallery of another model (FAILED_PRECONDITION).
        ImageTooLargeError
            Image over the pipeline's limits (RESOURCE_EXHAUSTED).
        NotFound
            Unknown gallery.
        """
        state = self._gallery(gallery)
        check_identity_id(identity_id)
        self._check_model(state)
        if (image is None) == (embedding is None):
            raise InvalidInput("enroll needs exactly one of an image or an embedding")
        face: Face | None = None
        sha = ""
        if image is not None:
            face = self._enrollment_face(image, kind, face_policy)
            vector = face.embedding.astype(np.float32)
            sha = hashlib.sha256(image).hexdigest()
        else:
            vector = check_embedding(embedding, state.embedding_dim)
        with state.lock.read():
            state.check_live()
            hits = search_identities(state.index, self.store.template_owners, vector[None], 2)[0]
        duplicate = next((Match.from_hit(h) for h in hits if h.identity_id != identity_id and h.distance <= state.threshold), None)
        item = NewTemplate(identity_id, vector, display_name=display_name, metadata=dict(metadata or {}), source_sha256=sha, face=face)
        with state.lock.write():
            state.check_live()
            (added,), seq = self.store.add_templates(state.name, [item])
            self._apply(state, seq, add=(np.array([added.template_id]), vector[None]))
        LOG.debug("enrolled template %d of %r in %r", added.template_id, identity_id, state.name)
        return EnrollResult(identity_id, added.template_id, face, added.identity_created, duplicate, sha)

    def _enrollment_face(self, image: bytes, kind: ImageKind, policy: FacePolicy) -> Face:
        faces = self.pipeline.analyze(image, kind=kind, max_faces=2 if policy is FacePolicy.REJECT_MULTIPLE else 1)
        if not faces:
            raise NoFaceError("no face was found in the image")
        if len(faces) > 1 and policy is FacePolicy.REJECT_MULTIPLE:
            raise MultipleFacesError("the image shows several faces and the face policy is REJECT_MULTIPLE; crop it or use LARGEST")
        return faces[0]

    # -- search ------------------------------------------------------------------------------

    def identify(
        self,
        gallery: str,
        image: bytes,
        *,
        kind: ImageKind = ImageKind.PHOTO,
        top_k: int = DEFAULT_TOP_K,
        threshold: float | None = None,
        max_faces: int = 0,
    ) -> list[Identification]:
        """1:N search of every face of an image (largest first).

        Parameters
        ----------
        top_k : int
            Candidate identities per face, 1..100.
        threshold : float, optional
            L2 decision threshold overriding the gallery's (finite, >= 0).
        max_faces : int
            Faces to search, largest first; 0 = all.

        Returns
        -------
        list of Identification, one per face; ``[]`` when no face is found (not an error).

        Raises
        ------
        InvalidInput, ImageDecodeError (INVALID_ARGUMENT); ModelMismatchError
        (FAILED_PRECONDITION); ImageTooLargeError (RESOURCE_EXHAUSTED); NotFound.
        """
        state = self._gallery(gallery)
        self._check_model(state)
        check_top_k(top_k)
        threshold = decision_threshold(threshold, state.threshold)
        check_max_faces(max_faces)
        started = time.perf_counter()
        faces = self.pipeline.analyze(image, kind=kind, max_faces=max_faces)
        analyzed = time.perf_counter()
        if not faces:
            return []
        x = np.stack([f.embedding for f in faces]).astype(np.float32)
        ranked = self._search(state, x, top_k)
        searched = time.perf_counter()
        LOG.debug("identify %r: %d faces, analyze %.1f ms, search %.1f ms", state.name, len(faces), (analyzed - started) * 1e3, (searched - analyzed) * 1e3)
        return [Identification.from_hits(face, hits, threshold) for face, hits in zip(faces, ranked, strict=True)]

    def identify_embedding(self, gallery: str, embedding: np.ndarray, *, top_k: int = DEFAULT_TOP_K, threshold: float | None = None) -> Identification:
        """1:N search of one embedding ``(D,) float32``; ``face`` of the result is None.

        Raises EmbeddingShapeError / InvalidInput (INVALID_ARGUMENT), ModelMismatchError
        (FAILED_PRECONDITION), NotFound.
        """
        state = self._gallery(gallery)
        self._check_model(state)
        check_top_k(top_k)
        threshold = decision_threshold(threshold, state.threshold)
        vector = check_embedding(embedding, state.embedding_dim)
        (hits,) = self._search(state, vector[None], top_k)
        return Identification.from_hits(None, hits, threshold)

    def _search(self, state: _Gallery, x: np.ndarray, top_k: int) -> list[list[IdentityHit]]:
        with state.lock.read():
            state.check_live()
            return search_identities(state.index, self.store.template_owners, x, top_k)

    def verify(self, gallery: str, identity_id: str, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, threshold: float | None = None) -> Verification:
        """1:1: the largest face of ``image`` against one identity's templates.

        Raises
        ------
        NotFound
            Unknown gallery or identity.
        NoFaceError, ImageDecodeError, InvalidInput
            No face, undecodable image, malformed id or threshold (INVALID_ARGUMENT).
        ModelMismatchError (FAILED_PRECONDITION); ImageTooLargeError (RESOURCE_EXHAUSTED).
        """
        state = self._gallery(gallery)
        check_identity_id(identity_id)
        self._check_model(state)
        threshold = decision_threshold(threshold, state.threshold)
        with state.lock.read():
            state.check_live()
            _, templates = self.store.identity_embeddings(state.name, identity_id)
        faces = self.pipeline.analyze(image, kind=kind, max_faces=1)
        if not faces:
            raise NoFaceError("no face was found in the image")
        probe = faces[0].embedding.astype(np.float32)
        distances = np.linalg.norm(templates - probe, axis=1)
        nearest = int(np.argmin(distances))
        distance = float(distances[nearest])
        return Verification(identity_id, distance, threshold, distance <= threshold, faces[0], self._probability_same(probe, templates[nearest]))

    def compare(
        self,
        image_a: bytes,
        image_b: bytes,
        *,
        kind_a: ImageKind = ImageKind.PHOTO,
        kind_b: ImageKind = ImageKind.PHOTO,
        threshold: float | None = None,
    ) -> Comparison:
        """L2 distance between the largest faces of two images (no gallery).

        Raises NoFaceError naming the image without a face, ImageDecodeError, InvalidInput
        (INVALID_ARGUMENT); ImageTooLargeError (RESOURCE_EXHAUSTED).
        """
        threshold = decision_threshold(threshold, self.model.threshold)
        faces = []
        for label, image, kind in (("image_a", image_a, kind_a), ("image_b", image_b, kind_b)):
            found = self.pipeline.analyze(image, kind=kind, max_faces=1)
            if not found:
                raise NoFaceError(f"no face was found in {label}")
            faces.append(found[0])
        a, b = (f.embedding.astype(np.float32) for f in faces)
        distance = float(np.linalg.norm(a - b))
        return Comparison(distance, threshold, distance <= threshold, faces[0], faces[1], self._probability_same(a, b))

    def embed(self, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, max_faces: int = 0) -> list[Face]:
        """Every face of an image with its embedding, largest first (``[]`` when none)."""
        check_max_faces(max_faces)
        return self.pipeline.analyze(image, kind=kind, max_faces=max_faces)

    def _probability_same(self, a: np.ndarray, b: np.ndarray) -> float | None:
        p = self.pipeline.probability_same(a[None], b[None])
        return None if p is None else float(p[0])

    # -- identities and templates ------------------------------------------------------------

    def get_identity(self, gallery: str, identity_id: str) -> IdentityRecord:
        """One identity with its templates. Raises NotFound / InvalidInput."""
        self._gallery(gallery)
        check_identity_id(identity_id)
        return self.store.get_identity(gallery, identity_id)

    def list_identities(self, gallery: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "") -> IdentityPage:
        """Identities in enrollment order, ``page_size`` (1..1000) at a time (no templates).

        ``page_token`` is ``""`` for the first page, else a previous page's ``next_page_token``
        (opaque; bound to the gallery). Raises InvalidInput for a bad size or token, NotFound.
        """
        state = self._gallery(gallery)
        check_page_size(page_size)
        after = decode_page_token(page_token, state.key)
        rows = self.store.list_identities(gallery, after_key=after, limit=page_size + 1)
        more = len(rows) > page_size
        rows = rows[:page_size]
        token = encode_page_token(state.key, rows[-1].key) if more else ""
        return IdentityPage(rows, token)

    def update_identity(self, gallery: str, identity_id: str, *, display_name: str | None = None, metadata: dict[str, str] | None = None) -> IdentityRecord:
        """Replace the display name and/or the whole metadata map (None keeps a field).

        Returns the identity with its templates. Raises NotFound / InvalidInput.
        """
        self._gallery(gallery)
        check_identity_id(identity_id)
        self.store.update_identity(gallery, identity_id, display_name=display_name, metadata=None if metadata is None else dict(metadata))
        return self.store.get_identity(gallery, identity_id)

    def delete_identity(self, gallery: str, identity_id: str) -> int:
        """Delete an identity and its templates; returns how many templates. Raises NotFound."""
        state = self._gallery(gallery)
        check_identity_id(identity_id)
        with state.lock.write():
            state.check_live()
            ids, seq = self.store.delete_identity(state.name, identity_id)
            self._apply(state, seq, remove=ids)
        return len(ids)

    def delete_template(self, gallery: str, template_id: int) -> bool:
        """Delete one template; True when its identity had no other and was deleted. Raises NotFound."""
        state = self._gallery(gallery)
        with state.lock.write():
            state.check_live()
            identity_deleted, seq = self.store.delete_template(state.name, template_id)
            self._apply(state, seq, remove=np.array([template_id]))
        return identity_deleted

    # -- export / import ---------------------------------------------------------------------

    def export_gallery(self, gallery: str) -> tuple[GalleryRecord, Iterator[ExportedTemplate]]:
        """The gallery and an iterator over all its templates (one consistent state, by template id).

        Close the iterator when stopping early. Raises NotFound.
        """
        self._gallery(gallery)
        return self.store.get_gallery(gallery), self.store.export_templates(gallery)

    def import_embeddings(self, gallery: str, model_id: str, templates: Iterable[NewTemplate]) -> ImportResult:
        """Store precomputed templates, skipping those an identity already has (same embedding).

        The gallery is created (bound to the loaded model) when missing. Templates are committed
        in batches as they arrive; when an item is rejected, the batches before it stay
        imported (importing the same stream again skips them).

        Raises
        ------
        ModelMismatchError
            ``model_id`` differs from the gallery's (FAILED_PRECONDITION).
        InvalidInput, EmbeddingShapeError
            Empty ``model_id``, a malformed identity id or embedding (INVALID_ARGUMENT).
        """
        check_gallery_name(gallery)
        if not model_id:
            raise InvalidInput("model_id is required: the model the embeddings were computed with")
        with self._lock:
            exists = gallery in self._galleries
        if not exists:
            check_model(gallery, self.model.model_id, model_id, "the embeddings come from")  # a new gallery gets the server's model
            try:
                self.create_gallery(gallery)
            except AlreadyExists:  # created concurrently: use it
                pass
        state = self._gallery(gallery)
        check_model(gallery, state.model_id, model_id, "the embeddings come from")
        imported = skipped = 0
        items = iter(templates)
        while batch := list(itertools.islice(items, _IMPORT_BATCH)):
            for item in batch:
                check_identity_id(item.identity_id)
            batch = [dataclasses.replace(item, embedding=check_embedding(item.embedding, state.embedding_dim)) for item in batch]
            with state.lock.write():
                state.check_live()
                results, seq = self.store.add_templates(state.name, batch, skip_duplicates=True)
                stored = [(r.template_id, item.embedding) for r, item in zip(results, batch, strict=True) if r is not None]
                if stored:
                    ids = np.array([t for t, _ in stored], dtype=np.int64)
                    x = np.stack([e for _, e in stored])
                    self._apply(state, seq, add=(ids, x))
            imported += len(stored)
            skipped += len(batch) - len(stored)
        LOG.info("imported %d templates into %r (%d skipped)", imported, gallery, skipped)
        return ImportResult(imported, skipped)

    # -- snapshots and lifecycle -------------------------------------------------------------

    def snapshot(self) -> int:
        """Write an index snapshot of every gallery changed since its last one; returns how many.

        Holds each gallery's read lock while writing (searches go on, writes wait), then drops
        the store's change-log entries the snapshot contains.
        """
        with self._lock:
            galleries = list(self._galleries.values())
        written = 0
        for state in galleries:
            with state.lock.read():
                if state.deleted or state.applied_seq == state.snapshot_seq:
                    continue
                header = write_snapshot(self._snapshot_path(state.key), state.index, gallery_key=state.key, gallery=state.name, last_seq=state.applied_seq)
            state.snapshot_seq = header.last_seq
            try:
                self.store.prune_changes(state.name, header.last_seq)
            except NotFound:  # deleted meanwhile
                continue
            written += 1
            LOG.info("wrote index snapshot of %r (%d templates, seq %d)", state.name, header.ntotal, header.last_seq)
        return written

    def index_template_ids(self, gallery: str) -> np.ndarray:
        """Template ids held by the gallery's index, ascending ``(n,) int64`` (for consistency checks)."""
        state = self._gallery(gallery)
        with state.lock.read():
            return state.index.ids()

    def close(self) -> None:
        """Stop background snapshots, write final snapshots, close the store (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        self.snapshot()
        self.store.close()

    def _snapshot_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.snapshot()
            except Exception:  # keep serving; the next round or close() retries
                LOG.exception("writing index snapshots failed")

    # -- helpers -----------------------------------------------------------------------------

    def _gallery(self, name: str) -> _Gallery:
        check_gallery_name(name)
        with self._lock:
            state = self._galleries.get(name)
        if state is None:
            raise NotFound(f"gallery {name!r} does not exist")
        return state

    def _check_model(self, state: _Gallery) -> None:
        check_model(state.name, state.model_id, self.model.model_id, "this server runs")

    def _apply(self, state: _Gallery, seq: int, *, add: tuple[np.ndarray, np.ndarray] | None = None, remove: np.ndarray | None = None) -> None:
        """Apply committed change ``seq`` to the index (write lock held): ``add`` = (ids, x), ``remove`` = ids.

        Should the index refuse it, the index is reloaded from the store, which has the change.
        """
        try:
            if remove is not None:
                state.index.remove(remove)
            if add is not None:
                state.index.add(*add)
        except Exception:
            LOG.exception("gallery %r: applying change %d to the index failed; reloading it from the store", state.name, seq)
            record = self.store.get_gallery(state.name)
            state.index = open_gallery_index(self.store, record, self._snapshot_path(state.key), self.index_factory)
            state.applied_seq = record.last_seq
            raise
        state.applied_seq = seq

    def _snapshot_path(self, key: int) -> Path:
        return snapshot_path(self.index_dir, key)

    def _remove_stale_snapshots(self) -> None:
        live = {self._snapshot_path(g.key).name for g in self._galleries.values()}
        for path in self.index_dir.glob(f"gallery-*{_SNAPSHOT_SUFFIX}*"):
            if path.name not in live:
                LOG.info("removing stale index file %s", path)
                path.unlink(missing_ok=True)


def snapshot_path(index_dir: str | Path, gallery_key: int) -> Path:
    """Where the index snapshot of the gallery with store key ``gallery_key`` lives."""
    return Path(index_dir) / f"gallery-{gallery_key}{_SNAPSHOT_SUFFIX}"
