"""A deterministic stand-in for the face pipeline, for gallery and server tests without a model.

Synthetic "photos" are PNG strips of 32x32 tiles; every non-black tile is a face. A tile's colour
decides its embedding: red and green pick the *person* (a random unit vector seeded by them),
blue a small variation of that person's face (an offset of L2 length 0.2 * blue / 255), so two
photos of one person are within the 0.6 threshold and two people are about sqrt(2) apart.
Decoding goes through Pillow, so random bytes fail as they would in the real pipeline.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from facegallery.server.contract.errors import ImageDecodeError, ImageTooLargeError
from facegallery.server.contract.face import Face, ImageKind
from facegallery.server.contract.manifest import ChipSpec, ModelFile, ModelManifest

TILE = 32
DIM = 128
THRESHOLD = 0.6
#: dlib's 5-point template (unit chip coordinates) is not needed by the fake; any 5 points do.
_TEMPLATE = ((0.2, 0.3), (0.4, 0.3), (0.8, 0.3), (0.6, 0.3), (0.5, 0.7))


def fake_manifest(model_tag: str = "fake-a") -> ModelManifest:
    """A manifest whose ``model_id`` depends on ``model_tag`` (so two tags are two models)."""
    digest = hashlib.sha256(model_tag.encode()).hexdigest()
    return ModelManifest(
        name=model_tag,
        version="1",
        embedding_dim=DIM,
        metric="euclidean",
        threshold=THRESHOLD,
        chip=ChipSpec(150, 0.25, _TEMPLATE),
        files={key: ModelFile(f"{key}.onnx", digest) for key in ("embedder", "detector", "landmarks")},
    )


def person_embedding(red: int, green: int, blue: int = 0) -> np.ndarray:
    """The ``(DIM,) float32`` embedding the fake gives a tile of this colour."""
    person = np.random.default_rng([red, green]).standard_normal(DIM)
    person /= np.linalg.norm(person)
    offset = np.random.default_rng([red, green, blue, 7]).standard_normal(DIM)
    offset *= 0.2 * blue / 255 / np.linalg.norm(offset)
    return (person + offset).astype(np.float32)


def photo(*colors: tuple[int, int, int]) -> bytes:
    """PNG bytes of a strip of tiles, one per colour; (0, 0, 0) is a tile without a face."""
    pixels = np.zeros((TILE, TILE * max(1, len(colors)), 3), np.uint8)
    for i, color in enumerate(colors):
        pixels[:, i * TILE : (i + 1) * TILE] = color
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


class FakePipeline:
    """The ``FacePipeline`` surface (manifest, model_id, analyze, probability_same) over synthetic photos.

    ``max_image_bytes`` mimics the pipeline's byte limit (ImageTooLargeError); ``with_head``
    adds a probability_same of ``exp(-distance)``.
    """

    def __init__(self, model_tag: str = "fake-a", *, max_image_bytes: int = 1 << 20, with_head: bool = False) -> None:
        self.manifest = fake_manifest(model_tag)
        self.max_image_bytes = max_image_bytes
        self.with_head = with_head
        self.calls = 0

    @property
    def model_id(self) -> str:
        """The embedding space, as ``FacePipeline.model_id`` (no flip augmentation)."""
        return self.manifest.model_id

    def analyze(self, image: bytes, *, kind: ImageKind = ImageKind.PHOTO, max_faces: int = 0) -> list[Face]:
        self.calls += 1
        if len(image) > self.max_image_bytes:
            raise ImageTooLargeError(f"image has {len(image)} bytes, the limit is {self.max_image_bytes}")
        try:
            pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageDecodeError(f"cannot decode the image: {exc}") from exc
        faces = []
        for i in range(pixels.shape[1] // TILE):
            color = tuple(int(c) for c in pixels[TILE // 2, i * TILE + TILE // 2])
            if color == (0, 0, 0):
                continue
            left = float(i * TILE)
            box = np.array([left, 0, left + TILE - 1, TILE - 1], np.float32)
            landmarks = (np.array(_TEMPLATE, np.float32) * TILE + [left, 0]).astype(np.float32)
            faces.append(Face(box=box, landmarks=landmarks, score=1.0, embedding=person_embedding(*color)))
        return faces[:max_faces] if max_faces else faces

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
        if not self.with_head:
            return None
        return np.exp(-np.linalg.norm(a - b, axis=1)).astype(np.float32)


class ExplodingPipeline(FakePipeline):
    """Fails with a programming error (not a FaceGalleryError) on one particular image, ``b"explode"``."""

    def analyze(self, image, **kwargs):
        if image == b"explode":
            raise ZeroDivisionError("boom")
        return super().analyze(image, **kwargs)
