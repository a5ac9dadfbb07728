"""Durable file writes: every file the project writes goes through :func:`atomic_write`.

A reader (or a process restarted after a crash or power loss) sees either the old file or the
complete new one, never a torn one: the bytes go to a temporary file in the same directory, are
flushed and fsynced, the file is renamed over the target (``os.replace``, atomic on POSIX within
one file system), and the directory is fsynced so the rename itself is durable. This is the
sequence SQLite and LevelDB use for their own files (see e.g. "Files are hard", Dan Luu, 2015).
Files get the permissions a plain ``open()`` would give them (0666 less the umask); keep the data
directory itself private (snapshots and exports hold biometric data).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_bytes_atomic", "write_text_atomic", "fsync_dir"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, making renames and new entries in it durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` atomically and durably when the block ends.

    Parameters
    ----------
    path : path
        The file to (re)place; its directory must exist.
    mode : {"wb", "w"}
        Binary or text.
    encoding : str, optional
        Text encoding for ``mode="w"`` (default utf-8).

    Yields
    ------
    file object
        Write to it. On a normal exit it is flushed, fsynced, renamed over ``path`` and the
        directory fsynced; on an exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    tmp_name = os.fspath(target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: a fresh file of our own; mode 0o666 is reduced by the umask, as open() does. Reopened
    # by name below because writers such as onnx.save_model read the file object's ``name``.
    os.close(os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with open(tmp_name, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (:func:`atomic_write`); returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``text`` atomically and durably (:func:`atomic_write`); returns the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)
