"""Triplet loss and the batch-hard / semi-hard miners on hand-made embeddings (export/train/losses.py).

The embeddings are 1-D points x = [0, 1, 3, 3.5, 6] with identities [0, 0, 0, 1, 1], so every
squared distance is known by hand:

    d(0,1)=1     d(0,2)=9     d(0,3)=12.25  d(0,4)=36
    d(1,2)=4     d(1,3)=6.25  d(1,4)=25
    d(2,3)=0.25  d(2,4)=9
    d(3,4)=6.25
"""

from __future__ import annotations

import pytest
import torch

from facegallery.export.train.losses import (
    TripletLoss,
    mine_batch_hard,
    mine_semi_hard,
    pairwise_squared_distances,
)

X = torch.tensor([[0.0], [1.0], [3.0], [3.5], [6.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 0, 1, 1])


def test_pairwise_squared_distances_by_hand():
    d = pairwise_squared_distances(X)
    assert d[0, 1] == 1 and d[0, 3] == 12.25 and d[2, 3] == 0.25 and d[3, 4] == 6.25
    assert torch.equal(d, d.T) and torch.all(torch.diagonal(d) == 0)


def test_batch_hard_picks_farthest_positive_and_nearest_negative():
    # a0: positives 1 (1), 2 (9) -> 2; negatives 3 (12.25), 4 (36) -> 3
    # a1: positives 0 (1), 2 (4) -> 2; negatives 3 (6.25), 4 (25) -> 3
    # a2: positives 0 (9), 1 (4) -> 0; negatives 3 (0.25), 4 (9) -> 3
    # a3: positive 4; negatives 0 (12.25), 1 (6.25), 2 (0.25) -> 2
    # a4: positive 3; negatives 0 (36), 1 (25), 2 (9) -> 2
    t = mine_batch_hard(pairwise_squared_distances(X), LABELS)
    assert t.anchor.tolist() == [0, 1, 2, 3, 4]
    assert t.positive.tolist() == [2, 2, 0, 4, 3]
    assert t.negative.tolist() == [3, 3, 3, 2, 2]


def test_semi_hard_picks_nearest_negative_farther_than_the_positive():
    # (a, p): d(a,p) -> negatives farther than d(a,p), nearest of them
    # (0,1): 1 -> 3 (12.25)   (0,2): 9 -> 3 (12.25)   (1,0): 1 -> 3 (6.25)   (1,2): 4 -> 3 (6.25)
    # (2,0): 9 -> none farther than 9 (3: 0.25, 4: 9 is not > 9) -> farthest negative, 4
    # (2,1): 4 -> 4 (9)   (3,4): 6.25 -> 0 (12.25; 1 is at 6.25, not farther)   (4,3): 6.25 -> 2 (9)
    t = mine_semi_hard(pairwise_squared_distances(X), LABELS)
    assert list(zip(t.anchor.tolist(), t.positive.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)]
    assert t.negative.tolist() == [3, 3, 3, 3, 4, 4, 0, 2]


def test_batch_hard_loss_values_by_hand():
    # margin 0.2: a0 9-12.25 -> 0; a1 4-6.25 -> 0; a2 9-0.25+0.2 = 8.95; a3 6.25-0.25+0.2 = 6.2; a4 6.25-9 -> 0
    out = TripletLoss(margin=0.2, miner="batch-hard")(X, LABELS)
    assert out.num_triplets == 5
    assert out.loss.item() == pytest.approx((8.95 + 6.2) / 5)
    assert out.active_fraction == pytest.approx(2 / 5)
    # margin 3: a0 -0.25 -> 0; a1 0.75; a2 11.75; a3 9; a4 0.25
    out = TripletLoss(margin=3.0, miner="batch-hard")(X, LABELS)
    assert out.loss.item() == pytest.approx((0.75 + 11.75 + 9 + 0.25) / 5)
    assert out.active_fraction == pytest.approx(4 / 5)


def test_semi_hard_loss_values_by_hand():
    # margin 3, triplets in the order above:
    # (0,1) 1-12.25+3 -> 0; (0,2) 9-12.25+3 = -0.25 -> 0; (1,0) 1-6.25+3 -> 0; (1,2) 4-6.25+3 = 0.75 (inside the margin);
    # (2,0) 9-9+3 = 3; (2,1) 4-9+3 -> 0; (3,4) 6.25-12.25+3 -> 0; (4,3) 6.25-9+3 = 0.25 (inside the margin)
    out = TripletLoss(margin=3.0, miner="semi-hard")(X, LABELS)
    assert out.num_triplets == 8
    assert out.loss.item() == pytest.approx((0.75 + 3 + 0.25) / 8)
    assert out.active_fraction == pytest.approx(3 / 8)


def test_gradient_by_hand():
    # Active batch-hard triplets at margin 0.2: a2 (p 0, n 3) and a3 (p 4, n 2); mean over 5 anchors:
    # L = [(x2-x0)^2 - (x2-x3)^2 + (x3-x4)^2 - (x3-x2)^2 + 0.4] / 5
    # dL/dx0 = -2(x2-x0)/5 = -1.2 (descent pulls x0 towards its positive x2)
    # dL/dx2 = [2(x2-x0) - 2(x2-x3) + 2(x3-x2)] / 5 = (6 + 1 + 1)/5 = 1.6
    # dL/dx3 = [2(x2-x3) + 2(x3-x4) - 2(x3-x2)] / 5 = (-1 - 5 - 1)/5 = -1.4 (pushed away from negative x2)
    # dL/dx4 = -2(x3-x4)/5 = 1.0; point 1 is in no active triplet.
    x = X.clone().requires_grad_(True)
    TripletLoss(margin=0.2, miner="batch-hard")(x, LABELS).loss.backward()
    assert x.grad[:, 0].tolist() == pytest.approx([-1.2, 0.0, 1.6, -1.4, 1.0])


def test_singletons_and_one_identity_give_no_triplets():
    out = TripletLoss(miner="batch-hard")(X[:3], LABELS[:3])  # one identity: no negatives
    assert out.num_triplets == 0 and out.loss.item() == 0.0 and out.active_fraction == 0.0
    t = mine_semi_hard(pairwise_squared_distances(X[2:4]), torch.tensor([0, 1]))  # no positives
    assert len(t) == 0


def test_easy_batch_has_no_active_triplet():
    far_apart = torch.tensor([[0.0], [0.1], [5.0], [5.1]])
    for miner in ("batch-hard", "semi-hard"):
        out = TripletLoss(margin=0.2, miner=miner)(far_apart, torch.tensor([0, 0, 1, 1]))
        assert out.loss.item() == 0.0 and out.active_fraction == 0.0 and out.num_triplets > 0


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="miner"):
        TripletLoss(miner="hardest")
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-0.1)
