"""Where the default model lives and how it appears on first start.

The server and the offline commands need a model directory
(:mod:`facegallery.server.contract.manifest`). Unless ``--model-dir`` names one, they use the
default model under the user's data directory, converting dlib's files from the installed
``face_recognition_models`` package the first time (no download). A lock file makes concurrent
first starts convert once. The server never imports this module: ``facegallery serve`` is handed
:func:`ensure_default_model` by the CLI (client/cli.py).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from facegallery.server.contract.manifest import MANIFEST_NAME, ModelManifest
from facegallery.server.contract.paths import user_data_dir

__all__ = ["DEFAULT_MODEL_NAME", "default_model_dir", "ensure_default_model"]

LOG = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "dlib_resnet_v1"
#: Overrides the default model location (for tests and containers).
MODEL_DIR_ENV = "FACEGALLERY_MODEL_DIR"


def default_model_dir() -> Path:
    """``$FACEGALLERY_MODEL_DIR``, else ``<user data dir>/facegallery/models/dlib_resnet_v1``."""
    env = os.environ.get(MODEL_DIR_ENV)
    if env:
        return Path(env)
    return user_data_dir() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model(model_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory holding the default dlib model, converting it on first use.

    Parameters
    ----------
    model_dir : path, optional
        Where the default model is (or is to be) kept; default :func:`default_model_dir`.

    Raises
    ------
    facegallery.server.contract.errors.ModelError
        ``face_recognition_models`` is not installed, or the existing ``model.json`` is missing
        required entries or malformed. The files' checksums are not read here: loading the
        pipeline (``FacePipeline.from_model_dir``) verifies them.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if (model_dir / MANIFEST_NAME).is_file():
        return model_dir
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = model_dir.parent / f".{model_dir.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (model_dir / MANIFEST_NAME).is_file():
            from facegallery.export.dlib.convert import export_dlib  # conversion code is only needed once

            LOG.info("no model at %s: converting dlib's models (a few seconds, once)", model_dir)
            export_dlib(model_dir, overwrite=True)
    ModelManifest.load(model_dir, verify=False)
    return model_dir
