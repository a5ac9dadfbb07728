"""Copy every gallery of one store into another: ``facegallery migrate`` (an embedded data
directory into Milvus, or back).

What is copied: each gallery (name, model id, L2 threshold, metric, dimension, decision policy),
its identities (id, display name, metadata, created) and templates (embedding, source sha256,
enrolled face, created), and the API keys (salted hashes, as stored). What is not: calibrations
(the target's servers recompute them), remembered Enroll request ids (a retry window of a day),
and template ids (the target assigns its own; ``template_id`` in results changes).

Resumable and idempotent: a gallery that exists in the target is filled, not replaced (it must
have the same model and dimension), and templates go through ``add_templates`` with
``skip_duplicates``, so a template whose identity already holds the same embedding is skipped.
Running it again after an interruption copies what is missing; running it on a finished copy
copies nothing. Run it while no server writes to the source; servers of the target may run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator

from facegallery.server.contract.errors import AlreadyExists, FailedPrecondition
from facegallery.server.gallery.store import ExportedTemplate, GalleryRecord, NewTemplate, TemplateStore

__all__ = ["MigratedGallery", "migrate_store", "BATCH"]

LOG = logging.getLogger(__name__)

#: Templates per ``add_templates`` call of the target.
BATCH = 1024


@dataclasses.dataclass(frozen=True)
class MigratedGallery:
    """One gallery's copy: templates ``copied`` now and ``skipped`` (already in the target)."""

    name: str
    copied: int
    skipped: int
    created: bool


def migrate_store(source: TemplateStore, target: TemplateStore, *, progress: Callable[[str, int], None] | None = None) -> list[MigratedGallery]:
    """Copy every gallery and API key of ``source`` into ``target`` (module docstring).

    ``progress(gallery, templates_done)`` is called after each batch. Returns one entry per
    gallery, in the source's creation order.

    Raises
    ------
    FailedPrecondition
        A gallery of the same name in the target was built with another model or dimension.
    BackendUnavailable
        Milvus cannot be reached (what was copied before stays; run it again).
    """
    _copy_api_keys(source, target)
    return [_copy_gallery(source, target, record, progress) for record in source.list_galleries()]


def _copy_gallery(source: TemplateStore, target: TemplateStore, record: GalleryRecord, progress: Callable[[str, int], None] | None) -> MigratedGallery:
    created = False
    try:
        target.create_gallery(
            record.name, model_id=record.model_id, threshold=record.threshold, metric=record.metric, embedding_dim=record.embedding_dim, policy=record.policy
        )
        created = True
    except AlreadyExists:
        existing = target.get_gallery(record.name)
        if (existing.model_id, existing.embedding_dim) != (record.model_id, record.embedding_dim):
            raise FailedPrecondition(
                f"gallery {record.name!r} exists in the target with model {existing.model_id} ({existing.embedding_dim}-d), "
                f"the source's is {record.model_id} ({record.embedding_dim}-d): delete it there or migrate into another target"
            ) from None
    copied = skipped = 0
    for batch in _batches(source.export_templates(record.name)):
        results, _ = target.add_templates(record.name, batch, skip_duplicates=True)
        done = sum(r is not None for r in results)
        copied += done
        skipped += len(results) - done
        if progress is not None:
            progress(record.name, copied + skipped)
    LOG.info("migrated gallery %r: %d templates copied, %d already there", record.name, copied, skipped)
    return MigratedGallery(record.name, copied, skipped, created)


def _batches(exported: Iterator[ExportedTemplate]) -> Iterator[list[NewTemplate]]:
    batch: list[NewTemplate] = []
    for t in exported:
        batch.append(NewTemplate(t.identity_id, t.embedding, t.display_name, t.metadata, t.source_sha256, t.face, t.created))
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _copy_api_keys(source: TemplateStore, target: TemplateStore) -> None:
    """Every key of the source (revoked ones too, with their time) not yet in the target."""
    have = {k.name for k in target.list_api_keys()}  # type: ignore[attr-defined]
    for record in source.list_api_keys():  # type: ignore[attr-defined]
        if record.name in have:
            continue
        (stored,) = [k for k in source.api_keys_by_id(record.key_id) if k.record.name == record.name]  # type: ignore[attr-defined]
        target.insert_api_key(stored.record, stored.salt, stored.hash)  # type: ignore[attr-defined]
        if record.revoked is not None:  # a revoked key stays revoked, from the same time
            target.revoke_api_key(record.name, record.revoked)  # type: ignore[attr-defined]
        LOG.info("migrated API key %r", record.name)
