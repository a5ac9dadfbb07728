"""Approximate search for large galleries: an IVF-Flat :class:`VectorIndex`, the plan that says
when a gallery uses it, and the wrapper that lets a gallery rebuild its index beside searches.

* :class:`IvfFlatIndex`: faiss ``IndexIVFFlat`` (L2) with the template ids stored in its inverted
  lists and a hash-table direct map, so ``remove`` costs O(removed ids) and a removed id is gone
  from every later search (faiss ``remove_ids``; no tombstones). Each query scans the ``nprobe``
  lists nearest to it: ``nprobe * ntotal / nlist`` vectors instead of ``ntotal``.
* :class:`IndexPlan`: the exact factory below :data:`APPROXIMATE_ABOVE` templates, IVF above;
  ``nlist`` follows the size (:func:`nlist_for`) and an IVF index is retrained once the size
  calls for twice its lists (the gallery has grown ~4x since it was trained).
* :class:`RebuildableIndex`: the index a gallery holds. A rebuild copies the vectors out under
  the gallery's read lock (:meth:`RebuildableIndex.start_rebuild`), trains and fills the new index
  with no lock held (:meth:`IndexPlan.build`), then, under the write lock, replays the writes
  recorded meanwhile and swaps it in (:meth:`RebuildableIndex.finish_rebuild`).

Why IVF-Flat and not HNSW (``bench/ann_search.py``, docs/scale.md, 2-core machine): at 100k
face-like templates HNSW32 took 50-60 s to build and IVF 2-20 s to train and fill; faiss HNSW
cannot remove vectors (tombstones plus periodic full rebuilds, minutes at 1M here), while IVF
removes in microseconds; both reach recall@1 >= 0.99 against exact search at well under 1 ms.
Memory: IVF-Flat stores the raw float32 vectors (``4 * d`` bytes) plus an 8-byte id and a
direct-map entry per template; HNSW32 adds ``2 * 32 * 4`` bytes of graph links per vector.

Distances are plain Euclidean (L2), as index.py's; vectors are ``(n, d) float32``, ids ``int64``.
"""

from __future__ import annotations

import dataclasses
import math
import re

import faiss
import numpy as np
from facegallery.server.gallery.index import (
    DEFAULT_FACTORY,
    FaissIndex,
    VectorIndex,
    add_with_ids,
    deserialize,
    l2_search,
    remove_ids,
)

__all__ = [
    "APPROXIMATE_ABOVE",
    "NPROBE",
    "IvfFlatIndex",
    "IndexPlan",
    "RebuildableIndex",
    "nlist_for",
    "make_any_index",
]

#: Templates from which a gallery is searched approximately. Measured (bench/ann_search.py,
#: docs/scale.md, one core): exact search takes 0.31 ms per query at 20k, 2.2 ms at 60k and 3.75 ms
#: at 100k, IVF 0.12, 0.26 and 0.34 ms; an S-norm calibration at 60k 70 s exact, 25 s with IVF.
APPROXIMATE_ABOVE = 50_000
#: Inverted lists scanned per query. Recall@1 against exact search depends on nprobe far more
#: than on nlist; measured on face-like identities (real dlib embeddings moved by real
#: same-person and different-person offsets, bench/ann_search.py), 2,000 probes at 100k with 512
#: or 1024 lists: 0.987 at nprobe 32, 0.992 at 48, 0.9945 at 64, 0.998 at 96 (docs/scale.md).
NPROBE = 64
#: ``nlist`` is the power of two at or below ``NLIST_PER_SQRT * sqrt(ntotal)``, between the
#: bounds below. A query costs ``nlist`` centroid distances plus ``nprobe * ntotal / nlist``
#: vector distances, least at ``nlist = sqrt(nprobe * ntotal)`` (8 sqrt(N) at nprobe 64); half
#: or a quarter of that keeps k-means (cost ~ nlist^2, a minute for 2048 lists here) affordable.
#: Measured at 100k, nprobe 64: 0.55 ms per query with 512 lists, 0.28 ms with 1024.
NLIST_PER_SQRT = 4
MIN_NLIST, MAX_NLIST = 64, 4096
#: Training vectors per list (faiss warns below 39; k-means cost grows with points * nlist).
TRAIN_PER_LIST = 40
#: k-means iterations of the coarse quantizer (faiss's default is 25; 10 changed recall@1 by
#: < 0.001 here and trains 2.5x faster).
TRAIN_ITERATIONS = 10
#: An approximate gallery goes back to exact search below this fraction of APPROXIMATE_ABOVE
#: (hysteresis: a gallery hovering at the threshold is not rebuilt back and forth).
EXACT_BELOW_FRACTION = 0.5

_IVF_FACTORY = re.compile(r"IVF(\d+),Flat")


def nlist_for(ntotal: int) -> int:
    """Inverted lists for ``ntotal`` vectors: the power of two at or below ``NLIST_PER_SQRT *
    sqrt(ntotal)``, clamped to ``[MIN_NLIST, MAX_NLIST]`` (50k: 512, 100k: 1024, 1M: 2048; it
    doubles each time the size grows 4x)."""
    wanted = max(1.0, NLIST_PER_SQRT * math.sqrt(ntotal))
    return int(min(MAX_NLIST, max(MIN_NLIST, 2 ** math.floor(math.log2(wanted)))))


class IvfFlatIndex(VectorIndex):
    """:class:`VectorIndex` over a trained faiss ``IndexIVFFlat`` (L2), ids kept by the IVF itself.

    Parameters
    ----------
    d : int
        Vector dimension.
    nlist : int
        Inverted lists (coarse centroids).
    nprobe : int
        Lists scanned per query (can be changed later through :attr:`nprobe`).
    data : bytes-like, optional
        A serialized index (:meth:`serialize`) to restore; else use :meth:`trained`.

    Raises
    ------
    ValueError
        ``data`` holds another kind of index, or another ``d`` or ``nlist``.
    """

    def __init__(self, d: int, nlist: int, *, nprobe: int = NPROBE, data: bytes | memoryview | np.ndarray | None = None) -> None:
        self.d = int(d)
        self.factory = f"IVF{int(nlist)},Flat"
        if data is None:
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(self.d), self.d, int(nlist), faiss.METRIC_L2)
        else:
            index = deserialize(data)
            if not isinstance(index, faiss.IndexIVFFlat):
                raise ValueError(f"expected an IndexIVFFlat, got {type(index).__name__}")
        if index.d != self.d or index.nlist != int(nlist) or index.metric_type != faiss.METRIC_L2:
            raise ValueError(f"expected an L2 IVF{nlist} of d={self.d}, got IVF{index.nlist} d={index.d} metric={index.metric_type}")
        index.nprobe = int(nprobe)
        self._index = index  # faiss's wrapper keeps the quantizer alive with it

    @classmethod
    def trained(cls, d: int, sample: np.ndarray, nlist: int, *, nprobe: int = NPROBE, seed: int = 1234) -> IvfFlatIndex:
        """An empty index whose coarse quantizer is k-means of ``sample`` ``(m, d) float32``
        (``m`` >= ``nlist``; :data:`TRAIN_ITERATIONS` iterations) with a hash-table direct map."""
        index = cls(d, nlist, nprobe=nprobe)
        ivf = index._index
        ivf.cp.niter = TRAIN_ITERATIONS
        ivf.cp.seed = seed
        ivf.cp.max_points_per_centroid = TRAIN_PER_LIST
        ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index

    @property
    def nlist(self) -> int:
        """Inverted lists (k-means cells) of the coarse quantizer, fixed at training (:func:`nlist_for`)."""
        return int(self._index.nlist)

    @property
    def nprobe(self) -> int:
        """Lists a search visits (settable; more = higher recall, slower; :data:`NPROBE` by default)."""
        return int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._index.nprobe = int(value)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        add_with_ids(self._index, ids, _vectors(x, self.d))

    def remove(self, ids: np.ndarray) -> int:
        return remove_ids(self._index, ids)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return l2_search(self._index, _vectors(x, self.d), k)

    def ids(self) -> np.ndarray:
        return np.sort(self.items(vectors=False)[0])

    def items(self, *, vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
        invlists = self._index.invlists
        ids, codes = [], []
        for lst in range(self.nlist):
            n = invlists.list_size(lst)
            if n == 0:
                continue
            ids.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy())
            if vectors:
                codes.append(faiss.rev_swig_ptr(invlists.get_codes(lst), n * self.d * 4).view(np.float32).reshape(n, self.d).copy())
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        x = np.concatenate(codes) if codes else np.zeros((0, self.d), np.float32)
        return all_ids.astype(np.int64), x

    def copy(self) -> IvfFlatIndex:
        copied = IvfFlatIndex.__new__(IvfFlatIndex)
        copied.d, copied.factory = self.d, self.factory
        copied._index = faiss.clone_index(self._index)
        return copied

    def serialize(self) -> np.ndarray:
        return faiss.serialize_index(self._index)

    def __repr__(self) -> str:
        return f"IvfFlatIndex(d={self.d}, nlist={self.nlist}, nprobe={self.nprobe}, ntotal={self.ntotal})"


def _vectors(x: np.ndarray, d: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"vectors must have shape (n, {d}), got {x.shape}")
    return x


def make_any_index(d: int, factory: str, *, nprobe: int = NPROBE, data: bytes | memoryview | np.ndarray | None = None) -> VectorIndex:
    """Restore a serialized index of either kind (``data``), or make an empty exact one.

    ``factory`` ``"IVF<nlist>,Flat"`` gives an :class:`IvfFlatIndex` (``data`` required: an IVF
    must be trained), anything else index.py's :class:`FaissIndex`.
    """
    match = _IVF_FACTORY.fullmatch(factory)
    if match is None:
        return FaissIndex(d, factory, data=data)
    if data is None:
        raise ValueError(f"an empty {factory} index needs training: use IndexPlan.build")
    return IvfFlatIndex(d, int(match.group(1)), nprobe=nprobe, data=data)


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """Which index a gallery of a given size gets.

    Attributes
    ----------
    exact_factory : str
        index.py factory of exact indexes (default ``"IDMap2,Flat"``).
    approximate_above : int or None
        Templates (vectors) from which the index is an :class:`IvfFlatIndex`; None: always exact.
    nprobe : int
        Lists an IVF index scans per query.
    """

    exact_factory: str = DEFAULT_FACTORY
    approximate_above: int | None = APPROXIMATE_ABOVE
    nprobe: int = NPROBE

    def __post_init__(self) -> None:
        if self.approximate_above is not None and self.approximate_above < MIN_NLIST:
            raise ValueError(f"approximate_above must be >= {MIN_NLIST} (an IVF trains on its vectors), got {self.approximate_above}")
        if self.nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {self.nprobe}")

    def factory_for(self, ntotal: int) -> str:
        """The factory a fresh index of ``ntotal`` vectors is built with."""
        if self.approximate_above is None or ntotal < self.approximate_above:
            return self.exact_factory
        return f"IVF{nlist_for(ntotal)},Flat"

    def accepts(self, factory: str) -> bool:
        """Whether an index of ``factory`` (e.g. from a snapshot) can serve under this plan,
        maybe until a rebuild: the exact factory, or any IVF when the plan allows approximation."""
        return factory == self.exact_factory or (self.approximate_above is not None and _IVF_FACTORY.fullmatch(factory) is not None)

    def rebuild_factory(self, index: VectorIndex) -> str | None:
        """The factory ``index`` should be rebuilt with now, or None when it fits its size:
        exact past ``approximate_above``; IVF below ``EXACT_BELOW_FRACTION`` of it, or with half
        the lists :func:`nlist_for` its size wants, or under a plan without approximation.
        Never for an index that is not ``rebuildable``."""
        if not index.rebuildable:
            return None
        n = index.ntotal
        match = _IVF_FACTORY.fullmatch(index.factory)
        if match is None:
            wanted = self.factory_for(n)
            return wanted if wanted != index.factory else None
        if self.approximate_above is None or n < EXACT_BELOW_FRACTION * self.approximate_above:
            return self.exact_factory
        if nlist_for(n) >= 2 * int(match.group(1)):
            return self.factory_for(n)
        return None

    def restored(self, index: VectorIndex) -> VectorIndex:
        """``index`` (e.g. read from a snapshot) with this plan's search parameters."""
        if isinstance(index, IvfFlatIndex):
            index.nprobe = self.nprobe
        return index

    def build(self, d: int, ids: np.ndarray, x: np.ndarray, *, factory: str | None = None) -> VectorIndex:
        """A new index holding ``x`` ``(n, d) float32`` under ``ids`` ``(n,) int64``: of
        ``factory`` (default :meth:`factory_for` ``n``); an IVF is trained on a random sample of
        ``TRAIN_PER_LIST * nlist`` of the vectors. On one OpenMP thread: with two, k-means on a
        busy 2-core machine ran 4x slower (spinning threads), and searches keep the other core.
        About a minute at 1M here (docs/scale.md)."""
        factory = factory or self.factory_for(len(ids))
        match = _IVF_FACTORY.fullmatch(factory)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # this thread's setting: leave the other core to searches
        try:
            if match is None:
                index: VectorIndex = FaissIndex(d, factory)
            else:
                nlist = int(match.group(1))
                rng = np.random.default_rng(len(ids))
                sample = x if len(x) <= TRAIN_PER_LIST * nlist else x[np.sort(rng.choice(len(x), TRAIN_PER_LIST * nlist, replace=False))]
                index = IvfFlatIndex.trained(d, sample, nlist, nprobe=self.nprobe)
            index.add(ids, x)
        finally:
            faiss.omp_set_num_threads(threads)
        return index


class RebuildableIndex(VectorIndex):
    """A :class:`VectorIndex` that delegates to :attr:`current` and can be replaced by a rebuilt one.

    Between :meth:`start_rebuild` and :meth:`finish_rebuild` (or :meth:`abandon_rebuild`) every
    ``add`` and ``remove`` is applied to :attr:`current` and also recorded, so that the rebuilt
    index, made from the vectors :meth:`start_rebuild` returned, gets them too before the swap:
    no write during a rebuild is lost. Not synchronised, like every VectorIndex: the owner calls
    ``start_rebuild`` with writes excluded and ``finish_rebuild`` with everything excluded.
    """

    def __init__(self, index: VectorIndex) -> None:
        self.current = index
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None

    @property
    def d(self) -> int:  # type: ignore[override]
        return self.current.d

    @property
    def factory(self) -> str:  # type: ignore[override]
        return self.current.factory

    @property
    def ntotal(self) -> int:
        return self.current.ntotal

    @property
    def rebuilding(self) -> bool:
        return self._journal is not None

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        self.current.add(ids, x)
        if self._journal is not None:
            self._journal.append(("add", np.array(ids, dtype=np.int64).reshape(-1), np.array(x, dtype=np.float32)))

    def remove(self, ids: np.ndarray) -> int:
        removed = self.current.remove(ids)
        if self._journal is not None:
            self._journal.append(("remove", np.array(ids, dtype=np.int64).reshape(-1), None))
        return removed

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.current.search(x, k)

    def ids(self) -> np.ndarray:
        return self.current.ids()

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        return self.current.items()

    def copy(self) -> VectorIndex:
        return self.current.copy()

    def serialize(self) -> np.ndarray:
        return self.current.serialize()

    def start_rebuild(self) -> tuple[np.ndarray, np.ndarray]:
        """Start recording writes; returns every ``(ids (n,) int64, x (n, d) float32)`` now held."""
        if self._journal is not None:
            raise RuntimeError("a rebuild is already running")
        self._journal = []
        return self.current.items()

    def finish_rebuild(self, rebuilt: VectorIndex) -> int:
        """Replay the recorded writes onto ``rebuilt`` and make it :attr:`current`; returns how
        many writes were replayed."""
        journal, self._journal = self._journal or [], None
        for op, ids, x in journal:
            if op == "add":
                rebuilt.add(ids, x)  # type: ignore[arg-type]
            else:
                rebuilt.remove(ids)
        self.current = rebuilt
        return len(journal)

    def abandon_rebuild(self) -> None:
        """Stop recording (the rebuild failed or was dropped; a no-op when none runs)."""
        self._journal = None

    def __repr__(self) -> str:
        return f"RebuildableIndex({self.current!r}{', rebuilding' if self.rebuilding else ''})"
