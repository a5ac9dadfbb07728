"""``facegallery eval``: measure a model's accuracy on a benchmark protocol (``eval lfw``, ``eval openset``).

``eval openset`` runs the gallery layer's own decision code, which export may not import
(tests/test_layers.py): :func:`openset_command` builds the command around a gallery opener handed
in by the composition root, ``facegallery.client.eval_openset`` (as ``serve`` gets its default-model
bootstrap from ``client/cli.py``). Without it the ``eval`` group has no ``openset``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import ContextManager

import click
import numpy as np

from facegallery.export.offline import flip_option, load_pipeline, model_dir_option

__all__ = ["eval_group", "openset_command", "GalleryOpener"]


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

    _check_plot(plot)
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


#: ``open_gallery(pipeline, policy, server=..., gallery=...)`` -> a context manager yielding an
#: ``openset.OpenSetGallery``: a temporary offline gallery when ``server`` is None, else the new
#: gallery ``gallery`` on that server. Raises ``click.ClickException`` for what the user must fix.
GalleryOpener = Callable[..., ContextManager]


def openset_command(open_gallery: GalleryOpener) -> click.Command:
    """``facegallery eval openset``, running its probes through the galleries ``open_gallery`` opens."""

    @click.command("openset")
    @click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Folder-per-identity tree DIR/<identity>/<image>.")
    @click.option("--enroll-per-identity", "k", type=click.IntRange(min=1), default=1, show_default=True,
                  help="K: people with more than K photos are enrolled from their first K (sorted names); people with one photo are strangers.")
    @click.option("--max-probes", type=click.IntRange(min=1), default=5, show_default=True, help="Genuine probes per enrolled person, at most.")
    @click.option("--gallery-size", type=click.IntRange(min=1), default=None,
                  help="Enroll a random subset of this many enrollable people (their other probes are dropped).  [default: all]")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --gallery-size subset.")
    @click.option("--threshold", type=click.FloatRange(min=0, min_open=True), default=None, help="Policy: a fixed L2 distance threshold.")
    @click.option("--target-fpir", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
                  help="Policy: the threshold follows the gallery so that FPIR is about this.  [default: the gallery default policy]")
    @click.option("--normalization", type=click.Choice(["snorm", "none"]), default=None,
                  help="Score normalisation of a --target-fpir policy.  [default: the policy default]")
    @click.option("--cohort-size", type=click.IntRange(min=2), default=None, help="S-norm cohort (nearest identities) of a --target-fpir policy.")
    @click.option("--aggregation", type=click.Choice(["nearest", "mean"]), default=None,
                  help="An identity's distance: to its nearest template, or to the mean of its templates.  [default: the policy default]")
    @click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Images embedded and probes searched in parallel.")
    @click.option("--server", default=None, metavar="HOST:PORT",
                  help="Run through this server instead of offline: --gallery is created there (it must not exist) and left filled.")
    @click.option("--gallery", "gallery_name", default=None, metavar="NAME", help="The gallery to create on --server.")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the DET curve (FNIR vs FPIR) to this PNG.")
    @flip_option
    @model_dir_option
    def eval_openset(images_dir: Path, k: int, max_probes: int, gallery_size: int | None, seed: int, threshold: float | None,
                     target_fpir: float | None, normalization: str | None, cohort_size: int | None, aggregation: str | None, workers: int, server: str | None,
                     gallery_name: str | None, as_json: bool, plot: Path | None, flip_augment: bool, model_dir: Path | None) -> None:
        """Open-set identification (1:N with strangers) on a folder-per-identity tree, with the gallery's own decision policy.

        People with more than K photos are enrolled from their first K photos (sorted file
        names) and probed with up to --max-probes of the others; people with exactly one photo
        are strangers (never enrolled) and probe once; people with 2..K photos (K > 1) are
        neither. Each image is its central face; embeddings are cached under the user cache
        directory, keyed by model and by each image's path, size and mtime.

        Reports the gallery size, closed-set rank-1, DIR (detection and identification rate) at
        FPIR 0.1, 0.01 and 0.001 with an oracle threshold on the returned score (n/a with fewer
        than 1/FPIR strangers), and the FPIR and DIR of the policy's own decisions with its
        mean estimated_fpir over the strangers. The probes go through the server's gallery code:
        a temporary offline gallery, or --server with --gallery.
        """
        from facegallery.export.evaluate import openset
        from facegallery.export.evaluate.embedding_cache import cached_embeddings

        try:
            policy = openset.PolicyOptions(
                threshold=threshold, target_fpir=target_fpir, normalization=normalization, cohort_size=cohort_size, aggregation=aggregation
            )
        except ValueError as exc:
            raise click.UsageError(f"{exc} (--threshold [--aggregation], or --target-fpir [--normalization, --cohort-size, --aggregation])") from exc
        if (server is None) != (gallery_name is None):
            raise click.UsageError("--server and --gallery go together: the gallery is created on that server")
        _check_plot(plot)
        try:
            protocol = openset.build_protocol(
                openset.list_identity_images(images_dir), enroll_per_identity=k, max_probes=max_probes, gallery_size=gallery_size, seed=seed
            )
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--gallery-size") from exc
        if not protocol.enrolled or not protocol.impostors:
            raise click.BadParameter(
                f"{images_dir} has {len(protocol.enrolled)} people with more than {k} photos and {len(protocol.impostors)} with one; "
                "an open-set run needs both", param_hint="--images")
        started = time.perf_counter()
        pipeline = load_pipeline(model_dir, flip_augment=flip_augment)
        loaded = time.perf_counter()
        embeddings = cached_embeddings(pipeline, images_dir, protocol.image_paths(), workers=workers)
        model_s, embed_s = loaded - started, time.perf_counter() - loaded
        with open_gallery(pipeline, policy, server=server, gallery=gallery_name) as gallery:
            run = openset.run_protocol(protocol, embeddings, gallery, workers=workers)
        summary = openset.summarize(run)
        summary["model_id"] = pipeline.model_id
        summary["enroll_per_identity"] = k
        summary["seconds"] = {"model": round(model_s, 3), "embeddings": round(embed_s, 3), **{key: round(v, 3) for key, v in run.seconds.items()}}
        if as_json:
            click.echo(json.dumps(openset.jsonable(summary), allow_nan=False))
        else:
            for line in openset.format_summary(summary):
                click.echo(line)
            click.echo(f"model {pipeline.model_id[:12]}; time: model {model_s:.1f} s, embeddings {embed_s:.1f} s, enroll {run.seconds['enroll']:.1f} s, probes {run.seconds['probes']:.1f} s")
        if plot is not None:
            from facegallery.export.evaluate.plots import plot_det

            fpir, fnir = openset.det_of_run(run)
            p = summary["policy"]
            points = [] if p["fpir"] is None or p["dir"] is None else [(f"policy: {p['name']}", p["fpir"], 1 - p["dir"])]
            plot_det([(f"{p['score_kind']} score", fpir, fnir)], plot, points=points,
                     title=f"{pipeline.manifest.name}: {summary['gallery']} enrolled, {summary['impostors']} strangers")
            if not as_json:
                click.echo(f"DET curve written to {plot}")

    return eval_openset


def _check_plot(plot: Path | None) -> None:
    """A usage error before any work when ``--plot`` is given but matplotlib is missing."""
    if plot is None:
        return
    from facegallery.export.evaluate.plots import require_matplotlib

    try:
        require_matplotlib()
    except RuntimeError as exc:
        raise click.UsageError(f"--plot: {exc}") from exc
