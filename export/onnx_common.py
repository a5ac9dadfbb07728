"""What every ONNX graph facegallery writes has in common: opset, IR version, atomic save."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

__all__ = ["OPSET", "IR_VERSION", "save_model"]

OPSET = 17
IR_VERSION = 8  # the IR that introduced opset 17; readable by onnxruntime >= 1.13


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return path
