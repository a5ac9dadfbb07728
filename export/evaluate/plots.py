"""ROC plot for verification results and DET plot for open-set identification (matplotlib, optional:
``pip install facegallery[plot]``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facegallery.server.contract.files import atomic_write

__all__ = ["roc_curve", "plot_roc", "plot_det", "require_matplotlib"]


def require_matplotlib() -> None:
    """Fail early (before hours of embedding) when matplotlib is missing.

    Raises
    ------
    RuntimeError
        matplotlib cannot be imported.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("plotting needs matplotlib: pip install 'facegallery[plot]'") from exc


def roc_curve(distances: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAR and TAR at every distinct finite threshold.

    Parameters
    ----------
    distances : (n,) float
        L2 distances, ``inf`` for missing faces (never accepted).
    same : (n,) bool

    Returns
    -------
    far, tar : (m,) float64, ascending in threshold.
    """
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    thresholds = np.unique(distances[np.isfinite(distances)])
    genuine, impostor = np.sort(distances[same]), np.sort(distances[~same])
    tar = np.searchsorted(genuine, thresholds, side="right") / max(genuine.size, 1)
    far = np.searchsorted(impostor, thresholds, side="right") / max(impostor.size, 1)
    return far, tar


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    with atomic_write(out) as f:
        fig.savefig(f, format=Path(out).suffix.lstrip(".").lower() or "png")
    return Path(out)


def plot_roc(distances: np.ndarray, same: np.ndarray, out: str | Path, *, title: str = "ROC") -> Path:
    """Write the ROC curve (TAR against FAR, log-scaled FAR) to a PNG file."""
    plt = _pyplot()
    far, tar = roc_curve(distances, same)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    keep = far > 0
    ax.plot(far[keep], tar[keep], lw=1.5)
    ax.set_xscale("log")
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return Path(out)


def plot_det(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    out: str | Path,
    *,
    points: Sequence[tuple[str, float, float]] = (),
    title: str = "DET",
) -> Path:
    """Write open-set DET curves (FNIR against FPIR, log-scaled FPIR, as NIST IR 8271 draws them) to a PNG.

    Parameters
    ----------
    curves : sequence of (label, fpir, fnir)
        One curve each, e.g. from ``metrics.det_curve``; points at FPIR 0 cannot be drawn on the log
        axis and are left out.
    points : sequence of (label, fpir, fnir)
        Operating points marked on the plot, e.g. the decision policy's own (drawn at the axis'
        lower end when its FPIR is 0).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    lowest = 1.0
    for label, fpir, fnir in curves:
        fpir, fnir = np.asarray(fpir, dtype=np.float64), np.asarray(fnir, dtype=np.float64)
        keep = fpir > 0
        if keep.any():
            lowest = min(lowest, float(fpir[keep].min()))
        ax.plot(fpir[keep], fnir[keep], lw=1.5, label=label, drawstyle="steps-post")
    for label, fpir, fnir in points:
        ax.plot([max(fpir, lowest)], [fnir], "o", ms=6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("false positive identification rate (FPIR)")
    ax.set_ylabel("false negative identification rate (FNIR = 1 - DIR)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if curves or points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out)
    plt.close(fig)
    return Path(out)
