"""Result types of the face pipeline (decode -> detect -> align -> embed)."""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

__all__ = ["ImageKind", "Face"]


class ImageKind(enum.Enum):
    """What an input image contains, i.e. which pipeline stages run (proto ``ImageKind``)."""

    PHOTO = "photo"  # detect every face, then landmarks, chip, embedding
    FACE_CROP = "face_crop"  # already cropped: no detection, landmarks inside the whole image
    ALIGNED_CHIP = "aligned_chip"  # already an aligned chip of the model's chip size: embed as is


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
    """One face found in an image, in pixels of the decoded image after EXIF orientation.

    Attributes
    ----------
    box : (4,) float32
        left, top, right, bottom (inclusive, dlib rectangle convention), pixels.
    landmarks : (5, 2) float32
        x, y of dlib's 5 points (0-1 one eye's outer/inner corner, 2-3 the other eye's, 4 nose base).
    score : float
        Detector confidence (raw MMOD score, ~0..1.2); 0.0 when detection was skipped.
    embedding : (D,) float32
        The model's embedding of the aligned face chip (D = 128 for the default model).
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    embedding: np.ndarray

    @property
    def area(self) -> float:
        """Box area in square pixels (inclusive rectangle)."""
        left, top, right, bottom = (float(v) for v in self.box)
        return max(0.0, right - left + 1) * max(0.0, bottom - top + 1)
