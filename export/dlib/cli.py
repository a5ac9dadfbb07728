"""``facegallery export dlib``: convert dlib's pretrained models into a facegallery model directory."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["export"]


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
    from facegallery.export.dlib.convert import export_dlib
    from facegallery.export.dlib.default_model import default_model_dir

    out_dir = out_dir or default_model_dir()
    manifest = export_dlib(out_dir, source_dir=source_dir, overwrite=force)
    click.echo(f"wrote {manifest.name} to {out_dir} (model_id {manifest.model_id[:16]}…, threshold {manifest.threshold})")
