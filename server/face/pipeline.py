"""The face pipeline: decode -> detect -> landmarks -> align -> embed, one image at a time.

:class:`FacePipeline` composes the stages (each in its own module) for one model directory:

    decode.py      bytes -> (H,W,3) uint8 RGB, EXIF orientation applied, size limits
    detect.py      MMOD CNN -> boxes and scores (scale chosen from image size)
    landmarks.py   5-point ERT shape predictor -> (N,5,2) landmarks
    align.py       similarity alignment -> (N,S,S,3) face chips (S = 150 for the default model)
    embed.py       ONNX embedder -> (N,D) float32 embeddings

The gallery (gallery/manager.py) and the CLI call :meth:`FacePipeline.analyze`; the server may wrap
the embedder in a batching layer shared by concurrent requests (batching.py).

Memory: before decoding, :meth:`FacePipeline.analyze` reads the image header, estimates the call's
working memory and holds it in the pipeline's :class:`~facegallery.server.face.memory_budget.MemoryBudget`
for the call (memory_budget.py: waits briefly, then RESOURCE_EXHAUSTED). Photos over
``reduce_above_pixels`` are decoded at an integer fraction of their side, the detector running on a
downscaled copy anyway; boxes and landmarks are mapped back to pixels of the full upright image.
:attr:`FacePipeline.model_id` names the embedding space the pipeline produces; galleries record it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from facegallery.server.contract.errors import InvalidInput
from facegallery.server.contract.face import Face, ImageKind
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.contract.process_memory import return_memory_to_os
from facegallery.server.contract.timing import record, timed
from facegallery.server.face.align import extract_chips, template_in_chip
from facegallery.server.face.decode import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodeLimits,
    ImageHeader,
    decode_image,
    read_header,
)
from facegallery.server.face.detect import DetectionConfig, FaceDetector
from facegallery.server.face.embed import Embedder
from facegallery.server.face.landmarks import LandmarkPredictor
from facegallery.server.face.memory_budget import (
    DEFAULT_WAIT_S,
    TRIM_ABOVE_BYTES,
    MemoryBudget,
    default_budget_bytes,
    estimate_working_bytes,
)
from facegallery.server.face.same_head import SameHead

__all__ = ["PipelineConfig", "FacePipeline", "ChipEmbedder", "DEFAULT_REDUCE_ABOVE_PIXELS"]

#: Photos over this many pixels are decoded at reduced size (above the largest golden test image,
#: 4352 px a side / 14 MP, and common 12-20 MP phone photos). See :meth:`FacePipeline.reduce_factor`.
DEFAULT_REDUCE_ABOVE_PIXELS = 24_000_000

LOG = logging.getLogger(__name__)

ImageInput = bytes | Image.Image | np.ndarray


class ChipEmbedder(Protocol):
    """Anything that embeds face chips: ``(N,S,S,3) uint8 -> (N,D) float32``."""

    def embed(self, chips: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Settings of the face pipeline (all keyword; defaults are the module constants).

    Attributes
    ----------
    max_image_bytes, max_image_pixels : int
        Decode limits (decode.py); over them -> ImageTooLargeError (RESOURCE_EXHAUSTED).
    detection : DetectionConfig
        Detector scale policy, upsampling, minimum face size, score threshold (detect.py).
    intra_op_threads : int
        onnxruntime intra-op threads of one run of the detector or embedder; 0 = one per core.
        1 (the default): each call detects on its own thread, so concurrent calls (the server's
        handlers, BulkEnroll's window) use the cores side by side, and the embedder splits a
        batch into one concurrent run per core (embed.py). That is faster wherever calls overlap
        (see onnx_session.py and embed.py for the figures); a lone call detects on one core.
    flip_augment : bool
        Test-time augmentation: a face's embedding is the mean of the embeddings of its chip and
        of the chip mirrored left-right (twice the embedding cost, ~4 ms per face on one core).
        Off by default, so embeddings equal dlib's ``compute_face_descriptor``. Measured on
        ``pairs_dev.tsv`` (2,865 LFW pairs, 150x150 images) with the default model: 10-fold
        accuracy 98.68 % -> 98.88 %, accuracy at the fixed threshold 0.6 98.15 % -> 98.85 %.
        Part of :attr:`FacePipeline.model_id`: a gallery enrolled with it on is refused by a
        server with it off, and the other way round.
    memory_budget_bytes : int or None
        Working memory all concurrent calls of this pipeline may hold together, bytes
        (memory_budget.py); None = 25 % of physical memory (at least 1 GiB), 0 = no budget.
    memory_wait_s : float
        How long a call waits for budget held by other calls before RESOURCE_EXHAUSTED, seconds.
    reduce_above_pixels : int
        Photos (and face crops) over this many pixels are decoded at reduced size; 0 = never.
    """

    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    detection: DetectionConfig = dataclasses.field(default_factory=DetectionConfig)
    intra_op_threads: int = 1
    flip_augment: bool = False
    memory_budget_bytes: int | None = None
    memory_wait_s: float = DEFAULT_WAIT_S
    reduce_above_pixels: int = DEFAULT_REDUCE_ABOVE_PIXELS

    def __post_init__(self) -> None:
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 0:
            raise InvalidInput(f"memory_budget_bytes must be >= 0, got {self.memory_budget_bytes}")
        if self.memory_wait_s < 0 or self.reduce_above_pixels < 0:
            raise InvalidInput("memory_wait_s and reduce_above_pixels must be >= 0")

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


class FacePipeline:
    """Every face of an image with its box, landmarks, score and embedding, for one model.

    Build it with :meth:`from_model_dir`. Thread-safe: the stages hold no per-call state and
    onnxruntime sessions may be run concurrently.
    """

    def __init__(
        self,
        manifest: ModelManifest,
        model_dir: Path,
        *,
        detector: FaceDetector,
        landmarks: LandmarkPredictor,
        embedder: ChipEmbedder,
        head: SameHead | None,
        config: PipelineConfig,
        memory_budget: MemoryBudget | None = None,
    ) -> None:
        self.manifest = manifest
        self.model_dir = model_dir
        self.detector = detector
        self.landmarks = landmarks
        self.embedder = embedder
        self.head = head
        self.config = config
        if memory_budget is None:
            limit = default_budget_bytes() if config.memory_budget_bytes is None else config.memory_budget_bytes
            memory_budget = MemoryBudget(limit, wait_s=config.memory_wait_s)
        #: Shared by every call of this pipeline (one per server process).
        self.memory_budget = memory_budget

    @functools.cached_property
    def model_id(self) -> str:
        """The embedding space of this pipeline: ``manifest.embedding_id(config.flip_augment)``
        (computed once: every call on an image or embedding checks it).

        64 hex digits of sha256 over the embedder file's hash, embedding_dim, metric, chip spec,
        embedder input and the flip augmentation (``ModelManifest.embedding_id``). Galleries record it; the server
        refuses galleries of another id.
        """
        return self.manifest.embedding_id(self.config.flip_augment)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | os.PathLike,
        config: PipelineConfig | None = None,
        *,
        embedder: ChipEmbedder | None = None,
        verify_checksums: bool = True,
    ) -> "FacePipeline":
        """Load a model directory (``model.json`` + files, see ``facegallery.server.contract.manifest``).

        Parameters
        ----------
        model_dir : path
            A directory written by ``facegallery export dlib`` or ``facegallery train``.
        config : PipelineConfig, optional
        embedder : optional
            Replaces the plain ONNX embedder (the server passes a batching wrapper around
            :meth:`load_embedder`'s result).
        verify_checksums : bool
            Check every file's sha256 against the manifest (about 0.1 s).

        Raises
        ------
        ModelError
            Missing/corrupt files or a manifest that disagrees with the ONNX graphs.
        """
        config = config or PipelineConfig()
        model_dir = Path(model_dir)
        manifest = ModelManifest.load(model_dir, verify=verify_checksums)
        started = time.perf_counter()
        pipeline = cls(
            manifest,
            model_dir,
            detector=FaceDetector.from_manifest(model_dir, manifest, intra_op_threads=config.intra_op_threads),
            landmarks=LandmarkPredictor.from_manifest(model_dir, manifest),
            embedder=embedder or cls.load_embedder(model_dir, manifest, config),
            head=SameHead.from_manifest(model_dir, manifest),
            config=config,
        )
        elapsed = time.perf_counter() - started
        record("model_load_seconds", elapsed)
        LOG.info("loaded model %s (%s) from %s in %.2f s", manifest.name, pipeline.model_id[:12], model_dir, elapsed)
        return pipeline

    @staticmethod
    def load_embedder(model_dir: Path, manifest: ModelManifest, config: PipelineConfig, *, parallel_runs: int | None = None) -> Embedder:
        """The plain onnxruntime embedder of a model directory (``parallel_runs``: embed.py
        ``Embedder``'s, None = its default)."""
        return Embedder.from_manifest(model_dir, manifest, intra_op_threads=config.intra_op_threads, parallel_runs=parallel_runs)

    # ------------------------------------------------------------------------------------------
    def analyze(
        self,
        image: ImageInput,
        *,
        kind: ImageKind = ImageKind.PHOTO,
        max_faces: int = 0,
        detection: DetectionConfig | None = None,
    ) -> list[Face]:
        """Detect, align and embed every face of one image.

        Parameters
        ----------
        image : bytes | PIL.Image.Image | (H,W,3) uint8 ndarray
            Encoded bytes, a PIL image or RGB pixels (see decode.py for modes and EXIF handling).
        kind : ImageKind
            PHOTO: detect faces. FACE_CROP: the image is one face; landmarks are predicted in the
            whole image. ALIGNED_CHIP: the image is already an aligned ``S x S`` chip
            (S = ``manifest.chip.size``) and is embedded as is.
        max_faces : int
            Keep at most this many faces, largest box first; 0 keeps all.
        detection : DetectionConfig, optional
            Overrides the pipeline's detection settings for this call.

        Returns
        -------
        list[Face]
            Largest box first; boxes and landmarks in pixels of the decoded image after EXIF
            orientation. ``[]`` when no face is found.

        Raises
        ------
        ImageDecodeError, ImageTooLargeError, InvalidInput
            Undecodable input, input over the limits, a chip of the wrong size.
        """
        if max_faces < 0:
            raise InvalidInput(f"max_faces must be >= 0, got {max_faces}")
        detection = detection or self.config.detection
        header = read_header(image, self.config.decode_limits)
        reduce = self.reduce_factor(header, kind, detection)
        estimate = self.estimate_bytes(header, reduce)
        large = estimate > TRIM_ABOVE_BYTES
        with self.memory_budget.reserve(estimate):
            try:
                return self._analyze(image, header, reduce, kind, max_faces, detection, trim=large)
            finally:
                if large:  # before the budget is released, so the next call finds the memory returned
                    return_memory_to_os()

    def reduce_factor(self, header: ImageHeader, kind: ImageKind, detection: DetectionConfig) -> int:
        """The integer factor the image is decoded at (1 = full size).

        Only encoded photos and face crops over ``reduce_above_pixels``, and only when the
        detector rescales: the image is reduced to no less than ``max(4 * max_detect_pixels,
        reduce_above_pixels / 4)`` pixels, i.e. at least twice the detector's side. Every face the
        detector can find (at least its 80 px window at the detection scale) is then at least
        160 px in the reduced image, more than the 150 px chip it is resampled to.
        """
        limit = self.config.reduce_above_pixels
        if not limit or kind is ImageKind.ALIGNED_CHIP or not detection.rescale or not header.reducible:
            return 1
        if header.pixels <= limit:
            return 1
        floor = max(4 * detection.max_detect_pixels, limit / 4)
        return max(1, math.floor(math.sqrt(header.pixels / floor)))

    @staticmethod
    def estimate_bytes(header: ImageHeader, reduce: int) -> int:
        """Estimated peak working memory of one call on this image, bytes (memory_budget.py)."""
        working = -(-header.width // reduce) * -(-header.height // reduce)
        return estimate_working_bytes(header.decoded_pixels(reduce), header.frame_bytes_per_pixel, working)

    def _analyze(
        self,
        image: ImageInput,
        header: ImageHeader,
        reduce: int,
        kind: ImageKind,
        max_faces: int,
        detection: DetectionConfig,
        *,
        trim: bool = False,
    ) -> list[Face]:
        with timed("decode"):
            rgb = decode_image(image, self.config.decode_limits, reduce=reduce)
        if trim and reduce > 1:  # the full-size frame is freed: give it back before detection
            return_memory_to_os()
        height, width = rgb.shape[:2]
        size = self.manifest.chip.size
        if kind is ImageKind.ALIGNED_CHIP:
            if (height, width) != (size, size):
                raise InvalidInput(f"an aligned chip must be {size}x{size} pixels, got {width}x{height}")
            boxes = np.array([[0, 0, width - 1, height - 1]], dtype=np.float32)
            scores = np.zeros(1, dtype=np.float32)
            landmarks = template_in_chip(self.manifest.chip)[None].astype(np.float32)
            chips = rgb[None]
        else:
            if kind is ImageKind.FACE_CROP:
                boxes = np.array([[0, 0, width - 1, height - 1]], dtype=np.float32)
                scores = np.zeros(1, dtype=np.float32)
            else:
                with timed("detect"):
                    detections = self.detector.detect(rgb, detection)
                boxes, scores = _largest_first(detections.boxes, detections.scores, max_faces)
                if len(boxes) == 0:  # no face: the later stages have nothing to do (nor to time)
                    return []
            with timed("landmarks"):
                landmarks = self.landmarks.predict(rgb, boxes)
            with timed("align"):
                chips = extract_chips(rgb, landmarks, self.manifest.chip)
        del rgb
        if reduce > 1:
            boxes, landmarks = _to_full_size(boxes, landmarks, (height, width), _full_size(header, (height, width)))
        with timed("embed"):
            embeddings = self._embed(chips)
        return [
            Face(box=boxes[i].astype(np.float32), landmarks=landmarks[i].astype(np.float32), score=float(scores[i]), embedding=embeddings[i])
            for i in range(len(boxes))
        ]

    def _embed(self, chips: np.ndarray) -> np.ndarray:
        """``(N,S,S,3) uint8`` chips -> ``(N,D) float32``, with the flip augmentation if configured."""
        n = len(chips)
        if n == 0:
            return np.zeros((0, self.manifest.embedding_dim), np.float32)
        if not self.config.flip_augment:
            return self.embedder.embed(chips)
        both = self.embedder.embed(np.concatenate([chips, chips[:, :, ::-1]]))
        return ((both[:n] + both[n:]) / 2).astype(np.float32)

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        """P(same person) from the model's learned head (export/train/head.py).

        Parameters
        ----------
        a, b : (N, D) float32
            Embeddings, row i of ``a`` paired with row i of ``b``.

        Returns
        -------
        (N,) float32 in [0, 1], or None when the model has no head.
        """
        if self.head is None:
            return None
        return self.head.probability_same(a, b)


def _full_size(header: ImageHeader, reduced: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of the full upright image whose reduced decode is ``reduced``: the
    declared size, transposed when the reduced image is (a PNG's late eXIf chunk is only seen then)."""
    h, w = header.height, header.width
    if abs(math.log((h / reduced[0]) / (w / reduced[1]))) > abs(math.log((w / reduced[0]) / (h / reduced[1]))):
        return w, h
    return h, w


def _to_full_size(
    boxes: np.ndarray, landmarks: np.ndarray, reduced: tuple[int, int], full: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (inclusive pixel corners) and landmarks (pixel centres) of a reduced image -> full size."""
    sy, sx = full[0] / reduced[0], full[1] / reduced[1]
    boxes = boxes.astype(np.float64)
    boxes[:, 0] *= sx
    boxes[:, 1] *= sy
    boxes[:, 2] = (boxes[:, 2] + 1) * sx - 1
    boxes[:, 3] = (boxes[:, 3] + 1) * sy - 1
    landmarks = landmarks.astype(np.float64)
    landmarks[..., 0] = (landmarks[..., 0] + 0.5) * sx - 0.5
    landmarks[..., 1] = (landmarks[..., 1] + 0.5) * sy - 0.5
    return boxes.astype(np.float32), landmarks.astype(np.float32)


def _largest_first(boxes: np.ndarray, scores: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Order detections by box area (descending), keep ``max_faces`` (0 = all)."""
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order = np.argsort(-areas, kind="stable")
    if max_faces:
        order = order[:max_faces]
    return boxes[order], scores[order]
