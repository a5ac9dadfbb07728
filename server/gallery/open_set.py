"""Scoring probes against one gallery under its decision policy (decision.py), with the state it needs.

:class:`OpenSetScorer` belongs to one :class:`~facegallery.server.gallery.indexed_gallery.IndexedGallery`,
which calls it with the gallery's read lock held and passes its index. It keeps two derived
things, both rebuilt from the index when stale:

* **cohort neighbours** per identity: the ascending L2 distances and ids of its
  ``cohort_size + 1`` nearest other identities (S-norm's template side, one extra so that a
  leave-one-out search can drop the probe's own identity). Computed on first use, by searching
  the identity's vectors (``identity_vectors``: its templates, or its mean template);
  about 3 KB per identity at k = 100; at most :data:`MAX_CACHED_IDENTITIES` are kept (oldest
  dropped first).
* the **calibration** (decision.py ``Calibration``): threshold and FPIR estimate from
  leave-one-out searches of a deterministic sample of M identities. Each one computed is kept in
  the store (store.py ``save_calibration``) with the store's change ``seq`` then, and a
  restarted server starts from it (:meth:`OpenSetScorer.restore_calibration`) instead of
  recomputing it on the first search (37-40 s at 1M templates with IVF, docs/scale.md).

Both are current within :data:`STALE_FRACTION`: an entry is recomputed once the templates added
or removed since it was computed exceed that fraction of the templates the gallery had then.
Costs, for N templates of dimension D and cohort k (flat index): a search scores
``RERANK_CANDIDATES`` candidates from one search for ``k + 1`` identities (one ``N x D`` scan,
as a plain search) plus one batched search for the candidates whose neighbours are not cached;
recalibration runs M + (uncached candidates) searches, every ~5% of change, in the thread that
first needs it (or in the background) while other threads keep the previous calibration.
Measured by ``bench/open_set.py`` (synthetic embeddings, one faiss thread, exact index): at 1M
templates a distance search takes ~56 ms, an S-norm search ~64 ms with a warm cohort cache and
~670 ms cold, a recalibration ~110 s (distance) and ~210 s (S-norm). Past ann_index.py's
``APPROXIMATE_ABOVE`` the index is IVF-Flat and each of those searches scans ``nprobe`` lists
instead of every template; what is left is mostly this module's and index.py's per-hit Python
work (docs/scale.md, ``bench/ann_search.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from facegallery.server.gallery.decision import (
    RERANK_CANDIDATES,
    Calibration,
    DecisionPolicy,
    FalseMatchCurve,
    ScoreKind,
    calibrate,
    choose_score_kind,
    cohort_stats,
    loo_sample_size,
    probe_cohort_stats,
    snorm,
)
from facegallery.server.contract.errors import GalleryClosed, NotFound
from facegallery.server.gallery.index import IdentityHit, RankedIdentities, VectorIndex, search_identities
from facegallery.server.gallery.owners import TemplateOwners
from facegallery.server.gallery.store import StoredCalibration, TemplateStore

__all__ = ["ScoredHit", "OpenSetScorer", "STALE_FRACTION", "STATUS_FULL_WAIT_SIZE", "MAX_CACHED_IDENTITIES"]

LOG = logging.getLogger(__name__)

#: ``read(fn)`` runs ``fn(index, version)`` under the gallery's read lock and returns its result.
Reader = Callable[[Callable[[VectorIndex, int], Any]], Any]

#: Derived state is recomputed once this fraction of the gallery's templates has changed.
STALE_FRACTION = 0.05
#: Beyond this fraction of change a stale calibration is not used while a new one is computed.
STALE_BLOCKING = 0.25
#: A status report waits in full for the recalibration of a gallery searching at most this many
#: vectors (its templates, or its identities under mean templates); measured, default policy,
#: exact index, 2 cores: 2.9 s at 20k templates (10k identities), 5.4 s at 50k.
STATUS_FULL_WAIT_SIZE = 20_000
#: Cohort-neighbour entries kept per gallery (about 3 KB each at k = 100, measured: 101 distances
#: and identity ids).
MAX_CACHED_IDENTITIES = 100_000
#: Leave-one-out probes per batched search.
_LOO_BATCH = 256


@dataclasses.dataclass(frozen=True)
class ScoredHit:
    """A candidate identity with its ``score`` (decision.py ``ScoreKind``; lower = more similar)."""

    hit: IdentityHit
    score: float


@dataclasses.dataclass(frozen=True)
class _Neighbours:
    distances: np.ndarray  # (m,) float64 ascending, m <= k + 1
    ids: tuple[str, ...]
    version: int  # the gallery's change counter when computed
    size: int  # templates in the gallery then
    stats: tuple[float, float]  # cohort_stats of distances (no identity left out)


class OpenSetScorer:
    """Scores, thresholds and FPIR estimates of one gallery (module docstring).

    Parameters
    ----------
    gallery : str
        The gallery's name in ``store``.
    store : TemplateStore
    policy : DecisionPolicy
    curve : FalseMatchCurve, optional
        The model's false-match curve.
    fallback_threshold : float
        The model's L2 threshold (decision.py ``calibrate``).
    identity_vectors : callable
        Identity id -> the ``(n, D) float32`` vectors that stand for it in the searched index.
    owners : TemplateOwners
        The identity of each template id of the searched index (owners.py), kept current by
        the gallery.
    applied_seq : callable
        The store's newest change the gallery's index holds (called with the read lock held).

    Every method taking ``index`` must be called with the gallery's read lock held;
    ``version`` is the gallery's count of template changes (adds + removes) so far.
    Thread-safe otherwise.
    """

    def __init__(
        self,
        gallery: str,
        store: TemplateStore,
        policy: DecisionPolicy,
        curve: FalseMatchCurve | None,
        *,
        fallback_threshold: float,
        identity_vectors: Callable[[str], np.ndarray],
        owners: TemplateOwners,
        applied_seq: Callable[[], int],
    ) -> None:
        self.gallery = gallery
        #: identity id -> ``(n, D) float32`` vectors that stand for it in the searched index
        #: (its templates, or its mean template).
        self.identity_vectors = identity_vectors
        self.policy = policy
        self._store = store
        self._owners = owners
        self._applied_seq = applied_seq
        self._curve = curve
        self._fallback = fallback_threshold
        self._neighbours: dict[str, _Neighbours] = {}
        self._cache_lock = threading.Lock()
        self._calibration: Calibration | None = None
        self._calibration_at: tuple[int, int] = (0, 0)  # (version, templates) when computed
        self._calibrating = threading.Lock()
        self._calibrated = threading.Condition()  # notified when a recalibration sets _calibration

    def set_policy(self, policy: DecisionPolicy) -> None:
        """Decide with ``policy`` from now on (the next search recalibrates and recomputes cohorts)."""
        self.policy = policy
        self._calibration = None
        with self._cache_lock:
            self._neighbours.clear()

    # -- searching ---------------------------------------------------------------------------

    def score(
        self, index: VectorIndex, x: np.ndarray, top_k: int, *, version: int, kind: ScoreKind, exclude: list[str | None] | None = None
    ) -> list[list[ScoredHit]]:
        """The ``top_k`` best-scored identities of each probe ``x`` ``(n, D) float32``, best first.

        ``kind`` DISTANCE: nearest identities, score = L2 distance. SNORM: the
        ``max(top_k, RERANK_CANDIDATES)`` nearest identities get their S-norm score (the probe's
        cohort from the same search) and are reranked by it. ``exclude[i]`` leaves one identity
        out of probe i's search (a template of that identity as the probe: enrollment,
        leave-one-out), also from its candidates' cohorts.
        """
        k = self.policy.cohort_size
        exclude = exclude if exclude is not None else [None] * len(x)
        out_keys = self._store.identity_keys(self.gallery, {e for e in exclude if e is not None}) if any(e is not None for e in exclude) else {}
        extra = 1 if out_keys else 0
        candidates = top_k if kind is ScoreKind.DISTANCE else max(top_k, RERANK_CANDIDATES)
        wanted = top_k if kind is ScoreKind.DISTANCE else max(k + 1, candidates)
        ranked = [r.without(out_keys.get(out)) for r, out in zip(search_identities(index, self._owners, x, wanted + extra), exclude, strict=True)]
        keys = np.concatenate([r.identity_keys[:candidates] for r in ranked])
        names = self._store.identity_names(keys)
        if len(names) < len(np.unique(keys)):  # deleted by another server of a shared store since this index synced
            gone = np.setdiff1d(keys, np.fromiter(names, np.int64, len(names)))
            ranked = [r.without_keys(gone) for r in ranked]
        if kind is ScoreKind.DISTANCE:
            return [_scored(r.head(top_k), r.distances[:top_k], names) for r in ranked]
        neighbours = self.neighbours(index, sorted({names[key][0] for r in ranked for key in r.identity_keys[:candidates].tolist()}), version=version)
        results = []
        for r, out in zip(ranked, exclude, strict=True):
            head = r.head(candidates)
            if not len(head):
                results.append([])
                continue
            probe_mu, probe_sigma = probe_cohort_stats(r.distances, np.arange(len(head)), k)
            stats = np.array([self._template_stats(neighbours[names[key][0]], out, k) for key in head.identity_keys.tolist()])
            scores = snorm(head.distances, probe_mu, probe_sigma, stats[:, 0], stats[:, 1])
            scores = np.where(np.isfinite(scores), scores, math.inf)
            order = np.argsort(scores, kind="stable")[:top_k]
            results.append(_scored(RankedIdentities(*(a[order] for a in head)), scores[order], names))
        return results

    @staticmethod
    def _template_stats(entry: _Neighbours, exclude: str | None, k: int) -> tuple[float, float]:
        if exclude is not None and exclude in entry.ids:
            keep = [i for i, other in enumerate(entry.ids) if other != exclude]
            return cohort_stats(entry.distances[keep], k)
        return entry.stats

    # -- cohort neighbours -------------------------------------------------------------------

    def neighbours(self, index: VectorIndex, identity_ids: list[str], *, version: int) -> dict[str, _Neighbours]:
        """Cohort neighbours of each identity: cached when current, else computed in one batched search."""
        size = index.ntotal
        found: dict[str, _Neighbours] = {}
        with self._cache_lock:
            for identity in identity_ids:
                entry = self._neighbours.get(identity)
                if entry is not None and version - entry.version <= STALE_FRACTION * entry.size:
                    found[identity] = entry
        missing = [i for i in identity_ids if i not in found]
        if missing:
            computed = self._compute_neighbours(index, missing, version=version, size=size)
            found.update(computed)
            self._remember(computed)
        return found

    def forget(self, identity_id: str) -> None:
        """Drop a deleted identity's entry."""
        with self._cache_lock:
            self._neighbours.pop(identity_id, None)

    def _remember(self, entries: dict[str, _Neighbours]) -> None:
        with self._cache_lock:
            self._neighbours.update(entries)
            while len(self._neighbours) > MAX_CACHED_IDENTITIES:
                self._neighbours.pop(next(iter(self._neighbours)))

    def _compute_neighbours(self, index: VectorIndex, identity_ids: list[str], *, version: int, size: int) -> dict[str, _Neighbours]:
        """One search of every template of the identities for ``k + 2`` identities; an identity's
        distance to another is the minimum over its templates (an identity in the true top k + 1
        is within k + 2 of the template that attains it)."""
        want = self.policy.cohort_size + 1
        owners: list[str] = []
        blocks = []
        for identity in identity_ids:
            x = self.identity_vectors(identity)
            owners.extend([identity] * len(x))
            blocks.append(x)
        if not blocks:
            return {}
        ranked = search_identities(index, self._owners, np.concatenate(blocks), want + 1)
        names = self._store.identity_names(np.concatenate([r.identity_keys for r in ranked]))
        merged: dict[str, dict[str, float]] = {i: {} for i in identity_ids}
        for identity, hits in zip(owners, ranked, strict=True):
            best = merged[identity]
            for key, distance in zip(hits.identity_keys.tolist(), hits.distances.tolist(), strict=True):
                other = names[key][0] if key in names else identity  # not in names: deleted by another server meanwhile
                if other != identity and distance < best.get(other, math.inf):
                    best[other] = distance
        entries = {}
        for identity, best in merged.items():
            nearest = sorted(best.items(), key=lambda item: item[1])[:want]
            distances = np.array([d for _, d in nearest], dtype=np.float64)
            entries[identity] = _Neighbours(distances, tuple(i for i, _ in nearest), version, size, cohort_stats(distances, self.policy.cohort_size))
        return entries

    # -- calibration -------------------------------------------------------------------------

    def calibration(self, read: Reader) -> Calibration:
        """The current calibration; recomputed (:meth:`recalibrate`) when stale.

        ``read(fn)`` runs ``fn(index, version)`` under the gallery's read lock; the
        recalibration takes that lock once per batch of leave-one-out searches, so writes go on
        between batches. With at most :data:`STALE_BLOCKING` of change since the current
        calibration, it is recomputed in a background thread and searches keep deciding with the
        current one meanwhile; with more (the first templates, a bulk import) they wait for it.
        """
        version = read(lambda index, version: version)
        current, at = self._calibration, self._calibration_at
        freshness = _freshness(current, at, version)
        if freshness != "blocking":
            assert current is not None  # only "blocking" has none
            if freshness == "stale":
                self._recalibrate_in_background(read)
            return current
        with self._calibrating:
            if self._calibration is not None and self._calibration is not current:
                return self._calibration  # computed while we waited
            return self.recalibrate(read)

    def latest_calibration(self, read: Reader, wait_s: float) -> tuple[Calibration, bool]:
        """The calibration for a status report, waiting at most ``wait_s`` seconds for a
        recalibration of a gallery searching over :data:`STATUS_FULL_WAIT_SIZE` vectors:
        ``(calibration, recalibrating)``.

        Where :meth:`calibration` would block (no calibration yet, e.g. after a policy change,
        or over :data:`STALE_BLOCKING` of change), the recomputation runs in the background;
        when it is not done within ``wait_s``, the previous calibration is returned with
        ``recalibrating`` True, or, with none, a provisional one from the model's curve or
        threshold alone (decision.py ``calibrate`` without leave-one-out scores). A smaller
        gallery's recalibration is waited for in full."""
        version, size = read(lambda index, version: (version, index.ntotal))
        current, at = self._calibration, self._calibration_at
        if _freshness(current, at, version) != "blocking" or size <= STATUS_FULL_WAIT_SIZE:
            return self.calibration(read), False
        self._recalibrate_in_background(read)
        with self._calibrated:
            self._calibrated.wait_for(lambda: self._calibration is not current, timeout=wait_s)
        latest = self._calibration
        if latest is not None and latest is not current:
            return latest, False
        return (current if current is not None else self._provisional()), True

    def _provisional(self) -> Calibration:
        """What the policy decides with before any leave-one-out search: the model's false-match
        curve for distances, else the model's threshold (decision.py ``calibrate``)."""
        record = self._store.get_gallery(self.gallery)
        kind = choose_score_kind(self.policy, record.identity_count)
        cal = calibrate(self.policy, record.identity_count, kind, [], self._curve, fallback_threshold=self._fallback, comparisons=record.template_count)
        return dataclasses.replace(cal, basis=f"provisional, while the leave-one-out calibration runs: {cal.basis}")

    def _recalibrate_in_background(self, read: Reader) -> None:
        """Start :meth:`recalibrate` in a thread unless one is running (:meth:`join` waits for it)."""
        if not self._calibrating.locked():
            threading.Thread(target=self._recalibrate_once, args=(read,), name=f"calibrate-{self.gallery}", daemon=True).start()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait up to ``timeout_s`` seconds (None: as long as it takes) for a recalibration under
        way, in the background or in a caller's thread (one whose gallery is closed or deleted
        ends at its next read: within one batch of :data:`_LOO_BATCH` searches)."""
        if self._calibrating.acquire(timeout=-1 if timeout_s is None else timeout_s):
            self._calibrating.release()

    def _recalibrate_once(self, read: Reader) -> None:
        if not self._calibrating.acquire(blocking=False):
            return  # another thread is on it
        try:
            self.recalibrate(read)
        except (NotFound, GalleryClosed):  # the gallery was deleted or closed meanwhile
            pass
        except Exception:  # keep deciding with the previous calibration; the next search retries
            LOG.exception("recalibrating gallery %r failed", self.gallery)
        finally:
            self._calibrating.release()

    def restore_calibration(self) -> bool:
        """Start from the calibration the store kept (see the module docstring); True when
        there is one for the current policy and model curve.

        Its age is the store's changes since it was computed: the difference of change ``seq``
        numbers, which counts the changes of every gallery of the store, so the estimate errs
        towards recalibrating early. Call before the first search (the gallery's load)."""
        stored = self._store.load_calibration(self.gallery)
        if stored is None or stored.policy != self.policy.to_json():
            return False
        calibration = Calibration.from_json(stored.calibration, self._curve)
        if calibration is None:
            return False
        changed = max(0, self._applied_seq() - stored.seq)
        self._calibration, self._calibration_at = calibration, (-changed, stored.templates)
        LOG.info("gallery %r: threshold %.4f (%s) from the stored calibration, %d changes old", self.gallery, calibration.threshold, calibration.score_kind.value, changed)
        return True

    def recalibrate(self, read: Reader) -> Calibration:
        """Leave-one-out searches of the identity sample, then decision.py ``calibrate``; the
        result is kept in the store (a failure to store it is logged, not raised)."""
        version, size, seq = read(lambda index, version: (version, index.ntotal, self._applied_seq()))
        record = self._store.get_gallery(self.gallery)
        identities = record.identity_count
        kind = choose_score_kind(self.policy, identities)
        started = time.perf_counter()
        loo = self.leave_one_out(read, loo_sample_size(identities), kind=kind)
        scores = [s.score for _, s in loo if s is not None]
        result = calibrate(self.policy, identities, kind, scores, self._curve, fallback_threshold=self._fallback, comparisons=record.template_count)
        self._calibration, self._calibration_at = result, (version, size)
        with self._calibrated:
            self._calibrated.notify_all()
        try:
            self._store.save_calibration(self.gallery, StoredCalibration(self.policy.to_json(), seq, size, result.to_json()))
        except NotFound:  # the gallery was deleted meanwhile, as for the searches above
            raise
        except Exception:  # still decides with it; a restart recomputes it
            LOG.warning("gallery %r: keeping its calibration in the store failed", self.gallery, exc_info=True)
        LOG.info(
            "gallery %r: %s threshold %.4f (%s), from %d leave-one-out searches in %.2f s",
            self.gallery, self.policy.describe(), result.threshold, kind.value, len(loo), time.perf_counter() - started,
        )
        return result

    def leave_one_out(self, read: Reader, limit: int, *, kind: ScoreKind) -> list[tuple[str, ScoredHit | None]]:
        """For up to ``limit`` identities (store.py ``identity_sample``), the best-scored other
        identity when its first template is the probe (None when there is no other); the read
        lock is taken per batch of :data:`_LOO_BATCH` searches."""
        ids, x = self._store.identity_sample(self.gallery, limit)
        results: list[tuple[str, ScoredHit | None]] = []
        for start in range(0, len(ids), _LOO_BATCH):
            batch = ids[start : start + _LOO_BATCH]
            probes = x[start : start + _LOO_BATCH]
            best = read(lambda index, version: self.score(index, probes, 1, version=version, kind=kind, exclude=list(batch)))  # noqa: B023
            results.extend((identity, hits[0] if hits else None) for identity, hits in zip(batch, best, strict=True))
        return results


def _freshness(calibration: Calibration | None, at: tuple[int, int], version: int) -> str:
    """How ``calibration``, computed at ``at`` = (change counter, templates), stands at change
    counter ``version``: ``"current"`` (within :data:`STALE_FRACTION` of change), ``"stale"``
    (recomputed in the background and still decided with, up to :data:`STALE_BLOCKING`) or
    ``"blocking"`` (none, or more change: searches wait for a new one)."""
    at_version, at_size = at
    changed = version - at_version
    if calibration is None or changed > STALE_BLOCKING * at_size:
        return "blocking"
    return "current" if changed <= STALE_FRACTION * at_size else "stale"


def _scored(ranked: RankedIdentities, scores: np.ndarray, names: dict[int, tuple[str, str]]) -> list[ScoredHit]:
    """ScoredHits of ``ranked``'s identities (``names``: identity key -> (id, display name))."""
    return [
        ScoredHit(IdentityHit(key, *names[key], template_id, distance), score)
        for key, template_id, distance, score in zip(ranked.identity_keys.tolist(), ranked.template_ids.tolist(), ranked.distances.tolist(), scores.tolist(), strict=True)
    ]
