"""The vector index of a gallery: FAISS search over template embeddings, and identity search.

The index is derived data; the store (store.py) is the truth; snapshot.py saves and restores it.
Two parts:

* :class:`VectorIndex`, the interface the gallery searches through, and :class:`FaissIndex`, its
  exact FAISS implementation, built from a faiss factory string (default ``"IDMap2,Flat"``: exact
  L2 over ``IndexFlatL2`` with template ids kept by ``IndexIDMap2``). The approximate
  implementation (IVF-Flat) and the plan of which one a gallery uses are in ann_index.py.
* :func:`search_identities`: an identity's distance is the minimum over its templates, so the
  index is searched for ``k' > k`` templates, which are grouped by identity; ``k'`` grows until
  ``k`` distinct identities are found or the index is exhausted (an approximate index is
  exhausted when it returns fewer than ``k'`` hits: the lists it scans hold no more).

Distances are plain Euclidean (L2) distances (faiss returns squared L2; we take the square root).
Short names as in faiss: n probes, d dimension, k neighbours, D distances, I ids.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import NamedTuple

import faiss
import numpy as np

from facegallery.server.gallery.owners import NO_OWNER, TemplateOwners

__all__ = [
    "DEFAULT_FACTORY",
    "VectorIndex",
    "FaissIndex",
    "make_index",
    "set_search_threads",
    "pin_search_threads",
    "l2_search",
    "add_with_ids",
    "remove_ids",
    "deserialize",
    "IdentityHit",
    "RankedIdentities",
    "search_identities",
]

#: Exact L2 search, template ids kept by IndexIDMap2 (add_with_ids / remove_ids / id list).
DEFAULT_FACTORY = "IDMap2,Flat"
#: First fetch of templates per identity wanted; multiplied by this while identities are missing.
_TEMPLATE_FANOUT = 4

# OpenMP threads per faiss call. OpenMP keeps this setting per calling thread, so setting it once
# in the main thread does not reach the server's handler threads: each thread sets it itself on
# its first search (else every handler thread would fan out to all cores and oversubscribe them).
_search_threads: int | None = None
_thread_state = threading.local()


def set_search_threads(n: int | None) -> None:
    """OpenMP threads each faiss search uses, in every thread (None = OpenMP's default, all cores)."""
    global _search_threads
    if n is not None and n < 1:
        raise ValueError(f"search threads must be >= 1, got {n}")
    _search_threads = n


def pin_search_threads() -> None:
    """Apply :func:`set_search_threads`' setting to the calling thread (each index's search calls it)."""
    if _search_threads is not None and getattr(_thread_state, "omp_threads", None) != _search_threads:
        faiss.omp_set_num_threads(_search_threads)
        _thread_state.omp_threads = _search_threads


def add_with_ids(index: faiss.Index, ids: np.ndarray, x: np.ndarray) -> None:
    """Add ``x`` ``(n, d) float32`` (already checked) under ``ids`` ``(n,)`` int64; ValueError when the lengths differ."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != len(x):
        raise ValueError(f"got {len(ids)} ids for {len(x)} vectors")
    if len(ids):
        index.add_with_ids(x, ids)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` ``(n,)`` int64 (absent ones are skipped: faiss takes them as an IDSelectorArray); returns how many were removed."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return 0
    return int(index.remove_ids(ids))


def l2_search(index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` nearest neighbours of each row of ``x`` ``(n, d) float32`` (already checked) in a faiss
    index of squared L2: ``D (n, k) float32`` L2 distances (+inf where fewer than k exist) and
    ``I (n, k) int64`` ids (-1 there). ValueError for k < 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(x) == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    pin_search_threads()
    squared, I = index.search(x, k)
    D = np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)
    D[I < 0] = np.inf
    return D, I.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Vector index


class VectorIndex(abc.ABC):
    """Nearest-neighbour search over ``(id, vector)`` pairs with Euclidean distance.

    Not synchronised: callers must keep writes (add, remove) apart from everything else;
    concurrent searches are safe.
    """

    #: Dimension d of the vectors.
    d: int
    #: The faiss factory string the index was built from (recorded in snapshots).
    factory: str
    #: Whether a background rebuild may replace the index by another kind (ann_index.py
    #: ``IndexPlan.rebuild_factory``); not an index Milvus searches (milvus_index.py).
    rebuildable: bool = True

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of vectors in the index."""

    @abc.abstractmethod
    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Add vectors ``x`` ``(n, d) float32`` under ids ``(n,) int64`` (not already present)."""

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the given ids ``(n,) int64`` (absent ids are ignored); returns how many were removed."""

    @abc.abstractmethod
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest vectors of each query.

        Parameters
        ----------
        x : (n, d) float32
            Query vectors.
        k : int
            Neighbours per query, >= 1.

        Returns
        -------
        D : (n, k) float32
            Plain L2 distances, ascending per row; +inf where there is no neighbour.
        I : (n, k) int64
            Ids of the neighbours; -1 where there is no neighbour (k > ntotal).
        """

    @abc.abstractmethod
    def ids(self) -> np.ndarray:
        """Every id in the index, ascending, ``(ntotal,) int64``."""

    @abc.abstractmethod
    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored ``(ids (ntotal,) int64, x (ntotal, d) float32)``, in the index's own order
        (a memory copy of the vectors: ``ntotal * d * 4`` bytes; what a rebuild starts from)."""

    @abc.abstractmethod
    def copy(self) -> VectorIndex:
        """An independent copy of the index (same ids, vectors and factory).

        Reads the index only, so it may run beside searches; a write must not run meanwhile.
        A memory copy, much faster than :meth:`serialize`: snapshots copy under the gallery's
        lock and serialize the copy after releasing it.
        """

    @abc.abstractmethod
    def serialize(self) -> np.ndarray:
        """The index as ``(nbytes,) uint8`` (:func:`make_index`'s ``data`` restores it)."""


class FaissIndex(VectorIndex):
    """:class:`VectorIndex` over a faiss ``IndexIDMap2`` with an L2 inner index.

    Parameters
    ----------
    d : int
        Vector dimension.
    factory : str
        faiss ``index_factory`` string; it must yield an ``IndexIDMap2`` (start with ``"IDMap2,"``)
        with the L2 metric, e.g. ``"IDMap2,Flat"`` (exact).
    data : bytes-like, optional
        A serialized index (:meth:`serialize`; bytes, memoryview or uint8 array) to restore instead of
        building an empty one.

    Raises
    ------
    ValueError
        The factory string or the data gives another kind of index, or a different ``d``.
    """

    def __init__(self, d: int, factory: str = DEFAULT_FACTORY, *, data: bytes | memoryview | np.ndarray | None = None) -> None:
        self.d = int(d)
        self.factory = factory
        if data is None:
            index = faiss.index_factory(self.d, factory, faiss.METRIC_L2)
        else:
            index = deserialize(data)
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"index factory {factory!r} must give an IndexIDMap2 (start with 'IDMap2,'), got {type(index).__name__}")
        if index.d != self.d or index.metric_type != faiss.METRIC_L2:
            raise ValueError(f"expected an L2 index of d={self.d}, got d={index.d} metric={index.metric_type}")
        self._index = index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        add_with_ids(self._index, ids, self._vectors(x))

    def remove(self, ids: np.ndarray) -> int:
        return remove_ids(self._index, ids)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return l2_search(self._index, self._vectors(x), k)

    def ids(self) -> np.ndarray:
        return np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        return ids, self._index.index.reconstruct_n(0, self.ntotal) if self.ntotal else np.zeros((0, self.d), np.float32)

    def copy(self) -> FaissIndex:
        copied = FaissIndex(self.d, self.factory)
        copied._index = faiss.clone_index(self._index)
        return copied

    def serialize(self) -> np.ndarray:
        return faiss.serialize_index(self._index)

    def _vectors(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"vectors must have shape (n, {self.d}), got {x.shape}")
        return x

    def __repr__(self) -> str:
        return f"FaissIndex(d={self.d}, factory={self.factory!r}, ntotal={self.ntotal})"


def deserialize(data: bytes | memoryview | np.ndarray) -> faiss.Index:
    """The faiss index serialized in ``data`` (``faiss.serialize_index``'s format).

    Read through a callback reader in 4 MiB chunks: faiss's own ``deserialize_index`` first
    copies the bytes into a zero-filled vector; measured on a 536 MB IVF index of 1M vectors,
    1.3 s that way and 0.16 s this way (the start-up of a large gallery, docs/scale.md).
    """
    view = memoryview(data).cast("B")
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = view[position : position + size]
        position += len(chunk)
        return bytes(chunk)

    return faiss.read_index(faiss.PyCallbackIOReader(read, 1 << 22))


def make_index(d: int, factory: str = DEFAULT_FACTORY, *, data: bytes | memoryview | np.ndarray | None = None) -> VectorIndex:
    """An empty (or, with ``data``, restored) exact index of dimension ``d`` for ``factory``
    (ann_index.py ``make_any_index`` restores approximate ones too)."""
    return FaissIndex(d, factory, data=data)


# ---------------------------------------------------------------------------------------------
# Identity search


@dataclasses.dataclass(frozen=True)
class IdentityHit:
    """One candidate identity for a probe: ``distance`` (L2) to its nearest template ``template_id``."""

    identity_key: int
    identity_id: str
    display_name: str
    template_id: int
    distance: float


class RankedIdentities(NamedTuple):
    """A probe's nearest identities, ascending distance: parallel ``(m,)`` arrays of the
    identities' store keys (int64), their nearest templates' ids (int64) and the L2 distances to
    those (float64)."""

    identity_keys: np.ndarray
    template_ids: np.ndarray
    distances: np.ndarray

    def __len__(self) -> int:
        return len(self.identity_keys)

    def without(self, identity_key: int | None) -> RankedIdentities:
        """The same ranking with one identity left out (None: unchanged)."""
        if identity_key is None:
            return self
        keep = self.identity_keys != identity_key
        return RankedIdentities(self.identity_keys[keep], self.template_ids[keep], self.distances[keep])

    def without_keys(self, identity_keys: np.ndarray) -> RankedIdentities:
        """The same ranking with the identities ``(n,) int64`` left out."""
        keep = ~np.isin(self.identity_keys, identity_keys)
        return RankedIdentities(self.identity_keys[keep], self.template_ids[keep], self.distances[keep])

    def head(self, n: int) -> RankedIdentities:
        """The first ``n`` identities."""
        return RankedIdentities(self.identity_keys[:n], self.template_ids[:n], self.distances[:n])


_NO_HITS = RankedIdentities(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))


def search_identities(index: VectorIndex, owners: TemplateOwners, x: np.ndarray, k: int) -> list[RankedIdentities]:
    """The ``k`` nearest identities of each probe, an identity's distance being its nearest template's.

    Parameters
    ----------
    index : VectorIndex
        Template ids -> embeddings.
    owners : TemplateOwners
        Template ids -> identity keys (owners.py); hits it does not hold are ignored.
    x : (n, d) float32
        Probe embeddings.
    k : int
        Identities per probe, >= 1.

    Returns
    -------
    list (length n) of RankedIdentities
        Ascending distance, at most ``k`` each (fewer when the gallery has fewer identities;
        empty for an empty gallery).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = len(x)
    ntotal = index.ntotal
    results: list[RankedIdentities] = [_NO_HITS] * n
    if ntotal == 0:
        return results
    pending = np.arange(n)
    fetch = min(ntotal, _TEMPLATE_FANOUT * k)
    while len(pending):
        D, I = index.search(x[pending], fetch)
        keys = owners.identity_keys(I)
        still = []
        for row, probe in enumerate(pending):
            results[probe] = _first_of_each_identity(D[row], I[row], keys[row], k)
            if len(results[probe]) < k and fetch < ntotal and I[row, -1] >= 0:
                still.append(probe)
        pending = np.asarray(still, dtype=np.int64)
        fetch = min(ntotal, fetch * _TEMPLATE_FANOUT)
    return results


def _first_of_each_identity(D: np.ndarray, I: np.ndarray, keys: np.ndarray, k: int) -> RankedIdentities:
    """The first (nearest) template of each identity in one ranked row, at most ``k`` identities."""
    held = np.flatnonzero(keys != NO_OWNER)
    _, first = np.unique(keys[held], return_index=True)
    rows = held[np.sort(first)[:k]]
    return RankedIdentities(keys[rows], I[rows].astype(np.int64), D[rows].astype(np.float64))
