"""``facegallery serve``: the click command that runs the gRPC server.

The client CLI's main group (client/cli.py) adds this command; the server modules are imported
only when the command runs, so the client commands start fast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

__all__ = ["serve"]

_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


@click.command("serve")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Store and index directory  [default: the user data dir, e.g. ~/.local/share/facegallery]",
)
@click.option(
    "--host",
    default="localhost",
    show_default=True,
    help="Address to listen on. The API has no authentication: use 0.0.0.0 or [::] only on a trusted network.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True, help="Port to listen on (0 picks a free one, logged at start).")
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Model directory with model.json  [default: the dlib model, exported on first start (~30 s)]",
)
@click.option("--log-level", type=click.Choice(_LOG_LEVELS, case_sensitive=False), default="INFO", show_default=True)
@click.option("--max-workers", type=click.IntRange(1), default=16, show_default=True, help="Calls served at once (gRPC threads).")
@click.option(
    "--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Most face chips per batch across concurrent calls (1 = no batching)."
)
@click.option(
    "--batch-delay-ms", type=click.FloatRange(0), default=5.0, show_default=True, help="Longest wait for more chips before a batch runs (milliseconds)."
)
@click.option("--min-face-size", type=click.IntRange(8), default=None, help="Smallest face to find, pixels  [default: 40]")
@click.option("--max-detect-pixels", type=click.IntRange(10_000), default=None, help="Largest image area the detector runs on; bigger photos are detected on a downscaled copy  [default: 1250000]")
@click.option("--max-image-bytes", type=click.IntRange(1), default=None, help="Larger images are refused with RESOURCE_EXHAUSTED  [default: 64 MiB]")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None, help="Images with more pixels are refused with RESOURCE_EXHAUSTED  [default: 120 MP]")
@click.option("--flip-augment", is_flag=True, help="Embed each face chip and its mirror image and average (better accuracy, 2x embedding cost; embeddings then differ from dlib's).")
@click.option("--intra-op-threads", type=click.IntRange(0), default=0, show_default=True, help="onnxruntime threads per model (0 = one per core).")
@click.option("--search-threads", type=click.IntRange(1), default=1, show_default=True, help="faiss threads per search.")
@click.option("--snapshot-interval", type=click.FloatRange(0, min_open=True), default=300.0, show_default=True, help="Seconds between index snapshots.")
@click.option("--grace", type=click.FloatRange(0), default=10.0, show_default=True, help="Seconds in-flight calls get to finish on SIGTERM/SIGINT.")
def serve(
    data_dir: Path | None,
    host: str,
    port: int,
    model_dir: Path | None,
    log_level: str,
    max_workers: int,
    batch_size: int,
    batch_delay_ms: float,
    min_face_size: int | None,
    max_detect_pixels: int | None,
    max_image_bytes: int | None,
    max_image_pixels: int | None,
    flip_augment: bool,
    intra_op_threads: int,
    search_threads: int,
    snapshot_interval: float,
    grace: float,
) -> None:
    """Run the face gallery gRPC server until SIGTERM or Ctrl-C.

    Enrolled templates are stored in DATA_DIR/gallery.sqlite3 (an acknowledged enrollment
    survives a crash); the search indexes are rebuilt or reloaded from DATA_DIR/index at start.
    """
    from .app import ServerConfig, default_data_dir
    from .app import serve as run
    from .detect import DetectionConfig
    from .pipeline import PipelineConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    detection = {k: v for k, v in (("min_face_size", min_face_size), ("max_detect_pixels", max_detect_pixels)) if v is not None}
    limits = {k: v for k, v in (("max_image_bytes", max_image_bytes), ("max_image_pixels", max_image_pixels)) if v is not None}
    config = ServerConfig(
        data_dir=data_dir if data_dir is not None else default_data_dir(),
        host=host,
        port=port,
        model_dir=model_dir,
        max_workers=max_workers,
        batch_max_size=batch_size,
        batch_max_delay_ms=batch_delay_ms,
        search_threads=search_threads,
        pipeline=PipelineConfig(intra_op_threads=intra_op_threads, flip_augment=flip_augment, detection=DetectionConfig(**detection), **limits),
        snapshot_interval_s=snapshot_interval,
        grace_s=grace,
    )
    run(config)
