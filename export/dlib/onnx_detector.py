"""ONNX graph (opset 17) of dlib's MMOD CNN face detector, built with the ``onnx.helper`` API.

Mapping (``../shared/specs/dlib_models.md``, "A mapping to ONNX that is known to work"):

* input ``tensor`` ``(1, 3, H, W) float32``: the normalised tiled image pyramid, planar RGB
  ``(pixel - mean) / 256`` with zero gaps, built in numpy (``facegallery.server.face.image_pyramid``)
  because its data-dependent tiling is awkward in ONNX; ``H`` and ``W`` are dynamic;
* ``con_`` + ``affine_`` (dlib's ``bn_con2`` converted on load) → one ``Conv`` with the affine
  folded in, cross-correlation with zero padding (cpu_dlib.cpp l.2835); the stride-2 convs are
  "valid" (padding 0, the template default ``stride != 1 ? 0 : k/2``);
* ``relu_`` → ``Relu``;
* output ``score`` ``(1, 1, Ho, Wo) float32``: raw MMOD scores of the 80×80 window centred at input
  pixel ``(8 x + 14, 8 y + 14)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from facegallery.export.onnx_common import IR_VERSION, OPSET, save_model

__all__ = ["OPSET", "IR_VERSION", "INPUT_NAME", "OUTPUT_NAME", "ConvLayer", "build_detector", "save_model"]

INPUT_NAME = "tensor"
OUTPUT_NAME = "score"


@dataclasses.dataclass(frozen=True, eq=False)
class ConvLayer:
    """One convolution of the detector with its affine folded in.

    Attributes
    ----------
    weight : (O, I, kh, kw) float32
        Filters, OIHW (dlib's ``con_`` layout).
    bias : (O,) float32
    stride : int
        Same in x and y.
    padding : int
        Zero padding on every side, pixels.
    relu : bool
        A ``Relu`` follows.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int
    relu: bool


def build_detector(layers: tuple[ConvLayer, ...] | list[ConvLayer], *, doc: str = "") -> onnx.ModelProto:
    """Build and check the detector graph.

    Parameters
    ----------
    layers : sequence of ConvLayer
        Forward order; the first takes 3 channels, the last gives 1.
    doc : str
        Stored as the graph's ``doc_string``.

    Returns
    -------
    onnx.ModelProto
        ``tensor`` ``(1, 3, height, width) float32`` → ``score`` ``(1, 1, out_height, out_width)
        float32``; passes ``onnx.checker.check_model``.
    """
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    current = INPUT_NAME
    for i, layer in enumerate(layers):
        w_name, b_name = f"conv{i}_weight", f"conv{i}_bias"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(layer.weight, np.float32), w_name))
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(layer.bias, np.float32), b_name))
        last = i == len(layers) - 1
        conv_out = OUTPUT_NAME if last and not layer.relu else f"conv{i}"
        kernel = list(layer.weight.shape[2:])
        nodes.append(
            helper.make_node(
                "Conv",
                [current, w_name, b_name],
                [conv_out],
                name=f"conv{i}",
                kernel_shape=kernel,
                strides=[layer.stride, layer.stride],
                pads=[layer.padding] * 4,
            )
        )
        current = conv_out
        if layer.relu:
            relu_out = OUTPUT_NAME if last else f"relu{i}"
            nodes.append(helper.make_node("Relu", [current], [relu_out], name=f"relu{i}"))
            current = relu_out
    channels_out = layers[-1].weight.shape[0]
    graph = helper.make_graph(
        nodes,
        "dlib_mmod_face_detector",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [1, channels_out, "out_height", "out_width"])],
        initializer=initializers,
        doc_string=doc,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="facegallery",
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model

