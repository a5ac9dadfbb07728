"""Embedding networks for training: a small CPU-friendly ResNet, and any ONNX embedder as a torch module.

Both take the server's embedder input unchanged: ``image`` ``(N, S, S, 3) float32`` RGB 0..255
(NHWC, as the aligner returns chips), with the normalisation inside the network, and return an
L2-normalised ``embedding`` ``(N, D) float32`` (FaceNet sec. 3: the embedding lives on the unit
hypersphere, so the triplet margin alpha has a fixed scale).

Why this backbone (:class:`SmallFaceResNet`): training runs on a CPU with two shared cores, so the
network is a four-stage ResNet (He et al., CVPR 2016) with one basic block per stage, widths
32-64-128-256 and batch normalisation, on 64 x 64 chips by default: 1.26 M parameters and 64 M
multiply-adds per chip (the dlib ResNet takes 271 M on 150 x 150 chips); one epoch of 1,560 LFW
chips takes about 7 s on one core. Residual blocks with batch normalisation train reliably
from scratch with AdamW; depthwise convolutions (MobileFaceNet style)
would need fewer multiply-adds but run slower per FLOP in PyTorch's CPU kernels.

:class:`OnnxEmbedder` rebuilds an ONNX embedder graph (the converted dlib ResNet among others) as a
torch module, generic over the operators such graphs use, so ``facegallery train --init MODEL_DIR``
fine-tunes an existing model with the same losses.
"""

from __future__ import annotations

import logging
import math
import os
import re

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import torch.nn.functional as F
from google.protobuf.message import DecodeError
from torch import nn

from facegallery.server.contract.errors import ModelError

__all__ = [
    "DEFAULT_DIM",
    "DEFAULT_WIDTH",
    "INPUT_MEAN",
    "INPUT_SCALE",
    "EmbeddingNet",
    "OnnxEmbedder",
    "SmallFaceResNet",
    "build_model",
    "load_onnx_embedder",
]

logger = logging.getLogger(__name__)

DEFAULT_DIM = 128
DEFAULT_WIDTH = 32
# Input normalisation of the small ResNet: (x - 127.5) / 128 maps 0..255 to about [-1, 1].
INPUT_MEAN = 127.5
INPUT_SCALE = 1.0 / 128.0


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU (He et al. 2016, fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        # Zero-init of the last BN gamma makes each block start as the identity (Goyal et al. 2017).
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallFaceResNet(nn.Module):
    """Four-stage ResNet for CPU training; features before the embedding projection.

    Parameters
    ----------
    width : int
        Channels of the first stage; the stages have width x (1, 2, 4, 8).

    Input ``(N, 3, S, S)`` float32, already normalised; output ``(N, 8 * width)`` float32
    (global average pool). Any S >= 32 works; S = 64 gives stage outputs 32, 16, 8, 4 px.
    """

    def __init__(self, *, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.width = width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks = []
        in_channels = width
        for i, w in enumerate(widths):
            blocks.append(_BasicBlock(in_channels, w, 1 if i == 0 else 2))
            in_channels = w
        self.blocks = nn.Sequential(*blocks)
        self.out_features = in_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return f"width={self.width}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class EmbeddingNet(nn.Module):
    """Server-convention embedder around a backbone.

    ``forward(image (N, S, S, 3) float32 RGB 0..255) -> (N, D) float32``, unit L2 norm.

    Parameters
    ----------
    body : nn.Module
        Either a :class:`SmallFaceResNet` (then the input is normalised here and a linear
        projection to ``dim`` follows) or an :class:`OnnxEmbedder` (which takes the raw image and
        produces the embedding itself; ``dim`` must equal its output size).
    dim : int
        Embedding dimension D.
    """

    def __init__(self, body: nn.Module, *, dim: int) -> None:
        super().__init__()
        self.body = body
        self.dim = dim
        self.projection: nn.Module | None = None
        if isinstance(body, SmallFaceResNet):
            # Linear + BatchNorm1d (the "BN-FC-BN" embedding layer of ArcFace, Deng et al. 2019,
            # sec. 3.2): centring the embeddings over the batch spreads them over the sphere at
            # initialisation; without it a random ReLU network maps every face near one point and
            # batch-hard mining collapses to it (loss stuck at the margin).
            self.projection = nn.Sequential(nn.Linear(body.out_features, dim, bias=False), nn.BatchNorm1d(dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            x = (image.permute(0, 3, 1, 2) - INPUT_MEAN) * INPUT_SCALE
            x = self.projection(self.body(x))
        else:
            x = self.body(image)
        # x / max(||x||, eps): exports to ONNX as ReduceL2/Max/Div.
        return F.normalize(x, p=2.0, dim=1, eps=1e-12)


def build_model(*, dim: int = DEFAULT_DIM, width: int = DEFAULT_WIDTH, init_onnx: str | os.PathLike | None = None) -> EmbeddingNet:
    """The network ``facegallery train`` optimises.

    Parameters
    ----------
    dim : int
        Embedding dimension of a new network (ignored with ``init_onnx``, which fixes it).
    width : int
        First-stage width of a new :class:`SmallFaceResNet`.
    init_onnx : path, optional
        An embedder ``.onnx`` to start from instead of random weights (:func:`load_onnx_embedder`).

    Raises
    ------
    ModelError
        The ONNX file cannot be converted (unsupported operator, non-constant shape input).
    """
    if init_onnx is None:
        return EmbeddingNet(SmallFaceResNet(width=width), dim=dim)
    body = load_onnx_embedder(init_onnx)
    return EmbeddingNet(body, dim=body.output_dim)


# ----------------------------------------------------------------------------- ONNX -> torch

# Initializers feeding these (operator, input index) pairs become trainable parameters; every
# other initializer (normalisation constants, pads, shapes) is a fixed buffer.
_TRAINABLE_INPUTS = {("Conv", 1), ("Conv", 2), ("MatMul", 0), ("MatMul", 1), ("Gemm", 1), ("Gemm", 2),
                     ("BatchNormalization", 1), ("BatchNormalization", 2)}
_SUPPORTED = ("Add", "AveragePool", "BatchNormalization", "Constant", "Conv", "Div", "Flatten", "Gemm",
              "GlobalAveragePool", "Identity", "MatMul", "MaxPool", "Mul", "Pad", "Relu", "Reshape", "Sub",
              "Transpose")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _torch_pads(onnx_pads: list[int]) -> list[int]:
    """ONNX ``[b1, b2, ..., e1, e2, ...]`` (outermost axis first) -> F.pad ``[b_last, e_last, ...]``."""
    n = len(onnx_pads) // 2
    out: list[int] = []
    for axis in reversed(range(n)):
        out += [int(onnx_pads[axis]), int(onnx_pads[axis + n])]
    return out


class OnnxEmbedder(nn.Module):
    """An ONNX embedder graph executed node by node with torch operators.

    Supports the operators of CNN embedders exported for inference: Conv, Relu, MaxPool,
    AveragePool, Pad (constant mode), Add/Sub/Mul/Div, GlobalAveragePool, Flatten, Reshape,
    MatMul, Gemm, BatchNormalization (inference form), Transpose, Identity, Constant. Weights of
    Conv, MatMul, Gemm and BatchNormalization become ``nn.Parameter`` s (trainable); the other
    initializers become buffers. The forward pass is traceable, so ``torch.onnx.export`` writes
    an equivalent graph back.

    Parameters
    ----------
    model : onnx.ModelProto
        One graph input (the image) and one output (the embedding ``(N, D)``).

    Raises
    ------
    ModelError
        An unsupported operator, a shape/pad operand that is not a constant, or a graph with
        other than one input and one output.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in inits]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ModelError(f"expected an embedder graph with 1 input and 1 output, got {len(inputs)} and {len(graph.output)}")
        self.input_name = inputs[0].name
        self.output_name = graph.output[0].name
        dims = graph.output[0].type.tensor_type.shape.dim
        if len(dims) != 2 or not dims[1].dim_value:
            raise ModelError(f"expected the embedder output {self.output_name!r} to be (N, D), got {len(dims)} dims")
        self.output_dim = int(dims[1].dim_value)
        constants = dict(inits)
        for node in graph.node:
            if node.op_type == "Constant":
                constants[node.output[0]] = onnx.numpy_helper.to_array(_attrs(node)["value"])
        trainable = {name for node in graph.node for i, name in enumerate(node.input)
                     if (node.op_type, i) in _TRAINABLE_INPUTS and name in inits}
        self.params = nn.ParameterDict()
        self._tensor_keys: dict[str, str] = {}
        for i, (name, value) in enumerate(sorted(constants.items())):
            key = f"t{i}_{re.sub(r'[^0-9A-Za-z_]', '_', name)}"[:60]
            tensor = torch.from_numpy(np.array(value))
            if name in trainable:
                self.params[key] = nn.Parameter(tensor.float())
            else:
                self.register_buffer(key, tensor, persistent=True)
            self._tensor_keys[name] = key
        self._nodes: list[tuple[str, list[str], list[str], dict]] = []
        for node in graph.node:
            if node.op_type not in _SUPPORTED:
                raise ModelError(f"cannot convert ONNX operator {node.op_type!r} (supported: {', '.join(_SUPPORTED)})")
            if node.op_type == "Constant":
                continue
            attrs = _attrs(node)
            # Static operands (pads, shapes) are read now so the traced graph has them as constants.
            if node.op_type == "Pad":
                if len(node.input) < 2 or node.input[1] not in constants:
                    raise ModelError(f"Pad node {node.name!r}: pads must be a constant")
                attrs["pads"] = [int(v) for v in constants[node.input[1]]]
                value = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                attrs["value"] = float(value) if value is not None else 0.0
                if attrs.get("mode", b"constant") not in (b"constant", "constant"):
                    raise ModelError(f"Pad node {node.name!r}: only constant mode is supported")
            if node.op_type == "Reshape":
                if node.input[1] not in constants:
                    raise ModelError(f"Reshape node {node.name!r}: shape must be a constant")
                attrs["shape"] = [int(v) for v in constants[node.input[1]]]
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs))
        logger.info("converted ONNX embedder: %d nodes, %d trainable tensors, output dim %d",
                    len(self._nodes), len(self.params), self.output_dim)

    def _tensor(self, name: str) -> torch.Tensor:
        key = self._tensor_keys[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: image}

        def get(name: str) -> torch.Tensor | None:
            if not name:
                return None
            return env[name] if name in env else self._tensor(name)

        for op, ins, outs, attrs in self._nodes:
            env[outs[0]] = _run_node(op, [get(n) for n in ins], attrs)
        return env[self.output_name]


def _pool_padding(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, tuple[int, int]]:
    """Symmetric ONNX pads go to the pooling call; asymmetric ones are applied explicitly."""
    if not pads or not any(pads):
        return x, (0, 0)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        return x, (pads[0], pads[1])
    return F.pad(x, _torch_pads([0, 0] + pads[:2] + [0, 0] + pads[2:]), value=value), (0, 0)


def _run_node(op: str, args: list, attrs: dict) -> torch.Tensor:
    x = args[0]
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = args[0], args[1]
        return {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](a, b)
    if op == "Relu":
        return F.relu(x)
    if op == "Identity":
        return x
    if op == "Transpose":
        return x.permute(*attrs["perm"])
    if op == "Conv":
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        stride = tuple(attrs.get("strides", [1, 1]))
        dilation = tuple(attrs.get("dilations", [1, 1]))
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ModelError("Conv auto_pad is not supported; export the model with explicit pads")
        padding = (0, 0)
        if pads[0] == pads[2] and pads[1] == pads[3]:
            padding = (pads[0], pads[1])
        else:
            x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        bias = args[2] if len(args) > 2 else None
        return F.conv2d(x, args[1], bias, stride, padding, dilation, int(attrs.get("group", 1)))
    if op == "MaxPool":
        x, padding = _pool_padding(x, list(attrs.get("pads", [])), -math.inf)
        return F.max_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])),
                            padding, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    if op == "AveragePool":
        pads = list(attrs.get("pads", []))
        include = bool(attrs.get("count_include_pad", 0))
        if any(pads) and not include and not (pads[0] == pads[2] and pads[1] == pads[3]):
            raise ModelError("AveragePool with asymmetric pads and count_include_pad=0 is not supported")
        x, padding = _pool_padding(x, pads, 0.0)
        return F.avg_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])),
                            padding, ceil_mode=bool(attrs.get("ceil_mode", 0)), count_include_pad=include)
    if op == "Pad":
        return F.pad(x, _torch_pads(attrs["pads"]), value=attrs["value"])
    if op == "GlobalAveragePool":
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "Flatten":  # ONNX Flatten always yields 2-D: (prod(dims[:axis]), prod(dims[axis:]))
        axis = int(attrs.get("axis", 1))
        return torch.flatten(torch.flatten(x, axis), 0, axis - 1) if axis > 0 else x.reshape(1, -1)
    if op == "Reshape":
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(attrs["shape"])]
        return x.reshape(shape)
    if op == "MatMul":
        return torch.matmul(args[0], args[1])
    if op == "Gemm":
        a, b = args[0], args[1]
        if attrs.get("transA", 0):
            a = a.t()
        if attrs.get("transB", 0):
            b = b.t()
        out = float(attrs.get("alpha", 1.0)) * (a @ b)
        if len(args) > 2 and args[2] is not None:
            out = out + float(attrs.get("beta", 1.0)) * args[2]
        return out
    if op == "BatchNormalization":
        return F.batch_norm(x, args[3], args[4], args[1], args[2], False, 0.0, float(attrs.get("epsilon", 1e-5)))
    raise ModelError(f"cannot convert ONNX operator {op!r}")  # unreachable: checked in __init__


def load_onnx_embedder(path: str | os.PathLike) -> OnnxEmbedder:
    """Read an embedder ``.onnx`` file as a trainable :class:`OnnxEmbedder`.

    Raises
    ------
    ModelError
        The file is missing, not ONNX, or uses an unsupported operator.
    """
    try:
        model = onnx.load(os.fspath(path))
    except (OSError, ValueError, DecodeError) as exc:
        raise ModelError(f"cannot read ONNX embedder {path}: {exc}") from exc
    return OnnxEmbedder(model)
