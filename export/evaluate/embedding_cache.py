"""An on-disk cache of the central-face embedding of each image of a folder tree.

Embedding a benchmark tree is the slow part of an evaluation (the 8,291 LFW images take minutes);
the decision experiments on top of it take seconds. :func:`cached_embeddings` keeps what
:func:`facegallery.export.evaluate.lfw.embed_lfw_images` computed in one ``.npz`` per model and
image root under ``user_cache_dir()/embeddings/``:

* the file name holds the pipeline's ``model_id`` (which covers the embedder, the chip and flip
  augmentation) and a hash of the resolved image root;
* each entry is keyed by the image's relative path, size and modification time (ns); an image
  whose size or mtime changed is embedded again;
* an image without a face (or that cannot be decoded) is cached as such (``found`` false), so it
  is not retried until it changes;
* the file is rewritten atomically (``atomic_write``) after every chunk of new embeddings, so an
  interrupted run keeps what it computed.

Arrays of the file: ``paths`` (n,) str, ``sizes`` (n,) int64, ``mtimes`` (n,) int64 ns, ``found``
(n,) bool, ``embeddings`` (n, D) float32 (zeros where not found), ``model_id`` () str. Deleting the
directory is always safe.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from facegallery.server.contract.files import atomic_write
from facegallery.server.contract.paths import user_cache_dir

__all__ = ["cache_file", "cached_embeddings", "CACHE_SUBDIR"]

LOG = logging.getLogger(__name__)

#: Subdirectory of ``user_cache_dir()`` holding the embedding caches.
CACHE_SUBDIR = "embeddings"
#: New embeddings computed between two writes of the cache file.
_CHUNK = 1000


def cache_file(model_id: str, images_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache file of one model and image root (``<cache_dir>/<model_id[:16]>-<root hash>.npz``).

    ``cache_dir`` defaults to ``user_cache_dir() / "embeddings"``.
    """
    root = os.fspath(Path(images_dir).resolve())
    directory = Path(cache_dir) if cache_dir is not None else user_cache_dir() / CACHE_SUBDIR
    return directory / f"{model_id[:16]}-{hashlib.sha256(root.encode()).hexdigest()[:12]}.npz"


def _stat_key(root: Path, rel: str) -> tuple[int, int] | None:
    try:
        st = (root / rel).stat()
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _load(path: Path, model_id: str) -> dict[str, tuple[int, int, np.ndarray | None]]:
    """Relative path -> (size, mtime_ns, embedding or None); empty when missing, unreadable or of another model."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["model_id"]) != model_id:
                LOG.warning("%s holds embeddings of model %s, not %s: ignored", path, str(data["model_id"])[:12], model_id[:12])
                return {}
            paths, sizes, mtimes, found, embeddings = (data[k] for k in ("paths", "sizes", "mtimes", "found", "embeddings"))
    except (OSError, ValueError, KeyError) as exc:
        LOG.warning("embedding cache %s unreadable (%s): ignored", path, exc)
        return {}
    return {
        str(p): (int(s), int(m), embeddings[i].copy() if f else None)
        for i, (p, s, m, f) in enumerate(zip(paths, sizes, mtimes, found))
    }


def _save(path: Path, model_id: str, entries: dict[str, tuple[int, int, np.ndarray | None]], dim: int) -> None:
    names = sorted(entries)
    embeddings = np.zeros((len(names), dim), dtype=np.float32)
    found = np.zeros(len(names), dtype=bool)
    for i, name in enumerate(names):
        vector = entries[name][2]
        if vector is not None:
            embeddings[i], found[i] = vector, True
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(
            f,
            paths=np.array(names, dtype=str),
            sizes=np.array([entries[n][0] for n in names], dtype=np.int64),
            mtimes=np.array([entries[n][1] for n in names], dtype=np.int64),
            found=found,
            embeddings=embeddings,
            model_id=np.array(model_id),
        )


def cached_embeddings(
    pipeline,
    images_dir: str | os.PathLike,
    relative_paths: list[str],
    *,
    workers: int = 1,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray | None]:
    """The central-face embedding of each image, from the cache where it is current.

    Parameters
    ----------
    pipeline : FacePipeline
        Its ``model_id`` keys the cache file; new embeddings come from
        :func:`~facegallery.export.evaluate.lfw.embed_lfw_images` (the face nearest the image centre).
    images_dir : path
        The root the relative paths are under.
    relative_paths : list of str
        ``<identity>/<file>`` (posix separators).
    workers : int
        Images embedded concurrently.
    cache_dir : path, optional
        Default ``user_cache_dir() / "embeddings"``.

    Returns
    -------
    dict
        Relative path -> ``(D,) float32`` embedding, or None (no face, or an undecodable image:
        logged when embedded, and cached like a face-less image; a missing file is not cached).
    """
    from facegallery.export.evaluate.lfw import embed_lfw_images

    root = Path(images_dir)
    model_id = pipeline.model_id
    dim = pipeline.manifest.embedding_dim
    path = cache_file(model_id, root, cache_dir)
    entries = _load(path, model_id)
    keys = {rel: _stat_key(root, rel) for rel in relative_paths}
    out: dict[str, np.ndarray | None] = {}
    todo: list[str] = []
    for rel, key in keys.items():
        cached = entries.get(rel)
        if key is not None and cached is not None and cached[:2] == key:
            out[rel] = cached[2]
        else:
            todo.append(rel)
    LOG.info("embedding cache %s: %d of %d images cached, %d to embed", path, len(out), len(keys), len(todo))
    for start in range(0, len(todo), _CHUNK):
        chunk = todo[start : start + _CHUNK]
        computed = embed_lfw_images(pipeline, root, chunk, workers=workers, progress=progress)
        for rel, vector in computed.items():
            out[rel] = vector
            key = keys[rel]
            if key is not None:
                entries[rel] = (*key, None if vector is None else np.asarray(vector, dtype=np.float32))
        try:
            _save(path, model_id, entries, dim)
        except OSError as exc:  # a read-only cache directory costs speed, not the result
            LOG.warning("could not write the embedding cache %s: %s", path, exc)
    return out
