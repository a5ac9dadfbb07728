"""ONNX graph (opset 17) of dlib's face recognition ResNet, built with the ``onnx.helper`` API.

Mapping (``../shared/specs/dlib_models.md``, "A mapping to ONNX that is known to work"):

* input ``image`` ``(N, S, S, 3) float32`` RGB 0..255 (HWC, as dlib chips or Pillow images) →
  ``Transpose`` to NCHW → ``Sub(mean_rgb)`` → ``Mul(1/256)`` (input.h l.209: planar RGB,
  ``(pixel - avg) / 256``, no std);
* ``con_`` followed by ``affine_`` → one ``Conv`` with the affine folded in
  (``W' = W * gamma[o]``, ``b' = b * gamma[o] + beta[o]``);
* ``relu_`` → ``Relu``; ``max_pool_`` → ``MaxPool``; ``avg_pool_`` → ``AveragePool``
  (``count_include_pad=0``: dlib clips out-of-range taps) or ``GlobalAveragePool`` for size 0;
* ``add_prevN`` → ``Pad`` (zero-extend C, H, W at the end to the element-wise max of the two
  shapes, cpu_dlib.cpp l.279) + ``Add``. This covers the shortcut's channel increase and the
  spatial mismatches 3×3 into 4×4 and 1×1 into 2×2 of the last two levels;
* ``fc_`` (no bias) → ``Flatten`` + ``MatMul`` (dlib stores W as (inputs, outputs), no transpose);
* output ``embedding`` ``(N, D) float32``, the raw fc output (no L2 normalisation, loss.h l.2029).

Shapes are tracked statically while building, so every ``Pad`` has constant pads.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facegallery.export.dlib.resnet import AddPrev, Affine, AvgPool, Conv, Dense, DlibResNet, MaxPool, Relu, Skip, Tag
from facegallery.export.onnx_common import EMBEDDER_INPUT, EMBEDDER_OUTPUT, IR_VERSION, OPSET, save_model

__all__ = ["OPSET", "IR_VERSION", "INPUT_NAME", "OUTPUT_NAME", "build_embedder", "save_model"]

logger = logging.getLogger(__name__)

INPUT_NAME = EMBEDDER_INPUT
OUTPUT_NAME = EMBEDDER_OUTPUT
_BATCH_DIM = "N"

Shape = tuple[int, int, int]  # (C, H, W) of one sample


class _Graph:
    """Accumulates nodes and initializers; every node gets one output named after itself."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counts: dict[str, int] = {}

    def _name(self, stem: str) -> str:
        self._counts[stem] = self._counts.get(stem, 0) + 1
        return f"{stem}_{self._counts[stem]}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self._name(stem)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], *, output: str | None = None, **attrs) -> str:
        name = self._name(op_type.lower())
        out = output or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out


def _window_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output side of a conv or pool: 1 + (in + 2p - k) / s, floored (spec (a) con_, pools)."""
    return 1 + (size + 2 * padding - kernel) // stride


def _fold_affine(conv: Conv, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """Conv weights (O, I, kh, kw) and bias (O,) float32 with ``y * gamma + beta`` folded in."""
    gamma = affine.gamma.astype(np.float64)
    weight = conv.weight.astype(np.float64) * gamma[:, None, None, None]
    bias = conv.bias.astype(np.float64) * gamma + affine.beta.astype(np.float64)
    return weight.astype(np.float32), bias.astype(np.float32)


def _pad_to(g: _Graph, name: str, shape: Shape, target: Shape) -> str:
    """Zero-extend ``name`` of per-sample ``shape`` at the end of C, H, W up to ``target``."""
    if shape == target:
        return name
    ends = [t - s for s, t in zip(shape, target)]
    pads = g.const("pads", np.array([0, 0, 0, 0, 0, *ends], dtype=np.int64))
    return g.op("Pad", [name, pads], mode="constant")


def build_embedder(net: DlibResNet) -> onnx.ModelProto:
    """Build the ONNX embedder of a parsed dlib ResNet.

    Parameters
    ----------
    net : DlibResNet
        From :func:`facegallery.export.dlib.resnet.read_resnet`.

    Returns
    -------
    onnx.ModelProto
        Opset 17, input ``image`` ``(N, S, S, 3) float32`` RGB 0..255 with S = ``net.chip_size``
        and dynamic N, output ``embedding`` ``(N, D) float32``. Passes ``onnx.checker`` (full).

    Raises
    ------
    ValueError
        The layer sequence contains something this mapping does not cover (an affine that does
        not follow a convolution, a skip/add_prev without its tag).
    """
    g = _Graph()
    size = net.chip_size
    x = g.op("Transpose", [INPUT_NAME], perm=[0, 3, 1, 2])
    x = g.op("Sub", [x, g.const("mean_rgb", net.input_mean_rgb.reshape(1, 3, 1, 1).astype(np.float32))])
    x = g.op("Mul", [x, g.const("scale", np.array(1.0 / 256.0, dtype=np.float32))])
    shape: Shape = (3, size, size)
    tags: dict[int, tuple[str, Shape]] = {}

    layers = net.layers
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, Conv):
            following = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(following, Affine):
                weight, bias = _fold_affine(layer, following)
                i += 1
            else:
                weight, bias = layer.weight, layer.bias
            k = weight.shape[2]
            p, s = layer.padding, layer.stride
            x = g.op(
                "Conv",
                [x, g.const("conv_w", weight), g.const("conv_b", bias)],
                kernel_shape=[k, k],
                strides=[s, s],
                pads=[p, p, p, p],
            )
            shape = (weight.shape[0], _window_out(shape[1], k, s, p), _window_out(shape[2], k, s, p))
        elif isinstance(layer, Affine):
            raise ValueError(f"layer {i}: affine_ that does not follow a con_ is not supported")
        elif isinstance(layer, Relu):
            x = g.op("Relu", [x])
        elif isinstance(layer, (MaxPool, AvgPool)) and layer.size > 0:
            k, s, p = layer.size, layer.stride, layer.padding
            attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])
            if isinstance(layer, AvgPool):
                attrs["count_include_pad"] = 0
            x = g.op("MaxPool" if isinstance(layer, MaxPool) else "AveragePool", [x], **attrs)
            shape = (shape[0], _window_out(shape[1], k, s, p), _window_out(shape[2], k, s, p))
        elif isinstance(layer, AvgPool):
            x = g.op("GlobalAveragePool", [x])
            shape = (shape[0], 1, 1)
        elif isinstance(layer, Tag):
            tags[layer.id] = (x, shape)
        elif isinstance(layer, (Skip, AddPrev)):
            if layer.id not in tags:
                raise ValueError(f"layer {i}: {type(layer).__name__}{layer.id} without a tag{layer.id} below it")
            tagged, tagged_shape = tags[layer.id]
            if isinstance(layer, Skip):
                x, shape = tagged, tagged_shape
            else:
                target: Shape = tuple(max(a, b) for a, b in zip(shape, tagged_shape))  # type: ignore[assignment]
                x = g.op("Add", [_pad_to(g, x, shape, target), _pad_to(g, tagged, tagged_shape, target)])
                shape = target
        elif isinstance(layer, Dense):
            x = g.op("Flatten", [x], axis=1)
            x = g.op("MatMul", [x, g.const("fc_w", layer.weight)], output=OUTPUT_NAME)
        else:
            raise ValueError(f"layer {i}: unsupported layer {layer!r}")
        i += 1

    graph = helper.make_graph(
        g.nodes,
        "dlib_face_recognition_resnet_model_v1",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [_BATCH_DIM, size, size, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [_BATCH_DIM, net.embedding_dim])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="facegallery",
        doc_string="dlib_face_recognition_resnet_model_v1: image (N,S,S,3) float32 RGB 0..255 -> embedding (N,D) float32",
    )
    onnx.checker.check_model(model, full_check=True)
    logger.info("built embedder graph: %d nodes, %d initializers", len(g.nodes), len(g.initializers))
    return model

