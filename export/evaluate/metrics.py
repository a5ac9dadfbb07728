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
"""

from __future__ import annotations

import numpy as np

__all__ = ["best_threshold", "verification_10fold", "threshold_at_far", "tar_at_far", "rank1"]


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
