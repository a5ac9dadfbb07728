"""Index snapshots: the file format, writing one, and loading a gallery's index at start-up.

A snapshot is one gallery's serialized vector index together with the last change ``seq`` of
the store's change log it contains, so that start-up loads it and replays only newer changes
instead of re-reading every embedding. A gallery that searches mean templates (identity_means.py)
also writes the index of its means, in the same format, to ``gallery-<key>-means.fgidx``. File
layout (``index/gallery-<key>.fgidx``)::

    8 bytes   magic  b"FGIDX\\x00\\x01\\n"
    4 bytes   little-endian uint32: length L of the header
    L bytes   UTF-8 JSON SnapshotHeader (gallery key and name, last_seq, d, ntotal, factory,
              sha256 of the payload, format "facegallery-index/1")
    rest      the payload: the faiss index as serialized by ``VectorIndex.serialize``
              (exact ``IDMap2,Flat`` or approximate ``IVF<nlist>,Flat``, ann_index.py)

:func:`write_snapshot` serializes, checksums and writes an index that must not change meanwhile:
the gallery passes a copy (``VectorIndex.copy``, a memory copy taken under its read lock) and
writes it after releasing the lock. The file goes through
``facegallery.server.contract.files.atomic_write`` (temp file, fsync, rename, fsync of the
directory): a crash at any point leaves the old snapshot or the new one.

:func:`open_gallery_index` loads a snapshot and replays the store's newer changes, or rebuilds
from the store when the snapshot is missing, corrupt or does not match; either way the index's
template ids are then checked against the store's. :func:`open_identity_means` does the same for
the means. Start-up at 1M templates is dominated by reading and checksumming the files and by
the store's template ids (docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from facegallery.server.contract.files import atomic_write
from facegallery.server.gallery.ann_index import IndexPlan, RebuildableIndex, make_any_index
from facegallery.server.gallery.identity_means import IdentityMeans
from facegallery.server.gallery.index import VectorIndex
from facegallery.server.gallery.store import GalleryRecord, TemplateStore

__all__ = [
    "SNAPSHOT_SUFFIX",
    "SnapshotError",
    "SnapshotHeader",
    "write_snapshot",
    "read_snapshot",
    "open_gallery_index",
    "open_identity_means",
    "snapshot_path",
    "means_snapshot_path",
    "remove_stale_snapshots",
]

LOG = logging.getLogger(__name__)

#: File name suffix of snapshots: ``gallery-<key>.fgidx``.
SNAPSHOT_SUFFIX = ".fgidx"
_MAGIC = b"FGIDX\x00\x01\n"
_FORMAT = "facegallery-index/1"
#: Snapshots, their temporary files (files.atomic_write: ``.gallery-<key>.fgidx.<random>.tmp``)
#: and the ``gallery-<key>.fgidx.tmp`` files earlier versions wrote.
_SNAPSHOT_FILE = re.compile(r"\.?gallery-\d+(-means)?" + re.escape(SNAPSHOT_SUFFIX) + r"(\..*)?")


class SnapshotError(Exception):
    """A snapshot file is missing, truncated, corrupt, or of another format."""


@dataclasses.dataclass(frozen=True)
class SnapshotHeader:
    """What a snapshot holds: the index of gallery ``gallery_key`` after change ``last_seq``."""

    gallery_key: int
    gallery: str
    last_seq: int
    d: int
    ntotal: int
    factory: str
    sha256: str
    format: str = _FORMAT


def write_snapshot(path: str | os.PathLike, index: VectorIndex, *, gallery_key: int, gallery: str, last_seq: int) -> SnapshotHeader:
    """Write ``index``, holding every change of gallery ``gallery_key`` up to ``last_seq``, to
    ``path`` atomically and durably (files.atomic_write); returns the header written.

    ``index`` must not change while this runs; it may be searched. The layout is in the module
    docstring. Raises OSError when the file cannot be written (``path`` is then untouched).
    """
    payload = index.serialize()
    header = SnapshotHeader(gallery_key, gallery, int(last_seq), index.d, index.ntotal, index.factory, hashlib.sha256(payload).hexdigest())
    header_bytes = json.dumps(dataclasses.asdict(header)).encode()
    with atomic_write(path, "wb") as f:
        f.write(_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes)
        f.write(payload)
    return header


def read_snapshot(path: str | os.PathLike) -> tuple[SnapshotHeader, VectorIndex]:
    """Load a snapshot written by :func:`write_snapshot`.

    An approximate index comes back with ann_index.py's default ``nprobe``
    (``IndexPlan.restored`` sets the gallery's).

    Raises
    ------
    SnapshotError
        Missing file, bad magic or header, checksum mismatch, or an index faiss cannot read.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot at {path}") from None
    prefix = len(_MAGIC) + 4
    if len(data) < prefix or not data.startswith(_MAGIC):
        raise SnapshotError(f"{path} is not a facegallery index snapshot")
    (length,) = struct.unpack("<I", data[len(_MAGIC) : prefix])
    try:
        header = SnapshotHeader(**json.loads(data[prefix : prefix + length]))
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{path} has a malformed header: {exc}") from exc
    payload = memoryview(data)[prefix + length :]
    if header.format != _FORMAT or hashlib.sha256(payload).hexdigest() != header.sha256:
        raise SnapshotError(f"{path} is corrupt (format or checksum mismatch)")
    try:
        index = make_any_index(header.d, header.factory, data=payload)
    except (RuntimeError, ValueError) as exc:
        raise SnapshotError(f"{path}: faiss cannot read the index: {exc}") from exc
    if index.ntotal != header.ntotal:
        raise SnapshotError(f"{path} holds {index.ntotal} vectors, its header says {header.ntotal}")
    return header, index


def open_gallery_index(
    store: TemplateStore,
    gallery: GalleryRecord,
    path: str | os.PathLike,
    plan: IndexPlan = IndexPlan(),
    *,
    template_ids: Callable[[], np.ndarray] | None = None,
) -> VectorIndex:
    """The index of ``gallery`` as of its ``last_seq``: snapshot plus replay, or a rebuild.

    The snapshot is used when it belongs to this gallery (same key and dimension, an index kind
    ``plan`` accepts) and is not newer than the store; changes after its ``last_seq`` are
    replayed (removals, then the additions that still exist). The result's ids must equal the
    store's template ids, otherwise (or when the snapshot is unusable) the index is rebuilt from
    every stored embedding, of the kind ``plan`` gives its size. So a snapshot replaced while this
    runs (its older changes then pruned) costs a rebuild, never a wrong index. Call it while the
    gallery receives no writes. ``template_ids``: the store's template ids of the gallery,
    ascending ``(n,) int64``, when the caller reads them anyway (the gallery's template owners);
    None reads them here (``store.template_ids``).
    """
    started = time.perf_counter()
    try:
        index = _from_snapshot(store, gallery, Path(path), plan, template_ids or (lambda: store.template_ids(gallery.name)))
        how = "snapshot"
    except SnapshotError as exc:
        LOG.info("gallery %r: %s; rebuilding the index from the store", gallery.name, exc)
        index = _rebuild(store, gallery, plan)
        how = "rebuild"
    LOG.info("gallery %r: index of %d templates (%s) ready (%s) in %.3f s", gallery.name, index.ntotal, index.factory, how, time.perf_counter() - started)
    return index


def open_identity_means(store: TemplateStore, gallery: GalleryRecord, path: str | os.PathLike, plan: IndexPlan = IndexPlan()) -> IdentityMeans:
    """The mean templates of ``gallery``: its means snapshot (:func:`means_snapshot_path`) plus
    the store's newer changes (identity_means.py ``IdentityMeans.restore``), or built from the
    store when there is none, it does not fit, or a change cannot be replayed."""
    started = time.perf_counter()
    try:
        header, index = _usable_snapshot(gallery, Path(path), plan)
        changes = store.changes_since(gallery.name, header.last_seq)
        means = IdentityMeans.restore(store, gallery.name, index, changes, gallery.identity_count)
        if means is None:
            raise SnapshotError(f"{path} plus the store's newer changes cannot be replayed exactly")
        if changes:
            means.index = RebuildableIndex(_compacted(means.index.current))
        how = "snapshot"
    except SnapshotError as exc:
        LOG.info("gallery %r: %s; building the mean templates from the store", gallery.name, exc)
        means = IdentityMeans.build(store, gallery.name, gallery.embedding_dim, plan)
        how = "rebuild"
    LOG.info("gallery %r: %d mean templates (%s) ready (%s) in %.3f s", gallery.name, means.index.ntotal, means.index.factory, how, time.perf_counter() - started)
    return means


def _usable_snapshot(gallery: GalleryRecord, path: Path, plan: IndexPlan) -> tuple[SnapshotHeader, VectorIndex]:
    header, index = read_snapshot(path)
    if (header.gallery_key, header.d) != (gallery.key, gallery.embedding_dim) or not plan.accepts(header.factory):
        raise SnapshotError(f"{path} is for another gallery, dimension or index type")
    if header.last_seq > gallery.last_seq:
        raise SnapshotError(f"{path} is newer (seq {header.last_seq}) than the store (seq {gallery.last_seq})")
    return header, plan.restored(index)


def _from_snapshot(store: TemplateStore, gallery: GalleryRecord, path: Path, plan: IndexPlan, template_ids: Callable[[], np.ndarray]) -> VectorIndex:
    header, index = _usable_snapshot(gallery, path, plan)
    changes = store.changes_since(gallery.name, header.last_seq)
    removed = {c.template_id for c in changes if c.op == "remove"}
    added = {c.template_id for c in changes if c.op == "add"} - removed
    index.remove(np.fromiter(removed, dtype=np.int64, count=len(removed)))
    blocks = list(store.embeddings(gallery.name, added))
    if blocks:  # one add, not one per block of 500: replaying 100k templates into a 1M IVF index took 19.2 s, now 15.0 s
        index.add(np.concatenate([ids for ids, _ in blocks]), np.concatenate([x for _, x in blocks]))
        index = _compacted(index)
    if not np.array_equal(index.ids(), template_ids()):
        raise SnapshotError(f"{path} plus {len(changes)} replayed changes does not match the store")
    LOG.debug("gallery %r: snapshot seq %d, replayed %d changes", gallery.name, header.last_seq, len(changes))
    return index


def _compacted(index: VectorIndex) -> VectorIndex:
    """A copy of ``index`` holding its vectors in arrays of exactly their size.

    Adding to an index loaded from a snapshot grows the arrays of its inverted lists (faiss keeps
    each in a ``std::vector``, which grows geometrically), so after a replay the index took far
    more memory than its vectors: measured at 1M templates (IVF, mean templates) with 10,000
    changes replayed, RSS 1.95-2.0 GB against 1.2 GB from the snapshot alone; with the copy, 1194
    MB (docs/scale.md). The copy costs about 0.3 s at 1M; the grown index is freed
    (GalleryManager trims the heap after loading).
    """
    return index.copy()


def _rebuild(store: TemplateStore, gallery: GalleryRecord, plan: IndexPlan) -> VectorIndex:
    blocks = list(store.embeddings(gallery.name))
    ids = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    x = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros((0, gallery.embedding_dim), np.float32)
    return plan.build(gallery.embedding_dim, ids, x)


def snapshot_path(index_dir: str | os.PathLike, gallery_key: int) -> Path:
    """Where the index snapshot of the gallery with store key ``gallery_key`` lives."""
    return Path(index_dir) / f"gallery-{gallery_key}{SNAPSHOT_SUFFIX}"


def means_snapshot_path(index_dir: str | os.PathLike, gallery_key: int) -> Path:
    """Where the snapshot of the mean templates of the gallery with key ``gallery_key`` lives."""
    return Path(index_dir) / f"gallery-{gallery_key}-means{SNAPSHOT_SUFFIX}"


def remove_stale_snapshots(index_dir: str | os.PathLike, live_keys: Iterable[int]) -> None:
    """Delete the snapshot files in ``index_dir`` of galleries not in ``live_keys``, and leftover
    temporary files of interrupted writes.

    Call it before any snapshot is being written (a temporary file in use would be deleted).
    """
    live = {path(index_dir, key).name for key in live_keys for path in (snapshot_path, means_snapshot_path)}
    for path in sorted(Path(index_dir).iterdir()):
        if _SNAPSHOT_FILE.fullmatch(path.name) and path.name not in live:
            LOG.info("removing stale index file %s", path)
            path.unlink(missing_ok=True)
