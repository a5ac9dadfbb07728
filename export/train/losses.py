"""Triplet loss with online triplet mining (training only; needs the ``train`` extra, PyTorch).

The triplet loss of FaceNet (Schroff, Kalenichenko, Philbin, CVPR 2015, eq. 1-3) asks every anchor
A to sit closer to a positive P (same identity) than to a negative N (another identity) by a margin
alpha, with d the *squared* L2 distance between embeddings::

    L = max(d(A, P) - d(A, N) + alpha, 0)

Random triplets are mostly already satisfied (loss 0), so triplets are mined online inside each
P x K batch (P identities x K images):

* ``batch-hard`` (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
  Re-Identification", 2017, sec. 2): one triplet per anchor, with its farthest positive and its
  nearest negative in the batch.
* ``semi-hard`` (FaceNet sec. 3.2): one triplet per anchor-positive pair (a, p), with the nearest
  negative that is still farther than the positive, d(a, p) < d(a, n); such negatives lie inside
  the margin when d(a, n) < d(a, p) + alpha. When no negative is farther than the positive, the
  farthest negative is taken (the convention of TensorFlow Addons ``triplet_semihard_loss``), so
  every pair yields one triplet and the hardest negatives, which FaceNet says can collapse the
  model early in training, are never chosen.

The loss is the mean over the mined triplets (FaceNet's sum divided by their number, so the
learning rate does not depend on the batch size); the *active fraction* is the share of mined
triplets whose loss is > 0, the usual progress signal of triplet training.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

__all__ = [
    "MINERS",
    "TripletLoss",
    "TripletLossOutput",
    "Triplets",
    "mine_batch_hard",
    "mine_semi_hard",
    "pairwise_squared_distances",
    "triplet_loss",
]

logger = logging.getLogger(__name__)

MINERS = ("batch-hard", "semi-hard")
DEFAULT_MARGIN = 0.2  # FaceNet sec. 3 uses alpha = 0.2 on unit-norm embeddings


@dataclasses.dataclass(frozen=True)
class Triplets:
    """Index triplets into a batch: ``anchor``, ``positive``, ``negative`` each ``(T,) int64``."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def __len__(self) -> int:
        return int(self.anchor.numel())


@dataclasses.dataclass(frozen=True)
class TripletLossOutput:
    """Result of :class:`TripletLoss`.

    Attributes
    ----------
    loss : () float32 tensor
        Mean triplet loss over the mined triplets (0 with grad when none could be mined).
    active_fraction : float
        Share of mined triplets with loss > 0, in [0, 1].
    num_triplets : int
        Number of mined triplets T.
    """

    loss: torch.Tensor
    active_fraction: float
    num_triplets: int


def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances between all rows.

    Parameters
    ----------
    embeddings : (B, D) float tensor

    Returns
    -------
    (B, B) float tensor
        ``d[i, j] = ||e_i - e_j||^2``, computed exactly as differences (not via the
        ``|a|^2 + |b|^2 - 2ab`` expansion, which goes slightly negative and has an unstable
        gradient at 0).
    """
    diff = embeddings.unsqueeze(1) - embeddings.unsqueeze(0)
    return (diff * diff).sum(dim=-1)


def _masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def mine_batch_hard(distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
    """Batch-hard mining: per anchor, the farthest positive and the nearest negative.

    Parameters
    ----------
    distances : (B, B) float tensor
        Squared L2 distances (:func:`pairwise_squared_distances`).
    labels : (B,) int64 tensor
        Identity of each row.

    Returns
    -------
    Triplets
        One triplet per anchor that has at least one positive and one negative in the batch
        (T <= B); empty when there is none. Ties go to the lowest index.
    """
    positive_mask, negative_mask = _masks(labels)
    valid = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    inf = torch.finfo(distances.dtype).max
    d = distances.detach()
    hardest_positive = torch.where(positive_mask, d, torch.full_like(d, -1.0)).argmax(dim=1)
    hardest_negative = torch.where(negative_mask, d, torch.full_like(d, inf)).argmin(dim=1)
    anchor = torch.nonzero(valid).flatten()
    return Triplets(anchor, hardest_positive[anchor], hardest_negative[anchor])


def mine_semi_hard(distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
    """Semi-hard mining (FaceNet sec. 3.2): per anchor-positive pair, the nearest farther negative.

    Parameters
    ----------
    distances : (B, B) float tensor
        Squared L2 distances.
    labels : (B,) int64 tensor

    Returns
    -------
    Triplets
        One triplet per ordered anchor-positive pair (a, p), a != p, whose anchor has a negative:
        the negative n with the smallest d(a, n) among those with d(a, n) > d(a, p); if there is
        no such negative, the one with the largest d(a, n). Ties go to the lowest index.
    """
    positive_mask, negative_mask = _masks(labels)
    has_negative = negative_mask.any(dim=1, keepdim=True)
    anchor, positive = torch.nonzero(positive_mask & has_negative, as_tuple=True)
    if anchor.numel() == 0:
        return Triplets(anchor, positive, anchor.clone())
    d = distances.detach()
    d_an = d[anchor]  # (T, B)
    d_ap = d[anchor, positive].unsqueeze(1)  # (T, 1)
    neg = negative_mask[anchor]
    inf = torch.finfo(d.dtype).max
    farther = neg & (d_an > d_ap)
    semi = torch.where(farther, d_an, torch.full_like(d_an, inf)).argmin(dim=1)
    easiest = torch.where(neg, d_an, torch.full_like(d_an, -1.0)).argmax(dim=1)
    negative = torch.where(farther.any(dim=1), semi, easiest)
    return Triplets(anchor, positive, negative)


def triplet_loss(
    distances: torch.Tensor, triplets: Triplets, margin: float = DEFAULT_MARGIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-triplet loss ``max(d(A,P) - d(A,N) + margin, 0)`` (FaceNet eq. 2).

    Parameters
    ----------
    distances : (B, B) float tensor
        Squared L2 distances, with grad.
    triplets : Triplets
        ``T`` index triplets into the batch.
    margin : float
        alpha, in squared-L2 units.

    Returns
    -------
    (T,) float tensor
        The hinge loss of each triplet.
    """
    d_ap = distances[triplets.anchor, triplets.positive]
    d_an = distances[triplets.anchor, triplets.negative]
    return torch.clamp(d_ap - d_an + margin, min=0.0)


class TripletLoss(torch.nn.Module):
    """Triplet loss over a P x K batch with online mining.

    Parameters
    ----------
    margin : float
        alpha in squared-L2 units (default 0.2, FaceNet).
    miner : {"batch-hard", "semi-hard"}

    Raises
    ------
    ValueError
        Unknown miner or negative margin.
    """

    def __init__(self, *, margin: float = DEFAULT_MARGIN, miner: str = "batch-hard") -> None:
        super().__init__()
        if miner not in MINERS:
            raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.miner = miner

    def extra_repr(self) -> str:
        return f"margin={self.margin}, miner={self.miner!r}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> TripletLossOutput:
        """Mine triplets in the batch and average their loss.

        Parameters
        ----------
        embeddings : (B, D) float tensor
        labels : (B,) int64 tensor

        Returns
        -------
        TripletLossOutput
        """
        distances = pairwise_squared_distances(embeddings)
        mine = mine_batch_hard if self.miner == "batch-hard" else mine_semi_hard
        triplets = mine(distances, labels)
        if len(triplets) == 0:
            logger.debug("no triplet in a batch of %d (labels %s)", labels.numel(), labels.unique().tolist())
            return TripletLossOutput(embeddings.sum() * 0.0, 0.0, 0)
        per_triplet = triplet_loss(distances, triplets, self.margin)
        active = float((per_triplet > 0).float().mean())
        return TripletLossOutput(per_triplet.mean(), active, len(triplets))
