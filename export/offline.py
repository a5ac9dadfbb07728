"""What the offline commands share: the ``--model-dir`` and ``--flip-augment`` options and the pipeline they load.

The offline commands (``facegallery embed``, ``eval``, ``train``, ``calibrate``) run the face
pipeline in-process, no server. Without ``--model-dir`` they use the default model, converted on
first use.
"""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["model_dir_option", "flip_option", "load_pipeline"]

model_dir_option = click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model directory (model.json + files). Default: the dlib model, exported on first use.",
)

flip_option = click.option(
    "--flip-augment", is_flag=True, help="Average each face's embedding with its mirror image's (see PipelineConfig.flip_augment)."
)


def load_pipeline(model_dir: Path | None, upsample: int | None = None, flip_augment: bool = False):
    """The in-process face pipeline of ``model_dir`` (default model if None).

    ``upsample`` set: detect exactly like dlib at that many 2x upsamplings (``rescale=False``).
    Raises ModelError for a missing or corrupt model directory.
    """
    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.server.face.detect import DetectionConfig
    from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

    model_dir = model_dir or ensure_default_model()
    detection = DetectionConfig() if upsample is None else DetectionConfig(upsample=upsample, rescale=False)
    return FacePipeline.from_model_dir(model_dir, PipelineConfig(detection=detection, flip_augment=flip_augment))
