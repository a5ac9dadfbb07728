"""``facegallery eval openset`` wired to the gallery code it measures: offline or through a server.

The open-set protocol, the figures and the command live in ``facegallery.export.evaluate``
(``openset.py``, ``cli.py``), but they must run the server's own decision code, and export may
not import the gallery layer or the client (tests/test_layers.py). This module, on the client
side where the packages meet, supplies the two galleries the command runs against:

* offline (no ``--server``): a :class:`~facegallery.server.gallery.manager.GalleryManager` over a
  temporary directory, given an analyzer that only carries the pipeline's manifest and model id
  (the run enrolls and searches embeddings, never images);
* ``--server ADDR --gallery NAME``: a :class:`~facegallery.client.GalleryClient`; the gallery is
  created with the policy (it must not exist yet), filled with ``import_embeddings`` and left on
  the server.

Both enroll with ``import_embeddings`` and search with ``identify_embedding``, top
``openset.TOP_K``. :func:`eval_group` is the ``eval`` entry of ``client/cli.py``'s
``LAZY_COMMANDS``: export's ``eval`` group with ``openset`` added.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator, Sequence

import click
import numpy as np

from facegallery.export.evaluate.cli import eval_group as _export_eval_group
from facegallery.export.evaluate.cli import openset_command
from facegallery.export.evaluate.openset import TOP_K, Answer, PolicyOptions

__all__ = ["eval_group", "open_gallery", "OfflineGallery", "ServerGallery"]

#: The gallery of an offline run, inside its temporary data directory.
OFFLINE_GALLERY = "openset"


def eval_group() -> click.Group:
    """``facegallery eval``: export's group (``lfw``) with ``openset`` added."""
    if "openset" not in _export_eval_group.commands:
        _export_eval_group.add_command(openset_command(open_gallery))
    return _export_eval_group


def _float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _estimate(value: float | None) -> float | None:
    """An answer's ``estimated_fpir``; None where the gallery has nothing to estimate it from (nan)."""
    return None if value is None or math.isnan(value) else float(value)


class _EmbeddingsOnly:
    """The ``FaceAnalyzer`` of an offline run: the loaded pipeline's manifest and model id, no images."""

    def __init__(self, pipeline) -> None:
        self.manifest = pipeline.manifest
        self.model_id = pipeline.model_id

    def analyze(self, image, **kwargs):
        raise RuntimeError("eval openset enrolls and searches embeddings only")

    def probability_same(self, a: np.ndarray, b: np.ndarray) -> None:
        return None


class OfflineGallery:
    """An ``openset.OpenSetGallery`` over an in-process ``GalleryManager`` gallery."""

    def __init__(self, manager, name: str, model_id: str) -> None:
        self.manager, self.name, self.model_id = manager, name, model_id

    def enroll(self, templates: Sequence[tuple[str, np.ndarray]]) -> int:
        from facegallery.server.gallery.store import NewTemplate

        result = self.manager.import_embeddings(self.name, self.model_id, (NewTemplate(i, e) for i, e in templates))
        return result.imported

    def identify(self, embedding: np.ndarray) -> Answer:
        r = self.manager.identify_embedding(self.name, embedding, model_id=self.model_id, top_k=TOP_K)
        top = r.matches[0].identity_id if r.matches else None
        return Answer(top, r.identity_id, r.score, r.distance, r.threshold, r.score_kind.value, _estimate(r.estimated_fpir))

    def status(self) -> dict:
        s = self.manager.decision_status(self.name)
        return {
            "name": s.policy.describe(),
            "policy": s.policy.to_json(),
            "score_kind": s.score_kind.value,
            "threshold": _float(s.threshold),
            "estimated_fpir": _float(s.estimated_fpir),
            "identities": s.identities,
            "basis": s.basis,
        }


class ServerGallery:
    """An ``openset.OpenSetGallery`` over a gallery of a running server."""

    def __init__(self, client, name: str, model_id: str) -> None:
        self.client, self.name, self.model_id = client, name, model_id

    def enroll(self, templates: Sequence[tuple[str, np.ndarray]]) -> int:
        from facegallery.client import ExportedTemplate

        items = (ExportedTemplate(identity_id=i, display_name="", metadata={}, template_id=0, embedding=e) for i, e in templates)
        return self.client.import_embeddings(items, model_id=self.model_id, gallery=self.name).imported

    def identify(self, embedding: np.ndarray) -> Answer:
        r = self.client.identify_embedding(embedding, top_k=TOP_K, model_id=self.model_id, gallery=self.name)
        top = r.matches[0].identity_id if r.matches else None
        return Answer(top, r.identity_id, r.score, r.distance, r.threshold, r.score_kind.value, _estimate(r.estimated_fpir))

    def status(self) -> dict:
        g = self.client.get_gallery(self.name)
        return {
            "name": g.policy.describe() if g.policy is not None else f"threshold {g.threshold:g}",
            "score_kind": g.score_kind.value,
            "threshold": _float(g.threshold),
            "estimated_fpir": _float(g.estimated_fpir),
            "identities": g.identity_count,
            "basis": g.threshold_basis,
            "server_gallery": g.name,
        }


def _decision_policy(options: PolicyOptions):
    """The gallery layer's ``DecisionPolicy`` of ``options``, with the defaults the server gives a
    ``CreateGallery`` request that leaves them out (servicer.py ``_policy``): no rule is
    ``DEFAULT_POLICY``; a target FPIR has ``DEFAULT_POLICY``'s normalisation and aggregation, a
    fixed threshold the nearest template."""
    from facegallery.server.gallery.decision import DEFAULT_POLICY, Aggregation, DecisionPolicy, Normalization

    if options.threshold is None and options.target_fpir is None:
        return DEFAULT_POLICY
    if options.threshold is not None:
        return DecisionPolicy.fixed(options.threshold, aggregation=Aggregation(options.aggregation or Aggregation.NEAREST))
    return DecisionPolicy.targeting(
        options.target_fpir,
        normalization=Normalization(options.normalization or DEFAULT_POLICY.normalization),
        cohort_size=options.cohort_size or DEFAULT_POLICY.cohort_size,
        aggregation=Aggregation(options.aggregation or DEFAULT_POLICY.aggregation),
    )


@contextlib.contextmanager
def _offline(pipeline, options: PolicyOptions) -> Iterator[OfflineGallery]:
    from facegallery.server.contract.errors import FaceGalleryError
    from facegallery.server.gallery.manager import GalleryManager

    with tempfile.TemporaryDirectory(prefix="facegallery-openset-") as data_dir:
        manager = GalleryManager.open(data_dir, _EmbeddingsOnly(pipeline))
        try:
            try:
                manager.create_gallery(OFFLINE_GALLERY, policy=_decision_policy(options))
            except FaceGalleryError as exc:
                raise click.UsageError(f"the gallery refused the policy: {exc}") from exc
            yield OfflineGallery(manager, OFFLINE_GALLERY, pipeline.model_id)
        finally:
            manager.close()


@contextlib.contextmanager
def _on_server(pipeline, options: PolicyOptions, server: str, gallery: str) -> Iterator[ServerGallery]:
    from facegallery.client import AlreadyExists, FaceGalleryClientError, GalleryClient, InvalidArgument

    with GalleryClient(server) as client:
        try:
            served = client.server_info().model.model_id
        except FaceGalleryClientError as exc:
            raise click.ClickException(f"server {server}: {exc}") from exc
        if served != pipeline.model_id:
            raise click.ClickException(
                f"server {server} runs model {served[:12]}, these embeddings are of {pipeline.model_id[:12]}: "
                "use the server's model directory (--model-dir) and flip setting (--flip-augment as the server's serve)"
            )
        policy = {"threshold": options.threshold, "target_fpir": options.target_fpir, "normalization": options.normalization, "cohort_size": options.cohort_size}
        if options.aggregation is not None:
            policy["aggregation"] = options.aggregation
        try:
            client.create_gallery(gallery, **policy)
        except TypeError as exc:  # a client without that policy keyword
            raise click.UsageError(f"this client cannot create that policy on a server: {exc}") from exc
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        except AlreadyExists as exc:
            raise click.ClickException(
                f"gallery {gallery!r} already exists on {server}; choose another --gallery or delete it (facegallery delete-gallery --gallery {gallery})"
            ) from exc
        except InvalidArgument as exc:
            raise click.UsageError(f"the server refused the gallery: {exc}") from exc
        yield ServerGallery(client, gallery, pipeline.model_id)


def open_gallery(pipeline, options: PolicyOptions, *, server: str | None = None, gallery: str | None = None):
    """The gallery of one ``eval openset`` run (export/evaluate/cli.py ``GalleryOpener``): a
    temporary offline one, or ``gallery`` created on ``server``."""
    if server is None:
        return _offline(pipeline, options)
    if gallery is None:
        raise click.UsageError("--server needs --gallery: the gallery to create there")
    return _on_server(pipeline, options, server, gallery)
