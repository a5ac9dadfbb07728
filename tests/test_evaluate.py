"""evaluate.py metrics on hand-made distances whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from facegallery.export.evaluate.metrics import best_threshold, rank1, tar_at_far, threshold_at_far, verification_10fold
from facegallery.export.evaluate.plots import roc_curve


def test_best_threshold_separable():
    d = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    t, acc = best_threshold(d, same)
    assert acc == 1.0 and 0.3 < t < 0.7 and t == pytest.approx(0.5)


def test_best_threshold_with_one_overlap_and_missing_face():
    d = np.array([0.1, 0.2, 0.65, np.inf, 0.5, 0.8, 0.9])  # genuine 0.65 above impostor 0.5; one missing face
    same = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    t, acc = best_threshold(d, same)
    assert acc == pytest.approx(5 / 7)  # best: accept <=0.2 or <=0.65 -> 5 of 7 correct either way


def test_10fold_uses_training_folds_only():
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(1, 11), 20)
    same = np.tile(np.r_[np.ones(10, bool), np.zeros(10, bool)], 10)
    d = np.where(same, rng.uniform(0.0, 0.5, 200), rng.uniform(0.55, 1.0, 200))
    result = verification_10fold(d, same, folds)
    assert result["accuracy"] == 1.0 and result["std"] == 0.0
    assert 0.5 <= result["threshold"] <= 0.55
    assert len(result["fold_accuracies"]) == 10
    # flip one genuine pair in fold 3 far beyond every impostor: only that fold loses one pair
    d2 = d.copy()
    d2[np.flatnonzero((folds == 3) & same)[0]] = 5.0
    r2 = verification_10fold(d2, same, folds)
    assert r2["fold_accuracies"][2] == pytest.approx(19 / 20)
    assert r2["accuracy"] == pytest.approx(1 - 1 / 200)


def test_tar_at_far_counts_allowed_false_accepts():
    impostor = np.linspace(0.5, 1.5, 2000)  # 2000 impostors -> FAR 1e-3 allows 2 accepted
    genuine = np.array([0.2, 0.4, 0.5005, 0.501, 0.52, 0.9])
    d = np.r_[genuine, impostor]
    same = np.r_[np.ones(6, bool), np.zeros(2000, bool)]
    t = threshold_at_far(d, same, 1e-3)
    assert impostor[1] <= t < impostor[2]
    r = tar_at_far(d, same, 1e-3)
    assert r["far"] == pytest.approx(2 / 2000)
    assert r["tar"] == pytest.approx(4 / 6)  # 0.2, 0.4, 0.5005, 0.501 lie below impostor[2] = 0.5010005
    assert r["genuine"] == 6 and r["impostor"] == 2000


def test_rank1():
    gallery = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    labels = np.array(["a", "b", "c"])
    probes = np.array([[1, 1], [9, 1], [6, 5], [0, 8]], np.float32)
    truth = np.array(["a", "b", "c", "c"])
    assert rank1(gallery, labels, probes, truth) == pytest.approx(3 / 4)  # (6,5) is nearer b


def test_roc_curve_is_monotone():
    d = np.array([0.1, 0.3, 0.35, 0.6, np.inf])
    same = np.array([1, 0, 1, 0, 1], bool)
    far, tar = roc_curve(d, same)
    assert far.tolist() == [0, 0.5, 0.5, 1.0]
    assert tar.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])
