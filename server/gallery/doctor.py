"""Offline checks of a data directory: the store, its WAL, the index snapshots and the model files.

``facegallery doctor`` (service/cli.py) runs :func:`diagnose` and prints one line per
:class:`Finding`. The server need not run, and may: SQLite in WAL mode lets a reader open the
store while the server writes (https://sqlite.org/wal.html), and nothing here writes to the data
directory except what opening the store does (``SqliteTemplateStore``: the WAL journal mode and
schema statements, which change nothing in a current store; closing the last connection to the
file checkpoints its WAL, as any SQLite reader would).

What each status means:

* ``OK``: sound, or a condition the server handles by itself at start (a snapshot a few changes
  behind is replayed).
* ``WARN``: the server starts, but something costs time or needs attention: a snapshot that will
  be rebuilt, a stale file, a large WAL, a gallery bound to another model.
* ``FAIL``: the server would refuse to start, or acknowledged data has been lost: a damaged store,
  a missing or changed model file, a snapshot newer than the store.

Layout of the data directory (manager.py): ``gallery.sqlite3`` (with ``-wal`` and ``-shm`` while
open) and ``index/gallery-<key>.fgidx`` (snapshot.py). docs/durability.md explains what the
checks protect against.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from facegallery.server.contract.errors import ModelError, StoreCorruptError
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.gallery.ann_index import IndexPlan
from facegallery.server.gallery.index import DEFAULT_FACTORY
from facegallery.server.gallery.manager import INDEX_DIR, STORE_FILE
from facegallery.server.gallery.snapshot import (
    SNAPSHOT_SUFFIX,
    SnapshotError,
    read_snapshot,
    snapshot_path,
)
from facegallery.server.gallery.store import (
    INTEGRITY_CHECKS,
    SCHEMA_VERSION,
    GalleryRecord,
    SqliteTemplateStore,
)

__all__ = [
    "WAL_WARN_BYTES",
    "Finding",
    "Status",
    "check_model",
    "check_snapshots",
    "check_store",
    "check_wal",
    "diagnose",
    "worst",
]

LOG = logging.getLogger(__name__)

#: A ``-wal`` file larger than this is reported (WARN): a checkpoint is pending, e.g. because a
#: reader held the WAL open for long; SQLite checkpoints at 1000 pages (4 MB) by default.
WAL_WARN_BYTES = 64 * 1024 * 1024
#: Index rebuild cost from the store, seconds per 100,000 templates: 0.19-0.20 s measured on a
#: 2-core machine (128-d float32, flat index, page cache warm); a cold cache adds a file read.
_REBUILD_S_PER_100K = 0.2
#: Snapshot files and the temporary files of interrupted writes (snapshot.py).
_SNAPSHOT_NAME = re.compile(r"(\.?)gallery-(\d+)" + re.escape(SNAPSHOT_SUFFIX) + r"(\..*)?")


class Status(str, enum.Enum):
    """How a check came out; ordered OK < WARN < FAIL."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def rank(self) -> int:
        return list(Status).index(self)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One check's result: ``check`` names what was checked (``"store"``, ``"snapshot g"``, ...),
    ``message`` says what was found and, unless OK, what to do."""

    check: str
    status: Status
    message: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "message": self.message}


def worst(findings: Iterable[Finding]) -> Status:
    """The worst status among ``findings`` (OK when there are none)."""
    return max((f.status for f in findings), key=lambda s: s.rank, default=Status.OK)


def diagnose(data_dir: str | Path, model_dir: str | Path | None = None, *, integrity_check: str = "quick") -> list[Finding]:
    """Check the data directory ``data_dir`` and, when given, the model directory ``model_dir``.

    ``integrity_check`` is ``"quick"`` (``PRAGMA quick_check``) or ``"full"``
    (``PRAGMA integrity_check``), as ``SqliteTemplateStore``. Returns the findings in the order
    checked: the WAL, the store and its galleries, the snapshots, the model. Never raises for
    what it finds; a store that cannot be opened ends the store checks with a FAIL.
    """
    if integrity_check not in INTEGRITY_CHECKS or INTEGRITY_CHECKS[integrity_check] is None:
        raise ValueError(f"integrity_check must be 'quick' or 'full', not {integrity_check!r}")
    data_dir = Path(data_dir)
    store_path = data_dir / STORE_FILE
    findings = check_wal(store_path)
    store_findings, store = check_store(store_path, integrity_check=integrity_check)
    findings += store_findings
    if store is not None:
        try:
            galleries = store.list_galleries()
            findings += check_snapshots(store, galleries, data_dir / INDEX_DIR)
        except sqlite3.DatabaseError as exc:  # damage the integrity check did not see
            findings.append(Finding("store", Status.FAIL, f"reading {store_path} failed: {exc}"))
            galleries = []
        finally:
            store.close()
    else:
        galleries = None
    if model_dir is not None:
        findings += check_model(model_dir, galleries or [])
    return findings


def check_wal(store_path: str | Path) -> list[Finding]:
    """The store's ``-wal`` file: absent (checkpointed, OK), present (OK; its size), or larger
    than :data:`WAL_WARN_BYTES` (WARN). Look before the store is opened: closing it checkpoints."""
    wal = Path(f"{store_path}-wal")
    if not wal.is_file():
        return [Finding("wal", Status.OK, f"no {wal.name} (every commit is checkpointed into {Path(store_path).name})")]
    size = wal.stat().st_size
    if size > WAL_WARN_BYTES:
        return [
            Finding(
                "wal",
                Status.WARN,
                f"{wal} is {_mib(size)} (over {_mib(WAL_WARN_BYTES)}): a checkpoint is pending. It holds committed writes: "
                f"never delete it or copy {Path(store_path).name} without it; stopping the server checkpoints it",
            )
        ]
    return [Finding("wal", Status.OK, f"{wal.name} is {_mib(size)} (committed writes not yet checkpointed; the server may be running)")]


def check_store(store_path: str | Path, *, integrity_check: str = "quick") -> tuple[list[Finding], SqliteTemplateStore | None]:
    """Open the store, run its integrity check, report its schema version and galleries.

    Returns the findings and the open store (the caller closes it), or None when it could not
    be opened: missing (FAIL: ``serve`` would start with an empty store), damaged (FAIL, the
    store's own message with the repair options), an unknown schema version (FAIL), or schema
    version 1 or 2 (WARN: ``serve`` migrates it; doctor does not write, so checks nothing further).
    """
    path = Path(store_path)
    if not path.is_file():
        return [Finding("store", Status.FAIL, f"no store at {path}: `facegallery serve` would start with empty galleries")], None
    version = _schema_version(path)
    if version is not None and version not in (1, 2, SCHEMA_VERSION):
        return [Finding("store", Status.FAIL, f"{path} has schema version {version}; this version of facegallery reads 1 to {SCHEMA_VERSION}")], None
    if version in (1, 2):
        message = f"{path} has schema version {version}: `facegallery serve` migrates it to {SCHEMA_VERSION} at start; run doctor again after that"
        return [Finding("store", Status.WARN, message)], None
    started = time.perf_counter()
    try:
        store = SqliteTemplateStore(path, integrity_check=integrity_check)
    except StoreCorruptError as exc:
        return [Finding("store", Status.FAIL, str(exc))], None
    except sqlite3.OperationalError as exc:  # locked beyond the busy timeout, I/O error, permissions
        return [Finding("store", Status.FAIL, f"cannot open {path}: {exc}")], None
    elapsed = time.perf_counter() - started
    try:
        galleries = store.list_galleries()
    except sqlite3.DatabaseError as exc:
        store.close()
        return [Finding("store", Status.FAIL, f"{path} passed PRAGMA {INTEGRITY_CHECKS[integrity_check]} but reading it failed: {exc}")], None
    templates = sum(g.template_count for g in galleries)
    findings = [
        Finding(
            "store",
            Status.OK,
            f"{path}: schema version {SCHEMA_VERSION}, PRAGMA {INTEGRITY_CHECKS[integrity_check]} ok ({elapsed:.2f} s), "
            f"{_count(len(galleries), 'gallery', 'galleries')}, {_count(templates, 'template')}",
        )
    ]
    for g in galleries:
        findings.append(
            Finding(
                f"gallery {g.name}",
                Status.OK,
                f"{_count(g.identity_count, 'identity', 'identities')}, {_count(g.template_count, 'template')}, "
                f"{g.embedding_dim}-d {g.metric}, last change {g.last_seq}, model {g.model_id[:12]}",
            )
        )
    return findings, store


def check_snapshots(store: SqliteTemplateStore, galleries: Sequence[GalleryRecord], index_dir: str | Path, *, index_factory: str = DEFAULT_FACTORY) -> list[Finding]:
    """Each gallery's index snapshot against the store, and stale files in ``index_dir``.

    Per gallery: no snapshot (OK: built from the store at start); a snapshot that replays to the
    store's template ids (OK: "will replay N changes"); unreadable, corrupt, of another gallery,
    dimension or index type, or not matching after replay (WARN: rebuilt from the store at start,
    with the estimated time); newer than the store (FAIL: the store lacks changes the snapshot
    holds: committed writes were lost, unless the store was restored from a backup on purpose).
    Then files of deleted galleries and leftovers of interrupted writes (WARN: deleted at start).
    """
    index_dir = Path(index_dir)
    findings = []
    for g in galleries:
        findings.append(_check_snapshot(store, g, snapshot_path(index_dir, g.key), index_factory))
    live = {g.key for g in galleries}
    stale = []
    if index_dir.is_dir():
        for path in sorted(index_dir.iterdir()):
            match = _SNAPSHOT_NAME.fullmatch(path.name)
            if match and (match.group(1) or match.group(3) or int(match.group(2)) not in live):
                stale.append(path)
    if stale:
        names = ", ".join(p.name for p in stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        findings.append(
            Finding(
                "index",
                Status.WARN,
                f"{_count(len(stale), 'stale file')} in {index_dir} (deleted galleries or interrupted snapshot writes): {names}; "
                "`facegallery serve` deletes them at start (if the server is running now, a temporary file may be a snapshot being written)",
            )
        )
    return findings


def _check_snapshot(store: SqliteTemplateStore, g: GalleryRecord, path: Path, index_factory: str) -> Finding:
    check = f"snapshot {g.name}"
    rebuild = f"will be rebuilt from the store at start (takes ~{_rebuild_estimate(g.template_count)})"
    if not path.exists():
        return Finding(check, Status.OK, f"no {path.name}: the index will be built from the store at start (takes ~{_rebuild_estimate(g.template_count)})")
    try:
        header, index = read_snapshot(path)
    except (SnapshotError, OSError) as exc:
        return Finding(check, Status.WARN, f"{exc}; the index {rebuild}")
    if (header.gallery_key, header.d) != (g.key, g.embedding_dim) or not IndexPlan(index_factory).accepts(header.factory):
        got = f"gallery key {header.gallery_key}, {header.d}-d, {header.factory!r}"
        want = f"gallery key {g.key}, {g.embedding_dim}-d, {index_factory!r} or an IVF index (the server's defaults)"
        return Finding(check, Status.WARN, f"{path} holds {got}, the store needs {want}; the index {rebuild}")
    if header.last_seq > g.last_seq:
        return Finding(
            check,
            Status.FAIL,
            f"{path} holds changes up to {header.last_seq}, the store only up to {g.last_seq}: the store has lost committed "
            "writes (a deleted or truncated -wal file, or a store copied while the server ran), unless it was restored from a backup "
            f"on purpose. The server rebuilds the index from the store (the lost templates are gone from search too); "
            "restore the store from a backup, or enroll them again",
        )
    changes = store.changes_since(g.name, header.last_seq)
    removed = {c.template_id for c in changes if c.op == "remove"}
    added = {c.template_id for c in changes if c.op == "add"} - removed
    replayed = np.union1d(np.setdiff1d(index.ids(), np.fromiter(removed, np.int64, len(removed))), np.fromiter(added, np.int64, len(added)))
    if not np.array_equal(replayed, np.sort(store.template_ids(g.name))):
        return Finding(check, Status.WARN, f"{path} (change {header.last_seq}) plus {_count(len(changes), 'change')} does not match the store; the index {rebuild}")
    if not changes:
        return Finding(check, Status.OK, f"{path.name} is up to date ({_count(header.ntotal, 'template')}, change {header.last_seq})")
    return Finding(
        check,
        Status.OK,
        f"{path.name} is behind (change {header.last_seq} of {g.last_seq}, {header.ntotal} of {g.template_count} templates): "
        f"will replay {_count(len(changes), 'change')} at start",
    )


def check_model(model_dir: str | Path, galleries: Sequence[GalleryRecord]) -> list[Finding]:
    """The model directory (``ModelManifest.load(verify=True)``: every file's sha256; a missing
    or changed file, or a bad ``model.json``, is a FAIL), then each gallery's model id against
    the model's embedding ids with and without flip augmentation (another model: WARN, image
    calls on that gallery are refused)."""
    model_dir = Path(model_dir)
    started = time.perf_counter()
    try:
        manifest = ModelManifest.load(model_dir, verify=True)
    except ModelError as exc:
        return [Finding("model", Status.FAIL, f"{exc}; `facegallery serve --model-dir {model_dir}` would not start (convert the model again)")]
    findings = [
        Finding(
            "model",
            Status.OK,
            f"{model_dir}: {manifest.name} {manifest.version}, {_count(len(manifest.files), 'file')} match model.json "
            f"({time.perf_counter() - started:.2f} s), embedding id {manifest.embedding_id(False)[:12]}",
        )
    ]
    plain, flipped, legacy = manifest.embedding_id(False), manifest.embedding_id(True), manifest.files["embedder"].sha256
    for g in galleries:
        check = f"model {g.name}"
        if g.model_id == plain:
            findings.append(Finding(check, Status.OK, "the gallery's model is this model"))
        elif g.model_id == flipped:
            findings.append(Finding(check, Status.OK, "the gallery's model is this model with flip augmentation (serve --flip-augment)"))
        elif g.model_id == legacy:
            findings.append(Finding(check, Status.OK, "the gallery records this embedder's sha256 (a legacy model id); serve rewrites it as the embedding id at start"))
        else:
            findings.append(
                Finding(
                    check,
                    Status.WARN,
                    f"the gallery's model id is {g.model_id}, this model's embedding id is {plain} ({flipped} with flip augmentation): "
                    "image calls and embeddings of this model are refused on it; serve the model it was made with, or export and re-enroll",
                )
            )
    return findings


def _schema_version(path: Path) -> int | None:
    """``PRAGMA user_version`` read on a read-only connection; None when SQLite cannot read it
    (the store's own open reports the damage)."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def _rebuild_estimate(templates: int) -> str:
    seconds = templates / 100_000 * _REBUILD_S_PER_100K
    return f"{seconds:.1f} s" if seconds >= 0.1 else "0.1 s"


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size / 1024:.0f} KiB"


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"
