"""Open-set decisions: a gallery's decision policy, S-norm scores, and the FPIR of a threshold.

A 1:N search returns the nearest enrolled identity; the decision says whether the probe *is* that
person or unknown. With one fixed distance threshold the share of strangers accepted as someone,
the false positive identification rate (FPIR, NIST IR 8271 sec. 3; ISO/IEC 19795-1), grows with
every person enrolled. So a gallery can instead keep a *target* FPIR, and the threshold follows
the gallery (:class:`DecisionPolicy`).

Terms (lower scores are more similar throughout):

* **score**: the L2 distance (:attr:`ScoreKind.DISTANCE`), or its symmetric S-norm
  (:attr:`ScoreKind.SNORM`, :func:`snorm`), dimensionless, in cohort standard deviations.
* **S-norm** (Auckenthaler et al. 2000 Z/T-norm; symmetric form as in Matejka et al. 2017,
  "Analysis of score normalization in multilingual speaker recognition", adaptive: the top-k
  cohort): for probe p and candidate identity c at distance d,
  ``s = ((d - mu_p) / sigma_p + (d - mu_c) / sigma_c) / 2`` where ``mu_p, sigma_p`` are the mean
  and population standard deviation of the distances from p to its k nearest gallery identities
  other than c, and ``mu_c, sigma_c`` the same over c's k nearest other identities. The cohort is
  the gallery itself.
* **leave-one-out (LOO) scores**: each enrolled identity, searched with one of its templates
  against the other identities, is a stranger search against N-1 people; the best scores of a
  sample of M identities estimate the distribution of a stranger's best score, a minimum, to
  which a Gumbel-minimum distribution is fitted (:class:`GumbelMin`): ``FPIR(t) ~= F(t)``.
* **false-match curve** (``model.json`` ``false_match``, measured by ``facegallery calibrate``):
  F1(d), the probability that one comparison of two different people has distance <= d. For a
  gallery too small to estimate its own tail, ``FPIR(d) ~= 1 - (1 - F1(d))^N`` (independent
  comparisons; measured on LFW it holds to within 0.5x-2x up to N of a few hundred and over-
  estimates FPIR beyond).

Which estimate a gallery uses is :func:`choose_score_kind` and :func:`calibrate`; the constants are
the ones measured on the dev protocol (docs/open-set.md).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from facegallery.server.contract.errors import InvalidInput

__all__ = [
    "Normalization",
    "Aggregation",
    "ScoreKind",
    "DecisionPolicy",
    "DEFAULT_POLICY",
    "DEFAULT_COHORT_SIZE",
    "SNORM_MIN_IDENTITIES",
    "LOO_MIN_IDENTITIES",
    "GumbelMin",
    "RERANK_CANDIDATES",
    "FalseMatchCurve",
    "Calibration",
    "DecisionStatus",
    "check_policy",
    "choose_score_kind",
    "loo_sample_size",
    "calibrate",
    "cohort_stats",
    "probe_cohort_stats",
    "snorm",
]

#: k of S-norm: cohort identities per side. Measured on the dev protocol, DIR at FPIR 0.01 for
#: k = 25/50/100/200: 0.659/0.687/0.705/0.705 with 1,000 people of one photo each, and
#: 0.779/0.813/0.830/0.787 with 352 people of three photos each.
DEFAULT_COHORT_SIZE = 100
#: Below this many identities a gallery is too small a cohort for S-norm: measured, S-norm with
#: the gallery as cohort lowered DIR at FPIR 0.01 below ~300 people (0.76 -> 0.52 at 100) and
#: raised it above (0.46 -> 0.71 at 1,000); below it the policy decides on distance.
SNORM_MIN_IDENTITIES = 300
#: Identities a gallery needs to estimate its FPIR from its own leave-one-out searches; smaller
#: galleries use the model's false-match curve (measured: the curve held 0.5x-2.4x up to 100
#: people and drifts low beyond, the LOO fit held from 300).
LOO_MIN_IDENTITIES = SNORM_MIN_IDENTITIES
#: LOO sample: at most this many identities.
LOO_SAMPLE = 2000
#: Nearest identities by distance that are scored (S-norm) and reranked for each probe.
RERANK_CANDIDATES = 10
#: S-norm spreads are floored here (an L2 distance) so a degenerate cohort cannot divide by zero.
SIGMA_FLOOR = 1e-4


class Normalization(str, enum.Enum):
    """Score normalisation of a target-FPIR policy."""

    NONE = "none"  # the score is the L2 distance
    SNORM = "snorm"  # symmetric S-norm with the gallery as cohort (from SNORM_MIN_IDENTITIES identities)


class Aggregation(str, enum.Enum):
    """How an identity's several templates give one distance to a probe."""

    NEAREST = "nearest"  # the distance to its nearest template
    MEAN = "mean"  # the distance to the mean of its templates (one vector per identity)


class ScoreKind(str, enum.Enum):
    """What a score is: an L2 distance, or an S-norm score (cohort standard deviations)."""

    DISTANCE = "distance"
    SNORM = "snorm"


@dataclasses.dataclass(frozen=True)
class DecisionPolicy:
    """How a gallery decides between "this enrolled person" and unknown.

    Exactly one of ``threshold`` (kind ``"threshold"``: accept when the L2 distance to the nearest
    identity is <= threshold, the behaviour before policies) and ``target_fpir`` (kind
    ``"target_fpir"``: the threshold is kept where the estimated FPIR of the gallery equals the
    target, in (0, 1)). ``normalization`` and ``cohort_size`` (S-norm's k) apply to target-FPIR
    policies only; ``aggregation`` to both.
    """

    target_fpir: float | None = None
    threshold: float | None = None
    normalization: Normalization = Normalization.NONE
    cohort_size: int = DEFAULT_COHORT_SIZE
    aggregation: Aggregation = Aggregation.NEAREST

    @property
    def kind(self) -> str:
        """``"threshold"`` or ``"target_fpir"``."""
        return "threshold" if self.threshold is not None else "target_fpir"

    @classmethod
    def fixed(cls, threshold: float, *, aggregation: Aggregation = Aggregation.NEAREST) -> DecisionPolicy:
        """A fixed L2 distance threshold."""
        return cls(threshold=float(threshold), aggregation=Aggregation(aggregation))

    @classmethod
    def targeting(
        cls,
        target_fpir: float,
        *,
        normalization: Normalization = Normalization.SNORM,
        cohort_size: int = DEFAULT_COHORT_SIZE,
        aggregation: Aggregation = Aggregation.MEAN,
    ) -> DecisionPolicy:
        """A threshold kept at ``target_fpir``, by default on S-norm scores of mean templates."""
        return cls(target_fpir=float(target_fpir), normalization=Normalization(normalization), cohort_size=int(cohort_size), aggregation=Aggregation(aggregation))

    def describe(self) -> str:
        """One line for people: ``"threshold 0.6"`` or ``"target FPIR 0.01, S-norm k=100, mean template"``."""
        mean = ", mean template" if self.aggregation is Aggregation.MEAN else ""
        if self.threshold is not None:
            return f"threshold {self.threshold:g}{mean}"
        norm = f"S-norm k={self.cohort_size}" if self.normalization is Normalization.SNORM else "no normalisation"
        return f"target FPIR {self.target_fpir:g}, {norm}{mean}"

    def to_json(self) -> dict[str, Any]:
        """The stored form (store.py ``policy`` column)."""
        out: dict[str, Any] = {"aggregation": self.aggregation.value}
        if self.threshold is not None:
            return {"threshold": self.threshold, **out}
        return {"target_fpir": self.target_fpir, "normalization": self.normalization.value, "cohort_size": self.cohort_size, **out}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DecisionPolicy:
        """Inverse of :meth:`to_json` (a record without ``aggregation`` is NEAREST)."""
        aggregation = Aggregation(data.get("aggregation", "nearest"))
        if "threshold" in data:
            return cls.fixed(data["threshold"], aggregation=aggregation)
        return cls.targeting(
            data["target_fpir"], normalization=Normalization(data.get("normalization", "none")), cohort_size=data.get("cohort_size", DEFAULT_COHORT_SIZE), aggregation=aggregation
        )


#: The policy of new galleries: the best on the dev protocol at FPIR 0.01 (docs/open-set.md): DIR
#: 0.893 with three photos per person (0.697 for a fixed distance at that FPIR, 0.830 with S-norm
#: on the nearest template), 0.705 with one (0.462 for a fixed distance).
DEFAULT_POLICY = DecisionPolicy.targeting(0.01, normalization=Normalization.SNORM, aggregation=Aggregation.MEAN)


def check_policy(policy: DecisionPolicy) -> DecisionPolicy:
    """``policy`` if valid, else InvalidInput (INVALID_ARGUMENT) saying what is wrong."""
    if (policy.threshold is None) == (policy.target_fpir is None):
        raise InvalidInput("a decision policy needs exactly one of a threshold or a target FPIR")
    if policy.threshold is not None:
        if not (math.isfinite(policy.threshold) and policy.threshold > 0):
            raise InvalidInput(f"threshold must be a positive L2 distance, got {policy.threshold}")
        if policy.normalization is not Normalization.NONE:
            raise InvalidInput("score normalisation needs a target FPIR: a fixed threshold is an L2 distance")
        return policy
    assert policy.target_fpir is not None
    if not (0 < policy.target_fpir < 1):
        raise InvalidInput(f"target FPIR must be in (0, 1), got {policy.target_fpir}")
    if not (2 <= policy.cohort_size <= 1000):
        raise InvalidInput(f"cohort size must be 2..1000 identities, got {policy.cohort_size}")
    return policy


# ---------------------------------------------------------------------------------------------
# Scores


def snorm(distance: np.ndarray, probe_mu: np.ndarray, probe_sigma: np.ndarray, template_mu: np.ndarray, template_sigma: np.ndarray) -> np.ndarray:
    """Symmetric S-norm of L2 distances (module docstring); all arguments broadcast, float64 out."""
    d = np.asarray(distance, dtype=np.float64)
    ps = np.maximum(np.asarray(probe_sigma, dtype=np.float64), SIGMA_FLOOR)
    ts = np.maximum(np.asarray(template_sigma, dtype=np.float64), SIGMA_FLOOR)
    return 0.5 * ((d - probe_mu) / ps + (d - template_mu) / ts)


def cohort_stats(distances: np.ndarray, k: int) -> tuple[float, float]:
    """Mean and population standard deviation of the first ``k`` of ascending ``distances``.

    ``(nan, nan)`` with fewer than 2 cohort members.
    """
    cohort = np.asarray(distances, dtype=np.float64)[:k]
    if len(cohort) < 2:
        return math.nan, math.nan
    return float(cohort.mean()), float(cohort.std())


def probe_cohort_stats(ranked: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The probe's cohort statistics for each candidate, the candidate left out of its own cohort.

    Parameters
    ----------
    ranked : (m,) float
        Ascending L2 distances from the probe to its m nearest identities (m >= k + 1 when the
        gallery has that many).
    positions : (c,) int
        Rank of each candidate in ``ranked`` (< m).
    k : int
        Cohort size.

    Returns
    -------
    mu, sigma : (c,) float64
        Over the first k of ``ranked`` without the candidate; nan with fewer than 2 members.
    """
    ranked = np.asarray(ranked, dtype=np.float64)
    head = ranked[: k + 1]
    n = min(k, len(head) - 1)
    positions = np.asarray(positions, dtype=np.int64)
    if n < 2:
        return np.full(len(positions), math.nan), np.full(len(positions), math.nan)
    # Without the candidate the cohort is head minus it (when it is in head), else head[:k].
    total, squares = head.sum(), (head**2).sum()
    inside = positions < len(head)
    removed = np.where(inside, head[np.minimum(positions, len(head) - 1)], head[-1] if len(head) > k else 0.0)
    count = np.where(inside | (len(head) > k), len(head) - 1, len(head))
    mu = (total - removed) / count
    var = np.maximum((squares - removed**2) / count - mu**2, 0.0)
    return mu, np.sqrt(var)


# ---------------------------------------------------------------------------------------------
# FPIR estimates


@dataclasses.dataclass(frozen=True)
class FalseMatchCurve:
    """A model's per-comparison false-match rate F1(d) (``model.json`` ``false_match``).

    ``distances`` ascending L2 distances, ``rates`` the non-decreasing fraction of
    different-person pairs at distance <= each; ``pairs`` how many pairs, ``data`` where from.
    """

    distances: np.ndarray
    rates: np.ndarray
    pairs: int
    data: str

    @classmethod
    def from_json(cls, record: Mapping[str, Any] | None, *, flip_augment: bool = False) -> FalseMatchCurve | None:
        """The curve of a manifest's ``false_match`` record for embeddings with or without test-time
        flip augmentation (the record's ``flip`` sub-record), or None when there is none.

        The top-level record is for embeddings without flip unless it says ``"flip_augment":
        true``; flip changes the embeddings (measured on LFW: F1 at 0.6 is 0.0088 with flip,
        0.0059 without), so a curve of the other kind is never used.
        """
        if record and flip_augment and not record.get("flip_augment", False):
            record = record.get("flip")
        if not record or bool(record.get("flip_augment", False)) != flip_augment:
            return None
        d = np.asarray(record["distances"], dtype=np.float64)
        r = np.asarray(record["rates"], dtype=np.float64)
        if d.ndim != 1 or d.shape != r.shape or len(d) < 2 or np.any(np.diff(d) <= 0) or np.any(np.diff(r) < 0):
            raise ValueError("false_match needs ascending distances and non-decreasing rates of equal length >= 2")
        return cls(d, r, int(record.get("pairs", 0)), str(record.get("data", "")))

    def rate(self, distance: float) -> float:
        """F1(distance), linear between the tabulated points, 0 before the first, last rate after."""
        if distance < self.distances[0]:
            return 0.0
        return float(np.interp(distance, self.distances, self.rates))

    def distance_at(self, rate: float) -> float:
        """The largest tabulated-interpolated distance whose F1 is <= ``rate``."""
        r, d = self.rates, self.distances
        if rate < r[0]:
            return float(d[0])
        last = np.searchsorted(r, rate, side="right") - 1  # r[last] <= rate
        if last >= len(r) - 1:
            return float(d[-1])
        lo, hi = r[last], r[last + 1]
        t = 0.0 if hi == lo else (rate - lo) / (hi - lo)
        return float(d[last] + t * (d[last + 1] - d[last]))

    def gallery_fpir(self, distance: float, comparisons: int) -> float:
        """``1 - (1 - F1(d))^n``: FPIR at ``distance`` for n independent comparisons (a stranger
        against every template of the gallery)."""
        return float(-math.expm1(comparisons * math.log1p(-min(self.rate(distance), 1 - 1e-15))))

    def gallery_threshold(self, target_fpir: float, comparisons: int) -> float:
        """The distance at which :meth:`gallery_fpir` equals ``target_fpir``."""
        per_comparison = -math.expm1(math.log1p(-target_fpir) / max(comparisons, 1))
        return self.distance_at(per_comparison)


def loo_sample_size(identities: int) -> int:
    """Identities searched leave-one-out: all of them up to LOO_SAMPLE."""
    return min(identities, LOO_SAMPLE)


def choose_score_kind(policy: DecisionPolicy, identities: int) -> ScoreKind:
    """The scores a gallery of ``identities`` people decides on under ``policy``: S-norm when the
    policy asks for it and the gallery has SNORM_MIN_IDENTITIES (and more than ``cohort_size``)
    identities; otherwise distance."""
    if policy.target_fpir is None or policy.normalization is not Normalization.SNORM:
        return ScoreKind.DISTANCE
    if identities < max(SNORM_MIN_IDENTITIES, policy.cohort_size + 1):
        return ScoreKind.DISTANCE
    return ScoreKind.SNORM


@dataclasses.dataclass(frozen=True)
class GumbelMin:
    """Gumbel (extreme value type I) distribution of minima, fitted by moments.

    ``P(X <= x) = 1 - exp(-exp((x - loc) / scale))``; by moments ``scale = sd * sqrt(6) / pi``,
    ``loc = mean + 0.5772 * scale`` (NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.6.16).
    A stranger's best score is a minimum over the gallery; measured on the dev protocol, this fit
    of the LOO scores put thresholds at FPIR 0.01 within 0.5x-2x where the raw 1 %-quantile of a
    few hundred LOO scores missed by up to 4x.
    """

    loc: float
    scale: float

    @classmethod
    def fit(cls, samples: np.ndarray) -> GumbelMin:
        """Moment fit of ``samples`` (at least 2, not all equal)."""
        scale = max(float(np.std(samples)), 1e-9) * math.sqrt(6) / math.pi
        return cls(float(np.mean(samples)) + 0.57721566 * scale, scale)

    def cdf(self, x: float) -> float:
        """``P(X <= x)``, the estimated FPIR at score ``x`` (exponent capped at 700 against overflow)."""
        return float(-math.expm1(-math.exp(min((x - self.loc) / self.scale, 700.0))))

    def quantile(self, p: float) -> float:
        """The score ``x`` with ``P(X <= x) = p``, ``loc + scale * ln(-ln(1 - p))``; p in (0, 1)."""
        return self.loc + self.scale * math.log(-math.log1p(-p))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A gallery's decision threshold and FPIR estimate at one moment.

    Attributes
    ----------
    score_kind : ScoreKind
    identities : int
        N, enrolled identities when computed.
    comparisons : int
        Templates then: the comparisons of a stranger's search, the exponent of the curve's
        estimate (an identity with several templates is several chances to match).
    threshold : float
        On the ``score_kind`` scale; accept when the best score <= threshold.
    tail : GumbelMin or None
        Fit of the leave-one-out best scores (galleries of LOO_MIN_IDENTITIES or more).
    curve : FalseMatchCurve or None
        The model's false-match curve (used for distance scores of smaller galleries).
    basis : str
        What the estimate rests on, for people.
    """

    score_kind: ScoreKind
    identities: int
    comparisons: int
    threshold: float
    tail: GumbelMin | None
    curve: FalseMatchCurve | None
    basis: str

    def to_json(self) -> dict[str, Any]:
        """The calibration as JSON (store.py keeps it across restarts); the model's curve is
        recorded only as whether it was used."""
        tail = None if self.tail is None else {"loc": self.tail.loc, "scale": self.tail.scale}
        return {
            "score_kind": self.score_kind.value, "identities": self.identities, "comparisons": self.comparisons,
            "threshold": self.threshold, "tail": tail, "uses_curve": self.curve is not None, "basis": self.basis,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], curve: FalseMatchCurve | None) -> Calibration | None:
        """The calibration :meth:`to_json` wrote, with the model's ``curve``; None when it used a
        curve and ``curve`` is None (the model changed) or the record is not one of ours."""
        try:
            if data["uses_curve"] and curve is None:
                return None
            tail = data["tail"]
            return cls(
                ScoreKind(data["score_kind"]), int(data["identities"]), int(data["comparisons"]), float(data["threshold"]),
                None if tail is None else GumbelMin(float(tail["loc"]), float(tail["scale"])),
                curve if data["uses_curve"] else None, str(data["basis"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def estimated_fpir(self, score: float) -> float:
        """Estimated probability that a person not enrolled scores <= ``score`` against someone
        in the gallery: the LOO fit's CDF, else the curve's ``1 - (1 - F1)^N``; 0 for an empty
        gallery, nan when there is nothing to estimate from (a small gallery, no curve)."""
        if self.identities == 0:
            return 0.0
        if not math.isfinite(score):
            return 1.0 if score > 0 else 0.0
        if self.tail is not None:
            return self.tail.cdf(score)
        if self.score_kind is ScoreKind.DISTANCE and self.curve is not None:
            return self.curve.gallery_fpir(score, self.comparisons)
        return math.nan


def calibrate(
    policy: DecisionPolicy,
    identities: int,
    score_kind: ScoreKind,
    loo: Sequence[float] | np.ndarray,
    curve: FalseMatchCurve | None,
    *,
    fallback_threshold: float,
    comparisons: int | None = None,
) -> Calibration:
    """The threshold of ``policy`` for a gallery of ``identities`` people.

    Parameters
    ----------
    loo : (M,) float
        Leave-one-out best scores of the sampled identities, on the ``score_kind`` scale.
    curve : FalseMatchCurve, optional
        The model's false-match curve.
    fallback_threshold : float
        The model's L2 threshold, for a target-FPIR policy with nothing to estimate from.
    comparisons : int, optional
        Templates in the gallery (default ``identities``), the exponent of the curve's estimate.

    The FPIR estimate: with at least LOO_MIN_IDENTITIES LOO scores, a Gumbel-minimum fit of them
    (:class:`GumbelMin`); else, for distances, the curve. A fixed policy keeps its threshold; a
    target-FPIR policy takes the score where the estimate equals the target (the fit's quantile,
    or the curve's distance), else ``fallback_threshold``.
    """
    comparisons = identities if comparisons is None else comparisons
    scores = np.asarray(loo, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    tail = GumbelMin.fit(scores) if len(scores) >= LOO_MIN_IDENTITIES else None
    if tail is not None:
        basis = f"Gumbel fit of leave-one-out searches of {len(scores)} of the {identities} enrolled identities"
    elif score_kind is ScoreKind.DISTANCE and curve is not None:
        basis = f"the model's false-match curve ({curve.data or 'model.json'}) for {comparisons} templates of {identities} identities"
    else:
        basis = "nothing: the gallery is too small to estimate its own FPIR and the model has no false-match curve"
    if policy.threshold is not None:
        threshold = policy.threshold
    elif tail is not None:
        threshold = tail.quantile(policy.target_fpir)  # type: ignore[arg-type]
    elif score_kind is ScoreKind.DISTANCE and curve is not None:
        threshold = curve.gallery_threshold(policy.target_fpir, max(comparisons, 1))  # type: ignore[arg-type]
    else:
        threshold = fallback_threshold
        basis += "; decides with the model's threshold"
    return Calibration(score_kind, identities, comparisons, float(threshold), tail, curve, basis)


@dataclasses.dataclass(frozen=True)
class DecisionStatus:
    """What a gallery decides with now: its policy, score kind, threshold, and the FPIR estimate
    at that threshold (``basis`` says what it rests on). ``recalibrating``: the calibration is
    being recomputed after a change of over open_set.py ``STALE_BLOCKING`` of the gallery or of
    its policy, and the other fields are those of the previous one, or provisional ones when
    there is none (searches wait for the new one; a status report waits a bounded time,
    manager.py ``STATUS_WAIT_S``)."""

    policy: DecisionPolicy
    score_kind: ScoreKind
    threshold: float
    estimated_fpir: float
    identities: int
    basis: str
    recalibrating: bool = False
