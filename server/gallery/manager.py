"""Galleries of enrolled identities: enroll, identify (1:N), verify (1:1), and their bookkeeping.

:class:`GalleryManager` is the domain layer the gRPC servicer calls; it knows nothing about the
transport. It is a facade over three parts:

* the store (store.py), the truth, shared by every gallery;
* one :class:`~facegallery.server.gallery.indexed_gallery.IndexedGallery` per gallery, which
  keeps the gallery's vector index equal to its stored templates (writes: store, then index,
  under the gallery's write lock; searches under its read lock) and writes its snapshots;
* the face pipeline (the :class:`FaceAnalyzer` protocol), which turns images into faces.

The manager keeps the registry of galleries by name, creates and deletes them, routes every
call to its gallery, runs the pipeline for the image calls, writes snapshots periodically and
on close, and at start-up loads every gallery (snapshot.py: snapshot plus replay, or rebuild).

Model identity: a gallery records the embedding id of the model that computed its templates
(``model_id``, manifest.py ``ModelManifest.embedding_id``). The server's own id is
``pipeline.model_id``, which covers test-time flip augmentation, so it can differ from
``pipeline.manifest.model_id``. Calls on images need the gallery's id to equal the server's;
calls on embeddings (enroll, identify_embedding, import) need it to equal the embedding's
``model_id`` (None or ``""``: the server's). Otherwise :class:`ModelMismatchError`
(FAILED_PRECONDITION) is raised instead of comparing unrelated embeddings. Galleries that still
record a legacy id (the embedder file's sha256, before embedding ids) are migrated on open.

Decisions: each gallery has a decision policy (decision.py): a fixed L2 threshold, or a target
false positive identification rate (FPIR) that the threshold follows as the gallery changes,
optionally on S-norm scores (open_set.py). New galleries get ``DEFAULT_POLICY``. An identity's
distance is that of its nearest template; 1:1 calls (verify, compare) use the gallery's or the
model's L2 threshold (0.6 for the default dlib model) and report the model's false-match rate.
Results are the frozen dataclasses of results.py; arguments are checked by validation.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from facegallery.server.contract.errors import (
    AlreadyExists,
    EmbeddingShapeError,
    GalleryClosed,
    GalleryNotFound,
    InvalidInput,
    MultipleFacesError,
    NoFaceError,
    NotFound,
    RequestIdReusedError,
)
from facegallery.server.contract.face import Face, ImageKind
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.contract import timing
from facegallery.server.contract.process_memory import return_memory_to_os
from facegallery.server.gallery.decision import DEFAULT_POLICY, DecisionPolicy, DecisionStatus, FalseMatchCurve, check_policy
from facegallery.server.gallery.ann_index import APPROXIMATE_ABOVE, NPROBE
from facegallery.server.gallery.index import DEFAULT_FACTORY
from facegallery.server.gallery.indexed_gallery import IndexedGallery
from facegallery.server.gallery.open_set import ScoredHit
from facegallery.server.gallery.results import (
    Comparison,
    DuplicatePair,
    EnrollResult,
    GalleryDeletion,
    Identification,
    IdentityPage,
    ImportResult,
    Match,
    Verification,
)
from facegallery.server.gallery.snapshot import remove_stale_snapshots, snapshot_path
from facegallery.server.gallery.store import (
    EnrollReplayed,
    ExportedTemplate,
    GalleryRecord,
    IdempotentRequest,
    IdentityRecord,
    NewTemplate,
    RememberedEnroll,
    SqliteTemplateStore,
    TemplateBatch,
    TemplateStore,
)
from facegallery.server.gallery.validation import (
    MAX_LIST_REPLY_BYTES,
    check_display_name,
    check_embedding,
    check_gallery_name,
    check_identity_id,
    check_max_faces,
    check_max_pairs,
    check_metadata,
    check_model,
    check_page_size,
    check_request_id,
    check_top_k,
    decision_threshold,
    identity_reply_bytes,
    decode_page_token,
    encode_page_token,
    score_threshold,
)

__all__ = [
    "DEFAULT_GALLERY",
    "DEFAULT_TOP_K",
    "DEFAULT_PAGE_SIZE",
    "STORE_FILE",
    "DEFAULT_MILVUS_PREFIX",
    "open_milvus_store",
    "STATUS_WAIT_S",
    "INDEX_DIR",
    "FaceAnalyzer",
    "FacePolicy",
    "GalleryManager",
    "PreparedEnrollment",
    "snapshot_path",  # from snapshot.py: with STORE_FILE and INDEX_DIR, the data directory layout
]

LOG = logging.getLogger(__name__)

#: The gallery that always exists.
DEFAULT_GALLERY = "default"
#: Candidate identities per probe when the caller gives none (at most validation.MAX_TOP_K).
DEFAULT_TOP_K = 5
#: Identities per listed page when the caller gives none (at most validation.MAX_PAGE_SIZE).
DEFAULT_PAGE_SIZE = 100
#: Seconds a status report (GetGallery) waits for a recalibration before it reports the previous one.
STATUS_WAIT_S = 2.0
#: Seconds close() waits for each background calibration (one batch of its searches, normally).
CLOSE_TIMEOUT_S = 30.0
#: Imported templates per store transaction.
_IMPORT_BATCH = 256
#: Collection-name prefix of the milvus backend (milvus_client.py; several deployments can share a Milvus).
DEFAULT_MILVUS_PREFIX = "facegallery"
#: Data directory layout: the store, and the directory of index snapshots (snapshot.py).
STORE_FILE = "gallery.sqlite3"
INDEX_DIR = "index"


class FaceAnalyzer(Protocol):
    """The face pipeline surface the gallery uses (``facegallery.server.face.pipeline.FacePipeline``).

    ``model_id`` is the embedding id of the embeddings ``analyze`` returns (the manifest's
    ``embedding_id`` with the pipeline's flip augmentation); ``manifest`` gives the threshold,
    metric and embedding dimension of new galleries.
    """

    manifest: ModelManifest
    model_id: str

    def analyze(self, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, max_faces: int = 0) -> list[Face]: ...

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None: ...


class FacePolicy(enum.Enum):
    """How enrollment treats an image with several faces (proto ``FacePolicy``)."""

    LARGEST = "largest"  # enroll the largest face by box area
    REJECT_MULTIPLE = "reject_multiple"  # MultipleFacesError (FAILED_PRECONDITION)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedEnrollment:
    """An enrollment checked and embedded, not yet stored (:meth:`GalleryManager.prepare_enrollment`).

    ``embedding`` ``(D,) float32`` with ``face`` (None for an embedding request) and the image's
    ``source_sha256``; ``replay``: the first result of a remembered request id (then nothing is
    stored).
    """

    gallery: IndexedGallery
    identity_id: str
    embedding: np.ndarray
    face: Face | None
    source_sha256: str
    display_name: str
    metadata: dict[str, str]
    request_id: str
    fingerprint: str
    replay: EnrollResult | None = None


class GalleryManager:
    """Every gallery of one data directory, served with one face model.

    Parameters
    ----------
    store : TemplateStore
        The durable store; the manager closes it in :meth:`close`.
    pipeline : FaceAnalyzer
        The loaded face pipeline; its ``model_id`` is the server's model.
    index_dir : path or None
        Where index snapshots live (``gallery-<key>.fgidx``); None for a shared store (the
        ``milvus`` backend, ``store.shared``), whose indexes are pulled from it at start-up and
        kept up to date before every call (IndexedGallery.sync), with nothing on local disk.
    index_factory : str
        faiss factory string of exact indexes (index.py).
    approximate_above : int or None
        Templates from which a gallery is searched approximately (IVF-Flat, ann_index.py;
        default ``APPROXIMATE_ABOVE``, 50,000); None keeps every gallery exact.
    nprobe : int
        Inverted lists an approximate search scans (ann_index.py ``NPROBE``).
    snapshot_interval_s : float, optional
        Seconds between background snapshots of changed galleries; None disables them
        (:meth:`close` still writes one).
    search_in_store : bool
        With a shared store: galleries are searched by the store (Milvus, milvus_index.py) and
        their embeddings are not held in memory (16 bytes per template are), for galleries
        larger than this machine's memory; searches are then slower (docs/milvus.md). False
        (default): each gallery is searched in a faiss index in memory. ValueError with an
        unshared store.

    Migrates galleries that record the legacy model id (:meth:`_migrate_legacy_model_id`), loads
    every gallery's index (snapshot + replay, or rebuild), deletes stale snapshot files and
    creates the ``default`` gallery if missing. Thread-safe.
    """

    def __init__(
        self,
        store: TemplateStore,
        pipeline: FaceAnalyzer,
        *,
        index_dir: str | Path | None,
        index_factory: str = DEFAULT_FACTORY,
        approximate_above: int | None = APPROXIMATE_ABOVE,
        nprobe: int = NPROBE,
        snapshot_interval_s: float | None = None,
        search_in_store: bool = False,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        #: a store other servers write too (milvus_store.py): no snapshots, galleries followed
        self.shared = bool(getattr(store, "shared", False))
        if (index_dir is None) != self.shared:
            raise ValueError("index_dir is None exactly for a shared store")
        self.index_dir = Path(index_dir) if index_dir is not None else Path()  # never written for a shared store
        #: IndexedGallery's index keywords, the same for every gallery.
        self.index_options: dict[str, object] = {"factory": index_factory, "approximate_above": approximate_above, "nprobe": nprobe, "search_in_store": search_in_store}
        flip = pipeline.model_id == pipeline.manifest.embedding_id(True)
        self.false_match = FalseMatchCurve.from_json(pipeline.manifest.false_match, flip_augment=flip)
        if pipeline.manifest.false_match and self.false_match is None:
            LOG.warning("the model's false-match curve is not for embeddings %s flip augmentation: small galleries decide with its threshold", "with" if flip else "without")
        self._lock = threading.Lock()  # guards _galleries; held across a creation's store insert and registration
        self._galleries: dict[str, IndexedGallery] = {}
        self._closed = threading.Event()
        if not self.shared:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        for record in store.list_galleries(counts=not self.shared):  # a shared store's galleries load from their changes
            record = self._migrate_legacy_model_id(record)
            self._galleries[record.name] = IndexedGallery.load(store, record, index_dir=self.index_dir, **self.index_options, **self._decisions())
        if not self.shared:
            remove_stale_snapshots(self.index_dir, [g.key for g in self._galleries.values()])
        return_memory_to_os()  # what the snapshots' reading and replays freed (snapshot.py _compacted)
        if DEFAULT_GALLERY not in self._galleries:
            try:
                self.create_gallery(DEFAULT_GALLERY)
            except AlreadyExists:  # another server of the shared store created it meanwhile
                self._gallery(DEFAULT_GALLERY)
        LOG.info("loaded %d galleries in %.2f s", len(self._galleries), time.perf_counter() - started)
        self._warm_up_thread = threading.Thread(target=self._warm_up, name="calibrate-galleries", daemon=True)
        self._warm_up_thread.start()
        self._snapshotter: threading.Thread | None = None
        if snapshot_interval_s is not None and not self.shared:
            self._snapshotter = threading.Thread(target=self._snapshot_loop, args=(snapshot_interval_s,), name="index-snapshots", daemon=True)
            self._snapshotter.start()

    @classmethod
    def open(cls, data_dir: str | Path, pipeline: FaceAnalyzer, *, integrity_check: str = "quick", **options: object) -> GalleryManager:
        """A manager over ``data_dir`` (``gallery.sqlite3`` + ``index/``); ``integrity_check`` as
        store.py's (``"off"`` when the caller has just checked the store); ``options`` as the
        constructor's. Raises StoreCorruptError (DATA_LOSS) for a damaged store."""
        data_dir = Path(data_dir)
        store = SqliteTemplateStore(data_dir / STORE_FILE, integrity_check=integrity_check)
        try:
            return cls(store, pipeline, index_dir=data_dir / INDEX_DIR, **options)  # type: ignore[arg-type]
        except BaseException:
            store.close()
            raise

    @classmethod
    def open_milvus(cls, uri: str, pipeline: FaceAnalyzer, *, token: str = "", prefix: str = DEFAULT_MILVUS_PREFIX, **options: object) -> GalleryManager:
        """A manager over the galleries kept in the Milvus at ``uri`` (the ``milvus`` backend:
        :func:`open_milvus_store`), shared with every other server pointed at it; nothing is kept
        on local disk. ``options`` as the constructor's. Raises BackendUnavailable when Milvus
        cannot be reached, RuntimeError without the ``milvus`` extra."""
        store = open_milvus_store(uri, token=token, prefix=prefix)
        try:
            return cls(store, pipeline, index_dir=None, **options)  # type: ignore[arg-type]
        except BaseException:
            store.close()
            raise

    @property
    def model(self) -> ModelManifest:
        """The manifest of the loaded model (its ``model_id`` omits flip augmentation; the
        server's model id is ``pipeline.model_id``)."""
        return self.pipeline.manifest

    def _migrate_legacy_model_id(self, record: GalleryRecord) -> GalleryRecord:
        """Rewrite a gallery's legacy model id as the embedding id it stands for.

        Before embedding ids, a gallery recorded the embedder file's sha256 as its model id. A
        gallery recording the loaded embedder's sha256 was built with this embedder and, in the
        normal case, without flip augmentation: it gets ``manifest.embedding_id(False)``. Other
        galleries are returned unchanged.
        """
        legacy = self.model.files["embedder"].sha256
        if record.model_id != legacy:
            return record
        migrated = self.store.set_model_id(record.name, self.model.embedding_id(False))
        LOG.warning(
            "gallery %r recorded the legacy model id %s (the embedder file's sha256); rewrote it as embedding id %s "
            "(this embedder without flip augmentation)",
            record.name,
            legacy,
            migrated.model_id,
        )
        return migrated

    # -- galleries ---------------------------------------------------------------------------

    def create_gallery(self, name: str, *, threshold: float | None = None, policy: DecisionPolicy | None = None) -> GalleryRecord:
        """Create an empty gallery bound to the server's model (``pipeline.model_id``).

        Parameters
        ----------
        name : str
            1..128 characters of ``[A-Za-z0-9_.-]``.
        threshold : float, optional
            A fixed L2 decision threshold (> 0): shorthand for ``DecisionPolicy.fixed``.
        policy : DecisionPolicy, optional
            The decision policy; neither given: ``DEFAULT_POLICY`` (target FPIR 0.01, S-norm).

        Raises
        ------
        InvalidInput
            Malformed name or policy, or both threshold and policy (INVALID_ARGUMENT).
        AlreadyExists
            The name is taken (ALREADY_EXISTS).
        """
        check_gallery_name(name)
        policy = self._policy(threshold, policy)
        l2 = self._l2_threshold(policy)
        with self._lock:
            self._check_open()
            record = self.store.create_gallery(
                name, model_id=self.pipeline.model_id, threshold=l2, metric=self.model.metric, embedding_dim=self.model.embedding_dim, policy=policy
            )
            self._galleries[name] = IndexedGallery.empty(self.store, record, index_dir=self.index_dir, **self.index_options, **self._decisions())
        LOG.info("created gallery %r (%s)", name, policy.describe())
        return record

    def update_gallery(self, name: str, *, policy: DecisionPolicy) -> GalleryRecord:
        """Give a gallery a new decision policy; the next search decides with it.

        Raises InvalidInput for a malformed policy (INVALID_ARGUMENT), NotFound.
        """
        gallery = self._gallery(name)
        record = gallery.set_policy(check_policy(policy), self._l2_threshold(policy))
        LOG.info("gallery %r now decides with %s", name, policy.describe())
        return record

    def decision_status(self, name: str, *, wait_s: float | None = None) -> DecisionStatus:
        """What the gallery decides with now: policy, score kind, threshold, estimated FPIR there,
        and what the estimate rests on. Raises NotFound.

        After a change of over a quarter of the gallery (a bulk import) its calibration is
        recomputed before the next search decides (at 1M templates ~40 s, docs/scale.md). With
        ``wait_s`` (seconds) the call waits at most that long for it, then returns the previous
        one with ``recalibrating`` set (status reports: GetGallery, ListGalleries wait
        :data:`STATUS_WAIT_S`); None waits for it, and so does any wait for a gallery of up to
        open_set.py ``STATUS_FULL_WAIT_SIZE`` (20,000) searched vectors (templates, or identities
        under mean templates), whose recalibration takes seconds."""
        return self._gallery(name).decision_status(wait_s=wait_s)

    def find_duplicates(self, name: str, *, max_pairs: int = 100) -> list[DuplicatePair]:
        """Pairs of identities the gallery's policy would confuse, best score first.

        Each identity's first template is searched against the other identities with the rule of
        ``identify``; a pair is reported when the best other is within the threshold (the same
        person under two ids, or look-alikes). Symmetric pairs are reported once. Costs one
        search per identity. Raises InvalidInput for ``max_pairs`` outside 1..10000, NotFound.
        """
        check_max_pairs(max_pairs)
        found, calibration = self._gallery(name).duplicates()
        pairs: dict[frozenset[str], tuple[str, ScoredHit]] = {}
        for identity, best in sorted(found, key=lambda item: item[1].score):
            pairs.setdefault(frozenset((identity, best.hit.identity_id)), (identity, best))
        return [
            DuplicatePair(
                identity,
                self.store.get_identity(name, identity).display_name,
                best.hit.identity_id,
                best.hit.display_name,
                best.score,
                best.hit.distance,
                calibration.estimated_fpir(best.score),
            )
            for identity, best in list(pairs.values())[:max_pairs]
        ]

    def _decisions(self) -> dict[str, object]:
        """What every gallery decides with besides its policy (IndexedGallery's keywords)."""
        return {"curve": self.false_match, "fallback_threshold": self.model.threshold}

    def _l2_threshold(self, policy: DecisionPolicy) -> float:
        """A gallery's L2 threshold (GalleryRecord.threshold): the policy's fixed one, else the model's."""
        return policy.threshold if policy.threshold is not None else self.model.threshold

    def _policy(self, threshold: float | None, policy: DecisionPolicy | None) -> DecisionPolicy:
        if threshold is not None and policy is not None:
            raise InvalidInput("give a threshold or a decision policy, not both")
        if threshold is not None:
            return check_policy(DecisionPolicy.fixed(threshold))
        return check_policy(policy or DEFAULT_POLICY)

    def get_gallery(self, name: str) -> GalleryRecord:
        """The gallery with its identity and template counts. Raises NotFound / InvalidInput."""
        self._gallery(name)
        return self.store.get_gallery(name)

    def list_galleries(self) -> list[GalleryRecord]:
        """Every gallery, in creation order. Raises GalleryClosed once closing."""
        self._check_open()
        return self.store.list_galleries()

    def delete_gallery(self, name: str) -> GalleryDeletion:
        """Delete a gallery with its identities, templates and snapshot. Raises NotFound.

        Deleting ``default`` empties it: it is recreated at once, bound to the server's model.
        """
        deletion = self._delete(self._gallery(name))
        assert deletion is not None  # only_if_empty is off
        return deletion

    def _delete(self, gallery: IndexedGallery, *, only_if_empty: bool = False) -> GalleryDeletion | None:
        """Delete ``gallery`` (with ``only_if_empty``: unless it holds a template, then None)."""
        name = gallery.name
        counts = gallery.delete(only_if_empty=only_if_empty)
        if counts is None:
            return None
        identities, templates = counts
        with self._lock:
            if self._galleries.get(name) is gallery:  # not yet replaced by a gallery created meanwhile
                del self._galleries[name]
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
        model_id: str | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        display_name: str = "",
        metadata: dict[str, str] | None = None,
        face_policy: FacePolicy = FacePolicy.LARGEST,
        request_id: str = "",
    ) -> EnrollResult:
        """Add one template to an identity, creating the identity on its first template.

        Parameters
        ----------
        gallery, identity_id : str
        image : bytes, optional
            An encoded image (kind says what it contains); exactly one of image / embedding.
        embedding : (D,) float32, optional
            A precomputed embedding of model ``model_id``.
        model_id : str, optional
            The embedding id ``embedding`` was computed with; None or ``""`` means the server's
            (``pipeline.model_id``). Only with an embedding: an image is embedded by the server.
        display_name : str
            Set on creation, or replaces the current one when non-empty. At most 256 bytes
            (UTF-8), no control characters.
        metadata : dict[str, str], optional
            Merged into the identity's metadata; the merged map must fit the limits of
            validation.check_metadata (64 keys, keys 1..128 bytes, values <= 4096 bytes,
            16 KiB in all).
        face_policy : FacePolicy
            LARGEST enrolls the largest face; REJECT_MULTIPLE refuses images with several.
        request_id : str
            Idempotency key (1..128 printable ASCII characters; ``""`` = none, Google AIP-155):
            remembered with the template for ``store.REQUEST_ID_RETENTION_S`` (24 h) while the
            template exists. A call with a remembered key and the same request (same identity,
            display name, metadata, image bytes or embedding, kind, model id and face policy)
            returns the first call's result and stores nothing, also when both run at once.

        Returns
        -------
        EnrollResult
            Returned once the template is durably stored and searchable.

        Raises
        ------
        InvalidInput
            Malformed ids, display name or metadata (also when merged with the identity's),
            both or neither source, a ``model_id`` with an image (INVALID_ARGUMENT).
        ImageDecodeError, NoFaceError, EmbeddingShapeError
            Undecodable image, no face, wrong-length or non-finite embedding (INVALID_ARGUMENT).
        MultipleFacesError, ModelMismatchError
            Several faces under REJECT_MULTIPLE; the gallery's model differs from the server's
            (image) or the embedding's (FAILED_PRECONDITION), the message naming both ids.
        ImageTooLargeError
            Image over the pipeline's limits (RESOURCE_EXHAUSTED).
        RequestIdReusedError
            ``request_id`` is remembered with a different request (FAILED_PRECONDITION).
        NotFound
            Unknown gallery.
        """
        return self.store_enrollment(
            self.prepare_enrollment(
                gallery,
                identity_id,
                image=image,
                embedding=embedding,
                model_id=model_id,
                kind=kind,
                display_name=display_name,
                metadata=metadata,
                face_policy=face_policy,
                request_id=request_id,
            )
        )

    def prepare_enrollment(
        self,
        gallery: str,
        identity_id: str,
        *,
        image: bytes | None = None,
        embedding: np.ndarray | None = None,
        model_id: str | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        display_name: str = "",
        metadata: dict[str, str] | None = None,
        face_policy: FacePolicy = FacePolicy.LARGEST,
        request_id: str = "",
        early_merge_check: bool = True,
    ) -> PreparedEnrollment:
        """The first half of :meth:`enroll`: check the request and compute its embedding.

        Takes :meth:`enroll`'s arguments and raises what it raises before storing anything. A
        request whose ``request_id`` is remembered comes back as its first result (``replay``),
        without running the pipeline. Runs on any thread, several at once: BulkEnroll prepares a
        window of items side by side (the pipeline is the expensive half). Then hand the results to
        :meth:`store_enrollment` in the order the enrollments are to take effect.

        ``early_merge_check``: refuse metadata that, merged with the identity's stored metadata,
        is over the limits now, before the pipeline runs. BulkEnroll passes False: the items
        stored before this one may still change that metadata, and :meth:`store_enrollment`
        checks it in order anyway.
        """
        state = self._gallery(gallery)
        check_identity_id(identity_id)
        check_display_name(display_name)
        metadata = dict(metadata or {})
        check_metadata(metadata)
        fingerprint = ""
        if request_id:
            check_request_id(request_id)
            fingerprint = _enroll_fingerprint(identity_id, image, embedding, model_id, kind, display_name, metadata, face_policy)
            remembered = self.store.remembered_enroll(gallery, request_id)
            if remembered is not None:
                return PreparedEnrollment(state, identity_id, np.zeros(0, np.float32), None, "", display_name, metadata, request_id, fingerprint, _replayed(remembered, fingerprint))
        if early_merge_check:
            self._check_merged_metadata(gallery, {identity_id: metadata})  # store_enrollment checks again, in order
        if (image is None) == (embedding is None):
            raise InvalidInput("enroll needs exactly one of an image or an embedding")
        face: Face | None = None
        sha = ""
        if image is not None:
            if model_id:
                raise InvalidInput("model_id names the model of an embedding; an image is embedded by the server's own model")
            self._check_server_model(state)
            face = self._enrollment_face(image, kind, face_policy)
            vector = face.embedding.astype(np.float32)
            sha = hashlib.sha256(image).hexdigest()
        else:
            self._check_embedding_model(state, model_id)
            vector = check_embedding(embedding, state.embedding_dim)
        return PreparedEnrollment(state, identity_id, vector, face, sha, display_name, metadata, request_id, fingerprint)

    def store_enrollment(self, prepared: PreparedEnrollment) -> EnrollResult:
        """The second half of :meth:`enroll`: the duplicate check and the durable write.

        Checks the identity's stored metadata merged with the new (again: an earlier enrollment
        may have added to it since :meth:`prepare_enrollment`), searches the gallery for a
        possible duplicate under its decision rule, and stores the template (with its request id).
        Returns the result once durable and searchable; the first result when the request id
        was stored meanwhile (a concurrent retry). Raises InvalidInput (merged metadata),
        RequestIdReusedError, NotFound (the gallery deleted meanwhile).
        """
        if prepared.replay is not None:
            return prepared.replay
        state, identity_id = prepared.gallery, prepared.identity_id
        self._check_merged_metadata(state.name, {identity_id: prepared.metadata})
        (scored,), calibration = state.identify(prepared.embedding[None], 1, exclude=[identity_id])
        duplicate = Match.from_scored(scored[0]) if scored and scored[0].score <= calibration.threshold else None
        item = NewTemplate(identity_id, prepared.embedding, display_name=prepared.display_name, metadata=prepared.metadata, source_sha256=prepared.source_sha256, face=prepared.face)
        request = IdempotentRequest(prepared.request_id, prepared.fingerprint, _match_json(duplicate)) if prepared.request_id else None
        try:
            (added,) = state.add_templates([item], request=request)
        except EnrollReplayed as exc:  # a concurrent retry stored it first
            return _replayed(exc.remembered, prepared.fingerprint)
        LOG.debug("enrolled template %d of %r in %r", added.template_id, identity_id, state.name)
        return EnrollResult(identity_id, added.template_id, prepared.face, added.identity_created, duplicate, prepared.source_sha256)

    def _check_merged_metadata(self, gallery: str, additions: dict[str, dict[str, str]]) -> None:
        """Raise InvalidInput when an identity's stored metadata merged with ``additions[id]`` (the
        store merges on enroll and import) would be over the metadata limits.

        Checked before the write, outside its transaction: two concurrent writes that each fit
        could together still exceed the total (the store should re-check within its transaction).
        """
        for identity_id, added in additions.items():
            if not added:
                continue
            try:
                current = self.store.get_identity(gallery, identity_id).metadata
            except NotFound:
                continue
            check_metadata({**current, **added}, what=f"metadata of identity {identity_id[:40]!r} merged with its stored metadata")

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
        self._check_server_model(state)
        check_top_k(top_k)
        threshold = score_threshold(threshold)
        check_max_faces(max_faces)
        started = time.perf_counter()
        faces = self.pipeline.analyze(image, kind=kind, max_faces=max_faces)
        analyzed = time.perf_counter()
        timing.record("faces_per_image", len(faces))
        if not faces:
            return []
        x = np.stack([f.embedding for f in faces]).astype(np.float32)
        ranked, calibration = state.identify(x, top_k)
        searched = time.perf_counter()
        LOG.debug("identify %r: %d faces, analyze %.1f ms, search %.1f ms", state.name, len(faces), (analyzed - started) * 1e3, (searched - analyzed) * 1e3)
        with timing.timed("decision"):
            return [Identification.decide(face, scored, calibration, threshold) for face, scored in zip(faces, ranked, strict=True)]

    def identify_embedding(
        self, gallery: str, embedding: np.ndarray, *, model_id: str | None = None, top_k: int = DEFAULT_TOP_K, threshold: float | None = None
    ) -> Identification:
        """1:N search of one embedding ``(D,) float32``; ``face`` of the result is None.

        ``model_id`` is the embedding id the embedding was computed with (None or ``""``: the
        server's, ``pipeline.model_id``); it must equal the gallery's, the server's need not (no
        pipeline is involved). ``top_k`` and ``threshold`` as for :meth:`identify`.

        Raises EmbeddingShapeError / InvalidInput (INVALID_ARGUMENT), ModelMismatchError
        (FAILED_PRECONDITION, naming both ids), NotFound.
        """
        state = self._gallery(gallery)
        self._check_embedding_model(state, model_id)
        check_top_k(top_k)
        threshold = score_threshold(threshold)
        vector = check_embedding(embedding, state.embedding_dim)
        (scored,), calibration = state.identify(vector[None], top_k)
        with timing.timed("decision"):
            return Identification.decide(None, scored, calibration, threshold)

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
        self._check_server_model(state)
        threshold = decision_threshold(threshold, state.threshold)
        _, templates = state.identity_embeddings(identity_id)
        faces = self.pipeline.analyze(image, kind=kind, max_faces=1)
        if not faces:
            raise NoFaceError("no face was found in the image")
        probe = faces[0].embedding.astype(np.float32)
        distances = np.linalg.norm(templates - probe, axis=1)
        nearest = int(np.argmin(distances))
        distance = float(distances[nearest])
        return Verification(
            identity_id, distance, threshold, distance <= threshold, faces[0], self._probability_same(probe, templates[nearest]), self._estimated_far(distance)
        )

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
        return Comparison(distance, threshold, distance <= threshold, faces[0], faces[1], self._probability_same(a, b), self._estimated_far(distance))

    def embed(self, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, max_faces: int = 0) -> list[Face]:
        """Every face of an image with its embedding, largest first (``[]`` when none)."""
        check_max_faces(max_faces)
        faces = self.pipeline.analyze(image, kind=kind, max_faces=max_faces)
        timing.record("faces_per_image", len(faces))
        return faces

    def _estimated_far(self, distance: float) -> float | None:
        """The model's false-match rate at an L2 distance (decision.py ``FalseMatchCurve``), or None."""
        return None if self.false_match is None else self.false_match.rate(distance)

    def _probability_same(self, a: np.ndarray, b: np.ndarray) -> float | None:
        p = self.pipeline.probability_same(a[None], b[None])
        return None if p is None else float(p[0])

    # -- identities and templates ------------------------------------------------------------

    def get_identity(self, gallery: str, identity_id: str) -> IdentityRecord:
        """One identity with its templates. Raises NotFound / InvalidInput."""
        self._gallery(gallery)
        check_identity_id(identity_id)
        return self.store.get_identity(gallery, identity_id)

    def list_identities(
        self, gallery: str, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "", max_reply_bytes: int = MAX_LIST_REPLY_BYTES
    ) -> IdentityPage:
        """Identities in enrollment order, up to ``page_size`` (1..1000) at a time (no templates).

        ``page_token`` is ``""`` for the first page, else a previous page's ``next_page_token``
        (opaque; bound to the gallery). Raises InvalidInput for a bad size or token, NotFound.

        A page can hold fewer identities than ``page_size`` (and still have a next page): it is
        cut so that its reply stays within ``max_reply_bytes`` (an upper bound of the protobuf
        size, validation.identity_reply_bytes; default validation.MAX_LIST_REPLY_BYTES, under
        1 MiB), so a listing never exceeds the gRPC message limit. With the metadata limits one
        identity is at most about 18 KiB, so a page always holds at least one, and about 53
        identities carrying the maximum metadata; small identities fill whole pages.
        """
        state = self._gallery(gallery)
        check_page_size(page_size)
        after = decode_page_token(page_token, state.key)
        rows = self.store.list_identities(gallery, after_key=after, limit=page_size + 1)
        more = len(rows) > page_size
        rows = rows[:page_size]
        budget = max_reply_bytes - 64  # next_page_token: tag, length and at most ~40 characters
        for count, row in enumerate(rows):
            budget -= identity_reply_bytes(row.identity_id, row.display_name, row.metadata)
            if budget < 0 and count > 0:
                rows, more = rows[:count], True
                break
        token = encode_page_token(state.key, rows[-1].key) if more else ""
        return IdentityPage(rows, token)

    def update_identity(self, gallery: str, identity_id: str, *, display_name: str | None = None, metadata: dict[str, str] | None = None) -> IdentityRecord:
        """Replace the display name and/or the whole metadata map (None keeps a field).

        Returns the identity with its templates. Raises NotFound; InvalidInput for a malformed
        id, a display name or metadata over the limits (validation.check_display_name,
        check_metadata).
        """
        self._gallery(gallery)
        check_identity_id(identity_id)
        if display_name is not None:
            check_display_name(display_name)
        if metadata is not None:
            metadata = dict(metadata)
            check_metadata(metadata)
        self.store.update_identity(gallery, identity_id, display_name=display_name, metadata=None if metadata is None else dict(metadata))
        return self.store.get_identity(gallery, identity_id)

    def delete_identity(self, gallery: str, identity_id: str) -> int:
        """Delete an identity and its templates; returns how many templates. Raises NotFound."""
        state = self._gallery(gallery)
        check_identity_id(identity_id)
        return state.delete_identity(identity_id)

    def delete_template(self, gallery: str, template_id: int) -> bool:
        """Delete one template; True when its identity had no other and was deleted. Raises NotFound."""
        return self._gallery(gallery).delete_template(template_id)

    # -- export / import ---------------------------------------------------------------------

    def export_gallery(self, gallery: str) -> tuple[GalleryRecord, Iterator[ExportedTemplate]]:
        """The gallery and an iterator over all its templates (one consistent state, by template id).

        Close the iterator when stopping early. Raises NotFound.
        """
        self._gallery(gallery)
        return self.store.get_gallery(gallery), self.store.export_templates(gallery)

    def import_embeddings(self, gallery: str, model_id: str, templates: Iterable[NewTemplate | TemplateBatch]) -> ImportResult:
        """Store precomputed templates, skipping those an identity already has (same embedding).

        ``model_id`` is the embedding id the embeddings were computed with. The gallery is
        created (bound to the server's model, which must then be ``model_id``) when missing, and
        removed again should the import fail before it holds a template.
        ``templates`` are single :class:`NewTemplate` (committed in groups of
        :data:`_IMPORT_BATCH`) or :class:`TemplateBatch` (each committed in one transaction of its
        own), in any mix; every commit is durable and searchable before the next group is read.
        When an item is rejected, the commits before it stay imported (importing the same
        stream again skips them).

        Returns without recalibrating the gallery's decision threshold: its scorer recomputes it
        on the next search (open_set.py ``OpenSetScorer.calibration``; at 1M templates that
        takes minutes, which a bulk load of seconds should not wait for).

        Raises
        ------
        ModelMismatchError
            ``model_id`` differs from the gallery's, or from the server's for a gallery to be
            created (FAILED_PRECONDITION, naming both ids).
        InvalidInput, EmbeddingShapeError
            Empty ``model_id``, a malformed identity id or embedding, a display name or metadata
            over the limits, also when merged with the identity's stored metadata and the
            stream's earlier items, a batch whose columns differ in length (INVALID_ARGUMENT).
        """
        check_gallery_name(gallery)
        if not model_id:
            raise InvalidInput("model_id is required: the model the embeddings were computed with")
        try:
            self._gallery(gallery)
            exists = True
        except GalleryNotFound:
            exists = False
        created = False
        if not exists:
            check_model(gallery, self.pipeline.model_id, model_id, "the embeddings come from")  # a new gallery gets the server's model
            try:
                self.create_gallery(gallery)
                created = True
            except AlreadyExists:  # created concurrently: use it
                pass
        state = self._gallery(gallery)
        check_model(gallery, state.model_id, model_id, "the embeddings come from")
        imported = skipped = 0
        try:
            for group in _import_groups(templates):
                if isinstance(group, TemplateBatch):
                    batch = _batch_templates(group, state.embedding_dim)
                else:
                    self._check_import_items(gallery, group)
                    batch = [dataclasses.replace(item, embedding=check_embedding(item.embedding, state.embedding_dim)) for item in group]
                stored = sum(r is not None for r in state.add_templates(batch, skip_duplicates=True))
                imported += stored
                skipped += len(batch) - stored
        except BaseException:
            if created and gallery != DEFAULT_GALLERY:
                with contextlib.suppress(NotFound):  # deleted meanwhile: nothing left to remove
                    if self._delete(state, only_if_empty=True) is not None:
                        LOG.info("import into new gallery %r failed before any template was stored: gallery removed", gallery)
            raise
        LOG.info("imported %d templates into %r (%d skipped)", imported, gallery, skipped)
        return ImportResult(imported, skipped)

    def _check_import_items(self, gallery: str, items: list[NewTemplate]) -> None:
        """Check the identity data of single imported templates, also merged per identity over
        the group and with the identity's stored metadata (InvalidInput)."""
        additions: dict[str, dict[str, str]] = {}
        for item in items:
            check_identity_id(item.identity_id)
            check_display_name(item.display_name)
            check_metadata(item.metadata)
            if item.metadata:
                additions[item.identity_id] = {**additions.get(item.identity_id, {}), **item.metadata}
        for identity_id, added in additions.items():
            check_metadata(added, what=f"metadata of identity {identity_id[:40]!r} merged over the import's items")
        self._check_merged_metadata(gallery, additions)

    # -- snapshots and lifecycle -------------------------------------------------------------

    def snapshot(self) -> int:
        """Write an index snapshot of every gallery changed since its last one; returns how many.

        One gallery at a time (``IndexedGallery.snapshot``): its read lock is held only while
        its index is copied in memory; serializing, writing and fsyncing the copy happen after,
        so searches of the gallery go on and its writes wait at most for the copy. Then the store's change-log entries the
        snapshot contains are dropped. Raises OSError when a file cannot be written.
        """
        with self._lock:
            galleries = list(self._galleries.values())
        return sum(gallery.snapshot() is not None for gallery in galleries)

    def index_template_ids(self, gallery: str) -> np.ndarray:
        """Template ids held by the gallery's index, ascending ``(n,) int64`` (for consistency checks)."""
        return self._gallery(gallery).template_ids()

    def close(self, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop background work, write final snapshots, close the store (idempotent).

        Later calls are refused (GalleryClosed, UNAVAILABLE: calls still running when the
        server's grace period ends get it). The background snapshots and the writes and
        searches under way are waited for; so are recalibrations (each ends within one batch
        of searches of its gallery being closed) and the start-up calibration, each up to
        ``timeout_s`` seconds, so the store is not used after it is closed. Background index
        rebuilds are not waited for (IndexedGallery.close)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._snapshotter is not None:
            self._snapshotter.join()
        with self._lock:
            galleries = list(self._galleries.values())
        for gallery in galleries:
            gallery.close(timeout_s)
        self._warm_up_thread.join(timeout_s)
        self.snapshot()
        self.store.close()

    def _warm_up(self) -> None:
        """Calibrate every loaded gallery now (open_set.py), so that the first searches need not wait
        for it; a search that comes first waits for its gallery's calibration instead."""
        with self._lock:
            galleries = list(self._galleries.values())
        for gallery in galleries:
            if self._closed.is_set():
                return
            try:
                gallery.decision_status()
            except NotFound:  # deleted meanwhile
                continue
            except GalleryClosed:  # close() was called
                return
            except Exception:  # the next search retries
                LOG.exception("calibrating gallery %r failed", gallery.name)

    def _snapshot_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.snapshot()
            except Exception:  # keep serving; the next round or close() retries
                LOG.exception("writing index snapshots failed")

    # -- helpers -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        """GalleryClosed (UNAVAILABLE) once :meth:`close` has begun."""
        if self._closed.is_set():
            raise GalleryClosed("the server is shutting down; retry on another server or after its restart")

    def _gallery(self, name: str) -> IndexedGallery:
        """The loaded gallery ``name``; of a shared store, first brought up to date with what
        other servers wrote (:meth:`_followed`). Raises GalleryNotFound, GalleryClosed."""
        check_gallery_name(name)
        self._check_open()
        with self._lock:
            state = self._galleries.get(name)
        if self.shared:
            return self._followed(name, state)
        if state is None:
            raise GalleryNotFound(f"gallery {name!r} does not exist")
        return state

    def _followed(self, name: str, gallery: IndexedGallery | None) -> IndexedGallery:
        """``gallery`` synced with the shared store (IndexedGallery.sync); when another server
        created it, deleted it or deleted and re-created it, the registry follows: the new
        gallery is loaded, a deleted one dropped (GalleryNotFound)."""
        if gallery is not None:
            try:
                gallery.sync()
                return gallery
            except GalleryNotFound:
                with self._lock:
                    if self._galleries.get(name) is gallery:
                        del self._galleries[name]
        record = self.store.get_gallery(name)  # GalleryNotFound: deleted everywhere
        loaded = IndexedGallery.load(self.store, record, index_dir=self.index_dir, **self.index_options, **self._decisions())
        with self._lock:
            current = self._galleries.setdefault(name, loaded)
        if current is not loaded:  # another call loaded it first
            loaded.close(0)
            current.sync()
        return current

    def _check_server_model(self, gallery: IndexedGallery) -> None:
        """ModelMismatchError unless the server's pipeline computes the gallery's embeddings."""
        check_model(gallery.name, gallery.model_id, self.pipeline.model_id, "this server runs")

    def _check_embedding_model(self, gallery: IndexedGallery, model_id: str | None) -> None:
        """ModelMismatchError unless an embedding of ``model_id`` (None/"": the server's) fits the gallery."""
        if model_id:
            check_model(gallery.name, gallery.model_id, model_id, "the embedding comes from")
        else:
            check_model(gallery.name, gallery.model_id, self.pipeline.model_id, "the embedding (no model_id given: this server's) comes from")


def open_milvus_store(uri: str, *, token: str = "", prefix: str = DEFAULT_MILVUS_PREFIX) -> TemplateStore:
    """The milvus backend's store (milvus_store.py ``MilvusTemplateStore``) of the Milvus at
    ``uri`` (``http://HOST:PORT``), authenticated with ``token`` (``user:password`` or an API key,
    ``""`` for none), its collections named ``<prefix>_*`` and created when missing.

    Raises BackendUnavailable when Milvus cannot be reached; RuntimeError, saying what to
    install, without pymilvus (the ``milvus`` extra, imported only here)."""
    try:
        from facegallery.server.gallery.milvus_store import MilvusTemplateStore
    except ImportError as exc:
        raise RuntimeError(f"the milvus backend needs pymilvus: pip install 'facegallery[milvus]' ({exc})") from exc
    return MilvusTemplateStore(uri, token=token, prefix=prefix)


def _enroll_fingerprint(
    identity_id: str,
    image: bytes | None,
    embedding: np.ndarray | None,
    model_id: str | None,
    kind: ImageKind,
    display_name: str,
    metadata: dict[str, str],
    face_policy: FacePolicy,
) -> str:
    """sha256 (hex) of everything an Enroll request asks for, to tell a retry from another request
    under the same idempotency key."""
    source = hashlib.sha256(image if image is not None else np.asarray(embedding, "<f4").tobytes()).hexdigest()
    fields = [identity_id, "image" if image is not None else "embedding", source, model_id or "", kind.value, display_name, face_policy.value]
    payload = json.dumps([fields, sorted(metadata.items())], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _match_json(match: Match | None) -> dict | None:
    """A possible duplicate as the store remembers it with an Enroll request id."""
    if match is None:
        return None
    return {"identity_id": match.identity_id, "display_name": match.display_name, "distance": float(match.distance), "template_id": int(match.template_id), "score": float(match.score)}


def _replayed(remembered: RememberedEnroll, fingerprint: str) -> EnrollResult:
    """The first result of a retried Enroll; RequestIdReusedError when its key came with another request."""
    if remembered.fingerprint != fingerprint:
        raise RequestIdReusedError(
            f"request_id {remembered.request_id!r} was used at {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(remembered.created))} "
            "for a different enroll request; use a new request_id for a new request",
            field="request_id",
        )
    template = remembered.template
    duplicate = None if remembered.duplicate is None else Match(**remembered.duplicate)
    LOG.info("enroll request %r replayed: template %d of %r", remembered.request_id, template.template_id, template.identity_id)
    return EnrollResult(template.identity_id, template.template_id, template.face, remembered.identity_created, duplicate, template.source_sha256)


def _import_groups(templates: Iterable[NewTemplate | TemplateBatch]) -> Iterator[list[NewTemplate] | TemplateBatch]:
    """The import's commits: each TemplateBatch alone, runs of single templates in lists of at
    most :data:`_IMPORT_BATCH` (a run is cut where a batch follows it)."""
    group: list[NewTemplate] = []
    for item in templates:
        if isinstance(item, TemplateBatch):
            if group:
                yield group
                group = []
            yield item
            continue
        group.append(item)
        if len(group) == _IMPORT_BATCH:
            yield group
            group = []
    if group:
        yield group


def _batch_templates(batch: TemplateBatch, dim: int) -> list[NewTemplate]:
    """The checked templates of a batch, their embeddings ``(dim,) float32`` rows of one array.

    Checked column by column (one finiteness test of the ``(n, dim)`` array, each distinct id
    and name once), as a batch holds many thousands. Raises InvalidInput, EmbeddingShapeError.
    """
    ids, names = list(batch.identity_ids), list(batch.display_names)
    n = len(ids)
    if names and len(names) != n:
        raise InvalidInput(f"a batch needs one display name per identity id or none, got {len(names)} names for {n} ids", field="batch.display_names")
    x = np.asarray(batch.embeddings, dtype=np.float32).reshape(-1)
    if x.size != n * dim:
        raise EmbeddingShapeError(f"a batch of {n} templates needs {n} x {dim} = {n * dim} embedding values (float32), got {x.size}", field="batch.embeddings")
    x = x.reshape(n, dim)
    if not np.isfinite(x).all():
        raise EmbeddingShapeError(f"embedding values must be finite (no NaN or infinity); row {int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])} is not", field="batch.embeddings")
    for identity_id in set(ids):
        check_identity_id(identity_id)
    for name in set(names):
        check_display_name(name)
    if names:
        return [NewTemplate(identity_id, row, display_name=name) for identity_id, row, name in zip(ids, x, names, strict=True)]
    return [NewTemplate(identity_id, row) for identity_id, row in zip(ids, x, strict=True)]
