"""One way to open an ONNX model on onnxruntime: the detector, the embedder, the head, and the
checks of freshly exported graphs (``facegallery.export.train``) all call :func:`open_session`.

Every session runs on the CPU provider with all graph optimisations and an explicit thread
budget, so a model behaves the same whichever component loads it, and a file that cannot be
loaded is reported as :class:`~facegallery.server.contract.errors.ModelError` (gRPC INTERNAL)
naming the file, never as onnxruntime's own untyped exception.
"""

from __future__ import annotations

import logging
import os
import time

import onnxruntime as ort

from facegallery.server.contract.errors import ModelError

__all__ = ["PROVIDERS", "open_session"]

logger = logging.getLogger(__name__)

#: Execution providers of every session: the server and the export checks are CPU-only.
PROVIDERS = ("CPUExecutionProvider",)


def open_session(
    path: str | os.PathLike,
    *,
    intra_op_threads: int,
    inter_op_threads: int = 1,
    memory_pattern: bool = True,
    what: str = "ONNX model",
) -> ort.InferenceSession:
    """Load an ONNX file into an onnxruntime CPU session.

    Parameters
    ----------
    path : path
        The ``.onnx`` file.
    intra_op_threads : int
        Threads of one operator (``SessionOptions.intra_op_num_threads``); 0 lets onnxruntime
        use one per core.
    inter_op_threads : int
        Threads running independent operators in parallel; 1 (the default) runs the graph
        sequentially, which is what these chain-shaped graphs need.
    memory_pattern : bool
        Pre-plan buffers from the first run's shapes (``enable_mem_pattern``). Turn it off for
        inputs whose shape changes on every call (the detector's image pyramid).
    what : str
        What the file is, for the error message (``"detector"``, ``"embedder"``, ...).

    Returns
    -------
    onnxruntime.InferenceSession
        Graph optimisation level ``ORT_ENABLE_ALL``, providers ``["CPUExecutionProvider"]``, thread
        pools that do not spin while idle.

    Raises
    ------
    ModelError
        The file is missing or is not a model onnxruntime can load.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = int(inter_op_threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = bool(memory_pattern)
    # Idle pool threads sleep instead of spinning: the server runs sessions from several threads
    # at once beside Python work, and spinning threads took the cores those need. Embedder batch 8
    # on 2 cores under load, chips/s: 2 intra-op threads spinning 34-44, not spinning 53-66.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=list(PROVIDERS))
    except Exception as exc:  # onnxruntime raises its own untyped errors (file missing, bad proto)
        raise ModelError(f"cannot load {what} {os.fspath(path)}: {exc}") from exc
    logger.debug("opened %s %s in %.2f s", what, os.fspath(path), time.perf_counter() - start)
    return session
