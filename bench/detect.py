"""Face detector cost by image size: ms per image under the default scale policy and dlib-exact.

Usage::

    python bench/detect.py                     # converts dlib's MMOD detector into a temp dir first
    python bench/detect.py --model-dir DIR     # a model directory with model.json
    python bench/detect.py --threads 2 --repeats 5

A real photo from ``../shared/faces`` is resized (Pillow bilinear) to 640×480, 1280×960 and
4000×3000. Each size runs with ``DetectionConfig()`` (the default rescaling policy) and with
``DetectionConfig(rescale=False)`` (dlib's ``cnn_face_detection_model_v1(img, 0)``; the
4000×3000 exact run is timed once, it takes tens of seconds and ~2 GB). Prints the median ms per
image, the faces found, the size the detector ran at, and the ratio 4000×3000 / 1280×960.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from facegallery.export.dlib.convert import DLIB_SOURCES, find_dlib_models
from facegallery.export.dlib.mmod import convert_mmod
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.detect import DetectionConfig, FaceDetector, plan_scale

FACES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "faces"
PHOTO = FACES_DIR / "face_recognition" / "steve_wozniak" / "steve_wozniak1.jpg"
SIZES = ((640, 480), (1280, 960), (4000, 3000))


def time_ms(detector: FaceDetector, rgb: np.ndarray, config: DetectionConfig, repeats: int) -> tuple[float, int]:
    """Median wall-clock ms of ``repeats`` detections and the number of faces found."""
    times, found = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        found = len(detector.detect(rgb, config))
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), found


@click.command()
@click.option(
    "--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Model directory (model.json)."
)
@click.option("--photo", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=PHOTO, show_default=True)
@click.option("--threads", default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--repeats", default=3, show_default=True, help="Timed runs per size and config.")
def main(model_dir: Path | None, photo: Path, threads: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if model_dir is None:
            onnx_path = Path(tmp) / "detector.onnx"
            params = convert_mmod(find_dlib_models() / DLIB_SOURCES["detector"], onnx_path)
            detector = FaceDetector(onnx_path, params, intra_op_threads=threads)
        else:
            detector = FaceDetector.from_manifest(model_dir, ModelManifest.load(model_dir), intra_op_threads=threads)
        with Image.open(photo) as im:
            source = im.convert("RGB")
        images = {size: np.asarray(source.resize(size, Image.Resampling.BILINEAR)) for size in SIZES}
        detector.detect(images[SIZES[0]], DetectionConfig(rescale=False))  # warm-up
        width, height = source.size
        click.echo(f"photo {photo.name} {width}x{height}, intra_op_threads={threads}, median of {repeats}")
        click.echo(f"{'image':>10} {'config':>14} {'runs at':>18} {'ms/image':>9} {'faces':>5}")
        ms: dict[tuple[tuple[int, int], str], float] = {}
        for name, config in (("default", DetectionConfig()), ("rescale=False", DetectionConfig(rescale=False))):
            for size in SIZES:
                rgb = images[size]
                plan = plan_scale(rgb.shape[0], rgb.shape[1], config)
                runs = 1 if name != "default" and size == SIZES[-1] else repeats
                ms[size, name], faces = time_ms(detector, rgb, config, runs)
                runs_at = f"{plan.size[1]}x{plan.size[0]} x2^{plan.upsample}"
                click.echo(f"{size[0]:>5}x{size[1]:<4} {name:>14} {runs_at:>18} {ms[size, name]:>9.0f} {faces:>5}")
        for name in ("default", "rescale=False"):
            ratio = ms[SIZES[2], name] / ms[SIZES[1], name]
            click.echo(f"ratio 4000x3000 / 1280x960 ({name}): {ratio:.2f}")


if __name__ == "__main__":
    main()
