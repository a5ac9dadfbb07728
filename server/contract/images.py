"""Which files count as images: the suffixes every folder scan of the project picks up.

``facegallery import`` (client/cli.py), the training and calibration data scans
(export/train/data.py) and any other walk over a folder of photos use :data:`IMAGE_SUFFIXES`, so
a file enrolled by one is trained on by the other. The set is what the decode stage
(``facegallery.server.face.decode``, Pillow) reads: JPEG, PNG, WebP, BMP, TIFF, GIF (first frame)
and the Netpbm greyscale / colour formats PGM and PPM (the ORL face database ships as PGM).
"""

from __future__ import annotations

import os

__all__ = ["IMAGE_SUFFIXES", "has_image_suffix"]

#: Lower-case file name suffixes of image files; compare with ``path.suffix.lower()``.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"})


def has_image_suffix(path: str | os.PathLike) -> bool:
    """Whether ``path``'s suffix, case-insensitively, is one of :data:`IMAGE_SUFFIXES`."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_SUFFIXES
