"""Issue 4 checks on LFW: train on people A-F (4+ photos), verify on pairs of people G-L.

Stages (``--stages``, comma-separated, run in this order):

* ``untrained`` - the new network with its random initial weights (``epochs=0``), exported as a
  model directory: the baseline the trained model must beat by >= 5 points.
* ``scratch`` - the same network trained with the triplet loss (``facegallery train``).
* ``default`` - the default dlib model as converted.
* ``init0`` - the default model through ``--init`` with 0 epochs: the same network with its
  output L2-normalised, to separate the effect of the normalisation from that of fine-tuning.
* ``finetune`` - the default model fine-tuned with ``--init`` on the same A-F people (must not
  lose more than 0.5 point).

Each model directory is evaluated like ``facegallery eval lfw --model-dir``: every image of the
G-L pairs of ``pairs_dev.tsv`` goes through that model's own pipeline (central face), then 10-fold
verification accuracy and TAR at FAR 1e-3. Prints one line per model (accuracy, std, TAR@FAR,
training time, settings) and writes ``OUT/results.json``. Long: run it in the background, niced.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from facegallery.export.dlib.default_model import ensure_default_model
from facegallery.export.evaluate.lfw import embed_lfw_images, read_pairs
from facegallery.export.evaluate.metrics import tar_at_far, verification_10fold
from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STAGES = ("untrained", "scratch", "default", "init0", "finetune")


def eval_gl(model_dir: Path, lfw: Path, pairs_file: Path, threads: int) -> dict:
    pairs = read_pairs(pairs_file)
    gl = np.array([a[:1].upper() in "GHIJKL" and b[:1].upper() in "GHIJKL" for a, b in pairs.names])
    pairs = pairs.subset(gl)
    pipeline = FacePipeline.from_model_dir(model_dir, PipelineConfig(intra_op_threads=threads))
    started = time.perf_counter()
    embeddings = embed_lfw_images(pipeline, lfw, pairs.image_paths(), workers=1, progress=False)
    distances, missing = pairs.distances(embeddings)
    result = verification_10fold(distances, pairs.same, pairs.folds)
    tar = tar_at_far(distances, pairs.same, 1e-3)
    return {"accuracy": result["accuracy"], "std": result["std"], "threshold_10fold": result["threshold"],
            "tar_at_far_1e-3": tar["tar"], "pairs": len(pairs), "same": int(pairs.same.sum()),
            "no_face_pairs": int(missing), "eval_seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Directory for the model directories and results.json.")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--lfw", type=Path, default=SHARED / "faces" / "lfw")
    parser.add_argument("--pairs", type=Path, default=SHARED / "faces" / "lfw_protocol" / "pairs_dev.tsv")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--init-epochs", type=int, default=1)
    parser.add_argument("--init-lr", type=float, default=3e-6)
    parser.add_argument("--chip-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--miner", default="semi-hard")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from facegallery.export.train.run import TrainArgs
    from facegallery.export.train.run import main as train_main

    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    common = dict(data_dir=args.lfw, name_range="A-F", min_images=4, p=args.p, k=args.k, seed=args.seed,
                  threads=args.threads, cache_dir=args.cache_dir, progress=False)
    for stage in stages:
        settings: dict = {}
        if stage == "default":
            model_dir = ensure_default_model()
        else:
            if stage in ("init0", "finetune"):
                settings = dict(init=ensure_default_model(), epochs=args.init_epochs if stage == "finetune" else 0,
                                lr=args.init_lr, miner=args.miner, head="abs-diff" if stage == "finetune" else "none")
            else:
                settings = dict(epochs=0 if stage == "untrained" else args.epochs, chip_size=args.chip_size,
                                width=args.width, miner=args.miner, lr=args.lr)
            train_args = TrainArgs(out=args.out / stage, **common, **settings)
            trained = train_main(train_args)
            model_dir = trained.model_dir
            settings = {**train_args.to_json(), "train_seconds": trained.train_seconds,
                        "onnx_max_abs_diff": trained.onnx_max_abs_diff,
                        "history": trained.history}
        figures = eval_gl(model_dir, args.lfw, args.pairs, args.threads)
        results[stage] = {"model_dir": str(model_dir), **figures, "settings": settings}
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"{stage:10s} G-L accuracy {100 * figures['accuracy']:.2f}% ± {100 * figures['std']:.2f} "
              f"TAR@FAR1e-3 {100 * figures['tar_at_far_1e-3']:.2f}% pairs {figures['pairs']} "
              f"(no face {figures['no_face_pairs']}) train {settings.get('train_seconds', 0):.0f} s", flush=True)
    if "untrained" in results and "scratch" in results:
        gain = 100 * (results["scratch"]["accuracy"] - results["untrained"]["accuracy"])
        print(f"trained - untrained: {gain:+.2f} points (issue 4 asks >= +5)")
    if "default" in results and "finetune" in results:
        change = 100 * (results["finetune"]["accuracy"] - results["default"]["accuracy"])
        print(f"fine-tuned - default: {change:+.2f} points (issue 4 allows >= -0.5)")


if __name__ == "__main__":
    main()
