"""Training data: folder-per-identity photos -> cached aligned face chips, P x K batches, augmentation.

``DATA_DIR/<identity>/<image>`` is scanned (:func:`scan_identity_folders`); each photo goes once
through the product's own pipeline (detector, 5-point landmarks) and the aligner cuts the chip
of the training :class:`ChipSpec` (:class:`PipelineChipper`), or the files are already aligned
chips (:class:`AlignedChipReader`). Chips are cached on disk, one ``.npz`` per image keyed by the
file's sha256, the chip spec, the source kind and the detector/landmark model files
(:func:`load_chips`), so a second run (or ``facegallery calibrate``) costs no detection.

Batches are P identities x K images (:class:`PKBatchSampler`, Hermans et al. 2017 sec. 3.1), so
every anchor has positives and negatives to mine in the batch. :func:`augment` applies random
horizontal flip, small crop-and-resize and colour jitter with plain torch operations on the
batch (torchvision is not used: it does not import beside this torch build). Only
:func:`augment` needs PyTorch, so ``facegallery calibrate`` runs without the ``train`` extra.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from tqdm import tqdm

from facegallery.export.evaluate.lfw import central_face
from facegallery.server.contract.errors import FaceGalleryError
from facegallery.server.contract.face import ImageKind
from facegallery.server.contract.files import atomic_write
from facegallery.server.contract.images import IMAGE_SUFFIXES, has_image_suffix
from facegallery.server.contract.manifest import ChipSpec
from facegallery.server.contract.paths import user_cache_dir
from facegallery.server.face.align import extract_chips
from facegallery.server.face.decode import decode_image

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_KINDS_CLI",
    "IMAGE_SUFFIXES",
    "TRAINING_RECORD",
    "AlignedChipReader",
    "AugmentConfig",
    "ChipSet",
    "ImageRecord",
    "PKBatchSampler",
    "PipelineChipper",
    "augment",
    "default_cache_dir",
    "load_chips",
    "parse_name_range",
    "scan_identity_folders",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = "facegallery-chip/1"
#: ``--kind`` of ``facegallery train`` / ``calibrate`` -> what the files are (:class:`ImageKind`).
IMAGE_KINDS_CLI = {kind.value.replace("_", "-"): kind for kind in ImageKind}
#: Written by ``facegallery train`` beside ``model.json`` (settings, train / held-out identities,
#: history, timings); ``facegallery calibrate`` leaves the identities it lists out.
TRAINING_RECORD = "training.json"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One photo of a folder-per-identity dataset: its path and its identity (folder name)."""

    path: Path
    identity: str


def parse_name_range(spec: str) -> tuple[str, str]:
    """``"A-F"`` -> ``("A", "F")``: identities whose first letter is in the range (case-insensitive).

    Raises
    ------
    ValueError
        Not two single letters joined by '-', or the first after the second.
    """
    parts = spec.strip().split("-")
    if len(parts) != 2 or not all(len(p) == 1 and p.isalpha() for p in parts) or parts[0].upper() > parts[1].upper():
        raise ValueError(f"a name range is two letters like 'A-F', got {spec!r}")
    return parts[0].upper(), parts[1].upper()


def scan_identity_folders(
    data_dir: str | os.PathLike,
    *,
    min_images: int = 1,
    name_range: tuple[str, str] | None = None,
    identities: Sequence[str] | None = None,
) -> list[ImageRecord]:
    """The photos of ``DATA_DIR/<identity>/<image>``, sorted by identity then file name.

    Parameters
    ----------
    data_dir : path
        One sub-directory per identity; files with an image suffix (:data:`IMAGE_SUFFIXES`) count.
    min_images : int
        Keep identities with at least this many photos.
    name_range : (str, str), optional
        Keep identities whose first letter (upper-cased) lies in this inclusive range.
    identities : sequence of str, optional
        Keep only these identities.

    Raises
    ------
    FileNotFoundError
        ``data_dir`` is not a directory.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"training data directory {root} does not exist")
    wanted = set(identities) if identities is not None else None
    records: list[ImageRecord] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        name = folder.name
        if name_range is not None and not (name_range[0] <= name[:1].upper() <= name_range[1]):
            continue
        if wanted is not None and name not in wanted:
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and has_image_suffix(p))
        if len(files) >= min_images:
            records.extend(ImageRecord(p, name) for p in files)
    return records


@dataclasses.dataclass(frozen=True)
class ChipSet:
    """Aligned chips with identity labels.

    Attributes
    ----------
    chips : (N, S, S, 3) uint8
        RGB face chips.
    labels : (N,) int64
        Index into ``identities``.
    identities : tuple of str
        Identity names, sorted.
    paths : tuple of str
        Source file of each chip.
    skipped : tuple of str
        Files without a usable face (no detection or unreadable).
    """

    chips: np.ndarray
    labels: np.ndarray
    identities: tuple[str, ...]
    paths: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.size)

    def subset(self, identities: Sequence[str]) -> ChipSet:
        """The chips of the named identities, relabelled 0..len(identities)-1 in sorted order."""
        keep = sorted(set(identities))
        old = {name: i for i, name in enumerate(self.identities)}
        mapping = np.full(len(self.identities), -1, dtype=np.int64)
        for new, name in enumerate(keep):
            mapping[old[name]] = new
        mask = mapping[self.labels] >= 0
        idx = np.flatnonzero(mask)
        return ChipSet(self.chips[idx], mapping[self.labels[idx]], tuple(keep), tuple(self.paths[i] for i in idx))


class PipelineChipper:
    """Photos -> aligned chips of a given spec, through the product's own face pipeline.

    Parameters
    ----------
    pipeline : FacePipeline
        Provides detection and landmarks (its own embedder's output is not used).
    spec : ChipSpec
        The chip to cut (size, padding, template); may differ from the pipeline model's chip.
    kind : ImageKind
        PHOTO: detect, then keep the face nearest the image centre (folder-per-identity photos
        are framed on their subject, as LFW is); FACE_CROP: the whole image is the face (tight
        crops such as ORL, where the detector finds nothing).
    """

    def __init__(self, pipeline, spec: ChipSpec, *, kind: ImageKind = ImageKind.PHOTO) -> None:
        if kind is ImageKind.ALIGNED_CHIP:
            raise ValueError("aligned chips need no pipeline: use AlignedChipReader")
        self.pipeline = pipeline
        self.spec = spec
        self.kind = kind
        files = pipeline.manifest.files
        self.cache_tag = f"{kind.value}:{files['detector'].sha256[:16]}:{files['landmarks'].sha256[:16]}"

    def __repr__(self) -> str:
        return f"PipelineChipper(spec={self.spec!r}, kind={self.kind})"

    def chip(self, data: bytes) -> np.ndarray | None:
        """The ``(S, S, 3) uint8`` chip of the photo's subject, or None without a face.

        Raises
        ------
        FaceGalleryError
            Undecodable or oversized image (ImageDecodeError, ImageTooLargeError).
        """
        rgb = decode_image(data, self.pipeline.config.decode_limits)
        faces = self.pipeline.analyze(rgb, kind=self.kind)
        face = central_face(faces, rgb.shape[1], rgb.shape[0])
        if face is None:
            return None
        return extract_chips(rgb, face.landmarks[None], self.spec)[0]


class AlignedChipReader:
    """Files that are already aligned chips: decoded to RGB and, if their size differs from the
    spec's, resized to ``S x S`` (bilinear, Pillow)."""

    def __init__(self, spec: ChipSpec) -> None:
        self.spec = spec
        self.cache_tag = "aligned_chip"

    def __repr__(self) -> str:
        return f"AlignedChipReader(spec={self.spec!r})"

    def chip(self, data: bytes) -> np.ndarray | None:
        rgb = decode_image(data)
        s = self.spec.size
        if rgb.shape[:2] != (s, s):
            rgb = np.asarray(Image.fromarray(rgb).resize((s, s), Image.Resampling.BILINEAR))
        return rgb


def default_cache_dir() -> Path:
    """``<user cache dir>/facegallery/chips``."""
    return user_cache_dir() / "chips"


def _spec_key(spec: ChipSpec) -> str:
    text = json.dumps([spec.size, round(spec.padding, 9), [[round(v, 9) for v in p] for p in spec.template]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_chips(
    records: Sequence[ImageRecord],
    chipper: PipelineChipper | AlignedChipReader,
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ChipSet:
    """Chips of every record, from the disk cache or computed once and cached.

    The cache file of a photo is ``cache_dir/<k[:2]>/<k>.npz`` with ``k`` = sha256 of (file
    sha256, chip spec, chipper tag); a photo without a face is cached too (an empty chip array),
    so it is not detected again.

    Parameters
    ----------
    records : sequence of ImageRecord
    chipper : PipelineChipper | AlignedChipReader
    cache_dir : path, optional
        Default :func:`default_cache_dir`.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    ChipSet
        Files without a face (or that cannot be decoded) are left out and listed in ``skipped``.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec_key = _spec_key(chipper.spec)
    s = chipper.spec.size
    chips: list[np.ndarray] = []
    names: list[str] = []
    paths: list[str] = []
    skipped: list[str] = []
    computed = 0
    for record in tqdm(records, desc="face chips", unit="img", disable=not progress):
        data = record.path.read_bytes()
        key = hashlib.sha256(f"{hashlib.sha256(data).hexdigest()}:{spec_key}:{chipper.cache_tag}".encode()).hexdigest()
        path = cache / key[:2] / f"{key}.npz"
        chip = _read_cached(path, s)
        if chip is None:
            computed += 1
            try:
                found = chipper.chip(data)
            except FaceGalleryError as exc:
                logger.warning("%s: %s", record.path, exc)
                found = None
            chip = found[None] if found is not None else np.zeros((0, s, s, 3), np.uint8)
            _write_cached(path, chip)
        if len(chip) == 0:
            skipped.append(str(record.path))
            continue
        chips.append(chip[0])
        names.append(record.identity)
        paths.append(str(record.path))
    identities = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(identities)}
    logger.info("%d chips of %d identities (%d computed, %d from cache, %d without a face)",
                len(chips), len(identities), computed, len(records) - computed, len(skipped))
    return ChipSet(
        np.stack(chips) if chips else np.zeros((0, s, s, 3), np.uint8),
        np.array([index[n] for n in names], dtype=np.int64),
        identities,
        tuple(paths),
        tuple(skipped),
    )


def _read_cached(path: Path, size: int) -> np.ndarray | None:
    try:
        with np.load(path) as z:
            if str(z["format"]) != CACHE_FORMAT:
                return None
            chip = z["chip"]
    except (OSError, KeyError, ValueError):
        return None
    return chip if chip.shape[1:] == (size, size, 3) else None


def _write_cached(path: Path, chip: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:  # concurrent runs may write the same key: each its own temp file
        np.savez(f, format=np.array(CACHE_FORMAT), chip=chip)


class PKBatchSampler:
    """P identities x K images per batch (Hermans et al. 2017, sec. 3.1).

    Identities are visited in a random order, P at a time, reshuffled whenever the order is used
    up; from each, K images are drawn without replacement (with replacement if it has fewer than
    K). Only identities with at least 2 images are used (a triplet needs a positive).

    Parameters
    ----------
    labels : (N,) int64
        Identity of each image.
    p, k : int
        Identities per batch and images per identity; P >= 2, K >= 2.
    batches_per_epoch : int, optional
        Default ``max(1, N // (P * K))``: about one pass over the images per epoch.
    seed : int
        The batches of epoch e depend only on (seed, e), so a resumed run sees the same batches.

    Raises
    ------
    ValueError
        P or K below 2, or fewer than P identities with 2+ images.
    """

    def __init__(self, labels: np.ndarray, *, p: int, k: int, batches_per_epoch: int | None = None, seed: int = 0) -> None:
        if p < 2 or k < 2:
            raise ValueError(f"P and K must both be >= 2, got P={p}, K={k}")
        labels = np.asarray(labels, dtype=np.int64)
        self.by_identity = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
        self.by_identity = [idx for idx in self.by_identity if idx.size >= 2]
        if len(self.by_identity) < p:
            raise ValueError(f"a P x K batch needs P={p} identities with 2+ images, the data has {len(self.by_identity)}")
        self.p, self.k, self.seed = p, k, seed
        self.batches_per_epoch = batches_per_epoch or max(1, labels.size // (p * k))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        """Yields ``(P * K,) int64`` index arrays, identity-major."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order: list[int] = []
        for _ in range(self.batches_per_epoch):
            if len(order) < self.p:  # next pass over the identities, none repeated within a batch
                order += [i for i in rng.permutation(len(self.by_identity)).tolist() if i not in order]
            chosen, order = order[: self.p], order[self.p:]
            batch = [rng.choice(self.by_identity[i], self.k, replace=self.by_identity[i].size < self.k) for i in chosen]
            yield np.concatenate(batch)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of training chips (each applied per image).

    Attributes
    ----------
    flip : bool
        Horizontal flip with probability 0.5.
    min_crop : float
        A square crop of side ``u * S`` with ``u ~ U(min_crop, 1)`` at a random position, resized
        back to ``S`` (bilinear); 1.0 disables it.
    brightness, contrast, saturation : float
        Colour jitter factors drawn from ``U(1 - v, 1 + v)``; 0 disables each.
    """

    flip: bool = True
    min_crop: float = 0.9
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2


def augment(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Augment a batch of chips.

    Parameters
    ----------
    images : (B, S, S, 3) float32 tensor
        RGB 0..255 (the embedder's input convention).
    generator : torch.Generator
        Source of randomness (seeded by the training loop for reproducible runs).
    config : AugmentConfig

    Returns
    -------
    (B, S, S, 3) float32 tensor, RGB clipped to 0..255.
    """
    import torch
    import torch.nn.functional as F

    b = images.shape[0]
    x = images.permute(0, 3, 1, 2)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    if config.min_crop < 1.0:
        # Output pixel grid -> input: a crop of relative side u centred at a random offset.
        u = uniform(config.min_crop, 1.0)
        tx = (1 - u) * (2 * torch.rand(b, generator=generator) - 1)
        ty = (1 - u) * (2 * torch.rand(b, generator=generator) - 1)
        zero = torch.zeros(b)
        theta = torch.stack([torch.stack([u, zero, tx], 1), torch.stack([zero, u, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if config.flip:
        flip = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    grey_weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R BT.601 luma
    if config.brightness > 0:
        x = x * uniform(1 - config.brightness, 1 + config.brightness).view(b, 1, 1, 1)
    if config.contrast > 0:
        mean = (x * grey_weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = mean + (x - mean) * uniform(1 - config.contrast, 1 + config.contrast).view(b, 1, 1, 1)
    if config.saturation > 0:
        grey = (x * grey_weights).sum(1, keepdim=True)
        x = grey + (x - grey) * uniform(1 - config.saturation, 1 + config.saturation).view(b, 1, 1, 1)
    return x.clamp(0.0, 255.0).permute(0, 2, 3, 1).contiguous()
