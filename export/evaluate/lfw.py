"""LFW-format verification pairs and the embedding of their images.

A pairs file is a TSV with a header and the columns ``fold name1 image1 name2 image2 same``
(``../shared/faces/lfw_protocol/pairs_dev.tsv``); images live at ``DIR/<name>/<image>``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facegallery.server.contract.errors import FaceGalleryError
from facegallery.server.contract.face import Face

__all__ = ["Pairs", "read_pairs", "central_face", "embed_lfw_images"]

LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Verification pairs.

    Attributes
    ----------
    folds : (n,) int
    first, second : tuple of n relative image paths ``<name>/<image>``
    same : (n,) bool
    names : tuple of n (name1, name2)
    """

    folds: np.ndarray
    first: tuple[str, ...]
    second: tuple[str, ...]
    same: np.ndarray
    names: tuple[tuple[str, str], ...]

    def __len__(self) -> int:
        return len(self.first)

    def image_paths(self) -> list[str]:
        """Unique relative paths of all images, sorted."""
        return sorted(set(self.first) | set(self.second))

    def subset(self, mask: np.ndarray) -> "Pairs":
        """The pairs where ``mask`` ((n,) bool) is true."""
        idx = np.flatnonzero(mask)
        return Pairs(
            self.folds[idx],
            tuple(self.first[i] for i in idx),
            tuple(self.second[i] for i in idx),
            self.same[idx],
            tuple(self.names[i] for i in idx),
        )

    def distances(self, embeddings: dict[str, np.ndarray | None]) -> tuple[np.ndarray, int]:
        """L2 distance of every pair, ``inf`` where an image had no face.

        Parameters
        ----------
        embeddings : dict
            Relative path -> ``(D,) float32`` embedding or None (no face).

        Returns
        -------
        distances : (n,) float64
        missing : int
            Number of pairs with at least one missing face.
        """
        out = np.full(len(self), np.inf)
        missing = 0
        for i, (a, b) in enumerate(zip(self.first, self.second)):
            ea, eb = embeddings.get(a), embeddings.get(b)
            if ea is None or eb is None:
                missing += 1
                continue
            out[i] = float(np.linalg.norm(ea.astype(np.float64) - eb.astype(np.float64)))
        return out, missing


def read_pairs(path: str | Path) -> Pairs:
    """Parse an LFW-format pairs TSV (header ``fold name1 image1 name2 image2 same``)."""
    folds, first, second, same, names = [], [], [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            folds.append(int(row["fold"]))
            first.append(f"{row['name1']}/{row['image1']}")
            second.append(f"{row['name2']}/{row['image2']}")
            same.append(row["same"].strip() in ("1", "true", "True"))
            names.append((row["name1"], row["name2"]))
    return Pairs(np.asarray(folds), tuple(first), tuple(second), np.asarray(same, dtype=bool), tuple(names))


def central_face(faces: list[Face], width: int, height: int) -> Face | None:
    """The face whose box centre is nearest the image centre (LFW images are centred on the
    labelled person), or None."""
    if not faces:
        return None
    cx, cy = (width - 1) / 2, (height - 1) / 2

    def offset(face: Face) -> float:
        left, top, right, bottom = face.box
        return float(((left + right) / 2 - cx) ** 2 + ((top + bottom) / 2 - cy) ** 2)

    return min(faces, key=offset)


def embed_lfw_images(pipeline, images_dir: str | Path, relative_paths: list[str], *, workers: int = 1, progress: bool = True) -> dict[str, np.ndarray | None]:
    """Embed the central face of each image.

    Parameters
    ----------
    pipeline : FacePipeline
    images_dir : path
        Root of ``<name>/<image>``.
    relative_paths : list of str
    workers : int
        Images processed concurrently (threads; onnxruntime and numpy release the GIL).

    Returns
    -------
    dict
        Relative path -> ``(D,) float32`` embedding, or None when no face was found or the image
        could not be read (logged).
    """
    from facegallery.server.face.decode import decode_image

    root = Path(images_dir)

    def one(rel: str) -> np.ndarray | None:
        try:
            rgb = decode_image((root / rel).read_bytes(), pipeline.config.decode_limits)
            face = central_face(pipeline.analyze(rgb), rgb.shape[1], rgb.shape[0])
        except (OSError, FaceGalleryError) as exc:
            LOG.warning("%s: %s", rel, exc)
            return None
        return None if face is None else face.embedding

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(one, relative_paths), total=len(relative_paths), desc="embedding", unit="img", disable=not progress))
    return dict(zip(relative_paths, results))
