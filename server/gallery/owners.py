"""Which identity each template of a gallery belongs to, in memory, for grouping search hits.

A search returns template ids; an identity's distance is its nearest template's (index.py
``search_identities``), so every hit needs its identity. Asking the store for them cost one SQLite
join per search over every fetched template (400+ for an S-norm search): a quarter of the
server's time at 8 concurrent Identify calls on a 1,000-identity gallery (py-spy,
``bench/identify_throughput.py``). :class:`TemplateOwners` answers from two sorted int64 arrays
instead, with one vectorised ``searchsorted`` per search: 16 bytes per template (16 MB at 1M),
built from the store when a gallery loads (store.py ``template_identity_keys``).

Template ids are the store's ``AUTOINCREMENT`` keys, so new ones are larger than every id held and
are appended; a removed id is marked (identity key -1) and the arrays are compacted once marks
exceed half of them. Not synchronised: the owning IndexedGallery changes it under its write lock
and reads it under its read lock.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TemplateOwners", "NO_OWNER"]

#: The identity key of a template id the gallery does not hold.
NO_OWNER = -1
_MIN_CAPACITY = 1024


class TemplateOwners:
    """Template id -> identity key of one gallery.

    Parameters
    ----------
    template_ids, identity_keys : (n,) int64
        The gallery's templates and their identities' store keys (any order).
    """

    def __init__(self, template_ids: np.ndarray, identity_keys: np.ndarray) -> None:
        self._ids = np.zeros(0, np.int64)
        self._keys = np.zeros(0, np.int64)
        self._size = 0  # used entries of the buffers, removed ones included
        self._removed = 0
        self.reset(template_ids, identity_keys)

    def reset(self, template_ids: np.ndarray, identity_keys: np.ndarray) -> None:
        """Hold exactly these templates (a gallery reloaded from the store)."""
        ids, keys = _pair(template_ids, identity_keys)
        order = np.argsort(ids, kind="stable")
        self._hold_sorted(ids[order], keys[order])

    def _hold_sorted(self, ids: np.ndarray, keys: np.ndarray) -> None:
        self._size, self._removed = 0, 0
        self._ids, self._keys = np.zeros(max(_MIN_CAPACITY, len(ids)), np.int64), np.zeros(max(_MIN_CAPACITY, len(ids)), np.int64)
        self._append(ids, keys)

    def __len__(self) -> int:
        """Templates held."""
        return self._size - self._removed

    @property
    def nbytes(self) -> int:
        """Bytes of the two arrays (their capacity)."""
        return self._ids.nbytes + self._keys.nbytes

    def add(self, template_ids: np.ndarray, identity_keys: np.ndarray) -> None:
        """Hold new templates ``(n,) int64`` of identities ``(n,) int64``. Ids above every held id
        (the store's order) are appended; others are merged in (one pass over the held ones)."""
        ids, keys = _pair(template_ids, identity_keys)
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")
        ids, keys = ids[order], keys[order]
        if self._size and ids[0] <= self._ids[self._size - 1]:  # merged in (several writers of a shared store interleave their ids)
            held = self._keys[: self._size] != NO_OWNER
            held_ids, held_keys = self._ids[: self._size][held], self._keys[: self._size][held]
            at = np.searchsorted(held_ids, ids)  # one pass, not a re-sort: 1M held, 43 ms -> a few ms
            self._hold_sorted(np.insert(held_ids, at, ids), np.insert(held_keys, at, keys))
            return
        self._append(ids, keys)

    def remove(self, template_ids: np.ndarray) -> None:
        """Forget templates ``(n,) int64`` (ids not held are ignored)."""
        ids = np.asarray(template_ids, dtype=np.int64).reshape(-1)
        if not len(ids) or not self._size:
            return
        at = np.minimum(np.searchsorted(self._ids[: self._size], ids), self._size - 1)
        hit = np.unique(at[(self._ids[at] == ids) & (self._keys[at] != NO_OWNER)])
        self._keys[hit] = NO_OWNER
        self._removed += len(hit)
        if self._removed > self._size // 2:
            held = self._keys[: self._size] != NO_OWNER
            self.reset(self._ids[: self._size][held], self._keys[: self._size][held])

    def identity_keys(self, template_ids: np.ndarray) -> np.ndarray:
        """The identity key of each template id (any shape, int64; faiss's -1 padding included),
        :data:`NO_OWNER` for ids not held; same shape, int64."""
        ids = np.asarray(template_ids, dtype=np.int64)
        if not self._size:
            return np.full(ids.shape, NO_OWNER, np.int64)
        at = np.minimum(np.searchsorted(self._ids[: self._size], ids), self._size - 1)
        return np.where(self._ids[at] == ids, self._keys[at], NO_OWNER)

    def template_ids(self) -> np.ndarray:
        """The template ids held, ascending ``(n,) int64`` (a copy)."""
        return self._ids[: self._size][self._keys[: self._size] != NO_OWNER]

    def holds_identities(self, identity_keys: np.ndarray) -> np.ndarray:
        """Whether some held template belongs to each identity key ``(n,) int64``: ``(n,) bool``
        (one pass over the held templates)."""
        return np.isin(np.asarray(identity_keys, dtype=np.int64), self._keys[: self._size][self._keys[: self._size] != NO_OWNER])

    def _append(self, ids: np.ndarray, keys: np.ndarray) -> None:
        end = self._size + len(ids)
        if end > len(self._ids):
            capacity = max(end, 2 * len(self._ids))
            self._ids = np.concatenate([self._ids[: self._size], np.zeros(capacity - self._size, np.int64)])
            self._keys = np.concatenate([self._keys[: self._size], np.zeros(capacity - self._size, np.int64)])
        self._ids[self._size : end] = ids
        self._keys[self._size : end] = keys
        self._size = end


def _pair(template_ids: np.ndarray, identity_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(template_ids, dtype=np.int64).reshape(-1)
    keys = np.asarray(identity_keys, dtype=np.int64).reshape(-1)
    if ids.shape != keys.shape:
        raise ValueError(f"{len(ids)} template ids for {len(keys)} identity keys")
    return ids, keys
