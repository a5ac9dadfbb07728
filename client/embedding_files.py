"""Files of precomputed embeddings: what ``export-gallery`` writes and ``import-embeddings`` reads.

The format follows the file's suffix:

* ``.npz`` (numpy, :func:`numpy.savez`): arrays ``embeddings`` ``(N, D) float32``,
  ``identity_ids`` ``(N,)`` str (integers are taken as their decimal text), optional
  ``display_names`` ``(N,)`` str and ``model_id`` (0-d str). Identity ids, display names,
  embeddings and the model id only.
* ``.parquet`` (needs pyarrow: ``pip install 'facegallery[parquet]'``): columns ``identity_id``
  (string), ``embedding`` (list<float32>, D values each), optional ``display_name`` (string);
  the model id in the file's key-value metadata under ``model_id``. The same content as ``.npz``.
* anything else: JSON Lines, format :data:`EXPORT_FORMAT`: line 1 ``{"format", "gallery":
  {name, model_id, threshold, metric, embedding_dim, ...}}``, then one line per template
  ``{"identity_id", "display_name", "metadata", "template_id", "embedding": [float32 values],
  "source_sha256", "create_time"}``: everything an export holds, one template at a time.

``.npz`` and ``.parquet`` are read whole into an :class:`EmbeddingTable` (``N * D * 4`` bytes of
embeddings: 512 MB for 1M templates of 128 values) and imported in batches; JSON Lines is
streamed template by template. Every written file replaces its path only once complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from facegallery.client._models import ExportedTemplate, Gallery
from facegallery.server.contract.files import atomic_write

__all__ = [
    "EXPORT_FORMAT",
    "MODEL_ID_KEY",
    "EmbeddingTable",
    "ExportFileError",
    "file_format",
    "read_jsonl",
    "read_table",
    "write_export",
]

#: First-line ``format`` of JSON Lines export files.
EXPORT_FORMAT = "facegallery-export/1"
#: Key of the model id in a Parquet file's key-value metadata.
MODEL_ID_KEY = "model_id"
#: Suffix -> format; any other suffix is JSON Lines.
_FORMATS = {".npz": "npz", ".parquet": "parquet"}


class ExportFileError(ValueError):
    """An embeddings file that cannot be read back (the message names the file and the fault)."""


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """N templates column by column, as ``.npz`` and ``.parquet`` files hold them.

    Attributes
    ----------
    identity_ids : list of str
        ``(N,)``: each template's identity.
    embeddings : ndarray
        ``(N, D) float32``.
    display_names : list of str or None
        ``(N,)`` (``""`` for none), or None: the file has no names.
    model_id : str or None
        The model the embeddings were computed with, or None: not in the file.
    """

    identity_ids: list[str]
    embeddings: np.ndarray
    display_names: list[str] | None = None
    model_id: str | None = None

    def __post_init__(self) -> None:
        n = len(self.identity_ids)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n or self.embeddings.dtype != np.float32:
            raise ValueError(f"embeddings must be ({n}, D) float32 (one row per identity id), got {self.embeddings.shape} {self.embeddings.dtype}")
        if self.display_names is not None and len(self.display_names) != n:
            raise ValueError(f"display_names must have one entry per identity id ({n}), got {len(self.display_names)}")

    def __len__(self) -> int:
        return len(self.identity_ids)

    @classmethod
    def from_templates(cls, templates: Iterable[ExportedTemplate], model_id: str | None) -> EmbeddingTable:
        """The identity ids, display names and embeddings of ``templates`` (metadata, template
        ids, source hashes and times are dropped); ``display_names`` None when all are empty."""
        ids: list[str] = []
        names: list[str] = []
        rows: list[np.ndarray] = []
        for template in templates:
            ids.append(template.identity_id)
            names.append(template.display_name)
            rows.append(template.embedding)
        x = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, 0), np.float32)
        return cls(ids, x, names if any(names) else None, model_id)


def file_format(path: str | Path) -> str:
    """``"npz"``, ``"parquet"`` or ``"jsonl"``, from the suffix of ``path`` (case-insensitive)."""
    return _FORMATS.get(Path(path).suffix.lower(), "jsonl")


# ---------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: Path) -> tuple[dict[str, Any], Iterator[ExportedTemplate]]:
    """Header and lazily parsed templates of a JSON Lines export file.

    The file stays open until the templates are exhausted or closed. Raises ExportFileError for
    a first line that is not the header, and (while iterating) for a malformed later line,
    naming its number.
    """
    stream = path.open("rb")  # decoded line by line, so an error names its line
    try:
        header = json.loads(stream.readline().decode("utf-8") or "null")
    except UnicodeDecodeError as exc:
        stream.close()
        raise ExportFileError(f"{path}: not an export-gallery file (line 1 is not UTF-8 text: {exc.reason})") from exc
    except json.JSONDecodeError as exc:
        stream.close()
        raise ExportFileError(f"{path}: line 1 is not JSON ({exc})") from exc
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        stream.close()
        raise ExportFileError(f"{path}: expected a first line with format {EXPORT_FORMAT!r}")

    def templates() -> Iterator[ExportedTemplate]:
        with stream:
            for number, raw in enumerate(stream, start=2):
                if not raw.strip():
                    continue
                try:
                    data = json.loads(raw.decode("utf-8"))
                    created = data.get("create_time")
                    yield ExportedTemplate(
                        identity_id=data["identity_id"],
                        display_name=data.get("display_name", ""),
                        metadata=dict(data.get("metadata", {})),
                        template_id=int(data.get("template_id", 0)),
                        embedding=np.asarray(data["embedding"], dtype=np.float32),
                        source_sha256=data.get("source_sha256", ""),
                        create_time=datetime.datetime.fromisoformat(created) if created else None,
                    )
                except UnicodeDecodeError as exc:
                    raise ExportFileError(f"{path}: line {number} is not UTF-8 text ({exc.reason})") from exc
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ExportFileError(f"{path}: line {number}: {type(exc).__name__}: {exc}") from exc

    return header, templates()


def read_table(path: Path) -> EmbeddingTable:
    """The templates of a ``.npz`` or ``.parquet`` file (by suffix), read whole.

    Raises ExportFileError for a file that is not of its format or lacks a required array or
    column, ImportError (naming the ``parquet`` extra) for Parquet without pyarrow.
    """
    kind = file_format(path)
    if kind == "npz":
        return _read_npz(path)
    if kind == "parquet":
        return _read_parquet(path)
    raise ExportFileError(f"{path}: read_table reads .npz and .parquet files, not JSON Lines (read_jsonl)")


def _read_npz(path: Path) -> EmbeddingTable:
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"embeddings", "identity_ids"} - set(data.files)
            if missing:
                raise ExportFileError(f"{path}: missing array(s) {sorted(missing)}; a .npz import needs 'embeddings' (N, D) float32 and 'identity_ids' (N,)")
            x = data["embeddings"]
            ids = _strings(data["identity_ids"], path, "identity_ids")
            names = _strings(data["display_names"], path, "display_names") if "display_names" in data.files else None
            model_id = _strings(data["model_id"].reshape(1), path, "model_id")[0] if "model_id" in data.files else None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ExportFileError):
            raise
        raise ExportFileError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if x.ndim != 2 or not (np.issubdtype(x.dtype, np.floating)):
        raise ExportFileError(f"{path}: 'embeddings' must be (N, D) float32, got shape {x.shape} {x.dtype}")
    return _table(path, ids, x.astype(np.float32, copy=False), names, model_id or None)


def _strings(array: np.ndarray, path: Path, name: str) -> list[str]:
    """A 1-D array of str, bytes (UTF-8) or integers as a list of str."""
    if array.ndim != 1:
        raise ExportFileError(f"{path}: {name!r} must be one-dimensional, got shape {array.shape}")
    if array.dtype.kind == "U":
        return array.tolist()
    if array.dtype.kind == "S":
        return [v.decode("utf-8") for v in array.tolist()]
    if array.dtype.kind in "iu":
        return [str(v) for v in array.tolist()]
    raise ExportFileError(f"{path}: {name!r} must hold strings (or integer ids), got dtype {array.dtype}")


def _read_parquet(path: Path) -> EmbeddingTable:
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ExportFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = {"identity_id", "embedding"} - set(table.column_names)
    if missing:
        raise ExportFileError(f"{path}: missing column(s) {sorted(missing)}; a Parquet import needs 'identity_id' and 'embedding' (list<float32>)")
    column = table.column("embedding").combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type)) or column.null_count:
        raise ExportFileError(f"{path}: column 'embedding' must be list<float32> without nulls, got {column.type} ({column.null_count} nulls)")
    n = len(column)
    values = column.flatten().to_numpy(zero_copy_only=False)
    lengths = np.diff(column.offsets.to_numpy()) if not pa.types.is_fixed_size_list(column.type) else np.full(n, column.type.list_size)
    if n and (lengths != lengths[0]).any():
        raise ExportFileError(f"{path}: every embedding must have the same length, got lengths {sorted(set(lengths.tolist()))[:5]}")
    x = values.astype(np.float32, copy=False).reshape(n, int(lengths[0]) if n else 0)
    ids = [str(v) for v in table.column("identity_id").to_pylist()]
    names = [v or "" for v in table.column("display_name").to_pylist()] if "display_name" in table.column_names else None
    model_id = (table.schema.metadata or {}).get(MODEL_ID_KEY.encode())
    return _table(path, ids, x, names, model_id.decode("utf-8") if model_id else None)


def _table(path: Path, ids: list[str], x: np.ndarray, names: list[str] | None, model_id: str | None) -> EmbeddingTable:
    try:
        return EmbeddingTable(ids, x, names, model_id)
    except ValueError as exc:
        raise ExportFileError(f"{path}: {exc}") from exc


def _pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, imported on first use; ImportError naming the extra."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("Parquet files need pyarrow: pip install 'facegallery[parquet]'") from exc
    return pyarrow, pyarrow.parquet


# ---------------------------------------------------------------------------------------------
# Writing


def write_export(file: Path, gallery: Gallery, templates: Iterable[ExportedTemplate]) -> int:
    """Write ``gallery``'s ``templates`` to ``file`` in the format of its suffix; returns how many.

    ``file`` is replaced only once the export is complete (an interrupted or failed export leaves
    any earlier file as it was and no partial one); ``"-"`` streams JSON Lines to stdout.
    """
    kind = "jsonl" if str(file) == "-" else file_format(file)
    if kind == "jsonl":
        with _text_output(file) as out:
            return _write_jsonl(out, gallery, templates)
    table = EmbeddingTable.from_templates(templates, gallery.model_id)
    with atomic_write(file, "wb") as out:
        (_write_npz if kind == "npz" else _write_parquet)(out, table)
    return len(table)


@contextlib.contextmanager
def _text_output(file: Path) -> Iterator[IO[str]]:
    """stdout for ``-`` (left open), else an atomically replaced text file."""
    if str(file) == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_write(file, "w", encoding="utf-8") as out:
        yield out


def _write_jsonl(out: IO[str], gallery: Gallery, templates: Iterable[ExportedTemplate]) -> int:
    out.write(json.dumps({"format": EXPORT_FORMAT, "gallery": gallery.to_dict()}) + "\n")
    count = 0
    for template in templates:
        # float32 -> Python float is exact and json writes a double's shortest round-trip
        # repr, so reading the value back as float32 restores the very same bits.
        out.write(json.dumps(template.to_dict(), ensure_ascii=False) + "\n")
        count += 1
    return count


def _write_npz(out: IO[bytes], table: EmbeddingTable) -> None:
    arrays: dict[str, np.ndarray] = {"embeddings": table.embeddings, "identity_ids": np.array(table.identity_ids, dtype=str)}
    if table.display_names is not None:
        arrays["display_names"] = np.array(table.display_names, dtype=str)
    if table.model_id:
        arrays["model_id"] = np.array(table.model_id)
    np.savez(out, **arrays)


def _write_parquet(out: IO[bytes], table: EmbeddingTable) -> None:
    pa, pq = _pyarrow()
    n, d = table.embeddings.shape
    offsets = pa.array(np.arange(0, n * d + 1, max(d, 1), dtype=np.int32)[: n + 1])
    columns = {
        "identity_id": pa.array(table.identity_ids, pa.string()),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(table.embeddings.reshape(-1), pa.float32())),
    }
    if table.display_names is not None:
        columns["display_name"] = pa.array(table.display_names, pa.string())
    metadata = {MODEL_ID_KEY: table.model_id} if table.model_id else None
    pq.write_table(pa.table(columns, metadata=metadata), out)
