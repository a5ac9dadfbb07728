"""A gallery's template index searched by Milvus itself: the server holds no embeddings.

With ``serve --backend milvus --milvus-search milvus`` a gallery's searches go to Milvus
(milvus_store.py ``search_templates``: exact, by the gallery's partition key, Strong consistency),
so a gallery may be larger than a server's memory. What the server still keeps per template is
its owner (owners.py: 16 bytes, the identity each hit belongs to), which also says which
templates the server holds: the rows of changes whose heads it has pulled. Hits outside it
(templates of a change another server has written but not yet committed) are left out by
index.py ``search_identities``, as with the in-memory index.

Adding and removing are bookkeeping only (Milvus has the rows once the store wrote them); there
is nothing to rebuild or snapshot. Under mean templates (decision.py ``Aggregation.MEAN``) the
means still live in memory, one per identity (identity_means.py), built from :meth:`items`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from facegallery.server.gallery.index import VectorIndex
from facegallery.server.gallery.owners import NO_OWNER, TemplateOwners

__all__ = ["MilvusIndex", "MILVUS_FACTORY"]

#: The ``factory`` of a :class:`MilvusIndex` (never a faiss factory).
MILVUS_FACTORY = "milvus"
#: copy() and serialize(): only snapshots and rebuilds call them, neither of which a shared store's
#: galleries have (indexed_gallery.py).
_NOT_COPIED = "a Milvus-searched index is neither copied nor serialized: Milvus holds its vectors"


class SearchingStore(Protocol):
    """What :class:`MilvusIndex` needs of the store (milvus_store.py ``MilvusTemplateStore``)."""

    def search_templates(self, key: int, dim: int, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def template_vectors(self, dim: int, template_ids: np.ndarray) -> np.ndarray: ...


class MilvusIndex(VectorIndex):
    """The templates of one gallery as Milvus holds them, restricted to those ``owners`` holds.

    Parameters
    ----------
    store : SearchingStore
        The milvus backend's store.
    gallery_key : int
        The gallery's key (its Milvus partition key).
    d : int
        Embedding dimension D.
    owners : TemplateOwners
        The gallery's template owners, kept by the IndexedGallery (it adds to and removes from
        them beside this index): the ids this index holds.
    """

    factory = MILVUS_FACTORY
    rebuildable = False

    def __init__(self, store: SearchingStore, gallery_key: int, d: int, owners: TemplateOwners) -> None:
        self.d = d
        self._store = store
        self._key = gallery_key
        self._owners = owners

    @property
    def ntotal(self) -> int:
        """Templates held (the owners')."""
        return len(self._owners)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        """Nothing to do: the store wrote the rows to Milvus, and the owners record them."""

    def remove(self, ids: np.ndarray) -> int:
        """How many of ``ids`` ``(n,) int64`` are held (the store deleted their rows; the owners
        forget them)."""
        return int(np.count_nonzero(self._owners.identity_keys(np.unique(np.asarray(ids, np.int64))) != NO_OWNER))

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """VectorIndex.search by Milvus (at most milvus_client.py ``SEARCH_LIMIT`` hits per probe,
        the rest padded with +inf / -1). Raises BackendUnavailable when Milvus cannot be
        reached; ValueError for k < 1."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return self._store.search_templates(self._key, self.d, np.ascontiguousarray(x, np.float32), k)

    def ids(self) -> np.ndarray:
        return self._owners.template_ids()

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """The held templates with their embeddings read from Milvus (``ntotal * d * 4`` bytes):
        what mean templates are built from."""
        ids = self._owners.template_ids()
        return ids, self._store.template_vectors(self.d, ids)

    def copy(self) -> MilvusIndex:
        raise TypeError(_NOT_COPIED)

    def serialize(self) -> np.ndarray:
        raise TypeError(_NOT_COPIED)

    def __repr__(self) -> str:
        return f"MilvusIndex(gallery_key={self._key}, d={self.d}, ntotal={self.ntotal})"
