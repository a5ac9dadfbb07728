"""Convert dlib's ``shape_predictor`` ``.dat`` (Kazemi-Sullivan ERT landmarks) to a ``.npz``.

File layout (``../shared/specs/dlib_models.md`` section (c); dlib v20.0.1
``dlib/image_processing/shape_predictor.h`` l.411 ``serialize``), all in dlib's packed-int /
float_details encoding (``dlib_format``)::

    int version (1)
    matrix<float,0,1> initial_shape                  2P values x0,y0,x1,y1,... (box-normalised)
    vector<vector<regression_tree>> forests          cascades x trees
        regression_tree = vector<split_feature{ulong idx1, ulong idx2, float thresh}> splits,
                          vector<matrix<float,0,1>> leaf_values            (each 2P values)
    vector<vector<ulong>> anchor_idx                 per cascade, one per feature pixel
    vector<vector<vector<float,2>>> deltas           per cascade, one (x, y) per feature pixel

The ``.npz`` holds plain arrays (C cascades, T trees per cascade, S = 2**depth - 1 splits and
L = 2**depth leaves per tree, F feature pixels per cascade, P parts); see
:func:`convert_shape_predictor`. ``facegallery.server.face.landmarks.LandmarkPredictor`` runs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from facegallery.export.dlib.dat_format import DlibFormatError, DlibReader
from facegallery.server.contract.files import atomic_write

__all__ = ["read_shape_predictor", "convert_shape_predictor"]

logger = logging.getLogger(__name__)


def _read_trees(reader: DlibReader, num_trees: int, num_parts: int) -> tuple[np.ndarray, ...]:
    """One cascade's ``vector<regression_tree>`` body (its size already read)."""
    idx1, idx2, thresh, leaves = [], [], [], []
    for t in range(num_trees):
        num_splits = reader.read_int()
        split = reader.read_int_run(4 * num_splits).reshape(num_splits, 4)
        num_leaves = reader.read_int()
        if num_leaves != num_splits + 1 or num_leaves & (num_leaves - 1):
            raise DlibFormatError(f"tree {t}: {num_splits} splits and {num_leaves} leaves is not a complete tree")
        # Each leaf is a matrix<float,0,1>: packed -nr, -nc, then 2P float_details (mantissa, exponent).
        leaf = reader.read_int_run(num_leaves * (2 + 4 * num_parts)).reshape(num_leaves, 2 + 4 * num_parts)
        if not (np.all(np.abs(leaf[:, 0]) == 2 * num_parts) and np.all(np.abs(leaf[:, 1]) == 1)):
            raise DlibFormatError(f"tree {t}: leaf values are not {2 * num_parts}x1 matrices")
        idx1.append(split[:, 0])
        idx2.append(split[:, 1])
        thresh.append(np.ldexp(split[:, 2].astype(np.float64), split[:, 3].astype(np.int32)))
        pairs = leaf[:, 2:].reshape(num_leaves, 2 * num_parts, 2)
        leaves.append(np.ldexp(pairs[..., 0].astype(np.float64), pairs[..., 1].astype(np.int32)))
    if len({len(s) for s in idx1}) > 1:
        raise DlibFormatError("trees of one cascade have different depths")
    return np.stack(idx1), np.stack(idx2), np.stack(thresh), np.stack(leaves)


def read_shape_predictor(data: bytes) -> dict[str, np.ndarray]:
    """Parse the bytes of a dlib ``shape_predictor`` file, to the last byte.

    Parameters
    ----------
    data : bytes
        The whole ``.dat`` file (e.g. ``shape_predictor_5_face_landmarks.dat``, 9.2 MB).

    Returns
    -------
    dict of str to ndarray
        The arrays described in :func:`convert_shape_predictor`.

    Raises
    ------
    DlibFormatError
        The bytes are not a dlib shape_predictor with complete trees of one depth (a
        float_details value is also rejected if it is inf/NaN), or bytes remain after it.
    """
    reader = DlibReader(data)
    reader.expect_int(1, "shape_predictor version")
    initial = reader.read_float_matrix().reshape(-1)
    if initial.size % 2 or initial.size == 0:
        raise DlibFormatError(f"initial_shape has {initial.size} values, expected 2 per part")
    num_parts = initial.size // 2

    num_cascades = reader.read_int()
    per_cascade = []
    for _ in range(num_cascades):
        per_cascade.append(_read_trees(reader, reader.read_int(), num_parts))
    if len({c[0].shape for c in per_cascade}) > 1:
        raise DlibFormatError("cascades have different numbers of trees or tree depths")
    split_idx1, split_idx2, split_thresh, leaf_values = (np.stack(a) for a in zip(*per_cascade))

    if reader.read_int() != num_cascades:
        raise DlibFormatError("anchor_idx has a different number of cascades than forests")
    anchors = [reader.read_int_run(reader.read_int()) for _ in range(num_cascades)]
    if reader.read_int() != num_cascades:
        raise DlibFormatError("deltas has a different number of cascades than forests")
    deltas = [reader.read_float_run(2 * reader.read_int()).reshape(-1, 2) for _ in range(num_cascades)]
    reader.expect_end()

    anchor_idx = np.stack(anchors)
    num_features = anchor_idx.shape[1]
    if anchor_idx.min() < 0 or anchor_idx.max() >= num_parts:
        raise DlibFormatError("anchor_idx refers to a part that does not exist")
    if max(split_idx1.max(), split_idx2.max()) >= num_features or min(split_idx1.min(), split_idx2.min()) < 0:
        raise DlibFormatError("a split refers to a feature pixel that does not exist")
    floats = [initial, split_thresh, leaf_values, *deltas]
    if not all(np.isfinite(a).all() for a in floats):
        raise DlibFormatError("non-finite value in the shape predictor")

    num_trees, num_splits = split_idx1.shape[1:]
    return {
        "initial_shape": initial.reshape(num_parts, 2).astype(np.float32),
        "anchor_idx": anchor_idx.astype(np.int32),
        "deltas": np.stack(deltas).astype(np.float32),
        "split_idx1": split_idx1.astype(np.int32),
        "split_idx2": split_idx2.astype(np.int32),
        "split_thresh": split_thresh.astype(np.float32),
        "leaf_values": leaf_values.reshape(num_cascades, num_trees, num_splits + 1, num_parts, 2).astype(np.float32),
    }


def convert_shape_predictor(dat_path: str | os.PathLike, npz_path: str | os.PathLike) -> dict[str, int]:
    """Parse a dlib shape_predictor ``.dat`` and write its arrays to ``npz_path``.

    The ``.npz`` (``numpy.savez``, uncompressed) holds, with C cascades, T trees per cascade,
    S splits and L = S + 1 leaves per tree (complete binary trees, node i has children 2i+1 /
    2i+2, leaf index = node - S), F feature pixels per cascade and P parts:

    ============== ================= =====================================================
    initial_shape  (P, 2) float32    mean shape, box-normalised (0,0)=box tl, (1,1)=box br
    anchor_idx     (C, F) int32      part each feature pixel is anchored to
    deltas         (C, F, 2) float32 feature pixel offset from its anchor (normalised)
    split_idx1     (C, T, S) int32   feature index of the first pixel of each split
    split_idx2     (C, T, S) int32   feature index of the second pixel
    split_thresh   (C, T, S) float32 go left when feat[idx1] - feat[idx2] > thresh
    leaf_values    (C, T, L, P, 2) float32  shape increment of each leaf (normalised)
    ============== ================= =====================================================

    Parameters
    ----------
    dat_path : path
        dlib's file, e.g. ``shape_predictor_5_face_landmarks.dat``.
    npz_path : path
        Output file; replaced atomically and durably (``atomic_write``).

    Returns
    -------
    dict of str to int
        ``num_parts``, ``cascades``, ``trees_per_cascade``, ``tree_depth``, ``feature_pixels``
        (5, 15, 500, 4, 800 for the 5-point model).

    Raises
    ------
    DlibFormatError
        See :func:`read_shape_predictor`.
    """
    arrays = read_shape_predictor(Path(dat_path).read_bytes())
    with atomic_write(npz_path, "wb") as f:
        np.savez(f, **arrays)
    cascades, trees, splits = arrays["split_idx1"].shape
    info = {
        "num_parts": int(arrays["initial_shape"].shape[0]),
        "cascades": int(cascades),
        "trees_per_cascade": int(trees),
        "tree_depth": int(splits + 1).bit_length() - 1,
        "feature_pixels": int(arrays["anchor_idx"].shape[1]),
    }
    logger.info("converted %s -> %s: %s", dat_path, npz_path, info)
    return info
