"""Open-set identification on a folder-per-identity tree: the protocol, the run, the figures.

The protocol (:func:`build_protocol`) from ``DIR/<identity>/<image>``, with K =
``enroll_per_identity``:

* a person with more than K photos is *enrollable*: enrolled from the first K photos (sorted file
  names) and probed with up to ``max_probes`` of the others (the next ones in that order): the
  *genuine* (mated) probes;
* a person with exactly one photo is a *stranger*, never enrolled: that photo is an *impostor*
  (non-mated) probe;
* a person with 2..K photos (only when K > 1) is neither: not enrolled, not probed (their photos
  would make them strangers for K = 1 but not for K = 3, so the strangers stay the same people
  for every K);
* ``gallery_size`` N: a random subset of N enrollable people (drawn with ``seed``) is enrolled; the
  probes of the others are dropped, not turned into strangers, so the impostor probes are the
  one-photo people for every gallery size.

One image is its central face (:func:`facegallery.export.evaluate.lfw.central_face`). An
enrollment photo without a face is skipped (the person is enrolled from the rest of their K; with
none left they are not enrolled and their probes are dropped); a probe without a face is left out
of the figures. Both are counted under ``no_face``.

The run (:func:`run_protocol`) goes through an :class:`OpenSetGallery`: the server's own gallery
code, offline (a temporary ``GalleryManager``) or through a running server (``GalleryClient``);
both live in ``facegallery.client.eval_openset``, since export may not import the gallery layer.
This module only enrolls the templates, sends every probe and counts what the gallery answered.

The figures (:func:`summarize`, terms of :mod:`facegallery.export.evaluate.metrics`):

* closed-set rank-1: genuine probes whose top candidate is the right person;
* DIR at FPIR 0.1, 0.01 and 0.001 with the oracle threshold on the returned top ``score`` (the
  policy's own score: L2 distance or normalised), None where there are fewer than ``1 / FPIR``
  impostor probes (:func:`~facegallery.export.evaluate.metrics.min_impostors_for_fpir`);
* the policy's own decisions: FPIR = impostor probes given any identity, DIR = genuine probes given
  the right one;
* its confidence: ``estimated_fpir`` of each answer is meant to be the probability that a stranger
  scores at most that score, i.e. the FPIR a threshold at that score would have. Over impostor
  probes a correct estimate is then uniform on [0, 1] (mean about 0.5), and at the impostor probe
  of measured rank ``ceil(f * m)`` it is about ``f``: both are reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from tqdm import tqdm

from facegallery.export.evaluate.metrics import det_curve, dir_at_fpir, min_impostors_for_fpir
from facegallery.server.contract.images import has_image_suffix

__all__ = [
    "FPIR_POINTS",
    "TOP_K",
    "Probe",
    "OpenSetProtocol",
    "PolicyOptions",
    "Answer",
    "OpenSetGallery",
    "OpenSetRun",
    "list_identity_images",
    "build_protocol",
    "run_protocol",
    "summarize",
    "format_summary",
    "det_of_run",
    "jsonable",
]

LOG = logging.getLogger(__name__)

#: The FPIR operating points reported.
FPIR_POINTS = (0.1, 0.01, 0.001)
#: Candidates asked for per probe (only the top one counts in the figures).
TOP_K = 5


class Probe(NamedTuple):
    """One probe image: ``path`` relative to the image root (``<identity>/<file>``), its true identity."""

    path: str
    identity_id: str


@dataclasses.dataclass(frozen=True)
class OpenSetProtocol:
    """Who is enrolled from which photos, and which photos probe the gallery (module docstring).

    Attributes
    ----------
    enrolled : dict of str to tuple of str
        Identity -> relative paths of its K enrollment photos, identities sorted.
    genuine : tuple of Probe
        Probes of enrolled people.
    impostors : tuple of Probe
        The one photo of each stranger.
    neither : tuple of str
        People with 2..K photos (K > 1): neither enrolled nor strangers.
    left_out : tuple of str
        Enrollable people not drawn into a ``gallery_size`` subset (their probes are dropped).
    enroll_per_identity, max_probes : int
    """

    enrolled: dict[str, tuple[str, ...]]
    genuine: tuple[Probe, ...]
    impostors: tuple[Probe, ...]
    neither: tuple[str, ...]
    left_out: tuple[str, ...]
    enroll_per_identity: int
    max_probes: int

    def image_paths(self) -> list[str]:
        """Every image the protocol uses (enrollment and probes), sorted."""
        paths = {p for photos in self.enrolled.values() for p in photos}
        paths.update(p.path for p in self.genuine)
        paths.update(p.path for p in self.impostors)
        return sorted(paths)


@dataclasses.dataclass(frozen=True)
class PolicyOptions:
    """The decision policy asked for, as plain values (the gallery layer's ``DecisionPolicy`` is built
    from them by the gallery backend). All None: the gallery layer's default policy.

    ``threshold`` (L2) and ``target_fpir`` exclude each other; ``normalization`` (``"snorm"`` /
    ``"none"``) and ``cohort_size`` go with ``target_fpir``; ``aggregation`` (``"nearest"`` /
    ``"mean"``: an identity's distance is to its nearest template or to the mean of its templates)
    with either. Left out, each is the default the server gives a ``CreateGallery`` request.
    """

    threshold: float | None = None
    target_fpir: float | None = None
    normalization: str | None = None
    cohort_size: int | None = None
    aggregation: str | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and self.target_fpir is not None:
            raise ValueError("give a fixed threshold or a target FPIR, not both")
        if self.target_fpir is None and (self.normalization is not None or self.cohort_size is not None):
            raise ValueError("normalization and cohort size go with a target FPIR")
        if self.threshold is None and self.target_fpir is None and self.aggregation is not None:
            raise ValueError("aggregation goes with a threshold or a target FPIR")


@dataclasses.dataclass(frozen=True)
class Answer:
    """The gallery's answer to one probe.

    Attributes
    ----------
    top_identity : str or None
        The top-ranked candidate (None: empty gallery).
    decision : str or None
        The identity the policy returned, None = unknown.
    score : float
        The top candidate's score on the policy's scale (lower = more similar; ``inf`` if none).
    distance : float
        The top candidate's L2 distance.
    threshold : float
        The threshold the decision used, on the score scale.
    score_kind : str
        ``"distance"`` or ``"snorm"``.
    estimated_fpir : float or None
        The gallery's estimate of the FPIR at this score (None when it gives none).
    """

    top_identity: str | None
    decision: str | None
    score: float
    distance: float
    threshold: float
    score_kind: str
    estimated_fpir: float | None


class OpenSetGallery(Protocol):
    """A gallery the protocol runs against (``facegallery.client.eval_openset``: offline or a server)."""

    def enroll(self, templates: Sequence[tuple[str, np.ndarray]]) -> int:
        """Add ``(identity_id, (D,) float32 embedding)`` templates; returns how many were stored."""
        ...

    def identify(self, embedding: np.ndarray) -> Answer:
        """One 1:N search with the gallery's policy."""
        ...

    def status(self) -> dict:
        """What the policy decides with after enrollment: at least ``name`` (its description); also
        ``threshold``, ``score_kind``, ``estimated_fpir`` and ``basis`` where the gallery tells them."""
        ...


@dataclasses.dataclass(frozen=True)
class OpenSetRun:
    """The answers of one run.

    ``genuine`` and ``impostors`` pair each searched probe with its answer; ``gallery`` and
    ``templates`` are the identities and templates enrolled; ``no_face`` counts what was left out
    (``enroll`` photos, ``unenrolled`` identities, ``genuine`` and ``impostors`` probes);
    ``status`` is :meth:`OpenSetGallery.status` after enrollment, before the first probe;
    ``seconds`` the wall time of ``enroll`` (with that status) and ``probes``.
    """

    gallery: int
    templates: int
    genuine: list[tuple[Probe, Answer]]
    impostors: list[tuple[Probe, Answer]]
    no_face: dict[str, int]
    status: dict
    seconds: dict[str, float]


# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------


def list_identity_images(images_dir: str | os.PathLike) -> dict[str, list[str]]:
    """``DIR/<identity>/<image>``: identity -> relative image paths (``<identity>/<file>``), both sorted.

    Folders and files whose names start with ``.`` are skipped, as ``facegallery import`` does; only
    files with an image suffix (``contract.images``) count; files directly under ``DIR`` are ignored.

    Raises
    ------
    FileNotFoundError
        ``images_dir`` is not a directory.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    listing: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and has_image_suffix(p) and p.is_file())
        if files:
            listing[folder.name] = [f"{folder.name}/{name}" for name in files]
    return listing


def build_protocol(
    images: Mapping[str, Sequence[str]],
    *,
    enroll_per_identity: int = 1,
    max_probes: int = 5,
    gallery_size: int | None = None,
    seed: int = 0,
) -> OpenSetProtocol:
    """The open-set protocol of a listing (:func:`list_identity_images`; rules in the module docstring).

    Parameters
    ----------
    images : mapping of str to sequence of str
        Identity -> its image paths; each identity's paths are sorted here.
    enroll_per_identity : int
        K >= 1, enrollment photos per person.
    max_probes : int
        At most this many genuine probes per enrolled person (>= 1).
    gallery_size : int, optional
        Enroll a random subset of this many enrollable people (1..their number); None = all.
    seed : int
        Seed of that subset (numpy ``default_rng``).

    Raises
    ------
    ValueError
        A bad K, max_probes or gallery_size (the message says why).
    """
    if enroll_per_identity < 1:
        raise ValueError(f"enroll_per_identity must be >= 1, got {enroll_per_identity}")
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    k = enroll_per_identity
    enrollable: dict[str, list[str]] = {}
    impostors: list[Probe] = []
    neither: list[str] = []
    for identity in sorted(images):
        photos = sorted(images[identity])
        if len(photos) == 1:
            impostors.append(Probe(photos[0], identity))
        elif len(photos) > k:
            enrollable[identity] = photos
        elif photos:
            neither.append(identity)
    chosen = sorted(enrollable)
    left_out: list[str] = []
    if gallery_size is not None:
        if not 1 <= gallery_size <= len(enrollable):
            raise ValueError(f"gallery_size must be 1..{len(enrollable)} (the people with more than {k} photos), got {gallery_size}")
        drawn = set(np.random.default_rng(seed).choice(len(chosen), size=gallery_size, replace=False).tolist())
        left_out = [identity for i, identity in enumerate(chosen) if i not in drawn]
        chosen = [identity for i, identity in enumerate(chosen) if i in drawn]
    enrolled = {identity: tuple(enrollable[identity][:k]) for identity in chosen}
    genuine = [Probe(path, identity) for identity in chosen for path in enrollable[identity][k : k + max_probes]]
    return OpenSetProtocol(enrolled, tuple(genuine), tuple(impostors), tuple(neither), tuple(left_out), k, max_probes)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_protocol(
    protocol: OpenSetProtocol,
    embeddings: Mapping[str, np.ndarray | None],
    gallery: OpenSetGallery,
    *,
    workers: int = 2,
    progress: bool = True,
) -> OpenSetRun:
    """Enroll the protocol's templates into ``gallery``, ask its status, then send every probe.

    Parameters
    ----------
    embeddings : mapping
        Relative path -> ``(D,) float32`` embedding or None (no face); every path of
        :meth:`OpenSetProtocol.image_paths`.
    workers : int
        Probes searched concurrently (threads).
    """
    templates: list[tuple[str, np.ndarray]] = []
    enrolled: set[str] = set()
    missing_enroll = 0
    for identity, photos in protocol.enrolled.items():
        for path in photos:
            vector = embeddings[path]
            if vector is None:
                missing_enroll += 1
            else:
                templates.append((identity, vector))
                enrolled.add(identity)
    started = time.perf_counter()
    stored = gallery.enroll(templates)
    # Asking for the status before the first probe lets a target-FPIR gallery recalibrate to its
    # full enrollment once, so that every probe is decided in the same state (the steady state).
    status = gallery.status()
    enroll_s = time.perf_counter() - started
    genuine = [(p, embeddings[p.path], True) for p in protocol.genuine if p.identity_id in enrolled]
    impostors = [(p, embeddings[p.path], False) for p in protocol.impostors]
    searched = [(p, e, mated) for p, e, mated in (*genuine, *impostors) if e is not None]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        answers = list(tqdm(pool.map(lambda item: gallery.identify(item[1]), searched), total=len(searched), desc="probes", unit="probe", disable=not progress))
    probe_s = time.perf_counter() - started
    genuine_answers = [(p, a) for (p, _, mated), a in zip(searched, answers) if mated]
    impostor_answers = [(p, a) for (p, _, mated), a in zip(searched, answers) if not mated]
    no_face = {
        "enroll": missing_enroll,
        "unenrolled": len(protocol.enrolled) - len(enrolled),
        "genuine": sum(e is None for _, e, _ in genuine),
        "impostors": sum(e is None for _, e, _ in impostors),
    }
    return OpenSetRun(len(enrolled), stored, genuine_answers, impostor_answers, no_face, status, {"enroll": enroll_s, "probes": probe_s})


# ---------------------------------------------------------------------------------------------
# The figures
# ---------------------------------------------------------------------------------------------


def _arrays(run: OpenSetRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    genuine_scores = np.array([a.score for _, a in run.genuine], dtype=np.float64)
    genuine_correct = np.array([a.top_identity == p.identity_id for p, a in run.genuine], dtype=bool)
    impostor_scores = np.array([a.score for _, a in run.impostors], dtype=np.float64)
    return genuine_scores, genuine_correct, impostor_scores


def det_of_run(run: OpenSetRun) -> tuple[np.ndarray, np.ndarray]:
    """The run's DET curve (FPIR, FNIR) on its returned top scores (``metrics.det_curve``)."""
    fpir, fnir, _ = det_curve(*_arrays(run))
    return fpir, fnir


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _estimate_at_measured(impostor_scores: np.ndarray, estimates: np.ndarray, fpir: float) -> float | None:
    """``estimated_fpir`` of the impostor probe of rank ``ceil(fpir * m)`` by score (measured FPIR ~ fpir there)."""
    m = impostor_scores.size
    if m < min_impostors_for_fpir(fpir) or np.isnan(estimates).all():
        return None
    order = np.argsort(impostor_scores, kind="stable")
    rank = max(1, math.ceil(fpir * m - 1e-9))
    value = estimates[order[rank - 1]]
    return None if np.isnan(value) else float(value)


def summarize(run: OpenSetRun, fpirs: Sequence[float] = FPIR_POINTS) -> dict:
    """The figures of a run, as ``eval openset --json`` prints them.

    Returns
    -------
    dict
        ``gallery``, ``genuine``, ``impostors``, ``rank1``, ``dir_at_fpir`` (``"0.1"`` -> DIR or
        None), ``policy`` (``name``, ``fpir``, ``dir``, and ``wrong_identity`` (genuine probes given
        someone else), ``threshold`` (median of the answers'; ``threshold_range`` when they differ),
        ``score_kind``, ``estimated_fpir_mean_impostor``, ``estimated_fpir_mean_genuine``,
        ``estimated_fpir_at_measured`` (module docstring), ``inconsistent`` (answers whose decision
        is not "top candidate iff score <= threshold") and the gallery's ``status``), plus
        ``templates``, ``thresholds_at_fpir`` (the oracle thresholds) and ``no_face``.
    """
    genuine_scores, genuine_correct, impostor_scores = _arrays(run)
    answers = [a for _, a in (*run.genuine, *run.impostors)]
    dirs, oracle = {}, {}
    for f in fpirs:
        point = dir_at_fpir(genuine_scores, genuine_correct, impostor_scores, f)
        dirs[f"{f:g}"] = None if point is None else point["dir"]
        oracle[f"{f:g}"] = None if point is None else point["threshold"]
    thresholds = np.array([a.threshold for a in answers], dtype=np.float64)
    impostor_estimates = np.array([np.nan if a.estimated_fpir is None else a.estimated_fpir for _, a in run.impostors], dtype=np.float64)
    genuine_estimates = [a.estimated_fpir for _, a in run.genuine if a.estimated_fpir is not None]
    inconsistent = sum(
        (a.decision is not None) != (a.score <= a.threshold) or (a.decision is not None and a.decision != a.top_identity) for a in answers
    )
    policy: dict = {
        "name": run.status.get("name", ""),
        "fpir": _mean([a.decision is not None for _, a in run.impostors]),
        "dir": _mean([a.decision == p.identity_id for p, a in run.genuine]),
        "wrong_identity": _mean([a.decision is not None and a.decision != p.identity_id for p, a in run.genuine]),
        "threshold": float(np.median(thresholds)) if thresholds.size else None,
        "score_kind": answers[0].score_kind if answers else None,
        "estimated_fpir_mean_impostor": None if np.isnan(impostor_estimates).all() else float(np.nanmean(impostor_estimates)),
        "estimated_fpir_mean_genuine": _mean(genuine_estimates),
        "estimated_fpir_at_measured": {f"{f:g}": _estimate_at_measured(impostor_scores, impostor_estimates, f) for f in fpirs},
        "inconsistent": int(inconsistent),
        "status": run.status,
    }
    if thresholds.size and thresholds.min() != thresholds.max():
        policy["threshold_range"] = [float(thresholds.min()), float(thresholds.max())]
    return {
        "gallery": run.gallery,
        "genuine": len(run.genuine),
        "impostors": len(run.impostors),
        "rank1": float(np.mean(genuine_correct)) if genuine_correct.size else None,
        "dir_at_fpir": dirs,
        "policy": policy,
        "templates": run.templates,
        "thresholds_at_fpir": oracle,
        "no_face": dict(run.no_face),
    }


def jsonable(value):
    """``value`` with every non-finite float (nan, inf) replaced by None, so that ``json.dumps``
    writes standard JSON (``null``) instead of ``NaN`` / ``Infinity``."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(summary: dict) -> list[str]:
    """Human-readable lines of a :func:`summarize` result."""
    policy, no_face = summary["policy"], summary["no_face"]
    status = policy.get("status") or {}
    lines = [
        f"gallery: {summary['gallery']} identities ({summary['templates']} templates); probes: {summary['genuine']} genuine, "
        f"{summary['impostors']} impostor (strangers); no face: {no_face['enroll']} enrollment photos "
        f"({no_face['unenrolled']} people not enrolled), {no_face['genuine']} genuine and {no_face['impostors']} impostor probes",
        f"closed-set rank-1: {_fmt(summary['rank1'])}",
        "DIR at FPIR (oracle threshold on the returned score): "
        + ", ".join(
            f"{f}: {_fmt(d)}" + ("" if summary["thresholds_at_fpir"][f] is None else f" (t={summary['thresholds_at_fpir'][f]:.4g})")
            for f, d in summary["dir_at_fpir"].items()
        ),
        f"policy {policy['name']!r}: threshold {_fmt(policy['threshold'], 4)} on {policy['score_kind']} scores"
        + (f"; estimated FPIR there {status['estimated_fpir']:.3g}" if status.get("estimated_fpir") is not None else "")
        + (f"; basis: {status['basis']}" if status.get("basis") else ""),
        f"  its decisions: FPIR {_fmt(policy['fpir'], 4)} (strangers given an identity), DIR {_fmt(policy['dir'])} "
        f"(genuine probes given the right one), wrong identity {_fmt(policy['wrong_identity'], 4)}",
        f"  estimated_fpir: mean {_fmt(policy['estimated_fpir_mean_impostor'])} over strangers (about 0.5 if calibrated); at measured FPIR "
        + ", ".join(f"{f}: {_fmt(e, 4)}" for f, e in policy["estimated_fpir_at_measured"].items()),
    ]
    if policy["inconsistent"]:
        lines.append(f"  WARNING: {policy['inconsistent']} answers decide otherwise than 'top candidate iff score <= threshold'")
    return lines
