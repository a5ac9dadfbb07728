"""``facegallery train`` and ``facegallery calibrate`` (click commands; PyTorch for ``train`` only).

The commands import their training modules lazily, so ``facegallery --help`` works without the
``train`` extra; ``train`` without PyTorch exits with a usage hint (``pip install
'facegallery[train]'``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from facegallery.server.contract.face import ImageKind
from facegallery.server.contract.manifest import MANIFEST_NAME

__all__ = ["calibrate", "train"]

logger = logging.getLogger(__name__)


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise click.ClickException("training needs PyTorch: pip install 'facegallery[train]'") from exc


def _name_range(ctx, param, value):
    if value is None:
        return None
    from facegallery.export.train.data import parse_name_range

    try:
        parse_name_range(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return value


# The keys of data.IMAGE_KINDS_CLI, spelled the same way; data.py is not imported here (it loads
# numpy, Pillow and the pipeline) so that `facegallery --help` stays fast.
_KINDS = [kind.value.replace("_", "-") for kind in ImageKind]
_data_options = [
    click.option("--min-images", type=int, default=4, show_default=True, help="Use identities with at least this many photos."),
    click.option("--name-range", default=None, callback=_name_range, help="Only identities whose name starts in this letter range, e.g. A-F."),
    click.option("--kind", type=click.Choice(_KINDS), default="photo", show_default=True,
                 help="photo: detect faces; face-crop: each file is one tight face crop (no detection); aligned-chip: files are chips."),
    click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Chip cache directory (default: the user cache dir)."),
    click.option("--threads", type=int, default=1, show_default=True, help="torch and onnxruntime threads."),
]


def _with(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


@click.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model directory to write.")
@click.option("--init", "init", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Fine-tune this model directory's embedder (the default dlib model too) instead of a new network.")
@click.option("--miner", type=click.Choice(["batch-hard", "semi-hard"]), default="semi-hard", show_default=True,
              help="Online triplet mining inside each P x K batch.")
@click.option("--margin", type=float, default=0.2, show_default=True, help="Triplet margin alpha (squared L2 of unit embeddings).")
@click.option("--dim", type=int, default=128, show_default=True, help="Embedding dimension of a new network (--init fixes it).")
@click.option("--width", type=int, default=32, show_default=True, help="First-stage width of a new network.")
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--p", "p", type=int, default=16, show_default=True, help="Identities per batch.")
@click.option("--k", "k", type=int, default=4, show_default=True, help="Images per identity in a batch.")
@click.option("--batches-per-epoch", type=int, default=None, help="Default: about one pass over the images.")
@click.option("--chip-size", type=int, default=64, show_default=True, help="Chip side in pixels of a new network (--init fixes it).")
@click.option("--lr", type=float, default=None, help="AdamW learning rate, cosine-decayed [default: 3e-3, with --init 3e-6].")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data and settings: same run.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/checkpoint.pth.")
@click.option("--test-only", is_flag=True, help="Only evaluate the initial (or resumed) network on the held-out identities.")
@click.option("--head", type=click.Choice(["abs-diff", "chi2", "none"]), default="abs-diff", show_default=True,
              help="Learned same-person head exported with the model.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of identities held out for evaluation and the threshold.")
@click.option("--name", default=None, help="model.json name (default: the output directory's name).")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Model directory whose detector and landmarks are used and copied [default: --init, else the default model].")
@_with(_data_options)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(data_dir: Path, out: Path, init: Path | None, quiet: bool, **options) -> None:
    """Train a face embedding network on DATA_DIR (one folder of photos per identity) with the
    triplet loss and write a model directory that `facegallery serve --model-dir OUT` serves."""
    _require_torch()
    from facegallery.export.train.run import TrainArgs, main

    if init is not None and options["chip_size"] != 64:
        logger.warning("--chip-size is ignored with --init: the chip of %s is used", init)
    args = TrainArgs(data_dir=data_dir, out=out, init=init, progress=not quiet, **options)
    try:
        result = main(args)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    history = result.history
    if result.model_dir is None:
        click.echo(json.dumps(history[-1]))
        return
    first, last = history[0], history[-1]
    click.echo(f"model directory: {result.model_dir}")
    click.echo(f"epochs: {last['epoch']}, training time {result.train_seconds:.0f} s, final loss {last.get('loss', float('nan')):.4f}, "
               f"active triplets {last.get('active_fraction', float('nan')):.3f}")
    if first.get("val_accuracy") is not None:
        click.echo(f"held-out verification accuracy: {first['val_accuracy']:.4f} before, {last['val_accuracy']:.4f} after")
    click.echo(f"threshold {result.threshold:.4f} (L2); ONNX vs PyTorch max |diff| {result.onnx_max_abs_diff:.2e}")


@click.command("calibrate")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--far", type=float, default=1e-3, show_default=True, help="Target false accept rate.")
@click.option("--dry-run", is_flag=True, help="Report only; leave model.json unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_with(_data_options)
def calibrate(model_dir: Path, data_dir: Path, far: float, dry_run: bool, as_json: bool, **options) -> None:
    """Choose MODEL_DIR's threshold at a target FAR on the identities of DATA_DIR (people the model
    was not trained on), store it in model.json with the false-match curve of the different-person
    pairs, and report TAR at that FAR."""
    from facegallery.export.train.calibrate import calibrate as run

    try:
        result = run(model_dir, data_dir, far=far, write=not dry_run, **options)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"{result.identities} identities, {result.images} images ({result.skipped} without a face); "
               f"{result.genuine} same pairs, {result.impostor} different pairs")
    click.echo(f"threshold {result.threshold:.4f} (L2) at FAR {result.far:.2e} (target {far:g}): TAR {100 * result.tar:.2f}%")
    if result.false_match is not None:
        click.echo(f"false-match curve: {len(result.false_match['distances'])} points")
    else:
        click.echo("no false-match curve: the different pairs give fewer than 2 distinct distances")
    if result.excluded:
        click.echo(f"left out {len(result.excluded)} identities the model was trained on")
    written = "threshold and false-match curve" if result.false_match is not None else "threshold"
    click.echo("model.json unchanged (--dry-run)" if dry_run else f"wrote {written} to {model_dir / MANIFEST_NAME}")
