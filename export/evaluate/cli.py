"""``facegallery eval``: measure a model's accuracy on a benchmark protocol (``eval lfw``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from facegallery.export.offline import flip_option, load_pipeline, model_dir_option

__all__ = ["eval_group"]


@click.group("eval")
def eval_group() -> None:
    """Measure a model's accuracy on a benchmark protocol."""


@eval_group.command("lfw")
@click.option("--pairs", "pairs_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pairs file, format detected: LFW's own pairs.txt (first line '10 300': folds and pairs per class; "
                   "images DIR/<name>/<name>_<n:04d>.jpg) or a TSV with the header 'fold name1 image1 name2 image2 same'.")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="LFW image root: DIR/<name>/<image>.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the ROC curve to this PNG.")
@click.option("--far", type=float, default=1e-3, show_default=True, help="Target FAR for the TAR@FAR figure.")
@click.option("--workers", type=int, default=os.cpu_count() or 1, show_default=True, help="Images embedded in parallel.")
@flip_option
@model_dir_option
def eval_lfw(pairs_file: Path, images_dir: Path, as_json: bool, plot: Path | None, far: float, workers: int, flip_augment: bool, model_dir: Path | None) -> None:
    """LFW verification accuracy over the pairs file's folds (10 for pairs.txt), threshold and TAR@FAR.

    The threshold of each fold is chosen on the other folds. Each image's face is the one nearest
    the image centre (LFW's convention); a pair with a missing face counts as decided "different".
    """
    from facegallery.export.evaluate.lfw import embed_lfw_images, read_pairs
    from facegallery.export.evaluate.metrics import tar_at_far, verification_10fold

    if plot is not None:
        from facegallery.export.evaluate.plots import require_matplotlib

        try:
            require_matplotlib()
        except RuntimeError as exc:
            raise click.UsageError(f"--plot: {exc}") from exc
    try:
        pairs = read_pairs(pairs_file)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--pairs") from exc
    n_folds = len(np.unique(pairs.folds))
    if n_folds < 2:
        raise click.BadParameter(f"{pairs_file} has {n_folds} fold(s); cross-validation needs at least 2 (LFW's View 1 files such as pairsDevTrain.txt have one; use View 2's pairs.txt)", param_hint="--pairs")
    pipeline = load_pipeline(model_dir, flip_augment=flip_augment)
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
        click.echo(f"accuracy: {100 * result['accuracy']:.2f}% ± {100 * result['std']:.2f}% ({n_folds}-fold)")
        click.echo(f"threshold (chosen on training folds, mean): {result['threshold']:.4f}")
        click.echo(f"TAR @ FAR={far:g}: {100 * tar['tar']:.2f}% (threshold {tar['threshold']:.4f}, achieved FAR {tar['far']:.2e})")
    if plot is not None:
        from facegallery.export.evaluate.plots import plot_roc

        plot_roc(distances, pairs.same, plot, title=f"{pipeline.manifest.name} on {pairs_file.name}")
        if not as_json:
            click.echo(f"ROC curve written to {plot}")
