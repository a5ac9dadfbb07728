"""Mean templates: one vector per identity, the mean of its template embeddings.

A gallery whose policy aggregates by ``Aggregation.MEAN`` (decision.py) is searched in an
:class:`IdentityMeans` index instead of its template index: an identity's distance to a probe is
the L2 distance to the mean of its templates (as Amazon Rekognition's user vectors; measured on
the dev protocol with three photos per person, it beat the nearest template by about 0.1 in DIR
at FPIR 0.01, docs/open-set.md). The template index and the store are unchanged; the means are
derived from the store: built in one pass over its templates, or restored from the gallery's
means snapshot (snapshot.py) plus the store's newer changes, and the means of the identities a
write touches recomputed after it commits (from the store, or, for identities the write
created, from the rows it wrote).

Each mean is stored under its identity's smallest template id, so index hits resolve to their
identity through the store's template owners like template hits do, and the index is the only
state (no per-identity Python objects: at 1M identities those cost ~0.7 KB each). On a store
other servers write too (milvus_store.py), the store may hold templates the gallery's index does
not (yet): ``held`` restricts every mean to the templates the index holds, and the gallery builds
its means from its own index (:meth:`IdentityMeans.from_templates`). Not synchronised: the owning IndexedGallery holds its write lock around every change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from facegallery.server.contract.errors import IdentityNotFound, NotFound
from facegallery.server.gallery.ann_index import IndexPlan, RebuildableIndex
from facegallery.server.gallery.index import VectorIndex
from facegallery.server.gallery.store import Change, TemplateStore

__all__ = ["IdentityMeans"]


class IdentityMeans:
    """The mean template of every identity of one gallery, in an index of its own.

    Attributes
    ----------
    index : RebuildableIndex
        ``(identities, D)`` float32 means under each identity's smallest template id; exact or
        approximate as the gallery's :class:`IndexPlan` says for the number of identities.

    ``held``: template ids ``(n,) int64`` -> ``(n,) bool``, which of them the gallery's index
    holds (None: all the store has).
    """

    def __init__(self, store: TemplateStore, gallery: str, index: VectorIndex, *, held: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._store = store
        self._gallery = gallery
        self._held = held
        self.index = RebuildableIndex(index)

    @classmethod
    def from_templates(
        cls, store: TemplateStore, gallery: str, template_ids: np.ndarray, x: np.ndarray, identity_keys: np.ndarray, plan: IndexPlan,
        held: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> IdentityMeans:
        """The means of the templates given (ids ``(n,) int64``, ``(n, D) float32``, their identity
        keys ``(n,) int64``): a gallery's own index, rather than the store."""
        return cls(store, gallery, plan.build(x.shape[1], *_group_means(template_ids, x, identity_keys)), held=held)

    def _embeddings(self, template_ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The held ones of an identity's templates."""
        if self._held is None:
            return template_ids, x
        keep = self._held(template_ids)
        return template_ids[keep], x[keep]

    @classmethod
    def build(cls, store: TemplateStore, gallery: str, dim: int, plan: IndexPlan) -> IdentityMeans:
        """The means of every identity in the store's gallery (one pass over its templates)."""
        keys, rows = [], []
        for _, template_ids, x in store.identity_templates(gallery):
            keys.append(int(template_ids.min()))
            rows.append(x.mean(axis=0, dtype=np.float64).astype(np.float32))
        x = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
        return cls(store, gallery, plan.build(dim, np.array(keys, dtype=np.int64), x))

    @classmethod
    def restore(cls, store: TemplateStore, gallery: str, index: VectorIndex, changes: list[Change], identities: int) -> IdentityMeans | None:
        """The means from a snapshot ``index`` plus the store's ``changes`` after it, or None
        when that cannot be done exactly (a removal among the changes: the identity that lost a
        template is no longer known; or the count differs from the store's ``identities``)."""
        if any(c.op == "remove" for c in changes):
            return None
        means = cls(store, gallery, index)
        owners = store.template_owners(c.template_id for c in changes)
        means.refresh({owner.identity_id for owner in owners.values()})
        return means if means.index.ntotal == identities else None

    def vector(self, identity_id: str) -> np.ndarray:
        """The mean of one identity, ``(1, D) float32``, from the store. Raises IdentityNotFound
        when it has no template."""
        try:
            _, x = self._embeddings(*self._store.identity_embeddings(self._gallery, identity_id))
        except NotFound:
            raise IdentityNotFound(f"identity {identity_id!r} does not exist in gallery {self._gallery!r}") from None
        if not len(x):
            raise IdentityNotFound(f"identity {identity_id!r} has no template in gallery {self._gallery!r}'s index")
        return x.mean(axis=0, dtype=np.float64).astype(np.float32)[None]

    def refresh(
        self, identity_ids: Iterable[str], removed: np.ndarray | None = None, created: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ) -> None:
        """Recompute the means of identities whose templates changed (dropped when none is left).

        ``removed``: template ids ``(n,) int64`` just deleted from them (a mean stored under one
        of them is dropped). ``created``: ``(template ids (m,) int64, embeddings (m, D) float32,
        identity keys (m,) int64)`` of every template of identities the change created; their
        means come from these rows, without reading the store (most of a bulk import's
        identities are new), and ``identity_ids`` need not name them.
        """
        stale = [np.zeros(0, np.int64) if removed is None else np.asarray(removed, dtype=np.int64).reshape(-1)]
        keys, rows = [], []
        # one query per 500 identities, not one each: replaying 100k identities at 1M took 25.7 s, now 18.7 s
        for stored, embeddings in self._store.identities_embeddings(self._gallery, identity_ids).values():  # deleted ones are left out
            stale.append(stored)  # its previous mean sits under one of them (or a removed one)
            template_ids, x = self._embeddings(stored, embeddings)
            if not len(template_ids):
                continue
            keys.append(int(template_ids.min()))
            rows.append(x.mean(axis=0, dtype=np.float64).astype(np.float32))
        self.index.remove(np.concatenate(stale))  # one call: an exact index compacts itself per call
        if keys:
            self.index.add(np.array(keys, dtype=np.int64), np.stack(rows))
        if created is not None and len(created[0]):
            self.index.add(*_group_means(*created))


def _group_means(template_ids: np.ndarray, x: np.ndarray, identity_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per identity key: its smallest template id ``(k,) int64`` and the mean of its rows
    ``(k, D) float32`` (accumulated in float64, as :meth:`IdentityMeans.build`)."""
    if not len(template_ids):
        return np.zeros(0, np.int64), np.zeros((0, x.shape[1]), np.float32)
    order = np.argsort(identity_keys, kind="stable")
    keys = identity_keys[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    counts = np.diff(np.r_[starts, len(keys)])
    sums = np.add.reduceat(x[order].astype(np.float64), starts, axis=0)
    return np.minimum.reduceat(template_ids[order], starts), (sums / counts[:, None]).astype(np.float32)
