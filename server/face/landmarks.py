"""Facial landmarks: dlib's shape_predictor (Kazemi & Sullivan ERT cascade) in numpy.

Runs the arrays written by ``facegallery.export.dlib.shape_predictor`` and reproduces
``dlib.shape_predictor(img, rect)`` exactly (dlib v20.0.1 ``shape_predictor.h`` l.238
``extract_feature_pixel_values`` and l.339 ``operator()``; ``../shared/specs/dlib_models.md``
section (c), gotcha 11):

* per cascade, the 2x2 part of the Umeyama similarity from the mean shape to the current shape
  (point_transforms.h l.323), cast to float32, places each feature pixel relative to its anchor part;
* features are single pixels at ``floor(x + 0.5)`` of the box-unnormalised position, grey =
  ``(r + g + b) // 3`` (pixel.h l.965), 0 outside the image;
* each tree goes left when ``feat[idx1] - feat[idx2] > thresh``; leaf values are added to the
  current shape one tree after another in float32;
* the parts are the unnormalised shape rounded with ``floor(x + 0.5)``.

Kazemi & Sullivan, "One Millisecond Face Alignment with an Ensemble of Regression Trees", CVPR 2014.
"""

from __future__ import annotations

import logging
import os
import zipfile

import numpy as np

from facegallery.server.contract.errors import InvalidInput, ModelError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.align import similarity_transform
from facegallery.server.face.dlib_geometry import lround

__all__ = ["LandmarkPredictor", "dlib_rectangles"]

logger = logging.getLogger(__name__)

_ARRAYS = ("initial_shape", "anchor_idx", "deltas", "split_idx1", "split_idx2", "split_thresh", "leaf_values")


def dlib_rectangles(boxes: np.ndarray) -> np.ndarray:
    """Round boxes to dlib integer rectangles, the way ``drectangle -> rectangle`` does.

    Parameters
    ----------
    boxes : (N, 4) array_like of float
        left, top, right, bottom, inclusive, pixels.

    Returns
    -------
    (N, 4) int64
        Each coordinate rounded half away from zero (``std::lround``, drectangle.h l.64), so
        integer boxes pass through unchanged.
    """
    return lround(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


class LandmarkPredictor:
    """dlib's ERT shape predictor (5 points for the default model), exact to dlib 20.0.1.

    Parameters
    ----------
    arrays : dict of str to ndarray
        The arrays of :func:`facegallery.export.dlib.shape_predictor.convert_shape_predictor`
        (``initial_shape`` (P,2), ``anchor_idx`` (C,F), ``deltas`` (C,F,2), ``split_idx1`` /
        ``split_idx2`` / ``split_thresh`` (C,T,S), ``leaf_values`` (C,T,S+1,P,2)).

    Raises
    ------
    ModelError
        An array is missing or the shapes disagree.
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        missing = [k for k in _ARRAYS if k not in arrays]
        if missing:
            raise ModelError(f"landmark model lacks arrays {missing}")
        self.initial_shape = np.ascontiguousarray(arrays["initial_shape"], dtype=np.float32)
        self.anchor_idx = np.asarray(arrays["anchor_idx"], dtype=np.intp)
        self.deltas = np.asarray(arrays["deltas"], dtype=np.float32)
        self.split_idx1 = np.asarray(arrays["split_idx1"], dtype=np.intp)
        self.split_idx2 = np.asarray(arrays["split_idx2"], dtype=np.intp)
        self.split_thresh = np.asarray(arrays["split_thresh"], dtype=np.float32)
        leaves = np.asarray(arrays["leaf_values"], dtype=np.float32)
        if self.split_idx1.ndim != 3 or self.anchor_idx.ndim != 2 or self.initial_shape.ndim != 2:
            raise ModelError("landmark model arrays have the wrong number of dimensions")
        num_parts = self.initial_shape.shape[0]
        cascades, trees, splits = self.split_idx1.shape
        expected = {
            "initial_shape": (num_parts, 2),
            "anchor_idx": (cascades, self.anchor_idx.shape[1]),
            "deltas": (cascades, self.anchor_idx.shape[1], 2),
            "split_idx2": (cascades, trees, splits),
            "split_thresh": (cascades, trees, splits),
            "leaf_values": (cascades, trees, splits + 1, num_parts, 2),
        }
        got = {"initial_shape": self.initial_shape.shape, "anchor_idx": self.anchor_idx.shape,
               "deltas": self.deltas.shape, "split_idx2": self.split_idx2.shape,
               "split_thresh": self.split_thresh.shape, "leaf_values": leaves.shape}
        bad = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
        if bad or (splits + 1) & splits:
            raise ModelError(f"inconsistent landmark model arrays (got, expected): {bad or 'incomplete trees'}")
        num_features = self.anchor_idx.shape[1]
        if not (0 <= self.anchor_idx.min() and self.anchor_idx.max() < num_parts
                and 0 <= min(self.split_idx1.min(), self.split_idx2.min())
                and max(self.split_idx1.max(), self.split_idx2.max()) < num_features):
            raise ModelError("landmark model indexes a part or feature pixel that does not exist")
        # (C, T, L, 2P): a leaf's increment in dlib's x0,y0,x1,y1,... layout.
        self.leaf_values = leaves.reshape(cascades, trees, splits + 1, 2 * num_parts)
        self.depth = (splits + 1).bit_length() - 1

    @property
    def num_parts(self) -> int:
        """P, the number of landmarks per face (5 for the default model)."""
        return int(self.initial_shape.shape[0])

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "LandmarkPredictor":
        """Load the ``.npz`` written by ``convert_shape_predictor``.

        Raises
        ------
        ModelError
            The file is missing, not an ``.npz``, or its arrays are inconsistent.
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ModelError(f"cannot read landmark model {path}: {exc}") from exc
        predictor = cls(arrays)
        logger.debug("loaded landmark model %s: %d parts, %s cascades x trees x splits",
                     path, predictor.num_parts, predictor.split_idx1.shape)
        return predictor

    @classmethod
    def from_manifest(cls, model_dir: str | os.PathLike, manifest: ModelManifest) -> "LandmarkPredictor":
        """Load ``manifest.files["landmarks"]`` from a model directory (see ``manifest.py``)."""
        if "landmarks" not in manifest.files:
            raise ModelError(f"model manifest of {model_dir} names no landmarks file")
        return cls.from_npz(manifest.path_of(model_dir, "landmarks"))

    def predict(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Landmarks of the faces in ``boxes``, like ``dlib.shape_predictor(img, rect)`` per box.

        Parameters
        ----------
        rgb : (H, W, 3) uint8
            RGB image (greyscale images must be converted to RGB by the caller).
        boxes : (N, 4) array_like of float
            Face boxes left, top, right, bottom, inclusive pixels (dlib rectangle convention).
            Non-integer values are rounded half away from zero (see :func:`dlib_rectangles`),
            because ``dlib.rectangle`` holds integers.

        Returns
        -------
        (N, P, 2) float32
            x, y of each part in image pixels; integer-valued like dlib's ``point`` parts.
            For the 5-point model: 0-1 one eye's outer/inner corner, 2-3 the other eye's
            outer/inner corner, 4 the nose base. ``N == 0`` gives ``(0, P, 2)``.

        Raises
        ------
        InvalidInput
            ``rgb`` is not an (H, W, 3) uint8 array or ``boxes`` is not (N, 4) and finite.
        """
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
            raise InvalidInput(f"landmarks need an (H, W, 3) uint8 RGB image, got {getattr(rgb, 'shape', None)} "
                               f"{getattr(rgb, 'dtype', type(rgb).__name__)}")
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.size == 0:
            return np.zeros((0, self.num_parts, 2), np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
            raise InvalidInput(f"boxes must be a finite (N, 4) array, got shape {boxes.shape}")
        rects = dlib_rectangles(boxes)
        # unnormalizing_tform(rect) (shape_predictor.h l.222): (0,0) -> tl, (1,1) -> br.
        origin = rects[:, None, 0:2].astype(np.float64)  # (N, 1, 2)
        extent = (rects[:, None, 2:4] - rects[:, None, 0:2]).astype(np.float64)
        height, width = rgb.shape[:2]

        trees = np.arange(self.split_idx1.shape[1])
        initial64 = self.initial_shape.astype(np.float64)
        current = np.broadcast_to(self.initial_shape.reshape(1, -1), (len(rects), self.initial_shape.size)).copy()
        for c in range(self.split_idx1.shape[0]):
            points = current.reshape(-1, self.num_parts, 2)
            tform = similarity_transform(initial64, points.astype(np.float64))[0].astype(np.float32)  # (N, 2, 2)
            dx, dy = self.deltas[c, :, 0], self.deltas[c, :, 1]
            anchor = points[:, self.anchor_idx[c]]  # (N, F, 2) float32
            qx = (tform[:, 0, 0, None] * dx + tform[:, 0, 1, None] * dy) + anchor[..., 0]
            qy = (tform[:, 1, 0, None] * dx + tform[:, 1, 1, None] * dy) + anchor[..., 1]
            px = np.floor(extent[..., 0] * qx + origin[..., 0] + 0.5).astype(np.int64)
            py = np.floor(extent[..., 1] * qy + origin[..., 1] + 0.5).astype(np.int64)
            inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
            pix = rgb[np.where(inside, py, 0), np.where(inside, px, 0)].astype(np.int32)
            feat = np.where(inside, pix.sum(axis=-1) // 3, 0).astype(np.float32)  # (N, F)

            node = np.zeros((len(rects), trees.size), np.intp)
            for _ in range(self.depth):
                i1 = self.split_idx1[c, trees, node]
                i2 = self.split_idx2[c, trees, node]
                diff = np.take_along_axis(feat, i1, axis=1) - np.take_along_axis(feat, i2, axis=1)
                node = np.where(diff > self.split_thresh[c, trees, node], 2 * node + 1, 2 * node + 2)
            leaf = node - self.split_idx1.shape[2]
            steps = self.leaf_values[c, trees, leaf]  # (N, T, 2P)
            # Sequential float32 accumulation, tree after tree (not pairwise summation).
            current = np.add.accumulate(np.concatenate([current[:, None], steps], axis=1), axis=1)[:, -1]

        shape = current.reshape(-1, self.num_parts, 2).astype(np.float64)
        return np.floor(extent * shape + origin + 0.5).astype(np.float32)
