"""``facegallery embed``: every face of each image with its box, landmarks, score and embedding."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from facegallery.export.offline import flip_option, load_pipeline, model_dir_option

__all__ = ["embed"]

IMAGE_KINDS = {"photo": "PHOTO", "crop": "FACE_CROP", "chip": "ALIGNED_CHIP"}


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image and line.")
@click.option("--upsample", type=click.IntRange(0, 4), default=None,
              help="Detect like dlib at exactly N 2x upsamplings (off: the scale is chosen from the image size).")
@click.option("--kind", type=click.Choice(sorted(IMAGE_KINDS)), default="photo", show_default=True,
              help="photo: detect faces; crop: the image is one cropped face; chip: an aligned face chip.")
@flip_option
@model_dir_option
def embed(images: tuple[Path, ...], as_json: bool, upsample: int | None, kind: str, flip_augment: bool, model_dir: Path | None) -> None:
    """Detect, align and embed every face of each IMAGE.

    With --json each line is {"image": path, "faces": [{"box": [left, top, right, bottom],
    "score": s, "landmarks": [[x, y] x5], "embedding": [D floats]}]}, boxes and points in pixels
    of the image after EXIF orientation.
    """
    from facegallery.server.contract.errors import FaceGalleryError
    from facegallery.server.contract.face import ImageKind

    pipeline = load_pipeline(model_dir, upsample, flip_augment)
    failed = 0
    for path in images:
        try:
            faces = pipeline.analyze(path.read_bytes(), kind=ImageKind[IMAGE_KINDS[kind]])
        except FaceGalleryError as exc:
            failed += 1
            record = {"image": str(path), "error": str(exc)}
            click.echo(json.dumps(record) if as_json else f"{path}: error: {exc}", err=not as_json)
            continue
        if as_json:
            click.echo(json.dumps({"image": str(path), "faces": [_face_record(f) for f in faces]}))
        else:
            click.echo(f"{path}: {len(faces)} face(s)")
            for i, face in enumerate(faces):
                box = ", ".join(f"{v:.0f}" for v in face.box)
                click.echo(f"  [{i}] box=({box}) score={face.score:.3f} |embedding|={np.linalg.norm(face.embedding):.3f}")
    if failed:
        sys.exit(1)


def _face_record(face) -> dict:
    return {
        "box": [round(float(v), 2) for v in face.box],
        "score": round(float(face.score), 6),
        "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.landmarks],
        "embedding": [float(v) for v in face.embedding],
    }
