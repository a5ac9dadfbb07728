"""Throughput of the face embedder: onnxruntime (facegallery Embedder) vs dlib, images per second.

Usage::

    python bench/embed.py                      # converts dlib's ResNet into a temp dir first
    python bench/embed.py --model-dir DIR      # a model directory with model.json
    python bench/embed.py --onnx embedder.onnx --chip-size 150 --embedding-dim 128

For each intra-op thread count and batch size: warm-up, then ``--repeats`` timed passes over
``--images`` chips; prints img/s as mean ± std over the passes and ms per image. When ``import
dlib`` works (and the chips are 150×150), the same chips go through
``dlib.face_recognition_model_v1.compute_face_descriptor`` and the table adds the ORT/dlib ratio
and the max abs difference between the two descriptors. Chips are the golden dlib chips from
``../shared/golden_dlib/chips`` when present (resized to the model's chip size if it differs),
otherwise seeded random uint8.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np
import onnxruntime as ort
from PIL import Image

from facegallery.export.dlib.convert import DLIB_SOURCES, find_dlib_models
from facegallery.export.dlib.resnet import convert_resnet
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.embed import Embedder

CHIPS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden_dlib" / "chips"
RESNET_DAT = DLIB_SOURCES["embedder"]


def load_chips(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``count`` RGB chips ``(count, size, size, 3) uint8`` and a description of their source."""
    paths = sorted(CHIPS_DIR.glob("*.png"))[:count] if CHIPS_DIR.is_dir() else []
    if len(paths) == count:
        images = [Image.open(p).convert("RGB") for p in paths]
        if images[0].size != (size, size):
            images = [im.resize((size, size), Image.Resampling.BILINEAR) for im in images]
        return np.stack([np.asarray(im) for im in images]), f"{count} golden dlib chips from {CHIPS_DIR}"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), f"{count} random uint8 chips (seed {seed})"


def time_passes(run_batch: Callable[[np.ndarray], object], chips: np.ndarray, batch: int, repeats: int, warmup: int) -> list[float]:
    """Images per second of each of ``repeats`` passes over ``chips`` in batches of ``batch``."""
    for _ in range(warmup):
        run_batch(chips[:batch])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(chips), batch):
            run_batch(chips[i : i + batch])
        rates.append(len(chips) / (time.perf_counter() - start))
    return rates


def _fmt(rates: list[float]) -> str:
    mean = statistics.fmean(rates)
    std = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return f"{mean:8.1f} ± {std:5.1f} img/s  {1000.0 / mean:7.2f} ms/img"


def _embedder_factory(model_dir: Path | None, onnx_path: Path | None, chip_size: int, embedding_dim: int, tmp: Path):
    if model_dir is not None:
        manifest = ModelManifest.load(model_dir)
        return (lambda threads: Embedder.from_manifest(model_dir, manifest, intra_op_threads=threads)), manifest.chip.size
    if onnx_path is None:
        onnx_path = tmp / "embedder.onnx"
        info = convert_resnet(find_dlib_models() / RESNET_DAT, onnx_path)
        chip_size, embedding_dim = info["chip_size"], info["embedding_dim"]
        click.echo(f"converted {RESNET_DAT} -> {onnx_path} ({onnx_path.stat().st_size:,} bytes)")
    return (
        lambda threads: Embedder(onnx_path, chip_size=chip_size, embedding_dim=embedding_dim, intra_op_threads=threads)
    ), chip_size


def _dlib_model():
    try:
        import dlib  # optional: the reference implementation
    except ImportError:
        return None
    return dlib.face_recognition_model_v1(str(find_dlib_models() / RESNET_DAT))


def _dlib_batch(model) -> Callable[[np.ndarray], np.ndarray]:
    def run(chips: np.ndarray) -> np.ndarray:
        if len(chips) == 1:
            return np.asarray(model.compute_face_descriptor(chips[0]), dtype=np.float32)[None]
        # The list overload embeds a batch of already aligned chips in one net call.
        return np.array([np.asarray(d) for d in model.compute_face_descriptor(list(chips))], dtype=np.float32)

    return run


@click.command()
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="Model directory with model.json.")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="An embedder .onnx file.")
@click.option("--chip-size", default=150, show_default=True, help="Chip side in pixels (with --onnx).")
@click.option("--embedding-dim", default=128, show_default=True, help="Embedding length (with --onnx).")
@click.option("--batches", default="1,8,32", show_default=True, help="Comma-separated batch sizes.")
@click.option("--threads", default="1,2", show_default=True, help="Comma-separated onnxruntime intra-op thread counts.")
@click.option("--images", default=64, show_default=True, help="Chips per timed pass.")
@click.option("--repeats", default=5, show_default=True, help="Timed passes per configuration.")
@click.option("--warmup", default=2, show_default=True, help="Untimed batches before each configuration.")
@click.option("--no-dlib", is_flag=True, help="Skip the dlib reference even if dlib is importable.")
def main(
    model_dir: Path | None,
    onnx_path: Path | None,
    chip_size: int,
    embedding_dim: int,
    batches: str,
    threads: str,
    images: int,
    repeats: int,
    warmup: int,
    no_dlib: bool,
) -> None:
    """Print onnxruntime (and dlib) face-embedding throughput per batch size and thread count."""
    if model_dir is not None and onnx_path is not None:
        raise click.UsageError("pass --model-dir or --onnx, not both")
    batch_sizes = [int(b) for b in batches.split(",")]
    thread_counts = [int(t) for t in threads.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        make_embedder, size = _embedder_factory(model_dir, onnx_path, chip_size, embedding_dim, Path(tmp))
        chips, source = load_chips(images, size)
        click.echo(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
        click.echo(f"chips: {source}; {repeats} passes of {images} images per row, {warmup} warm-up batches")

        ort_rates: dict[tuple[int, int], list[float]] = {}
        reference = None
        for t in thread_counts:
            embedder = make_embedder(t)
            if t == thread_counts[0]:
                click.echo(repr(embedder))
                reference = embedder.embed(chips)
            for b in batch_sizes:
                ort_rates[t, b] = rates = time_passes(embedder.embed, chips, b, repeats, warmup)
                click.echo(f"ort   intra_op={t}  batch {b:3d}  {_fmt(rates)}")

        model = None if no_dlib or size != 150 else _dlib_model()
        if model is None:
            click.echo("dlib: not measured (" + ("--no-dlib" if no_dlib else "not importable or chip size is not 150") + ")")
            return
        run = _dlib_batch(model)
        diff = float(np.abs(run(chips) - reference).max())
        click.echo(f"dlib descriptors vs ORT: max abs diff {diff:.2e}")
        for b in batch_sizes:
            rates = time_passes(run, chips, b, repeats, warmup)
            dlib_mean = statistics.fmean(rates)
            ratios = "  ".join(f"ORT{t}/dlib {statistics.fmean(ort_rates[t, b]) / dlib_mean:5.1f}x" for t in thread_counts)
            click.echo(f"dlib               batch {b:3d}  {_fmt(rates)}  {ratios}")


if __name__ == "__main__":
    main()
