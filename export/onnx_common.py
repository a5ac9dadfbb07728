"""What every ONNX graph facegallery writes has in common: opset, IR version, tensor names, durable save.

Both the dlib converters (``facegallery.export.dlib``, graphs built with ``onnx.helper``) and
training (``facegallery.export.train``, graphs exported by ``torch.onnx.export``) write their
graphs through :func:`save_model` / :func:`save_torch_onnx`, so every model file is replaced
atomically and durably (:mod:`facegallery.server.contract.files`) at one opset.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from facegallery.server.contract.files import atomic_write, write_bytes_atomic

__all__ = ["OPSET", "IR_VERSION", "EMBEDDER_INPUT", "EMBEDDER_OUTPUT", "save_model", "save_torch_onnx"]

OPSET = 17
IR_VERSION = 8  # the IR that introduced opset 17; readable by onnxruntime >= 1.13
#: Tensor names of every embedder graph, ``(N, S, S, 3) float32`` RGB 0..255 -> ``(N, D) float32``
#: (the ``model.json`` ``embedder_input.name`` default, server/contract/manifest.py).
EMBEDDER_INPUT = "image"
EMBEDDER_OUTPUT = "embedding"


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically and durably (``atomic_write``); returns the path."""
    with atomic_write(path, "wb") as f:
        onnx.save_model(model, f)
    return Path(path)


def save_torch_onnx(
    module: Any,
    example: tuple[Any, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> Path:
    """Export a PyTorch module with ``torch.onnx.export`` at :data:`OPSET` and write it atomically.

    The graph is exported into memory and written with ``write_bytes_atomic``, so ``path`` is
    either the previous file or the complete new graph, never a partial export.

    Parameters
    ----------
    module : torch.nn.Module
        In eval mode; traced with ``example``.
    example : tuple of torch.Tensor
        Example inputs for the trace (their batch size is irrelevant with ``dynamic_axes``).
    path : path
        The ``.onnx`` file to write.
    input_names, output_names : sequence of str
        Graph tensor names.
    dynamic_axes : mapping
        ``{tensor name: {axis: symbolic name}}``, e.g. the batch axis.

    Returns
    -------
    Path
        ``path``.
    """
    import torch  # export needs PyTorch; the rest of this module does not

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript (not a dependency); the TorchScript path exports these graphs exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module, example, buffer, dynamo=False, opset_version=OPSET,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
        )  # fmt: skip
    return write_bytes_atomic(path, buffer.getvalue())
