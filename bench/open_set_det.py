"""DET curves of the decision policies on an open-set protocol: the figure of docs/open-set.md.

Runs ``eval openset``'s protocol (export/evaluate/openset.py) in process, through the server's
own gallery code (client/eval_openset.py, offline), once per policy, and draws every policy's DET
curve (FNIR against FPIR) with its operating point in one PNG. Prints each policy's DIR at FPIR
0.01 and its ratio to the fixed-distance baseline of the same run.

    python bench/open_set_det.py --images ../shared/faces/lfw --out docs/open-set-det.png
"""

from __future__ import annotations

from pathlib import Path

import click

from facegallery.client.eval_openset import open_gallery
from facegallery.export.evaluate import openset
from facegallery.export.evaluate.embedding_cache import cached_embeddings
from facegallery.export.evaluate.plots import plot_det
from facegallery.export.offline import load_pipeline

#: (label, enroll_per_identity, policy): the baseline first.
RUNS = [
    ("1 photo, fixed distance", 1, openset.PolicyOptions(threshold=0.6, aggregation="nearest")),
    ("1 photo, default (S-norm)", 1, openset.PolicyOptions()),
    ("3 photos, fixed distance, nearest", 3, openset.PolicyOptions(threshold=0.6, aggregation="nearest")),
    ("3 photos, S-norm, nearest", 3, openset.PolicyOptions(target_fpir=0.01, aggregation="nearest")),
    ("3 photos, default (S-norm, mean)", 3, openset.PolicyOptions()),
]


@click.command()
@click.option("--images", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True, help="Folder-per-identity tree.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("docs/open-set-det.png"), show_default=True)
def main(images: Path, out: Path) -> None:
    """Run every policy of RUNS on IMAGES and write their DET curves to OUT."""
    pipeline = load_pipeline(None)
    listing = openset.list_identity_images(images)
    curves, points, baseline = [], [], {}
    for label, k, policy in RUNS:
        protocol = openset.build_protocol(listing, enroll_per_identity=k)
        embeddings = cached_embeddings(pipeline, images, protocol.image_paths(), workers=2)
        with open_gallery(pipeline, policy) as gallery:
            run = openset.run_protocol(protocol, embeddings, gallery, progress=False)
        summary = openset.summarize(run)
        fpir, fnir = openset.det_of_run(run)
        curves.append((f"{label} (N={summary['gallery']})", fpir, fnir))
        points.append((label, summary["policy"]["fpir"], 1 - summary["policy"]["dir"]))
        at = summary["dir_at_fpir"]["0.01"]
        baseline.setdefault(k, at)
        print(f"{label:36s} N={summary['gallery']:5d} DIR@FPIR0.01 {at:.3f} ({at / baseline[k]:.2f}x the fixed distance); "
              f"policy FPIR {summary['policy']['fpir']:.4f} DIR {summary['policy']['dir']:.3f}")
    plot_det(curves, out, points=[p for p in points if p[1] > 0], title=f"Open-set DET on {images.name}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
