"""The learned same-person head: P(same) from two embeddings, on onnxruntime.

A model directory trained with ``facegallery train --head abs-diff|chi2`` carries ``head.onnx``
(``files.head``) and ``"head": {"kind": ...}`` in ``model.json``. The head is a logistic
regression over a per-component feature of the two embeddings (Taigman et al., DeepFace,
CVPR 2014, sec. 4.2)::

    abs_diff:  P = sigmoid(sum_k w_k |a_k - b_k| + c)
    chi2:      P = sigmoid(sum_k w_k (a_k - b_k)^2 / (|a_k| + |b_k| + eps) + c)

The feature is computed inside the graph (export/train/head.py builds and exports it), so this
module only feeds the two embeddings and checks shapes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from facegallery.server.contract.errors import EmbeddingShapeError, ModelError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.onnx_session import open_session

__all__ = ["HEAD_INPUTS", "HEAD_KINDS", "HEAD_OUTPUT", "SameHead"]

logger = logging.getLogger(__name__)

#: ``model.json`` ``head.kind`` values (export/train/head.py).
HEAD_KINDS = ("abs_diff", "chi2")
#: Graph input names, each ``(N, D) float32``, and the output name, ``(N,) float32`` in [0, 1].
HEAD_INPUTS = ("embedding_a", "embedding_b")
HEAD_OUTPUT = "probability_same"


class SameHead:
    """P(same person) for pairs of embeddings from a model's ``head.onnx``.

    Parameters
    ----------
    onnx_path : path
        The head graph: inputs ``embedding_a``, ``embedding_b`` ``(N, D) float32`` (dynamic N),
        output ``probability_same`` ``(N,) float32``.
    embedding_dim : int
        D, from ``model.json``.
    kind : str
        ``"abs_diff"`` or ``"chi2"`` (informational; the feature is inside the graph).
    intra_op_threads : int
        onnxruntime intra-op threads (the head is a dot product: 1 is plenty).

    Raises
    ------
    ModelError
        The file cannot be loaded, ``kind`` is unknown, or the graph's names/shapes disagree with
        the contract above (gRPC INTERNAL).
    """

    def __init__(self, onnx_path: str | os.PathLike, *, embedding_dim: int, kind: str, intra_op_threads: int = 1) -> None:
        if kind not in HEAD_KINDS:
            raise ModelError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
        self.onnx_path = Path(onnx_path)
        self.embedding_dim = int(embedding_dim)
        self.kind = kind
        self._session = open_session(self.onnx_path, intra_op_threads=intra_op_threads, what="same-person head")
        self._check_session()
        logger.info("loaded %r", self)

    @classmethod
    def from_manifest(cls, model_dir: str | os.PathLike, manifest: ModelManifest) -> SameHead | None:
        """The head of a model directory, or None when ``model.json`` declares none.

        Raises
        ------
        ModelError
            ``head`` is declared without ``files.head`` (or the reverse), or the graph is invalid.
        """
        if manifest.head is None and "head" not in manifest.files:
            return None
        if manifest.head is None or "head" not in manifest.files:
            raise ModelError(f"model.json in {model_dir} must give both 'head' and 'files.head', or neither")
        return cls(manifest.path_of(model_dir, "head"), embedding_dim=manifest.embedding_dim, kind=str(manifest.head.get("kind")))

    def _check_session(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = self._session.get_outputs()
        if set(inputs) != set(HEAD_INPUTS) or [o.name for o in outputs] != [HEAD_OUTPUT]:
            raise ModelError(
                f"{self.onnx_path}: expected inputs {list(HEAD_INPUTS)} and output [{HEAD_OUTPUT!r}], "
                f"got {sorted(inputs)} and {[o.name for o in outputs]}"
            )
        for name in HEAD_INPUTS:
            arg = inputs[name]
            shape = list(arg.shape)
            if arg.type != "tensor(float)" or len(shape) != 2 or shape[1] != self.embedding_dim or isinstance(shape[0], int):
                raise ModelError(
                    f"{self.onnx_path}: input {name!r} is {arg.type} {shape}, expected tensor(float) [N, {self.embedding_dim}]"
                )
        out = outputs[0]
        if out.type != "tensor(float)" or len(out.shape) != 1:
            raise ModelError(f"{self.onnx_path}: output {HEAD_OUTPUT!r} is {out.type} {list(out.shape)}, expected tensor(float) [N]")

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """P(same person) for each row pair.

        Parameters
        ----------
        a, b : (N, D) float32
            Embeddings of the same model; row i of ``a`` is paired with row i of ``b``. N may be 0.

        Returns
        -------
        (N,) float32
            Probabilities in [0, 1].

        Raises
        ------
        EmbeddingShapeError
            ``a`` and ``b`` are not both (N, D) with D = ``embedding_dim``, or hold non-finite
            values (gRPC INVALID_ARGUMENT).
        """
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        d = self.embedding_dim
        if a.ndim != 2 or a.shape[1] != d or a.shape != b.shape:
            raise EmbeddingShapeError(f"embeddings must both be (N, {d}), got {a.shape} and {b.shape}")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise EmbeddingShapeError("embeddings hold non-finite values")
        if len(a) == 0:
            return np.zeros(0, dtype=np.float32)
        (p,) = self._session.run([HEAD_OUTPUT], {HEAD_INPUTS[0]: np.ascontiguousarray(a), HEAD_INPUTS[1]: np.ascontiguousarray(b)})
        return p.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"SameHead(onnx_path={str(self.onnx_path)!r}, embedding_dim={self.embedding_dim}, kind={self.kind!r})"
