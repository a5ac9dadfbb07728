"""Verification pairs in LFW's layout and the embedding of their images.

:func:`read_pairs` accepts two formats and tells them apart by the first line:

* LFW's own ``pairs.txt`` (Huang et al., LFW tech report 07-49, "View 2"): a first line
  ``<folds> <n>`` (``10 300``), then per fold ``n`` matched lines ``name n1 n2`` followed by ``n``
  mismatched lines ``name1 n1 name2 n2``, fields separated by tabs or spaces. Image ``n`` of
  ``name`` is ``<name>/<name>_<n:04d>.jpg``. A first line with one number (``pairsDevTrain.txt``,
  "View 1") is one fold of that many pairs per class.
* A TSV with the header ``fold name1 image1 name2 image2 same`` (``same`` is 1/0 or true/false),
  e.g. ``../shared/faces/lfw_protocol/pairs_dev.tsv``; the image is ``<name>/<image>``.

Folds are numbered from 1. Image paths are relative to the LFW image root, ``DIR/<name>/<image>``.
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

__all__ = ["Pairs", "read_pairs", "central_face", "embed_lfw_images", "PAIRS_FORMATS"]

LOG = logging.getLogger(__name__)

#: What ``read_pairs`` accepts, for help texts and error messages.
PAIRS_FORMATS = "LFW's pairs.txt (first line '<folds> <pairs per class>') or a TSV with the header 'fold name1 image1 name2 image2 same'"
TSV_COLUMNS = ("fold", "name1", "image1", "name2", "image2", "same")
_TRUE, _FALSE = ("1", "true", "True"), ("0", "false", "False")


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Verification pairs.

    Attributes
    ----------
    folds : (n,) int
        Fold of each pair, numbered from 1.
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
    """Parse a pairs file: LFW's ``pairs.txt`` or a TSV (see the module docstring), detected from
    the first non-blank line.

    Raises
    ------
    ValueError
        The file is in neither format, or a line does not fit it (the message names the line).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    header = next((line for line in lines if line.strip()), None)
    if header is None:
        raise ValueError(f"{path}: empty pairs file; expected {PAIRS_FORMATS}")
    if _is_lfw_header(header):
        return _read_lfw_pairs_txt(path, lines)
    return _read_pairs_tsv(path, lines)


def _is_lfw_header(line: str) -> bool:
    fields = line.split()
    return 1 <= len(fields) <= 2 and all(field.isdigit() for field in fields)


def _lfw_image(name: str, number: str) -> str:
    return f"{name}/{name}_{int(number):04d}.jpg"


def _read_lfw_pairs_txt(path: Path, lines: list[str]) -> Pairs:
    rows = [(number, line.split()) for number, line in enumerate(lines, start=1) if line.strip()]
    (_, header), body = rows[0], rows[1:]
    n_folds, per_class = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    expected = n_folds * 2 * per_class
    if len(body) != expected:
        raise ValueError(f"{path}: the first line announces {n_folds} fold(s) of {per_class} matched + {per_class} mismatched pairs = {expected} lines, got {len(body)}")
    folds, first, second, same, names = [], [], [], [], []
    for i, (number, fields) in enumerate(body):
        fold, matched = i // (2 * per_class) + 1, i % (2 * per_class) < per_class
        if matched and len(fields) == 3:
            (name1, n1, n2), name2 = fields, fields[0]
        elif not matched and len(fields) == 4:
            name1, n1, name2, n2 = fields
        else:
            n1 = n2 = ""
        if not (n1.isdigit() and n2.isdigit()):
            kind, shape = ("matched", "name n1 n2") if matched else ("mismatched", "name1 n1 name2 n2")
            raise ValueError(f"{path}:{number}: expected a {kind} pair '{shape}' of fold {fold}, got {' '.join(fields)!r}")
        folds.append(fold)
        first.append(_lfw_image(name1, n1))
        second.append(_lfw_image(name2, n2))
        same.append(matched)
        names.append((name1, name2))
    return Pairs(np.asarray(folds, dtype=np.int64), tuple(first), tuple(second), np.asarray(same, dtype=bool), tuple(names))


def _read_pairs_tsv(path: Path, lines: list[str]) -> Pairs:
    reader = csv.DictReader(lines, delimiter="\t")
    missing = [column for column in TSV_COLUMNS if column not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{path}: expected {PAIRS_FORMATS}; its header {reader.fieldnames} lacks {', '.join(missing)}")
    folds, first, second, same, names = [], [], [], [], []
    for row in reader:
        flag = (row["same"] or "").strip()
        fold = (row["fold"] or "").strip()
        if flag not in _TRUE + _FALSE or not fold.isdigit():
            raise ValueError(f"{path}:{reader.line_num}: expected an integer fold and same = 1/0/true/false, got fold {fold!r}, same {flag!r}")
        folds.append(int(fold))
        first.append(f"{row['name1']}/{row['image1']}")
        second.append(f"{row['name2']}/{row['image2']}")
        same.append(flag in _TRUE)
        names.append((row["name1"], row["name2"]))
    return Pairs(np.asarray(folds, dtype=np.int64), tuple(first), tuple(second), np.asarray(same, dtype=bool), tuple(names))


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
