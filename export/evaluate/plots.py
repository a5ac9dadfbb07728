"""ROC plot for verification results (matplotlib, optional: ``pip install facegallery[plot]``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facegallery.server.contract.files import atomic_write

__all__ = ["roc_curve", "plot_roc", "require_matplotlib"]


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


def plot_roc(distances: np.ndarray, same: np.ndarray, out: str | Path, *, title: str = "ROC") -> Path:
    """Write the ROC curve (TAR against FAR, log-scaled FAR) to a PNG file."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    with atomic_write(out) as f:
        fig.savefig(f, format=Path(out).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return Path(out)
