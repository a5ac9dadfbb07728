"""Face detection: dlib's MMOD CNN face detector on onnxruntime, with numpy pre- and post-processing.

One call of :meth:`FaceDetector.detect` (``../shared/specs/dlib_models.md`` (b) "MMOD CNN face
detector"; dlib v20.0.1):

1. choose the scale the detector runs at (:func:`plan_scale`) and resample: Pillow downscaling of
   large photos, dlib's ``pyramid_up`` (×2) or a Pillow upscale for small ones;
2. build the tiled image pyramid (``image_pyramid.tiled_pyramid``) and run the ONNX graph
   (``score`` map, one value per 8 px);
3. decode every score above the threshold into an 80×80 window of the level it lies in, mapped back
   to the image (loss.h ``tensor_to_dets`` l.1724-1787, image_pyramid.h ``tiled_pyramid_to_image``);
4. greedy non-maximum suppression with dlib's overlap test (loss.h ``to_label`` l.1344-1383,
   box_overlap_testing.h l.86);
5. map the boxes back to the input pixels (``rect_down`` for ``pyramid_up``, the resize factor
   otherwise).

With ``DetectionConfig(rescale=False, upsample=k)`` the result equals dlib's
``cnn_face_detection_model_v1(img, k)`` (same integer boxes; scores within ~1e-5).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import numpy as np
import onnx
from PIL import Image

from facegallery.server.contract.errors import InvalidInput, ModelError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.dlib_geometry import lround, rect_area, rect_down
from facegallery.server.face.image_pyramid import pyramid_up, pyramid_up_size, tiled_pyramid
from facegallery.server.face.onnx_session import open_session

__all__ = [
    "DEFAULT_MIN_FACE_SIZE",
    "DEFAULT_MAX_DETECT_PIXELS",
    "Detections",
    "DetectionConfig",
    "ScalePlan",
    "plan_scale",
    "FaceDetector",
]

logger = logging.getLogger(__name__)

#: Smallest face (side of dlib's face box, pixels of the input) the default policy looks for.
#: 40 px makes small images (up to ``DEFAULT_MAX_DETECT_PIXELS / 4``, e.g. 640×480) run exactly as
#: ``face_recognition``'s default ``cnn_face_detection_model_v1(img, 1)``.
#: Measured on every 3rd golden image with ``face_upsample == 1`` (138 images of at most 1000 px a
#: side from ../shared/faces, 139 dlib upsample-1 faces of 40-353 px): recall of dlib's faces at
#: IoU >= 0.5 (no detection outside them in any setting) and CPU time per image (onnxruntime 1
#: thread, 2-vCPU AMD EPYC shared with other jobs)::
#:
#:     min_face_size   40       48       60       80
#:     recall          139/139  138/139  131/139  89/139
#:     ms / image      98       74       54       31
DEFAULT_MIN_FACE_SIZE = 40

#: Largest image area (pixels) the detector runs on under the default policy: just above
#: 1282×961, the size of a 640×480 image after dlib's ×2 ``pyramid_up``, so a 4000×3000 photo
#: runs at about 1291×968 and costs about what a 1280×960 one does (bench/detect.py). The price:
#: in a 12 MP photo faces below ~250 px (80 px / scale 0.32) are not found.
#: Measured on the 63 golden images larger than 1000 px a side (up to 4352 px, 68 dlib upsample-0
#: faces of 115-1219 px), ``min_face_size=40``, same measures; "dlib at full size" is
#: ``rescale=False`` (recall 1 by construction)::
#:
#:     max_detect_pixels  0.3 MP  0.5 MP  0.8 MP  1.25 MP  2.0 MP  dlib at full size
#:     recall             65/68   66/68   67/68   67/68    67/68   68/68
#:     ms / image         138     209     319     462      757     1003
#:
#: The face lost from 0.8 MP up is half outside the image (deepface/jack_dorsey/img59.jpg, dlib
#: score 0.07); 0.5 MP and below also lose 137-197 px faces of a 2000×1428 group photo.
DEFAULT_MAX_DETECT_PIXELS = 1_250_000

_REQUIRED_PARAMS = (
    "window", "stride", "offset", "pyramid_down", "padding", "outer_padding",
    "nms_iou", "nms_covered", "mean_rgb", "scale",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class Detections:
    """Faces found in one image, best first.

    Attributes
    ----------
    boxes : (N, 4) float32
        ``left, top, right, bottom``, inclusive pixel coordinates of the input image (dlib's
        rectangle convention). Integers unless the detector ran on a resized copy.
    scores : (N,) float32
        Raw MMOD detection scores (about 0..1.2; dlib's ``confidence``), descending.

    No face gives ``boxes.shape == (0, 4)`` and ``scores.shape == (0,)``.
    """

    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class DetectionConfig:
    """How :meth:`FaceDetector.detect` scales the image and filters detections.

    Attributes
    ----------
    upsample : int or None
        Number of dlib ``pyramid_up`` (×2) steps before detection. ``None``: chosen by the scale
        policy (``rescale=True``) or 0 (``rescale=False``).
    rescale : bool
        ``True``: pick the detection scale from the image size, ``min_face_size`` and
        ``max_detect_pixels`` (:func:`plan_scale`). ``False``: run exactly like dlib's
        ``cnn_face_detection_model_v1(img, upsample or 0)``, whatever the image size.
    min_face_size : int
        Side of the smallest face box worth finding, pixels of the input image (rescale only).
    max_detect_pixels : int
        Largest image area the detector runs on, pixels (rescale only); bounds time and memory.
    score_threshold : float
        Keep windows scoring above this (dlib's ``adjust_threshold``; 0 in dlib's Python API).

    Raises
    ------
    InvalidInput
        Negative ``upsample``, non-positive ``min_face_size`` or ``max_detect_pixels``, or a
        non-finite threshold (INVALID_ARGUMENT).
    """

    upsample: int | None = None
    rescale: bool = True
    min_face_size: int = DEFAULT_MIN_FACE_SIZE
    max_detect_pixels: int = DEFAULT_MAX_DETECT_PIXELS
    score_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.upsample is not None and not 0 <= self.upsample <= 4:
            raise InvalidInput(f"upsample must be in 0..4, got {self.upsample}")
        if self.min_face_size <= 0 or self.max_detect_pixels <= 0:
            raise InvalidInput("min_face_size and max_detect_pixels must be positive")
        if not math.isfinite(self.score_threshold):
            raise InvalidInput(f"score_threshold must be finite, got {self.score_threshold}")


@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """How the input is resampled before detection.

    Attributes
    ----------
    size : (int, int)
        ``(height, width)`` after the Pillow resize (the input size when there is none).
    upsample : int
        dlib ``pyramid_up`` steps applied after that.
    """

    size: tuple[int, int]
    upsample: int


def plan_scale(height: int, width: int, config: DetectionConfig, window: int = 80) -> ScalePlan:
    """Choose the detection scale for an image of ``height`` × ``width`` pixels.

    The detector finds faces whose box is at least ``window`` px (its 80×80 window at the pyramid's
    finest level) and any larger size. So a face of ``min_face_size`` px needs a scale of
    ``s_face = window / min_face_size``, while ``max_detect_pixels`` allows
    ``s_cap = sqrt(max_detect_pixels / (height * width))``.

    * ``rescale=False``: no resize, ``upsample or 0`` pyramid_up steps (dlib's behaviour).
    * ``upsample=k`` given: ``k`` pyramid_up steps, after a Pillow downscale if the upsampled
      image would exceed ``max_detect_pixels``.
    * otherwise, when ``s_face`` is a power of two (e.g. 2 for the default 40 px) and that many
      pyramid_up steps fit in ``max_detect_pixels``: those steps. This is dlib's own upsampling, so
      small images get exactly dlib's ``cnn_face_detection_model_v1(img, k)``.
    * otherwise a Pillow resize to ``min(s_face, s_cap)`` (skipped within ±5 % of 1): large photos
      are downscaled to ``max_detect_pixels``, mid-size ones upscaled as far as that allows.

    Parameters
    ----------
    height, width : int
        Input size, pixels.
    config : DetectionConfig
    window : int
        Detector window side, pixels (80 for dlib's model).

    Returns
    -------
    ScalePlan
    """
    if not config.rescale:
        return ScalePlan((height, width), config.upsample or 0)
    if config.upsample is not None:
        up_h, up_w = _upsampled(height, width, config.upsample)
        factor = min(1.0, math.sqrt(config.max_detect_pixels / (up_h * up_w)))
        return ScalePlan(_resized(height, width, factor), config.upsample)
    s_face = window / config.min_face_size
    steps = round(math.log2(s_face))
    if steps >= 1 and abs(s_face / 2**steps - 1) <= 0.05:
        up_h, up_w = _upsampled(height, width, steps)
        if up_h * up_w <= config.max_detect_pixels:
            return ScalePlan((height, width), steps)
    factor = min(s_face, math.sqrt(config.max_detect_pixels / (height * width)))
    if abs(factor - 1) <= 0.05:
        factor = 1.0
    return ScalePlan(_resized(height, width, factor), 0)


def _upsampled(height: int, width: int, steps: int) -> tuple[int, int]:
    for _ in range(steps):
        height, width = pyramid_up_size(height, width)
    return height, width


def _resized(height: int, width: int, factor: float) -> tuple[int, int]:
    if factor == 1.0:
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


def _nearest_level(points: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """dlib ``nearest_rect`` (rectangle.h l.469): the first level containing the point, else the
    first one at the smallest Euclidean distance. ``points`` (N, 2) int64 → (N,) level indices."""
    x, y = points[:, :1], points[:, 1:]
    left, top, right, bottom = (rects[:, i][None, :] for i in range(4))
    inside = (left <= x) & (x <= right) & (top <= y) & (y <= bottom)
    dx = np.clip(x, left, right) - x
    dy = np.clip(y, top, bottom) - y
    dist = np.sqrt((dx * dx + dy * dy).astype(np.float64))
    return np.where(inside.any(axis=1), inside.argmax(axis=1), dist.argmin(axis=1))


def _overlaps(kept: np.ndarray, box: np.ndarray, iou: float, covered: float) -> bool:
    """dlib ``test_box_overlap`` (box_overlap_testing.h l.86) of ``box`` against any kept box.

    On inclusive integer rectangles: overlap when ``|A∩B| / |bounding box of A∪B| > iou`` or
    ``|A∩B| / |A| > covered`` or ``|A∩B| / |B| > covered``.
    """
    if kept.shape[0] == 0:
        return False
    iw = np.minimum(kept[:, 2], box[2]) - np.maximum(kept[:, 0], box[0]) + 1
    ih = np.minimum(kept[:, 3], box[3]) - np.maximum(kept[:, 1], box[1]) + 1
    inner = np.where((iw > 0) & (ih > 0), iw * ih, 0).astype(np.float64)
    outer = ((np.maximum(kept[:, 2], box[2]) - np.minimum(kept[:, 0], box[0]) + 1)
             * (np.maximum(kept[:, 3], box[3]) - np.minimum(kept[:, 1], box[1]) + 1))  # fmt: skip
    hit = (inner / outer > iou) | (inner / rect_area(kept) > covered) | (inner / rect_area(box) > covered)
    return bool(np.any((inner > 0) & hit))


class FaceDetector:
    """dlib's MMOD CNN face detector (``mmod_human_face_detector``) converted to ONNX.

    Parameters
    ----------
    onnx_path : path
        The graph written by ``facegallery.export.dlib.mmod.convert_mmod``.
    params : dict
        Its decoding parameters (``model.json`` ``"detector"``): ``window``, ``stride``,
        ``offset``, ``pyramid_down``, ``padding``, ``outer_padding``, ``nms_iou``, ``nms_covered``,
        ``mean_rgb``, ``scale``, and optionally ``input``/``output`` tensor names.
    intra_op_threads : int
        onnxruntime intra-op threads; 0 lets onnxruntime use one per core.

    Raises
    ------
    ModelError
        Missing parameters, or a graph whose input/output names disagree with them (INTERNAL).

    Thread-safe: :meth:`detect` keeps no per-call state on the object.
    """

    def __init__(self, onnx_path: str | os.PathLike, params: dict[str, Any], *, intra_op_threads: int = 0) -> None:
        missing = [k for k in _REQUIRED_PARAMS if k not in params]
        if missing:
            raise ModelError(f"detector parameters lack {', '.join(missing)}")
        self.params = dict(params)
        self._window = tuple(int(v) for v in params["window"])
        self._stride, self._offset = int(params["stride"]), int(params["offset"])
        self._mean = np.asarray(params["mean_rgb"], dtype=np.float32)
        # Every image gives another tensor shape, so no memory pattern.
        self._session = open_session(onnx_path, intra_op_threads=intra_op_threads, memory_pattern=False,
                                     what="detector graph")
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        self._input = params.get("input", inputs[0].name)
        self._output = params.get("output", outputs[0].name)
        if [i.name for i in inputs] != [self._input] or self._output not in [o.name for o in outputs]:
            raise ModelError(
                f"detector graph has inputs {[i.name for i in inputs]} / outputs {[o.name for o in outputs]}, "
                f"parameters name {self._input!r} / {self._output!r}"
            )
        self._kernels = _conv_geometry(onnx_path)

    @classmethod
    def from_manifest(cls, model_dir: str | os.PathLike, manifest: ModelManifest, **kwargs: Any) -> "FaceDetector":
        """The detector of a model directory (``files["detector"]`` and ``detector`` of model.json).

        Raises
        ------
        ModelError
            The manifest has no detector parameters.
        """
        if manifest.detector is None or "detector" not in manifest.files:
            raise ModelError(f"model {manifest.name} has no detector")
        return cls(manifest.path_of(model_dir, "detector"), manifest.detector, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self._window}, stride={self._stride}, offset={self._offset})"

    # -- public ---------------------------------------------------------------------------------
    def detect(self, rgb: np.ndarray, config: DetectionConfig = DetectionConfig()) -> Detections:
        """Find faces in an RGB image.

        Parameters
        ----------
        rgb : (H, W, 3) uint8
            RGB pixels (not BGR).
        config : DetectionConfig
            Scale policy and threshold; the default rescales (see :func:`plan_scale`).

        Returns
        -------
        Detections
            Boxes in pixels of ``rgb`` and raw scores, best first; empty for images too small for
            the network (under about 30 px at the detection scale).

        Raises
        ------
        InvalidInput
            ``rgb`` is not a non-empty ``(H, W, 3) uint8`` array (INVALID_ARGUMENT).
        """
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            what = f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
            raise InvalidInput(f"detector input must be an (H, W, 3) uint8 RGB array, got {what}")
        height, width = rgb.shape[:2]
        if height == 0 or width == 0:
            raise InvalidInput(f"detector input is empty ({height}x{width})")
        plan = plan_scale(height, width, config, self._window[0])
        start = time.perf_counter()
        image = rgb
        if plan.size != (height, width):
            resample = Image.Resampling.BILINEAR
            image = np.asarray(Image.fromarray(rgb).resize((plan.size[1], plan.size[0]), resample, reducing_gap=2.0))
        for _ in range(plan.upsample):
            image = pyramid_up(image)
        boxes, scores = self._detect_dlib(np.ascontiguousarray(image), config.score_threshold)
        if plan.upsample:
            # pyramid_down<2>::rect_down(rect, levels) of dlib's integer rectangles, undoing
            # pyramid_up: the corners go down in double, then lround (image_pyramid.h l.155-160).
            boxes = lround(rect_down(boxes, plan.upsample))
        boxes = boxes.astype(np.float64)
        if plan.size != (height, width):
            sy, sx = plan.size[0] / height, plan.size[1] / width
            boxes[:, 0] /= sx
            boxes[:, 1] /= sy
            boxes[:, 2] = (boxes[:, 2] + 1) / sx - 1
            boxes[:, 3] = (boxes[:, 3] + 1) / sy - 1
        logger.debug(
            "detect %dx%d -> %s x2^%d: %d faces in %.0f ms",
            width, height, plan.size[::-1], plan.upsample, len(scores), 1000 * (time.perf_counter() - start),
        )  # fmt: skip
        return Detections(boxes.astype(np.float32), scores)

    # -- dlib's net(img) -------------------------------------------------------------------------
    def _detect_dlib(self, rgb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """dlib ``net(img)`` on one image: integer boxes ``(N, 4) int64`` and scores ``(N,) float32``."""
        p = self.params
        tensor, rects = tiled_pyramid(
            rgb, self._mean, float(p["scale"]),
            downscale=int(p["pyramid_down"]), padding=int(p["padding"]), outer_padding=int(p["outer_padding"]),
        )  # fmt: skip
        if not self._fits(tensor.shape[2], tensor.shape[3]):
            return np.zeros((0, 4), np.int64), np.zeros((0,), np.float32)
        score = self._session.run([self._output], {self._input: tensor})[0][0, 0]
        boxes, scores = self._decode(score, rects, threshold)
        return self._nms(boxes, scores)

    def _fits(self, height: int, width: int) -> bool:
        """Whether every conv of the graph has at least one output pixel for this input size."""
        for kernel, stride, pad in self._kernels:
            height = (height + 2 * pad - kernel) // stride + 1
            width = (width + 2 * pad - kernel) // stride + 1
            if height < 1 or width < 1:
                return False
        return True

    def _decode(self, score: np.ndarray, rects: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Windows above ``threshold`` → image rectangles (loss.h ``tensor_to_dets``).

        Cell (r, c) is the window centred at ``p = (stride c + offset, stride r + offset)`` of the
        tiled image: ``centered_drect(p, 80, 80) = p ± 39.5``. Its level is ``nearest_rect(rects, p)``;
        both corners lose the level's origin and go through ``point_up`` (``q -> q N/(N-1) + 0.3``)
        once per level (image_pyramid.h l.855-860), then ``lround`` (drectangle.h l.64).
        """
        rows, cols = np.nonzero(score.astype(np.float64) > threshold)
        values = score[rows, cols]
        centres = np.stack([cols, rows], axis=1).astype(np.int64) * self._stride + self._offset
        levels = _nearest_level(centres, rects)
        half_w, half_h = (self._window[0] - 1) / 2, (self._window[1] - 1) / 2
        origin = rects[levels][:, :2].astype(np.float64)
        corners = np.concatenate([centres - (half_w, half_h), centres + (half_w, half_h)], axis=1)
        corners -= np.concatenate([origin, origin], axis=1)
        n = int(self.params["pyramid_down"])
        ratio = n / (n - 1.0)
        for i in range(int(levels.max(initial=0))):
            up = levels > i
            corners[up] = corners[up] * ratio + 0.3
        order = np.argsort(-values, kind="stable")
        return lround(corners[order]), values[order].astype(np.float32)

    def _nms(self, boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Greedy suppression in score order (loss.h ``to_label`` l.1366-1379)."""
        iou, covered = float(self.params["nms_iou"]), float(self.params["nms_covered"])
        keep: list[int] = []
        for i in range(boxes.shape[0]):
            if not _overlaps(boxes[keep], boxes[i], iou, covered):
                keep.append(i)
        return boxes[keep], scores[keep]


def _conv_geometry(onnx_path: str | os.PathLike) -> list[tuple[int, int, int]]:
    """``(kernel, stride, padding)`` of every (square) ``Conv`` of the graph, in order."""
    model = onnx.load(os.fspath(onnx_path))
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    geometry = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            attrs = {a.name: list(a.ints) for a in node.attribute}
            kernel = attrs.get("kernel_shape") or list(shapes[node.input[1]][2:])
            geometry.append((int(kernel[0]), int(attrs.get("strides", [1])[0]), int(attrs.get("pads", [0])[0])))
    return geometry
