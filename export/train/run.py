"""Train (or fine-tune) a face embedding network with the triplet loss and export a model directory.

Structured like torchvision's classification reference script (``references/classification/
train.py``): :func:`main` reads a :class:`TrainArgs` (the ``facegallery train`` click command in
``train_cli.py`` plays the part of ``parse_args()``), :func:`train_one_epoch` runs one pass of
P x K batches with online triplet mining, :func:`evaluate` measures verification on held-out
identities, and every epoch writes a checkpoint (model, optimizer, scheduler, epoch, args) that
``--resume`` continues from. A fixed seed gives the same run: the network's initial weights, the
held-out identities, the batches (seeded by (seed, epoch)) and the augmentation (seeded by
seed + epoch) are all derived from it.

At the end the network is exported to ONNX (:func:`export_embedder`, checked against PyTorch at
batch sizes 1 and 7) and written as a model directory the server serves unchanged:
``embedder.onnx``, the default model's detector and landmark files, the optional same-person
head, and ``model.json`` (:class:`facegallery.server.contract.manifest.ModelManifest`) with the training
chip spec, metric ``euclidean`` and a threshold chosen on the held-out identities.
``training.json`` beside it records the settings, the per-epoch history and the timings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from facegallery.export.dlib.convert import DLIB_CHIP_PADDING, FILE_NAMES
from facegallery.export.evaluate.metrics import best_threshold
from facegallery.export.onnx_common import EMBEDDER_INPUT, EMBEDDER_OUTPUT, save_torch_onnx
from facegallery.export.train.data import (
    IMAGE_KINDS_CLI,
    TRAINING_RECORD,
    AlignedChipReader,
    AugmentConfig,
    ChipSet,
    PipelineChipper,
    PKBatchSampler,
    augment,
    load_chips,
    parse_name_range,
    scan_identity_folders,
)
from facegallery.export.train.head import export_head, fit_head
from facegallery.export.train.losses import TripletLoss
from facegallery.export.train.model import EmbeddingNet, build_model
from facegallery.server.contract.errors import ModelError
from facegallery.server.contract.face import ImageKind
from facegallery.server.contract.files import atomic_write, write_text_atomic
from facegallery.server.contract.manifest import ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.face.align import DLIB_5POINT_TEMPLATE
from facegallery.server.face.onnx_session import open_session

__all__ = [
    "TrainArgs",
    "TrainResult",
    "embed_chips",
    "evaluate",
    "export_embedder",
    "main",
    "prepare_data",
    "train_one_epoch",
]

logger = logging.getLogger(__name__)

EMBEDDER_FILE = FILE_NAMES["embedder"]
HEAD_FILE = "head.onnx"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "checkpoint.pth"
ONNX_ATOL = 1e-4  # issue 4: onnxruntime vs PyTorch max |diff| <= 1e-4
HEAD_KINDS_CLI = {"abs-diff": "abs_diff", "chi2": "chi2", "none": None}
DEFAULT_LR = 3e-3  # AdamW from random weights (LFW A-F: held-out accuracy 0.72 vs 0.64 at 1e-3 after 22 epochs)
DEFAULT_INIT_LR = 3e-6  # fine-tuning: on LFW A-F, 1 epoch at 3e-6 kept dlib's G-L accuracy (+0.26 point), 2 at 1e-5 lost 0.35


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Settings of one training run (``facegallery train --help`` documents each).

    Attributes
    ----------
    data_dir : Path
        Folder-per-identity photos (or aligned chips with ``kind="aligned-chip"``).
    out : Path
        Model directory to write (created); checkpoints go to ``out/checkpoints``.
    init : Path, optional
        Model directory whose embedder is fine-tuned instead of a new network; its chip spec and
        embedding dimension are used.
    miner : {"batch-hard", "semi-hard"}
    margin : float
        Triplet margin alpha, squared-L2 units.
    dim, width : int
        Embedding dimension and first-stage width of a new network.
    epochs, p, k : int
        Epochs; identities and images per identity in a batch.
    batches_per_epoch : int, optional
        Default: about one pass over the training images.
    chip_size, padding : int, float
        Chip of a new network (dlib's 5-point template).
    lr, weight_decay : float, optional
        AdamW settings; ``lr`` defaults to 3e-3 (new network) or 3e-6 (``init``), cosine-decayed.
    seed : int
    resume : bool
        Continue from ``out/checkpoints/checkpoint.pth``.
    test_only : bool
        Only evaluate the (initial or resumed) network on the held-out identities.
    head : {"abs-diff", "chi2", "none"}
    min_images : int
    name_range : str, optional
        ``"A-F"``: identities whose name starts with A..F.
    kind : {"photo", "face-crop", "aligned-chip"}
        What the files are (see :class:`~facegallery.export.train.data.PipelineChipper`).
    val_fraction : float
        Share of identities held out for evaluation and the threshold (at least 2 when > 0).
    threads : int
        torch / onnxruntime threads (1 by default: on a shared 2-core machine a second thread
        made epochs slower, not faster).
    cache_dir : Path, optional
        Chip cache (default: user cache dir).
    base : Path, optional
        Model directory whose detector and landmark files find the faces and are copied into the
        output (default: ``init``, else the default model, converted on first use).
    name : str, optional
        ``model.json`` name (default: the output directory's name).
    progress : bool
        Show tqdm bars.
    """

    data_dir: Path
    out: Path
    init: Path | None = None
    miner: str = "semi-hard"
    margin: float = 0.2
    dim: int = 128
    width: int = 32
    epochs: int = 100
    p: int = 16
    k: int = 4
    batches_per_epoch: int | None = None
    chip_size: int = 64
    padding: float = DLIB_CHIP_PADDING
    lr: float | None = None
    weight_decay: float = 5e-4
    seed: int = 0
    resume: bool = False
    test_only: bool = False
    head: str = "abs-diff"
    min_images: int = 4
    name_range: str | None = None
    kind: str = "photo"
    val_fraction: float = 0.1
    threads: int = 1
    cache_dir: Path | None = None
    base: Path | None = None
    name: str | None = None
    progress: bool = True

    def base_dir(self) -> Path:
        """The model directory providing the detector and landmarks (see ``base``)."""
        if self.base is not None:
            return self.base
        if self.init is not None:
            return self.init
        from facegallery.export.dlib.default_model import ensure_default_model

        return ensure_default_model()

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What :func:`main` produced.

    Attributes
    ----------
    model_dir : Path
        The written model directory (None with ``test_only``).
    history : list of dict
        Per epoch: ``epoch``, ``loss``, ``active_fraction``, ``val_accuracy``, ``seconds``;
        epoch 0 is the network before training (no loss).
    threshold : float
        L2 threshold written to ``model.json``.
    onnx_max_abs_diff : float
        Worst |onnxruntime - torch| embedding difference at batch sizes 1 and 7.
    train_seconds : float
        Wall time from building the network to the end of the last epoch (chip extraction,
        export and head fitting excluded).
    """

    model_dir: Path | None
    history: list[dict]
    threshold: float
    onnx_max_abs_diff: float
    train_seconds: float


# --------------------------------------------------------------------------------------------- data
def _chip_spec(args: TrainArgs, init_manifest: ModelManifest | None) -> ChipSpec:
    if init_manifest is not None:
        return init_manifest.chip
    return ChipSpec(int(args.chip_size), float(args.padding), DLIB_5POINT_TEMPLATE)


def prepare_data(args: TrainArgs, spec: ChipSpec) -> ChipSet:
    """Scan ``args.data_dir`` and return its chips (computed once through the pipeline of
    ``args.base_dir()``, then cached).

    Parameters
    ----------
    args : TrainArgs
    spec : ChipSpec
        The chips to cut.

    Raises
    ------
    ValueError
        No image matched the filters, or an unknown ``kind``.
    """
    name_range = parse_name_range(args.name_range) if args.name_range else None
    records = scan_identity_folders(args.data_dir, min_images=args.min_images, name_range=name_range)
    if not records:
        raise ValueError(f"no identity in {args.data_dir} has {args.min_images}+ images"
                         + (f" within names {args.name_range}" if args.name_range else ""))
    if args.kind not in IMAGE_KINDS_CLI:
        raise ValueError(f"kind must be one of {sorted(IMAGE_KINDS_CLI)}, got {args.kind!r}")
    kind = IMAGE_KINDS_CLI[args.kind]
    if kind is ImageKind.ALIGNED_CHIP:
        chipper = AlignedChipReader(spec)
    else:
        from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

        pipeline = FacePipeline.from_model_dir(args.base_dir(), PipelineConfig(intra_op_threads=args.threads))
        chipper = PipelineChipper(pipeline, spec, kind=kind)
    return load_chips(records, chipper, cache_dir=args.cache_dir, progress=args.progress)


def split_identities(identities: tuple[str, ...], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Held-out identities for evaluation: ``round(fraction * n)`` of them (at least 2 when
    ``fraction > 0`` and at least 4 identities exist), chosen by ``seed``. Returns (train, val)."""
    n = len(identities)
    n_val = 0
    if fraction > 0 and n >= 4:
        n_val = min(n - 2, max(2, int(round(fraction * n))))
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = sorted(identities[i] for i in order[:n_val])
    train = sorted(identities[i] for i in order[n_val:])
    return train, val


# ----------------------------------------------------------------------------------- train / eval
def train_one_epoch(
    model: EmbeddingNet,
    criterion: TripletLoss,
    optimizer: torch.optim.Optimizer,
    data: ChipSet,
    sampler: PKBatchSampler,
    epoch: int,
    args: TrainArgs,
) -> dict:
    """One epoch of P x K batches: augment, embed, mine triplets, step.

    Returns
    -------
    dict
        ``loss`` (mean over batches), ``active_fraction`` (mean share of active triplets),
        ``triplets`` (mean per batch), ``seconds``.
    """
    model.train()
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    chips = torch.from_numpy(data.chips)
    labels = torch.from_numpy(data.labels)
    losses, actives, counts = [], [], []
    started = time.perf_counter()
    bar = tqdm(sampler, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=not args.progress, leave=False)
    for index in bar:
        idx = torch.from_numpy(index)
        images = augment(chips[idx].float(), generator, AugmentConfig())
        out = criterion(model(images), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        actives.append(out.active_fraction)
        counts.append(out.num_triplets)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", active=f"{np.mean(actives):.3f}")
    return {
        "loss": float(np.mean(losses)),
        "active_fraction": float(np.mean(actives)),
        "triplets": float(np.mean(counts)),
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def embed_chips(model: torch.nn.Module, chips: np.ndarray, *, batch_size: int = 128) -> np.ndarray:
    """Embeddings of chips with the network in eval mode.

    Parameters
    ----------
    chips : (N, S, S, 3) uint8

    Returns
    -------
    (N, D) float32
    """
    model.eval()
    out = [model(torch.from_numpy(chips[i:i + batch_size]).float()).numpy() for i in range(0, len(chips), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def balanced_pairs(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every same-identity pair (i < j), plus as many different-identity pairs drawn at random
    (all of them if there are fewer). Returns ``i, j`` (M,) int64 and ``same`` (M,) bool."""
    labels = np.asarray(labels)
    i, j = np.triu_indices(labels.size, k=1)
    same = labels[i] == labels[j]
    genuine = np.flatnonzero(same)
    impostor = np.flatnonzero(~same)
    rng = np.random.default_rng([seed, 11])
    if impostor.size > genuine.size:
        impostor = np.sort(rng.choice(impostor, genuine.size, replace=False))
    keep = np.concatenate([genuine, impostor])
    return i[keep].astype(np.int64), j[keep].astype(np.int64), same[keep]


def evaluate(model: torch.nn.Module, data: ChipSet, *, seed: int = 0) -> dict:
    """Verification on (held-out) identities: balanced pairs, best-threshold accuracy.

    Parameters
    ----------
    model : the embedding network
    data : ChipSet
        Identities not trained on.
    seed : int
        Picks the different-identity pairs.

    Returns
    -------
    dict
        ``accuracy`` (at the best L2 threshold, :func:`facegallery.export.evaluate.metrics.best_threshold`),
        ``threshold`` (L2), ``pairs``; empty when there are no pairs.
    """
    if len(data) < 2:
        return {}
    embeddings = embed_chips(model, data.chips)
    i, j, same = balanced_pairs(data.labels, seed)
    if not same.any() or same.all():
        return {}
    distances = np.linalg.norm(embeddings[i] - embeddings[j], axis=1)
    threshold, accuracy = best_threshold(distances, same)
    return {"accuracy": accuracy, "threshold": threshold, "pairs": int(same.size)}


# ------------------------------------------------------------------------------------------ export
def export_embedder(model: EmbeddingNet, path: str | os.PathLike, chip_size: int, *, threads: int = 1) -> float:
    """Export the network to ONNX and check onnxruntime against PyTorch at batch sizes 1 and 7.

    The graph has input ``image`` ``(N, S, S, 3) float32`` RGB 0..255 and output ``embedding``
    ``(N, D) float32`` with a dynamic batch axis N (opset ``onnx_common.OPSET``, 17); the file is
    replaced atomically.

    Returns
    -------
    float
        Max |onnxruntime - torch| over both batches.

    Raises
    ------
    ModelError
        The difference exceeds ``ONNX_ATOL`` (1e-4) at either batch size.
    """
    model.eval()
    example = torch.rand(2, chip_size, chip_size, 3) * 255
    save_torch_onnx(
        model, (example,), path, input_names=[EMBEDDER_INPUT], output_names=[EMBEDDER_OUTPUT],
        dynamic_axes={EMBEDDER_INPUT: {0: "N"}, EMBEDDER_OUTPUT: {0: "N"}},
    )  # fmt: skip
    session = open_session(path, intra_op_threads=threads, what="exported embedder")
    generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for n in (1, 7):
        images = torch.rand(n, chip_size, chip_size, 3, generator=generator) * 255
        with torch.no_grad():
            expected = model(images).numpy()
        (got,) = session.run([EMBEDDER_OUTPUT], {EMBEDDER_INPUT: images.numpy()})
        diff = float(np.abs(got - expected).max())
        logger.info("ONNX check at batch %d: max |diff| %.2e", n, diff)
        if not diff <= ONNX_ATOL:
            raise ModelError(f"exported embedder differs from PyTorch by {diff:.2e} at batch {n} (allowed {ONNX_ATOL})")
        worst = max(worst, diff)
    return worst


def _write_model_dir(
    args: TrainArgs,
    model: EmbeddingNet,
    spec: ChipSpec,
    train: ChipSet,
    threshold: float,
    calibration: dict,
    init_manifest: ModelManifest | None,
) -> tuple[ModelManifest, float, dict]:
    out = args.out
    onnx_diff = export_embedder(model, out / EMBEDDER_FILE, spec.size, threads=args.threads)
    default_dir = args.base_dir()
    default = ModelManifest.load(default_dir, verify=False)
    files = {"embedder": ModelFile(EMBEDDER_FILE, sha256_file(out / EMBEDDER_FILE))}
    for key in ("detector", "landmarks"):
        name = default.files[key].path
        with open(default.path_of(default_dir, key), "rb") as source, atomic_write(out / name) as target:
            shutil.copyfileobj(source, target)
        files[key] = ModelFile(name, sha256_file(out / name))
    head_kind = HEAD_KINDS_CLI[args.head]
    head_info: dict = {}
    if head_kind is not None:
        fit = fit_head(embed_chips(model, train.chips), train.labels, kind=head_kind, seed=args.seed)
        head_diff = export_head(fit.head, out / HEAD_FILE)
        files["head"] = ModelFile(HEAD_FILE, sha256_file(out / HEAD_FILE))
        head_info = {"kind": head_kind, "train_accuracy": fit.accuracy, "train_bce": fit.loss, "pairs": fit.pairs,
                     "onnx_max_abs_diff": head_diff}
    sources = {}
    if init_manifest is not None:
        sources[f"init:{init_manifest.name}"] = init_manifest.files["embedder"].sha256  # sources are file hashes
    manifest = ModelManifest(
        name=args.name or out.name,
        version="1",
        embedding_dim=model.dim,
        metric="euclidean",
        threshold=float(threshold),
        chip=spec,
        files=files,
        sources=sources,
        detector=default.detector,
        head={"kind": head_kind} if head_kind is not None else None,
        calibration=calibration,
    )
    manifest.write(out)
    ModelManifest.load(out)  # every checksum verifies
    return manifest, onnx_diff, head_info


# -------------------------------------------------------------------------------------------- main
def _save_checkpoint(path: Path, model, optimizer, scheduler, epoch: int, args: TrainArgs, history: list[dict]) -> None:
    """Replace the checkpoint atomically: a run killed while saving keeps the previous epoch's."""
    with atomic_write(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                    "epoch": epoch, "args": args.to_json(), "history": history}, f)


def main(args: TrainArgs) -> TrainResult:
    """Train, evaluate, export; see the module docstring.

    Raises
    ------
    ValueError
        Bad settings (unknown miner/head/kind, too few identities for P, a resume checkpoint
        written with a different data set or network).
    ModelError
        ``init`` is not a valid model directory, or the exported graph fails its check.
    FileNotFoundError
        ``data_dir`` is missing, or ``resume`` without a checkpoint.
    """
    if args.head not in HEAD_KINDS_CLI:
        raise ValueError(f"head must be one of {sorted(HEAD_KINDS_CLI)}, got {args.head!r}")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    init_manifest = ModelManifest.load(args.init) if args.init is not None else None
    spec = _chip_spec(args, init_manifest)
    data = prepare_data(args, spec)
    train_ids, val_ids = split_identities(data.identities, args.val_fraction, args.seed)
    train, val = data.subset(train_ids), data.subset(val_ids)
    logger.info("training on %d chips of %d identities, %d held-out chips of %d identities (%d files without a face)",
                len(train), len(train_ids), len(val), len(val_ids), len(data.skipped))

    started = time.perf_counter()
    model = build_model(dim=args.dim, width=args.width,
                        init_onnx=init_manifest.path_of(args.init, "embedder") if init_manifest else None)
    criterion = TripletLoss(margin=args.margin, miner=args.miner)
    lr = args.lr if args.lr is not None else (DEFAULT_INIT_LR if init_manifest else DEFAULT_LR)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.epochs))
    sampler = PKBatchSampler(train.labels, p=args.p, k=args.k, batches_per_epoch=args.batches_per_epoch, seed=args.seed)

    checkpoint_dir = args.out / CHECKPOINT_DIR
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    start_epoch, history = 1, []
    if args.resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        _check_resumable(checkpoint["args"], args)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch, history = int(checkpoint["epoch"]) + 1, list(checkpoint["history"])
        logger.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)

    if args.test_only:
        figures = evaluate(model, val, seed=args.seed)
        logger.info("held-out verification: %s", figures)
        return TrainResult(None, [{"epoch": start_epoch - 1, **{f"val_{k}": v for k, v in figures.items()}}],
                           float(figures.get("threshold", math.nan)), math.nan, 0.0)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not history:
        figures = evaluate(model, val, seed=args.seed)
        history.append({"epoch": 0, "val_accuracy": figures.get("accuracy")})
        logger.info("epoch 0 (before training): held-out accuracy %s", figures.get("accuracy"))
    for epoch in range(start_epoch, args.epochs + 1):
        stats = train_one_epoch(model, criterion, optimizer, train, sampler, epoch, args)
        scheduler.step()
        figures = evaluate(model, val, seed=args.seed)
        record = {"epoch": epoch, **stats, "lr": optimizer.param_groups[0]["lr"], "val_accuracy": figures.get("accuracy")}
        history.append(record)
        logger.info("epoch %d: loss %.4f, active %.3f, held-out accuracy %s, %.1f s", epoch, stats["loss"],
                    stats["active_fraction"], figures.get("accuracy"), stats["seconds"])
        _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, args, history)
    train_seconds = time.perf_counter() - started

    figures = evaluate(model, val if len(val) else train, seed=args.seed)
    threshold = figures.get("threshold", 1.0)
    calibration = {"method": "best accuracy on balanced pairs of held-out training identities" if len(val)
                   else "best accuracy on balanced pairs of the training identities",
                   "identities": len(val_ids) if len(val) else len(train_ids), "pairs": figures.get("pairs", 0),
                   "accuracy": figures.get("accuracy")}
    manifest, onnx_diff, head_info = _write_model_dir(args, model, spec, train, threshold, calibration, init_manifest)
    record = {"args": args.to_json(), "train_identities": train_ids, "val_identities": val_ids,
              "skipped_files": list(data.skipped), "history": history, "train_seconds": train_seconds,
              "onnx_max_abs_diff": onnx_diff, "head": head_info, "model_id": manifest.model_id}
    write_text_atomic(args.out / TRAINING_RECORD, json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s (threshold %.4f, %.0f s of training)", args.out, threshold, train_seconds)
    return TrainResult(args.out, history, float(threshold), onnx_diff, train_seconds)


_RESUME_KEYS = ("data_dir", "init", "dim", "width", "chip_size", "padding", "min_images", "name_range", "kind",
                "val_fraction", "seed", "p", "k")


def _check_resumable(saved: dict, args: TrainArgs) -> None:
    current = args.to_json()
    differ = [key for key in _RESUME_KEYS if saved.get(key) != current.get(key)]
    if differ:
        raise ValueError("--resume: the checkpoint was written with different settings: "
                         + ", ".join(f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in differ))
