"""Choose a model's verification threshold at a target false accept rate on unseen identities.

``facegallery calibrate MODEL_DIR DATA_DIR --far 1e-3``: the photos of DATA_DIR (one folder per
identity, people the model was *not* trained on) go through the model's own pipeline (chips
cached as for training), every pair of images is compared (L2 distance of the embeddings), and
the threshold is the largest one whose FAR on the different-identity pairs is at most the target
(:func:`facegallery.export.evaluate.metrics.threshold_at_far`). The same different-identity pairs
give the model's false-match curve F1(d) (:func:`false_match_curve`), which the server uses to
estimate the FPIR of small galleries and the FAR of 1:1 verify / compare
(:class:`facegallery.server.gallery.decision.FalseMatchCurve`). Both are written into
``model.json`` (``threshold`` with a ``calibration`` record, and ``false_match``); only
``model.json`` changes, so every file checksum stays valid. Works for any model directory, the
default dlib model included, and needs no PyTorch.

Identities listed as trained on in the model's ``training.json`` (written by ``facegallery
train``) are left out, so the threshold always comes from unseen people.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from facegallery.export.evaluate.metrics import tar_at_far
from facegallery.export.train.data import (
    IMAGE_KINDS_CLI,
    TRAINING_RECORD,
    AlignedChipReader,
    PipelineChipper,
    load_chips,
    parse_name_range,
    scan_identity_folders,
)
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.embed import Embedder

__all__ = ["CalibrationResult", "all_pairs_distances", "calibrate", "false_match_curve"]

logger = logging.getLogger(__name__)

#: Log-spaced false-match rates at which :func:`false_match_curve` tabulates F1, from 1 / pairs to 1.
FALSE_MATCH_POINTS = 80
#: Decimals kept of a tabulated L2 distance (1e-5, far finer than any threshold is meaningful).
DISTANCE_DECIMALS = 5
#: Significant digits kept of a tabulated rate.
RATE_DIGITS = 4


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes
    ----------
    threshold : float
        L2 distance; same person when distance <= threshold.
    tar : float
        True accept rate of the same-identity pairs at that threshold.
    far : float
        False accept rate achieved (<= the target).
    target_far : float
    genuine, impostor : int
        Pair counts.
    identities, images, skipped : int
        Identities and chips used; files without a face.
    excluded : tuple of str
        Identities left out because the model was trained on them.
    false_match : dict or None
        The ``model.json`` ``false_match`` record of the different-identity pairs
        (:func:`false_match_curve`); None when they give fewer than 2 distinct distances.
    """

    threshold: float
    tar: float
    far: float
    target_far: float
    genuine: int
    impostor: int
    identities: int
    images: int
    skipped: int
    excluded: tuple[str, ...] = ()
    false_match: dict[str, Any] | None = None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["excluded"] = list(self.excluded)
        return out


def all_pairs_distances(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2 distances of every unordered pair of rows.

    Parameters
    ----------
    embeddings : (N, D) float32
    labels : (N,) int

    Returns
    -------
    distances : (N (N - 1) / 2,) float64
    same : (N (N - 1) / 2,) bool
    """
    e = np.asarray(embeddings, dtype=np.float64)
    i, j = np.triu_indices(len(e), k=1)
    sq = (e * e).sum(1)
    # From the (N, N) Gram matrix: gathering e[i], e[j] would take 2 (N^2 / 2) D floats.
    d2 = (sq[:, None] + sq[None, :] - 2 * (e @ e.T))[i, j]
    return np.sqrt(np.maximum(d2, 0.0)), np.asarray(labels)[i] == np.asarray(labels)[j]


def false_match_curve(impostor_distances: np.ndarray, *, data: str) -> dict[str, Any] | None:
    """The false-match curve of different-identity pairs, as a ``model.json`` ``false_match`` record.

    F1(d) is the fraction of the pairs whose L2 distance is <= d. It is tabulated at
    :data:`FALSE_MATCH_POINTS` log-spaced rates r from 1 / n to 1, plus 0.5: the point for r is
    the floor(r n)-th smallest distance (the smallest for r n < 1), rounded up to
    :data:`DISTANCE_DECIMALS` decimals. A distance reached by several rates is kept once, and each
    point's rate is then counted exactly, (number of distances <= the stored distance) / n, and
    rounded to :data:`RATE_DIGITS` significant digits. The server interpolates linearly between
    the points (:class:`facegallery.server.gallery.decision.FalseMatchCurve`, which parses the
    record).

    Parameters
    ----------
    impostor_distances : (n,) float
        L2 distances of the different-identity pairs (``distances[~same]`` of
        :func:`all_pairs_distances`), in any order.
    data : str
        Where the pairs come from; stored as ``data``.

    Returns
    -------
    dict or None
        ``{"distances": [...], "rates": [...], "pairs": n, "data": data}``: distances strictly
        ascending, rates non-decreasing in (0, 1], of equal length; None when the pairs give fewer
        than 2 distinct distances (the curve needs 2 points).
    """
    dist = np.sort(np.asarray(impostor_distances, dtype=np.float64).ravel())
    n = len(dist)
    if n < 2:
        return None
    rates = np.unique(np.concatenate([np.logspace(np.log10(1 / n), 0, FALSE_MATCH_POINTS), [0.5]]))
    index = np.clip(np.floor(rates * n * (1 + 1e-12)).astype(np.int64) - 1, 0, n - 1)  # 1e-12: round-off of r n
    # Rounded up, so that every point counts at least the distance it was taken at.
    scale = 10.0**DISTANCE_DECIMALS
    picked = dist[index]
    steps = np.ceil(picked * scale)
    steps = np.where(steps / scale < picked, steps + 1, steps)  # round-off of picked * scale
    points = np.unique(steps / scale)
    if len(points) < 2:
        return None
    counts = np.searchsorted(dist, points, side="right")
    return {
        "distances": [float(d) for d in points],
        "rates": [float(f"{c / n:.{RATE_DIGITS}g}") for c in counts],
        "pairs": int(n),
        "data": data,
    }


def _trained_identities(model_dir: Path) -> set[str]:
    path = model_dir / TRAINING_RECORD
    if not path.is_file():
        return set()
    record = json.loads(path.read_text(encoding="utf-8"))
    return set(record.get("train_identities", [])) | set(record.get("val_identities", []))


def calibrate(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    far: float = 1e-3,
    write: bool = True,
    min_images: int = 2,
    name_range: str | None = None,
    kind: str = "photo",
    cache_dir: str | os.PathLike | None = None,
    threads: int = 1,
    progress: bool = True,
) -> CalibrationResult:
    """Threshold at ``far`` on the identities of ``data_dir``; optionally stored in ``model.json``.

    Parameters
    ----------
    model_dir : path
        Any model directory (``model.json`` + files).
    data_dir : path
        ``<identity>/<image>`` photos of people the model was not trained on.
    far : float
        Target false accept rate, in (0, 1).
    write : bool
        Store ``threshold`` with a ``calibration`` record and the ``false_match`` curve in
        ``model.json`` (a curve left from earlier data is removed if these pairs give none).
    min_images, name_range, kind, cache_dir : as for ``facegallery train``.
    threads : int
        onnxruntime threads.

    Raises
    ------
    ValueError
        ``far`` outside (0, 1); fewer than 2 usable identities or no same pair; too few
        different pairs to reach ``far`` (fewer than 1 / far).
    ModelError
        The model directory is invalid.
    """
    from facegallery.server.contract.face import ImageKind
    from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

    if not 0 < far < 1:
        raise ValueError(f"far must be in (0, 1), got {far}")
    model_dir = Path(model_dir)
    manifest = ModelManifest.load(model_dir)
    trained = _trained_identities(model_dir)
    records = scan_identity_folders(data_dir, min_images=min_images,
                                    name_range=parse_name_range(name_range) if name_range else None)
    excluded = tuple(sorted({r.identity for r in records} & trained))
    if excluded:
        logger.warning("leaving out %d identities %s was trained on", len(excluded), model_dir)
        records = [r for r in records if r.identity not in trained]
    if kind not in IMAGE_KINDS_CLI:
        raise ValueError(f"kind must be one of {sorted(IMAGE_KINDS_CLI)}, got {kind!r}")
    if IMAGE_KINDS_CLI[kind] is ImageKind.ALIGNED_CHIP:
        chipper = AlignedChipReader(manifest.chip)
    else:
        pipeline = FacePipeline.from_model_dir(model_dir, PipelineConfig(intra_op_threads=threads))
        chipper = PipelineChipper(pipeline, manifest.chip, kind=IMAGE_KINDS_CLI[kind])
    data = load_chips(records, chipper, cache_dir=cache_dir, progress=progress)
    if len(data.identities) < 2:
        raise ValueError(f"calibration needs at least 2 identities with faces, {data_dir} gives {len(data.identities)}")
    embedder = Embedder.from_manifest(model_dir, manifest, intra_op_threads=threads)
    embeddings = np.concatenate([embedder.embed(data.chips[i:i + 64]) for i in range(0, len(data), 64)])
    distances, same = all_pairs_distances(embeddings, data.labels)
    if not same.any():
        raise ValueError("calibration needs identities with at least 2 images")
    impostors = int((~same).sum())
    if impostors * far < 1:
        raise ValueError(f"FAR {far:g} needs at least {math.ceil(1 / far)} different-identity pairs, the data gives {impostors}")
    figures = tar_at_far(distances, same, far)
    source = Path(data_dir).name + (f" (names {name_range})" if name_range else "")
    curve = false_match_curve(
        distances[~same], data=f"{source}: {len(data.identities)} unseen identities, {len(data)} images (facegallery calibrate)")
    if curve is None:
        logger.warning("the different-identity pairs give fewer than 2 distinct distances: no false-match curve")
    result = CalibrationResult(
        threshold=float(figures["threshold"]), tar=float(figures["tar"]), far=float(figures["far"]), target_far=far,
        genuine=int(figures["genuine"]), impostor=int(figures["impostor"]), identities=len(data.identities),
        images=len(data), skipped=len(data.skipped), excluded=excluded, false_match=curve,
    )
    logger.info("threshold %.4f at FAR %.2e: TAR %.4f", result.threshold, result.far, result.tar)
    if write:
        record = {"method": "threshold at target FAR on unseen identities (facegallery calibrate)",
                  "data": Path(data_dir).name, **result.to_json()}
        record.pop("excluded")
        record.pop("false_match")  # stored as model.json false_match
        manifest.with_updates(threshold=result.threshold, calibration=record, false_match=curve).write(model_dir)
        ModelManifest.load(model_dir)  # checksums still verify: only model.json changed
    return result
