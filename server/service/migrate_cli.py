"""``facegallery migrate``: copy an embedded data directory's galleries into Milvus, or back
(gallery/migrate.py does the copy; docs/milvus.md)."""

from __future__ import annotations

from pathlib import Path

import click

from facegallery.server.contract.errors import FaceGalleryError
from facegallery.server.gallery.manager import DEFAULT_MILVUS_PREFIX, STORE_FILE, open_milvus_store
from facegallery.server.gallery.migrate import migrate_store
from facegallery.server.gallery.store import SqliteTemplateStore, TemplateStore

__all__ = ["migrate", "milvus_uri"]

_SCHEMES = {"milvus://": "http://", "milvus+https://": "https://"}


def milvus_uri(location: str) -> str | None:
    """The pymilvus uri of ``milvus://HOST:PORT`` (``milvus+https://`` for TLS), None for a path."""
    for scheme, http in _SCHEMES.items():
        if location.startswith(scheme):
            return http + location[len(scheme) :]
    return None


def _open(location: str, *, token: str, prefix: str) -> TemplateStore:
    uri = milvus_uri(location)
    if uri is None:
        return SqliteTemplateStore(Path(location).expanduser() / STORE_FILE)
    return open_milvus_store(uri, token=token, prefix=prefix)


@click.command("migrate")
@click.option("--from", "source", required=True, help="A data directory, or milvus://HOST:PORT (milvus+https:// for TLS).")
@click.option("--to", "target", required=True, help="milvus://HOST:PORT, or a data directory (created when missing).")
@click.option("--milvus-token", default="", envvar="FACEGALLERY_MILVUS_TOKEN", show_envvar=True, help="user:password or API key of the Milvus side.")
@click.option("--milvus-prefix", default=DEFAULT_MILVUS_PREFIX, show_default=True, help="Collection-name prefix of the Milvus side (as serve's).")
def migrate(source: str, target: str, milvus_token: str, milvus_prefix: str) -> None:
    """Copy every gallery (identities, templates with their faces, policies) and API key from one
    store into another: an embedded data directory into Milvus, or Milvus into a data directory.

    Resumable: run it again after an interruption and it copies only what is missing (a template
    whose identity already holds the same embedding is skipped); on a finished copy it copies
    nothing. Stop the servers writing the source first. Not copied: calibrations (recomputed),
    Enroll request ids; template ids change. Exit 1 on an error (what was copied stays).
    """
    if (milvus_uri(source) is None) == (milvus_uri(target) is None):
        raise click.UsageError("one of --from and --to must be milvus://HOST:PORT and the other a data directory")
    if milvus_uri(source) is None and not (Path(source).expanduser() / STORE_FILE).is_file():
        raise click.UsageError(f"no gallery store at {Path(source).expanduser() / STORE_FILE}")
    try:
        src = _open(source, token=milvus_token, prefix=milvus_prefix)
        try:
            dst = _open(target, token=milvus_token, prefix=milvus_prefix)
            try:
                results = migrate_store(src, dst, progress=lambda gallery, done: click.echo(f"  {gallery}: {done} templates", err=True))
            finally:
                dst.close()
        finally:
            src.close()
    except FaceGalleryError as exc:
        raise click.ClickException(f"{exc} (run the same command again to resume)") from exc
    except RuntimeError as exc:  # no pymilvus: what to install
        raise click.ClickException(str(exc)) from exc
    for r in results:
        click.echo(f"{r.name}: {r.copied} templates copied, {r.skipped} already there{' (gallery created)' if r.created else ''}")
