"""Mean templates: one vector per identity, the mean of its template embeddings.

A gallery whose policy aggregates by ``Aggregation.MEAN`` (decision.py) is searched in an
:class:`IdentityMeans` index instead of its template index: an identity's distance to a probe is
the L2 distance to the mean of its templates (as Amazon Rekognition's user vectors; measured on
the dev protocol with three photos per person, it beat the nearest template by about 0.1 in DIR
at FPIR 0.01, docs/open-set.md). The template index, its snapshots and the store are unchanged;
the means are derived in memory from the store: built when the gallery is loaded (one pass over
its templates), and the means of the identities a write touches recomputed after it commits.

Each mean is stored under its identity's smallest template id, so index hits resolve to their
identity through the store's template owners like template hits do. Not synchronised: the owning
IndexedGallery holds its write lock around every change.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from facegallery.server.contract.errors import IdentityNotFound, NotFound
from facegallery.server.gallery.index import VectorIndex, make_index
from facegallery.server.gallery.store import TemplateStore

__all__ = ["IdentityMeans"]


class IdentityMeans:
    """The mean template of every identity of one gallery, in a flat index of its own.

    Attributes
    ----------
    index : VectorIndex
        ``(identities, D)`` float32 means under each identity's smallest template id.
    """

    def __init__(self, store: TemplateStore, gallery: str, dim: int, factory: str) -> None:
        self._store = store
        self._gallery = gallery
        self.index: VectorIndex = make_index(dim, factory)
        self._key_of: dict[str, int] = {}  # identity id -> the template id its mean is stored under
        self._mean_of: dict[str, np.ndarray] = {}

    @classmethod
    def build(cls, store: TemplateStore, gallery: str, dim: int, factory: str) -> IdentityMeans:
        """The means of every identity in the store's gallery (one pass over its templates)."""
        means = cls(store, gallery, dim, factory)
        ids, keys, rows = [], [], []
        for identity_id, template_ids, x in store.identity_templates(gallery):
            ids.append(identity_id)
            keys.append(int(template_ids.min()))
            rows.append(x.mean(axis=0, dtype=np.float64).astype(np.float32))
        if ids:
            x = np.stack(rows)
            means.index.add(np.array(keys, dtype=np.int64), x)
            means._key_of = dict(zip(ids, keys, strict=True))
            means._mean_of = dict(zip(ids, x, strict=True))
        return means

    def vector(self, identity_id: str) -> np.ndarray:
        """The mean of one identity, ``(1, D) float32``. Raises IdentityNotFound when it has no template."""
        mean = self._mean_of.get(identity_id)
        if mean is None:
            raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {self._gallery!r}")
        return mean[None]

    def refresh(self, identity_ids: Iterable[str]) -> None:
        """Recompute the means of identities whose templates changed (dropped when none is left)."""
        for identity_id in set(identity_ids):
            self._drop(identity_id)
            try:
                template_ids, x = self._store.identity_embeddings(self._gallery, identity_id)
            except NotFound:  # the identity was deleted
                continue
            key, mean = int(template_ids.min()), x.mean(axis=0, dtype=np.float64).astype(np.float32)
            self.index.add(np.array([key], dtype=np.int64), mean[None])
            self._key_of[identity_id], self._mean_of[identity_id] = key, mean

    def _drop(self, identity_id: str) -> None:
        key = self._key_of.pop(identity_id, None)
        self._mean_of.pop(identity_id, None)
        if key is not None:
            self.index.remove(np.array([key], dtype=np.int64))
