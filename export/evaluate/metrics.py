"""Verification and identification metrics as plain functions over numpy arrays.

Conventions: a *pair* is genuine (same person) or impostor; its ``distance`` is the L2 distance
between the two embeddings, ``+inf`` when a face was not found (such a pair is then always
decided "different", which counts against genuine pairs). A pair is accepted as the same person
when ``distance <= threshold``.

* FAR(t) = impostor pairs accepted / impostor pairs; TAR(t) = genuine pairs accepted / genuine
  pairs (FRR = 1 - TAR).
* LFW "unrestricted" 10-fold protocol (Huang et al., LFW tech report 07-49, 2007): the threshold is
  chosen on nine folds to maximise accuracy and tested on the tenth; the report is the mean and
  standard deviation of the ten test accuracies.

Open-set identification (1:N with people who are not enrolled), in the terms of ISO/IEC
19795-1:2021 and NIST IR 8271 (Grother, Ngan, Hanaoka, "FRVT Part 2: Identification", 2019):

* a *mated* (genuine) search is a probe of an enrolled person, a *non-mated* (impostor, stranger)
  search a probe of someone not enrolled; each search returns its top candidate and that
  candidate's ``score``, lower = more similar (an L2 distance, or a normalised score);
* FPIR(t), the false positive identification rate: the fraction of non-mated searches whose top
  score is ``<= t`` (a candidate is returned although the person is not enrolled);
* FNIR(t), the false negative identification rate at rank 1: the fraction of mated searches whose
  top candidate is not the right person or whose score is ``> t``; DIR(t) = 1 - FNIR(t), the
  detection and identification rate (Phillips et al., FRVT 2002);
* a DET curve is FNIR against FPIR over all thresholds (NIST IR 8271 plots FPIR on a log axis).

The NIST definitions count candidates *at or above* a similarity threshold; with distances the
comparison flips to ``<=``.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "best_threshold",
    "verification_10fold",
    "threshold_at_far",
    "tar_at_far",
    "rank1",
    "open_set_rates",
    "threshold_at_fpir",
    "min_impostors_for_fpir",
    "dir_at_fpir",
    "det_curve",
]


def best_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """Threshold maximising verification accuracy on the given pairs.

    Parameters
    ----------
    distances : (n,) float
        L2 distances (``inf`` allowed).
    same : (n,) bool
        True for genuine pairs.

    Returns
    -------
    threshold : float
        Midpoint between two consecutive distinct finite distances (or just above the largest).
    accuracy : float
        Fraction of pairs decided correctly at that threshold.
    """
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    finite = np.unique(distances[np.isfinite(distances)])
    if finite.size == 0:
        return 0.0, float(np.mean(~same))
    candidates = np.concatenate([[finite[0] - 1e-6], (finite[:-1] + finite[1:]) / 2, [finite[-1] + 1e-6]])
    # accepted genuine pairs and rejected impostors for every candidate, via sorted counts
    genuine = np.sort(distances[same])
    impostor = np.sort(distances[~same])
    tp = np.searchsorted(genuine, candidates, side="right")
    fp = np.searchsorted(impostor, candidates, side="right")
    correct = tp + (impostor.size - fp)
    best = int(np.argmax(correct))
    return float(candidates[best]), float(correct[best] / distances.size)


def verification_10fold(distances: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict:
    """LFW-style k-fold verification accuracy.

    Parameters
    ----------
    distances : (n,) float
        L2 distance of each pair; ``inf`` where a face was missing.
    same : (n,) bool
    folds : (n,) int
        Fold label of each pair (1..10 for LFW's ``pairs.txt`` and ``pairs_dev.tsv``); at least two
        distinct labels.

    Returns
    -------
    dict
        ``accuracy`` (mean of the per-fold test accuracies), ``std`` (their population standard
        deviation), ``threshold`` (mean of the thresholds chosen on the training folds),
        ``fold_accuracies`` and ``fold_thresholds`` (lists).

    Raises
    ------
    ValueError
        Fewer than two folds: no fold would have training pairs to choose its threshold on.
    """
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    folds = np.asarray(folds)
    if np.unique(folds).size < 2:
        raise ValueError(f"k-fold verification needs at least 2 folds, got {np.unique(folds).size}")
    accuracies, thresholds = [], []
    for fold in np.unique(folds):
        test = folds == fold
        threshold, _ = best_threshold(distances[~test], same[~test])
        decided_same = distances[test] <= threshold
        accuracies.append(float(np.mean(decided_same == same[test])))
        thresholds.append(threshold)
    return {
        "accuracy": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "threshold": float(np.mean(thresholds)),
        "fold_accuracies": accuracies,
        "fold_thresholds": thresholds,
    }


def threshold_at_far(distances: np.ndarray, same: np.ndarray, far: float) -> float:
    """The largest threshold whose false accept rate is at most ``far``.

    With m impostor pairs at most ``floor(far * m)`` of them may be accepted; the threshold sits
    just below the next impostor distance. Returns ``inf`` when every impostor may be accepted.
    """
    impostor = np.sort(np.asarray(distances, dtype=np.float64)[~np.asarray(same, dtype=bool)])
    allowed = int(np.floor(far * impostor.size + 1e-9))
    if allowed >= impostor.size:
        return float("inf")
    return float(np.nextafter(impostor[allowed], -np.inf))


def tar_at_far(distances: np.ndarray, same: np.ndarray, far: float = 1e-3) -> dict:
    """True accept rate at a target false accept rate.

    Returns
    -------
    dict
        ``tar``, ``threshold`` (from :func:`threshold_at_far`), ``far`` (the rate achieved at that
        threshold), ``genuine`` and ``impostor`` pair counts. Note the resolution: with m impostor
        pairs, FAR below 1/m is only reachable as 0.
    """
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    threshold = threshold_at_far(distances, same, far)
    accepted = distances <= threshold
    return {
        "tar": float(np.mean(accepted[same])) if same.any() else float("nan"),
        "threshold": threshold,
        "far": float(np.mean(accepted[~same])) if (~same).any() else float("nan"),
        "genuine": int(same.sum()),
        "impostor": int((~same).sum()),
    }


def rank1(gallery: np.ndarray, gallery_labels: np.ndarray, probes: np.ndarray, probe_labels: np.ndarray) -> float:
    """Rank-1 identification rate by exact nearest neighbour (L2).

    Parameters
    ----------
    gallery : (m, d) float32
        Enrolled templates.
    gallery_labels : (m,)
        Identity of each template.
    probes : (n, d) float32
    probe_labels : (n,)
        True identity of each probe (must be enrolled).

    Returns
    -------
    float
        Fraction of probes whose nearest template belongs to their identity.
    """
    gallery = np.asarray(gallery, dtype=np.float64)
    probes = np.asarray(probes, dtype=np.float64)
    d2 = (probes**2).sum(1)[:, None] - 2 * probes @ gallery.T + (gallery**2).sum(1)[None, :]
    nearest = np.argmin(d2, axis=1)
    return float(np.mean(np.asarray(gallery_labels)[nearest] == np.asarray(probe_labels)))


# ---------------------------------------------------------------------------------------------
# Open-set identification (see the module docstring)
# ---------------------------------------------------------------------------------------------


def _open_set_arrays(genuine_scores, genuine_correct, impostor_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    genuine_scores = np.asarray(genuine_scores, dtype=np.float64).reshape(-1)
    genuine_correct = np.asarray(genuine_correct, dtype=bool).reshape(-1)
    impostor_scores = np.asarray(impostor_scores, dtype=np.float64).reshape(-1)
    if genuine_scores.shape != genuine_correct.shape:
        raise ValueError(f"genuine_scores and genuine_correct differ in length: {genuine_scores.size} != {genuine_correct.size}")
    return genuine_scores, genuine_correct, impostor_scores


def open_set_rates(genuine_scores: np.ndarray, genuine_correct: np.ndarray, impostor_scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """FPIR and DIR (rank 1) at one threshold.

    Parameters
    ----------
    genuine_scores : (g,) float
        Top score of each mated search (lower = more similar; ``inf`` = no candidate).
    genuine_correct : (g,) bool
        Whether the top candidate of each mated search is the right person.
    impostor_scores : (m,) float
        Top score of each non-mated search.
    threshold : float
        A candidate is returned when its score is ``<= threshold``.

    Returns
    -------
    fpir, dir : float
        ``nan`` where there are no searches of that kind.
    """
    genuine_scores, genuine_correct, impostor_scores = _open_set_arrays(genuine_scores, genuine_correct, impostor_scores)
    fpir = float(np.mean(impostor_scores <= threshold)) if impostor_scores.size else float("nan")
    dir_ = float(np.mean(genuine_correct & (genuine_scores <= threshold))) if genuine_scores.size else float("nan")
    return fpir, dir_


def threshold_at_fpir(impostor_scores: np.ndarray, fpir: float) -> float:
    """The largest threshold whose FPIR is at most ``fpir`` (an oracle threshold on these searches).

    With m non-mated searches at most ``floor(fpir * m)`` may return a candidate; the threshold
    sits just below the next impostor score (ties are all kept out). ``inf`` when every search may
    return one.
    """
    return threshold_at_far(np.asarray(impostor_scores, dtype=np.float64), np.zeros(np.size(impostor_scores), dtype=bool), fpir)


def min_impostors_for_fpir(fpir: float) -> int:
    """Non-mated searches needed before an FPIR of ``fpir`` can be measured: ``ceil(1 / fpir)``.

    With fewer, ``floor(fpir * m)`` is 0: the only reachable operating point is FPIR = 0, which says
    nothing about the rate at ``fpir``. At exactly ``1 / fpir`` a single false positive is allowed,
    so the figure is still coarse (its binomial spread is about as large as the rate itself).
    """
    if not 0 < fpir < 1:
        raise ValueError(f"fpir must be in (0, 1), got {fpir}")
    return int(np.ceil(1 / fpir - 1e-9))


def dir_at_fpir(genuine_scores: np.ndarray, genuine_correct: np.ndarray, impostor_scores: np.ndarray, fpir: float) -> dict | None:
    """DIR at a target FPIR, with the oracle threshold of :func:`threshold_at_fpir`.

    Returns
    -------
    dict or None
        ``dir``, ``threshold``, ``fpir`` (the rate reached at that threshold, <= the target) and
        ``impostors``; None when there are fewer non-mated searches than
        :func:`min_impostors_for_fpir` (the rate cannot be measured) or no mated ones.
    """
    genuine_scores, genuine_correct, impostor_scores = _open_set_arrays(genuine_scores, genuine_correct, impostor_scores)
    if impostor_scores.size < min_impostors_for_fpir(fpir) or genuine_scores.size == 0:
        return None
    threshold = threshold_at_fpir(impostor_scores, fpir)
    reached, dir_ = open_set_rates(genuine_scores, genuine_correct, impostor_scores, threshold)
    return {"dir": dir_, "threshold": threshold, "fpir": reached, "impostors": int(impostor_scores.size)}


def det_curve(genuine_scores: np.ndarray, genuine_correct: np.ndarray, impostor_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The open-set DET curve: FPIR and FNIR (rank 1) at every distinct finite score.

    Returns
    -------
    fpir, fnir, thresholds : (k,) float64, ascending in threshold (FPIR rising, FNIR falling).
        FNIR = 1 - DIR; a mated search whose top candidate is wrong is a miss at every threshold,
        so FNIR never falls below ``1 - rank-1``.
    """
    genuine_scores, genuine_correct, impostor_scores = _open_set_arrays(genuine_scores, genuine_correct, impostor_scores)
    every = np.concatenate([genuine_scores, impostor_scores])
    thresholds = np.unique(every[np.isfinite(every)])
    hits = np.sort(genuine_scores[genuine_correct])
    impostor = np.sort(impostor_scores)
    dir_ = np.searchsorted(hits, thresholds, side="right") / max(genuine_scores.size, 1)
    fpir = np.searchsorted(impostor, thresholds, side="right") / max(impostor.size, 1)
    return fpir, 1.0 - dir_, thresholds
