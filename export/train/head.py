"""The logistic same-person head over two embeddings (training and ONNX export; needs PyTorch).

DeepFace (Taigman, Yang, Ranzato, Wolf, CVPR 2014, sec. 4.2) verifies a pair with a logistic
regression over a per-component distance feature of the two descriptors f(x_i), f(x_j)::

    abs_diff:  y = sigmoid( sum_k w_k |f(x_i)_k - f(x_j)_k| + b )
    chi2:      y = sigmoid( sum_k w_k (f(x_i)_k - f(x_j)_k)^2 / (f(x_i)_k + f(x_j)_k) + b )

The chi-squared feature assumes non-negative components (DeepFace's descriptors follow a ReLU
and are normalised to [0, 1]). Our embeddings are L2-normalised with signed components (and a raw
embedding such as dlib's is signed too), so ``a_k + b_k`` can be zero or negative, which would make
the feature infinite or flip its sign. We therefore use the denominator ``|a_k| + |b_k| + eps``
(eps = 1e-6): it equals ``a_k + b_k`` whenever both components are non-negative (the case the
paper covers), it is always positive, and since ``|a_k - b_k| <= |a_k| + |b_k|`` the feature is
bounded by ``|a_k - b_k|`` (it is 0, not 0/0, when both components are 0).

The head is fitted with binary cross-entropy on balanced pairs (half same, half different) of the
training identities' embeddings, and exported as ``head.onnx`` (inputs ``embedding_a``,
``embedding_b`` ``(N, D) float32`` -> ``probability_same`` ``(N,) float32``); the server runs it
with :class:`facegallery.server.face.same_head.SameHead`.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facegallery.export.onnx_common import save_torch_onnx
from facegallery.server.face.onnx_session import open_session
from facegallery.server.face.same_head import HEAD_INPUTS, HEAD_KINDS, HEAD_OUTPUT

__all__ = ["CHI2_EPS", "HeadFit", "SameHeadNet", "export_head", "fit_head", "pair_features", "sample_pairs"]

logger = logging.getLogger(__name__)

CHI2_EPS = 1e-6


def pair_features(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-component pair feature.

    Parameters
    ----------
    a, b : (N, D) float tensor
    kind : {"abs_diff", "chi2"}

    Returns
    -------
    (N, D) float tensor
        ``|a - b|`` or ``(a - b)^2 / (|a| + |b| + CHI2_EPS)`` (see the module docstring).
    """
    diff = a - b
    if kind == "abs_diff":
        return diff.abs()
    if kind == "chi2":
        return diff * diff / (a.abs() + b.abs() + CHI2_EPS)
    raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")


class SameHeadNet(nn.Module):
    """``P(same) = sigmoid(w . feature(a, b) + c)``.

    Parameters
    ----------
    dim : int
        Embedding dimension D.
    kind : {"abs_diff", "chi2"}

    ``forward(embedding_a (N, D), embedding_b (N, D)) -> (N,)`` probabilities;
    :meth:`logits` gives the pre-sigmoid values.
    """

    def __init__(self, dim: int, kind: str) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
        self.kind = kind
        self.linear = nn.Linear(dim, 1)
        # Start from "larger distance -> less likely the same person".
        nn.init.constant_(self.linear.weight, -1.0 / dim)
        nn.init.zeros_(self.linear.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def logits(self, embedding_a: torch.Tensor, embedding_b: torch.Tensor) -> torch.Tensor:
        return self.linear(pair_features(embedding_a, embedding_b, self.kind)).squeeze(1)

    def forward(self, embedding_a: torch.Tensor, embedding_b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(embedding_a, embedding_b))


def sample_pairs(labels: np.ndarray, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced random pairs: ``n_pairs // 2`` same-identity pairs of distinct images, the rest
    pairs of different identities.

    Parameters
    ----------
    labels : (N,) int
    n_pairs : int
    rng : numpy Generator

    Returns
    -------
    i, j : (M,) int64
        Row indices of the two images.
    same : (M,) bool

    Raises
    ------
    ValueError
        No identity has 2 images, or there is only one identity.
    """
    labels = np.asarray(labels)
    groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
    multi = [g for g in groups if g.size >= 2]
    if not multi or len(groups) < 2:
        raise ValueError("head pairs need an identity with 2+ images and at least 2 identities")
    n_same = n_pairs // 2
    which = rng.integers(len(multi), size=n_same)
    same_pairs = np.array([rng.choice(multi[g], 2, replace=False) for g in which]).reshape(-1, 2)
    n_diff = n_pairs - n_same
    i = rng.integers(labels.size, size=4 * n_diff)
    j = rng.integers(labels.size, size=4 * n_diff)
    keep = labels[i] != labels[j]
    i, j = i[keep][:n_diff], j[keep][:n_diff]
    first = np.concatenate([same_pairs[:, 0], i]).astype(np.int64)
    second = np.concatenate([same_pairs[:, 1], j]).astype(np.int64)
    same = np.concatenate([np.ones(n_same, bool), np.zeros(i.size, bool)])
    return first, second, same


@dataclasses.dataclass(frozen=True)
class HeadFit:
    """A fitted head and its figures on the pairs it was fitted on.

    Attributes
    ----------
    head : SameHeadNet
    loss : float
        Final mean binary cross-entropy.
    accuracy : float
        Share of pairs with (P >= 0.5) == same.
    pairs : int
    """

    head: SameHeadNet
    loss: float
    accuracy: float
    pairs: int


def fit_head(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    kind: str,
    n_pairs: int = 20000,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> HeadFit:
    """Fit the logistic head on balanced pairs of the given embeddings (full-batch Adam).

    Parameters
    ----------
    embeddings : (N, D) float32
        Embeddings of the training identities' chips.
    labels : (N,) int
    kind : {"abs_diff", "chi2"}
    n_pairs, steps, lr, weight_decay : training settings (L2 penalty on w via AdamW decay).
    seed : int

    Returns
    -------
    HeadFit
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    i, j, same = sample_pairs(labels, n_pairs, rng)
    emb = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
    a, b = emb[i], emb[j]
    target = torch.from_numpy(same.astype(np.float32))
    head = SameHeadNet(emb.shape[1], kind)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head.logits(a, b), target)
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        logits = head.logits(a, b)
        final = float(F.binary_cross_entropy_with_logits(logits, target))
        accuracy = float(((logits >= 0) == target.bool()).float().mean())
    logger.info("head %s: %d pairs, BCE %.4f, accuracy %.4f", kind, len(same), final, accuracy)
    return HeadFit(head, final, accuracy, len(same))


def export_head(head: SameHeadNet, path: str | os.PathLike, *, atol: float = 1e-5) -> float:
    """Write ``head.onnx`` (atomically, opset ``onnx_common.OPSET``) and check it against PyTorch
    at batch sizes 1 and 7.

    Parameters
    ----------
    head : SameHeadNet
    path : path
        Output ``.onnx`` file.
    atol : float
        Largest allowed |onnxruntime - torch| probability difference.

    Returns
    -------
    float
        The max |diff| observed.

    Raises
    ------
    AssertionError
        The exported graph disagrees with PyTorch by more than ``atol``.
    ModelError
        onnxruntime cannot load the exported file.
    """
    head.eval()
    dim = head.linear.in_features
    example = (torch.randn(2, dim), torch.randn(2, dim))
    save_torch_onnx(
        head, example, path, input_names=HEAD_INPUTS, output_names=[HEAD_OUTPUT],
        dynamic_axes={HEAD_INPUTS[0]: {0: "N"}, HEAD_INPUTS[1]: {0: "N"}, HEAD_OUTPUT: {0: "N"}},
    )  # fmt: skip
    session = open_session(path, intra_op_threads=1, what="exported head")
    worst = 0.0
    generator = torch.Generator().manual_seed(1)
    for n in (1, 7):
        a = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
        b = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
        with torch.no_grad():
            expected = head(a, b).numpy()
        (got,) = session.run([HEAD_OUTPUT], {HEAD_INPUTS[0]: a.numpy(), HEAD_INPUTS[1]: b.numpy()})
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst
