"""Face embedding: runs a model directory's ONNX embedder on aligned face chips.

The embedder contract comes from ``model.json`` (:mod:`facegallery.server.contract.manifest`): input
``(N, S, S, 3) float32`` RGB 0..255 (NHWC, normalisation inside the graph), output
``(N, D) float32``. :class:`Embedder` checks at load time that the ONNX session agrees with the
declared chip size S and embedding dimension D, and never guesses either from the graph.

Cores: with one intra-op thread per run (the default, ``PipelineConfig.intra_op_threads``), a
batch is split into one slice per core and the slices run at once, each on its own thread (data
parallel). On this 2-core machine under other load, batch 8, chips/s: one run on 2 intra-op
threads 34-66, two concurrent runs on 1 thread each 68-102.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from facegallery.server.contract.errors import InvalidInput, ModelError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.onnx_session import open_session

__all__ = ["Embedder"]

logger = logging.getLogger(__name__)

_ACCEPTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
# The graph input's name when model.json's embedder_input gives none (the manifest's default).
_DEFAULT_INPUT_NAME = "image"
# What Embedder feeds the graph; a manifest declaring anything else cannot be served by it.
_SUPPORTED_INPUT = {"layout": "NHWC", "color": "RGB", "range": [0, 255], "dtype": "float32"}


class Embedder:
    """Embeds aligned face chips with an ONNX model on onnxruntime's CPU provider.

    Parameters
    ----------
    onnx_path : path
        The embedder graph: one input ``(N, S, S, 3) float32`` with dynamic N, one output
        ``(N, D) float32``.
    chip_size : int
        S, the chip side in pixels the model was built for (150 for dlib's ResNet).
    embedding_dim : int
        D, the embedding length (128 for dlib's ResNet).
    input_name : str
        Name of the graph input (``model.json`` ``embedder_input.name``).
    intra_op_threads, inter_op_threads : int
        onnxruntime thread-pool sizes; 0 means onnxruntime's default (one per core for intra-op).
    parallel_runs : int or None
        Slices a batch is split into, run concurrently from their own threads (>= 1); None: one
        per core with ``intra_op_threads=1``, else 1.

    Raises
    ------
    ModelError
        The file cannot be loaded, or its input/output names, ranks, element types or static
        dims disagree with ``input_name``, ``chip_size`` and ``embedding_dim`` (gRPC INTERNAL).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        *,
        chip_size: int,
        embedding_dim: int,
        input_name: str = _DEFAULT_INPUT_NAME,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        parallel_runs: int | None = None,
    ) -> None:
        self.onnx_path = Path(onnx_path)
        self.chip_size = int(chip_size)
        self.embedding_dim = int(embedding_dim)
        self.input_name = input_name
        self.intra_op_threads = int(intra_op_threads)
        self.inter_op_threads = int(inter_op_threads)
        if parallel_runs is None:
            parallel_runs = (os.cpu_count() or 1) if self.intra_op_threads == 1 else 1
        if parallel_runs < 1:
            raise ValueError(f"parallel_runs must be >= 1, got {parallel_runs}")
        self.parallel_runs = int(parallel_runs)
        # The slices but the caller's own run on these threads.
        self._pool = ThreadPoolExecutor(self.parallel_runs - 1, thread_name_prefix="embedder") if self.parallel_runs > 1 else None

        start = time.perf_counter()
        self._session = open_session(
            self.onnx_path, intra_op_threads=self.intra_op_threads, inter_op_threads=self.inter_op_threads, what="embedder"
        )
        self._output_name = self._check_session()
        logger.info("loaded %r in %.2f s", self, time.perf_counter() - start)

    @classmethod
    def from_manifest(cls, model_dir: str | os.PathLike, manifest: ModelManifest, **threads: int) -> "Embedder":
        """The embedder of a model directory, as declared by its ``model.json``.

        Parameters
        ----------
        model_dir : path
            The model directory.
        manifest : ModelManifest
            Its parsed ``model.json``; uses ``files["embedder"]``, ``chip.size``,
            ``embedding_dim`` and ``embedder_input``.
        **threads
            ``intra_op_threads`` / ``inter_op_threads`` / ``parallel_runs``, passed to the constructor.

        Raises
        ------
        ModelError
            The manifest names no embedder, declares an input convention other than NHWC RGB
            0..255 float32, or the graph disagrees with it.
        """
        if "embedder" not in manifest.files:
            raise ModelError(f"model.json in {model_dir} names no embedder file")
        declared = manifest.embedder_input
        for key, supported in _SUPPORTED_INPUT.items():
            if key in declared and declared[key] != supported:
                raise ModelError(f"embedder_input.{key} is {declared[key]!r}; only {supported!r} is supported")
        return cls(
            manifest.path_of(model_dir, "embedder"),
            chip_size=manifest.chip.size,
            embedding_dim=manifest.embedding_dim,
            input_name=str(declared.get("name", _DEFAULT_INPUT_NAME)),
            **threads,
        )

    def _check_session(self) -> str:
        """Compare the session's signature with the declared one; returns the output name."""
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(
                f"{self.onnx_path}: expected 1 input and 1 output, got inputs {[i.name for i in inputs]} "
                f"and outputs {[o.name for o in outputs]}"
            )
        inp, out = inputs[0], outputs[0]
        if inp.name != self.input_name:
            raise ModelError(f"{self.onnx_path}: input is named {inp.name!r}, model.json says {self.input_name!r}")
        s, d = self.chip_size, self.embedding_dim
        _check_arg("input", self.onnx_path, inp, (None, s, s, 3))
        _check_arg("output", self.onnx_path, out, (None, d))
        return out.name

    def embed(self, chips: np.ndarray) -> np.ndarray:
        """Embed a batch of aligned face chips.

        Parameters
        ----------
        chips : (N, S, S, 3) uint8 or float32
            RGB chips, 0..255, S = ``chip_size`` (as ``dlib.get_face_chip`` or the align stage
            produce). N may be 0.

        Returns
        -------
        (N, D) float32
            One embedding per chip, D = ``embedding_dim``; compare with Euclidean (L2) distance.
            Each row depends only on its own chip (no batch statistics).

        Raises
        ------
        InvalidInput
            ``chips`` is not a 4-D array of shape (N, S, S, 3) with dtype uint8 or float32
            (gRPC INVALID_ARGUMENT).
        """
        chips = np.asarray(chips)
        s = self.chip_size
        if chips.ndim != 4 or chips.shape[1:] != (s, s, 3):
            raise InvalidInput(f"face chips must have shape (N, {s}, {s}, 3), got {chips.shape}")
        if chips.dtype not in _ACCEPTED_DTYPES:
            raise InvalidInput(f"face chips must be uint8 or float32 RGB 0..255, got dtype {chips.dtype}")
        if len(chips) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        chips = np.ascontiguousarray(chips, dtype=np.float32)
        if self._pool is None or len(chips) == 1:
            return self._run(chips)
        slices = np.array_split(chips, min(self.parallel_runs, len(chips)))
        others = [self._pool.submit(self._run, part) for part in slices[1:]]
        first = self._run(slices[0])
        return np.concatenate([first, *(f.result() for f in others)])

    def _run(self, chips: np.ndarray) -> np.ndarray:
        """One session run: ``(n, S, S, 3) float32`` -> ``(n, D) float32`` (onnxruntime releases the GIL)."""
        (embeddings,) = self._session.run([self._output_name], {self.input_name: chips})
        return embeddings

    def __repr__(self) -> str:
        return (
            f"Embedder(onnx_path={str(self.onnx_path)!r}, chip_size={self.chip_size}, "
            f"embedding_dim={self.embedding_dim}, input_name={self.input_name!r}, "
            f"intra_op_threads={self.intra_op_threads}, inter_op_threads={self.inter_op_threads}, parallel_runs={self.parallel_runs})"
        )


def _check_arg(role: str, path: Path, arg: Any, expected: tuple[int | None, ...]) -> None:
    """Check an onnxruntime NodeArg: float tensor, rank, dynamic batch, and static dims."""
    if arg.type != "tensor(float)":
        raise ModelError(f"{path}: {role} {arg.name!r} has type {arg.type}, expected tensor(float)")
    shape = list(arg.shape)
    if len(shape) != len(expected):
        raise ModelError(f"{path}: {role} {arg.name!r} has shape {shape}, expected rank {len(expected)}")
    if isinstance(shape[0], int):
        raise ModelError(f"{path}: {role} {arg.name!r} has a fixed batch size {shape[0]}; the batch axis must be dynamic")
    for axis, (got, want) in enumerate(zip(shape[1:], expected[1:]), start=1):
        if got != want:
            raise ModelError(f"{path}: {role} {arg.name!r} has dim {axis} = {got!r}, model.json implies {want}")
