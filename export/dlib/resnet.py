"""Reader of dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``).

dlib's ``.dat`` files carry no type information, so the reader walks the compile-time network
type of ``examples/dnn_face_recognition_ex.cpp`` l.40-65 (dlib v20.0.1; identical in
``tools/python/src/face_recognition.cpp``), spelled out in ``../shared/specs/dlib_models.md``
section (b)::

    residual<N,S>      = add_prev1<block<N,1,tag1<S>>>
    residual_down<N,S> = add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<N,2,tag1<S>>>>>>
    block<N,stride,S>  = affine<con<N,3,3,1,1,relu<affine<con<N,3,3,stride,stride,S>>>>>
    ares<N,S> = relu<residual<N,S>>;  ares_down<N,S> = relu<residual_down<N,S>>
    anet = loss_metric<fc_no_bias<128, avg_pool_everything<alevel0<...<alevel4<
             max_pool<3,3,2,2, relu<affine<con<32,7,7,2,2, input_rgb_image_sized<150>>>>>>>>>>>>

Every declared hyper-parameter (filters, kernel, stride, padding, pooling window) is checked
against the file, and the file must be consumed to its last byte.

The network in forward order is returned as a :class:`DlibResNet` (a tuple of layer records);
:func:`convert_resnet` turns it into the ONNX embedder via :mod:`facegallery.export.dlib.onnx_embedder`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Union

import numpy as np

from facegallery.export.dlib.dat_format import DlibFormatError, DlibReader

__all__ = [
    "Conv",
    "Affine",
    "Relu",
    "MaxPool",
    "AvgPool",
    "Tag",
    "Skip",
    "AddPrev",
    "Dense",
    "Layer",
    "DlibResNet",
    "read_resnet",
    "convert_resnet",
]

logger = logging.getLogger(__name__)

# Wrapper versions found in the file (spec (a) "Network nesting"; dlib/dnn/core.h l.1056, l.1441,
# l.1694, l.2765, l.3128).
_LOSS_VERSION = 1
_ADD_LAYER_VERSION = 2
_INPUT_ADD_LAYER_VERSION = 3
_TAG_SKIP_VERSION = 1
_FC_NO_BIAS = 1  # fc_ bias_mode (layers.h l.2200)
_CONV_MODE = 0  # affine_ per-channel mode (layers.h l.2911)


# -- layer records (forward order) ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Conv:
    """``con_``: cross-correlation with zero padding (layers.h l.291-355).

    ``weight`` (O, I, kh, kw) float32 (OIHW), ``bias`` (O,) float32; ``stride`` and ``padding``
    in pixels, the same along both axes.
    """

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    padding: int


@dataclasses.dataclass(frozen=True, eq=False)
class Affine:
    """``affine_`` in CONV_MODE: ``y = x * gamma[c] + beta[c]``; ``gamma``, ``beta`` (C,) float32."""

    gamma: np.ndarray
    beta: np.ndarray


@dataclasses.dataclass(frozen=True)
class Relu:
    """``relu_``."""


@dataclasses.dataclass(frozen=True)
class MaxPool:
    """``max_pool_``: ``size``×``size`` window, ``stride``, ``padding`` (pixels)."""

    size: int
    stride: int
    padding: int


@dataclasses.dataclass(frozen=True)
class AvgPool:
    """``avg_pool_``: ``size``×``size`` window; ``size`` 0 pools the whole input (global average)."""

    size: int
    stride: int
    padding: int


@dataclasses.dataclass(frozen=True)
class Tag:
    """``tagN``: remembers the current tensor under ``id``."""

    id: int


@dataclasses.dataclass(frozen=True)
class Skip:
    """``skipN``: replaces the current tensor by the output of the nearest ``tagN`` below."""

    id: int


@dataclasses.dataclass(frozen=True)
class AddPrev:
    """``add_prevN``: current + nearest ``tagN`` output, both zero-extended at the end of (C, H, W)
    to their element-wise maximum (layers.h l.3013, cpu_dlib.cpp l.279)."""

    id: int


@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """``fc_`` without bias: ``y = x.reshape(N, -1) @ weight``; ``weight`` (in, out) float32."""

    weight: np.ndarray


Layer = Union[Conv, Affine, Relu, MaxPool, AvgPool, Tag, Skip, AddPrev, Dense]


@dataclasses.dataclass(frozen=True, eq=False)
class DlibResNet:
    """The parsed face recognition ResNet.

    Attributes
    ----------
    input_mean_rgb : (3,) float32
        Mean subtracted from R, G, B (0..255) before dividing by 256 (input.h l.209).
    chip_size : int
        Input side in pixels (``input_rgb_image_sized<150>``).
    layers : tuple of Layer
        The network in forward (execution) order, from the first convolution to the fc layer.
    margin, dist_thresh : float
        ``loss_metric_2`` fields; ``dist_thresh`` is the same-person threshold on the Euclidean
        (L2) distance between descriptors (loss.h l.2200).
    """

    input_mean_rgb: np.ndarray
    chip_size: int
    layers: tuple[Layer, ...]
    margin: float
    dist_thresh: float

    @property
    def embedding_dim(self) -> int:
        """Length of the descriptor (the fc layer's outputs)."""
        dense = next(layer for layer in reversed(self.layers) if isinstance(layer, Dense))
        return int(dense.weight.shape[1])

    @property
    def param_count(self) -> int:
        """Number of learned parameters as stored by dlib (5,614,592 for this model, spec (b))."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, Conv):
                total += layer.weight.size + layer.bias.size
            elif isinstance(layer, Affine):
                total += layer.gamma.size + layer.beta.size
            elif isinstance(layer, Dense):
                total += layer.weight.size
        return total


# -- the architecture, as plan entries (kind, args) in forward order -----------------------------
def _block(n: int, stride: int) -> list[tuple]:
    return [("con", n, 3, stride), ("affine",), ("relu",), ("con", n, 3, 1), ("affine",)]


def _ares(n: int) -> list[tuple]:
    return [("tag", 1), *_block(n, 1), ("add_prev", 1), ("relu",)]


def _ares_down(n: int) -> list[tuple]:
    return [("tag", 1), *_block(n, 2), ("tag", 2), ("skip", 1), ("avg_pool", 2, 2), ("add_prev", 2), ("relu",)]


def _plan() -> list[tuple]:
    stem = [("con", 32, 7, 2), ("affine",), ("relu",), ("max_pool", 3, 2)]
    alevel4 = _ares(32) * 3
    alevel3 = _ares_down(64) + _ares(64) * 3
    alevel2 = _ares_down(128) + _ares(128) * 2
    alevel1 = _ares_down(256) + _ares(256) * 2
    alevel0 = _ares_down(256)
    head = [("avg_pool", 0, 1), ("fc", 128)]
    return stem + alevel4 + alevel3 + alevel2 + alevel1 + alevel0 + head


_EXPECTED_CHIP_SIZE = 150


# -- record readers ---------------------------------------------------------------------------
def _check(what: str, expected: object, got: object, r: DlibReader) -> None:
    if expected != got:
        raise DlibFormatError(f"{what}: architecture expects {expected}, file has {got} (before offset {r.offset})")


def _read_conv(r: DlibReader, filters: int, kernel: int, stride: int) -> Conv:
    r.expect_str("con_4")
    params = r.read_tensor().ravel()
    num_filters, nr, nc = r.read_int(), r.read_int(), r.read_int()
    stride_y, stride_x, pad_y, pad_x = (r.read_int() for _ in range(4))
    w_dims = r.read_alias_tensor()
    b_dims = r.read_alias_tensor()
    for _ in range(4):  # lr / wd multipliers of filters and biases
        r.read_float()
    # Template default padding: stride != 1 ? 0 : k/2 (layers.h con_ declaration; spec (a) con_).
    padding = 0 if stride != 1 else kernel // 2
    _check("con filters/kernel", (filters, kernel, kernel), (num_filters, nr, nc), r)
    _check("con stride/padding", (stride, stride, padding, padding), (stride_y, stride_x, pad_y, pad_x), r)
    n_w = int(np.prod(w_dims))
    _check("con params size", n_w + filters, params.size, r)
    _check("con bias alias", (1, filters, 1, 1), tuple(b_dims), r)
    weight = params[:n_w].reshape(w_dims)
    return Conv(weight=weight, bias=params[n_w:].copy(), stride=stride, padding=padding)


def _read_affine(r: DlibReader) -> Affine:
    r.expect_str("affine_")
    params = r.read_tensor().ravel()
    g_dims = r.read_alias_tensor()
    b_dims = r.read_alias_tensor()
    mode = r.read_int()
    _check("affine mode", _CONV_MODE, mode, r)
    c = g_dims[1]
    _check("affine shapes", ((1, c, 1, 1), 2 * c), (tuple(b_dims), params.size), r)
    return Affine(gamma=params[:c].copy(), beta=params[c:].copy())


def _read_pool(r: DlibReader, version: str, size: int, stride: int) -> tuple[int, int]:
    r.expect_str(version)
    nr, nc, stride_y, stride_x, pad_y, pad_x = (r.read_int() for _ in range(6))
    _check(f"{version} window/stride/padding", (size, size, stride, stride, 0, 0), (nr, nc, stride_y, stride_x, pad_y, pad_x), r)
    return size, stride


def _read_fc(r: DlibReader, outputs: int) -> Dense:
    r.expect_str("fc_2")
    num_outputs, num_inputs = r.read_int(), r.read_int()
    params = r.read_tensor().ravel()
    w_dims = r.read_alias_tensor()
    r.read_alias_tensor()  # bias alias; no bias data is stored with FC_NO_BIAS
    bias_mode = r.read_int()
    for _ in range(4):
        r.read_float()
    _check("fc outputs", outputs, num_outputs, r)
    _check("fc bias_mode (FC_NO_BIAS)", _FC_NO_BIAS, bias_mode, r)
    _check("fc weights", ((num_inputs, num_outputs, 1, 1), num_inputs * num_outputs), (tuple(w_dims), params.size), r)
    return Dense(weight=params.reshape(num_inputs, num_outputs))


def _read_relu(r: DlibReader) -> Relu:
    r.expect_str("relu_")
    return Relu()


def _read_max_pool(r: DlibReader, size: int, stride: int) -> MaxPool:
    return MaxPool(*_read_pool(r, "max_pool_2", size, stride), padding=0)


def _read_avg_pool(r: DlibReader, size: int, stride: int) -> AvgPool:
    return AvgPool(*_read_pool(r, "avg_pool_2", size, stride), padding=0)


def _read_add_prev(r: DlibReader, tag_id: int) -> AddPrev:
    r.expect_str("add_prev_")
    return AddPrev(tag_id)


# Details readers of the add_layer kinds of the plan, called with the plan entry's arguments.
_DETAIL_READERS = {
    "con": _read_conv,
    "affine": _read_affine,
    "relu": _read_relu,
    "max_pool": _read_max_pool,
    "avg_pool": _read_avg_pool,
    "add_prev": _read_add_prev,
    "fc": _read_fc,
}


def _read_details(r: DlibReader, entry: tuple) -> Layer:
    return _DETAIL_READERS[entry[0]](r, *entry[1:])


def _expect_empty_tensor(r: DlibReader, what: str) -> None:
    t = r.read_tensor()
    if t.size:
        raise DlibFormatError(f"{what}: expected an empty cached tensor, got shape {t.shape} (offset {r.offset})")


def _read_add_layer_tail(r: DlibReader) -> None:
    """The state add_layer<L, SUBNET> v2 writes after L's details (core.h l.1056)."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, output/grad disabled
        r.read_bool()
    for what in ("x_grad", "cached_output", "params_grad"):
        _expect_empty_tensor(r, what)


def read_resnet(dat_path: str | os.PathLike) -> DlibResNet:
    """Parse ``dlib_face_recognition_resnet_model_v1.dat`` without dlib.

    Parameters
    ----------
    dat_path : path
        The dlib model file (22,466,066 bytes, sha256 55533b28...da30 for the file of the spec).

    Returns
    -------
    DlibResNet
        Weights and hyper-parameters in forward order.

    Raises
    ------
    DlibFormatError
        The bytes do not follow the expected network type, or bytes remain after the last field.
    """
    r = DlibReader(Path(dat_path).read_bytes())
    plan = _plan()

    # add_loss_layer (core.h l.2765): version, loss details, then the subnet.
    r.expect_int(_LOSS_VERSION, "add_loss_layer version")
    r.expect_str("loss_metric_2")
    margin, dist_thresh = r.read_float(), r.read_float()

    # Every wrapper writes its version and recurses before its own details, so the file holds
    # the versions from the outermost layer inwards, then the details in forward order.
    for entry in reversed(plan[1:]):
        is_plain = entry[0] in ("tag", "skip")
        r.expect_int(_TAG_SKIP_VERSION if is_plain else _ADD_LAYER_VERSION, f"{entry[0]} wrapper version")
    r.expect_int(_INPUT_ADD_LAYER_VERSION, "add_layer<con, input> version")

    # Innermost add_layer<con, input_rgb_image_sized<150>> (core.h l.1441, input.h l.253).
    r.expect_str("input_rgb_image_sized")
    mean = np.array([r.read_float() for _ in range(3)], dtype=np.float32)
    nr, nc = r.read_int(), r.read_int()
    _check("input size", (_EXPECTED_CHIP_SIZE, _EXPECTED_CHIP_SIZE), (nr, nc), r)
    layers: list[Layer] = [_read_details(r, plan[0])]
    for _ in range(3):
        r.read_bool()
    for what in ("x_grad", "cached_output", "grad_final"):
        _expect_empty_tensor(r, what)
    r.read_int()  # _sample_expansion_factor

    for entry in plan[1:]:
        kind = entry[0]
        if kind == "tag":
            layers.append(Tag(entry[1]))
        elif kind == "skip":
            layers.append(Skip(entry[1]))
        else:
            layers.append(_read_details(r, entry))
            _read_add_layer_tail(r)
    r.expect_end()

    net = DlibResNet(input_mean_rgb=mean, chip_size=nr, layers=tuple(layers), margin=margin, dist_thresh=dist_thresh)
    logger.info("read %s: %d layers, %d parameters", dat_path, len(layers), net.param_count)
    return net


def _shortest_f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (dlib stores these fields as float)."""
    return float(str(np.float32(value)))


def convert_resnet(dat_path: str | os.PathLike, onnx_path: str | os.PathLike) -> dict:
    """Convert the dlib face recognition ResNet to an ONNX embedder.

    The ONNX graph maps ``image`` ``(N, 150, 150, 3) float32`` RGB 0..255 to ``embedding``
    ``(N, 128) float32`` (unnormalised descriptor, as dlib's ``compute_face_descriptor``); see
    :func:`facegallery.export.dlib.onnx_embedder.build_embedder`.

    Parameters
    ----------
    dat_path : path
        ``dlib_face_recognition_resnet_model_v1.dat``.
    onnx_path : path
        Where to write the ONNX model (written to a temporary name, then renamed).

    Returns
    -------
    dict
        ``embedding_dim`` (128), ``chip_size`` (150, pixels), ``input_mean_rgb`` (3 floats,
        0..255 scale), ``scale`` (1/256, applied after the mean), ``threshold`` (0.6, the
        ``loss_metric_2`` dist_thresh on the L2 distance).

    Raises
    ------
    DlibFormatError
        The .dat file does not hold this network.
    """
    # Imported here: onnx_embedder imports this module's layer records.
    from facegallery.export.dlib.onnx_embedder import build_embedder, save_model

    net = read_resnet(dat_path)
    save_model(build_embedder(net), onnx_path)
    return {
        "embedding_dim": net.embedding_dim,
        "chip_size": net.chip_size,
        "input_mean_rgb": [_shortest_f32(v) for v in net.input_mean_rgb],
        "scale": 1.0 / 256.0,
        "threshold": _shortest_f32(net.dist_thresh),
    }
