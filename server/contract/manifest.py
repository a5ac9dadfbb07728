"""The model directory contract: ``model.json`` and the files it names.

A model directory holds the ONNX graphs and numpy arrays the pipeline runs, plus ``model.json``,
the explicit metadata record the server reads instead of guessing anything from graph shapes
(torchvision ``Weights.meta`` style). Both the dlib conversion (``facegallery export dlib``) and
training (``facegallery train``) write this same record, so ``facegallery serve --model-dir DIR``
serves either.

``model.json`` (format ``facegallery-model/1``)::

    {
      "format": "facegallery-model/1",
      "name": "dlib_face_recognition_resnet_model_v1", "version": "1",
      "embedding_dim": 128,
      "metric": "euclidean",            # distances are plain L2 between embeddings
      "threshold": 0.6,                 # same person when distance <= threshold
      "chip": {"size": 150, "padding": 0.25,
               "template": [[x, y] x 5]},   # 5-point template in unit chip coordinates
      "embedder_input": {"name": "image", "layout": "NHWC", "color": "RGB",
                         "range": [0, 255], "dtype": "float32"},
      "files": {"embedder": {"path": "embedder.onnx", "sha256": "..."},
                "detector": {...}, "landmarks": {...}, "head": {...}},   # head optional
      "sources": {"dlib_face_recognition_resnet_model_v1.dat": "<sha256>", ...},
      "detector": {...},                # MMOD decoding parameters (window, stride, NMS), see facegallery.server.face.detect
      "head": {"kind": "abs_diff" | "chi2"}                          # only with files.head
      "calibration": {...},                                          # optional, free-form
      "false_match": {"distances": [...], "rates": [...],            # optional: per-comparison false-match
                      "pairs": n, "data": "..."}                     # rate F1(d) of different people (calibrate)
    }

The embedder maps ``image`` ``(N, size, size, 3) float32`` RGB 0..255 to ``embedding``
``(N, embedding_dim) float32``; normalisation is inside the graph.

Model identity: embeddings are comparable only when everything that maps a face to its
embedding is the same, so a gallery records :meth:`ModelManifest.embedding_id` (its
``model_id``), a sha256 over the embedder file's hash, ``embedding_dim``, ``metric``, the chip
spec, ``embedder_input`` and the pipeline's test-time flip augmentation. ``files.embedder.sha256``
stays the hash of the embedder file alone; galleries created before the embedding id recorded
that as their ``model_id`` (the gallery engine migrates them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from facegallery.server.contract.errors import ModelError
from facegallery.server.contract.files import write_text_atomic

__all__ = ["MANIFEST_NAME", "FORMAT", "EMBEDDING_ID_FORMAT", "ChipSpec", "ModelFile", "ModelManifest", "sha256_file"]

MANIFEST_NAME = "model.json"
FORMAT = "facegallery-model/1"
#: Tag hashed into every embedding id: change it (``/2``) if the hashed record's layout changes.
EMBEDDING_ID_FORMAT = "facegallery-embedding-id/1"
REQUIRED_FILES = ("embedder", "detector", "landmarks")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Geometry of the aligned face chip the embedder takes.

    ``size`` is the chip side in pixels; ``padding`` the fraction of the template box added on
    each side (dlib ``get_face_chip_details`` convention: chip point = (padding + p) /
    (2 * padding + 1) * size); ``template`` the 5 landmark positions ``(5, 2)`` in unit coordinates
    (dlib ``get_face_chip_details``, interpolation.h l.2062-2153).
    """

    size: int
    padding: float
    template: tuple[tuple[float, float], ...]


@dataclasses.dataclass(frozen=True)
class ModelFile:
    path: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class ModelManifest:
    """The parsed ``model.json`` of a model directory (see the module docstring)."""

    name: str
    version: str
    embedding_dim: int
    metric: str
    threshold: float
    chip: ChipSpec
    files: dict[str, ModelFile]
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    embedder_input: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"name": "image", "layout": "NHWC", "color": "RGB", "range": [0, 255], "dtype": "float32"}
    )
    detector: dict[str, Any] | None = None
    head: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    false_match: dict[str, Any] | None = None

    @property
    def model_id(self) -> str:
        """The embedding id of this model without flip augmentation: ``embedding_id(False)``.

        Covers the embedder file's sha256, ``embedding_dim``, ``metric``, the chip spec and
        ``embedder_input``; a server's id is its pipeline's (``FacePipeline.model_id``), which
        also covers the pipeline's flip augmentation. Galleries record it.
        """
        return self.embedding_id(False)

    def embedding_id(self, flip_augment: bool = False) -> str:
        """Identity of the embedding space: 64 hex digits of sha256 over everything that changes
        the embedding a face gets.

        Hashed, as canonical JSON (sorted keys, no whitespace): the embedder file's sha256,
        ``embedding_dim``, ``metric``, the chip spec (``size``, ``padding``, ``template``),
        ``embedder_input`` and ``flip_augment``. Not hashed: ``name``, ``version``,
        ``threshold`` (a decision setting, stored per gallery), the detector and landmark models
        (they choose the face and its landmarks, not the chip-to-embedding mapping), the head,
        ``sources``, ``calibration`` and ``false_match``.

        Parameters
        ----------
        flip_augment : bool
            The pipeline's test-time flip augmentation (``PipelineConfig.flip_augment``): the
            mean of a chip's and its mirror image's embeddings is a different embedding.

        Returns
        -------
        str
            64 lowercase hex digits; equal manifests give equal ids on every machine and run.
        """
        record = {
            "format": EMBEDDING_ID_FORMAT,
            "embedder_sha256": self.files["embedder"].sha256,
            "embedding_dim": int(self.embedding_dim),
            "metric": self.metric,
            "chip": {
                "size": int(self.chip.size),
                "padding": float(self.chip.padding),
                "template": [[float(x), float(y)] for x, y in self.chip.template],
            },
            "embedder_input": self.embedder_input,
            "flip_augment": bool(flip_augment),
        }
        canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()

    def path_of(self, directory: str | os.PathLike, key: str) -> Path:
        return Path(directory) / self.files[key].path

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT}
        out.update(dataclasses.asdict(self))
        out["chip"]["template"] = [list(p) for p in self.chip.template]
        for key in ("detector", "head", "calibration", "false_match"):
            if out[key] is None:
                del out[key]
        return out

    def write(self, directory: str | os.PathLike) -> Path:
        """Write ``model.json`` into ``directory`` atomically and durably (files.py); returns its path."""
        return write_text_atomic(Path(directory) / MANIFEST_NAME, json.dumps(self.to_json(), indent=2) + "\n")

    def with_updates(self, **changes: Any) -> "ModelManifest":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelManifest":
        if data.get("format") != FORMAT:
            raise ModelError(f"unsupported model.json format {data.get('format')!r} (expected {FORMAT!r})")
        try:
            chip = data["chip"]
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                embedding_dim=int(data["embedding_dim"]),
                metric=str(data["metric"]),
                threshold=float(data["threshold"]),
                chip=ChipSpec(int(chip["size"]), float(chip["padding"]), tuple(tuple(map(float, p)) for p in chip["template"])),
                files={k: ModelFile(str(v["path"]), str(v["sha256"])) for k, v in data["files"].items()},
                sources=dict(data.get("sources", {})),
                embedder_input=dict(data.get("embedder_input") or cls.__dataclass_fields__["embedder_input"].default_factory()),
                detector=data.get("detector"),
                head=data.get("head"),
                calibration=data.get("calibration"),
                false_match=data.get("false_match"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"malformed model.json: {exc!r}") from exc

    @classmethod
    def load(cls, directory: str | os.PathLike, *, verify: bool = True) -> "ModelManifest":
        """Read ``DIR/model.json``; with ``verify`` check every file exists and matches its sha256.

        Raises
        ------
        ModelError
            The manifest is missing or malformed, a required file is absent, or a checksum differs.
        """
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"no {MANIFEST_NAME} in model directory {directory}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(f"{path} is not valid JSON: {exc}") from exc
        manifest = cls.from_json(data)
        missing = [k for k in REQUIRED_FILES if k not in manifest.files]
        if missing:
            raise ModelError(f"{path} names no {', '.join(missing)} file")
        if manifest.head is not None and "head" not in manifest.files:
            raise ModelError(f"{path} describes a head but names no head file")
        if verify:
            for key, entry in manifest.files.items():
                file_path = Path(directory) / entry.path
                if not file_path.is_file():
                    raise ModelError(f"model file {file_path} ({key}) is missing")
                digest = sha256_file(file_path)
                if digest != entry.sha256:
                    raise ModelError(f"model file {file_path} ({key}) has sha256 {digest}, manifest says {entry.sha256}")
        return manifest
