"""The ``facegallery`` command line: a thin click group over :class:`GalleryClient`.

Client commands (``enroll``, ``identify``, ``verify``, ``compare``, ``galleries``,
``create-gallery``, ``update-gallery``, ``delete-gallery``, ``duplicates``, ``identities``,
``delete``, ``import``, ``export-gallery``, ``import-embeddings``) talk to a running server and all
take ``--server HOST:PORT`` (env ``FACEGALLERY_SERVER``; several servers as ``IP:PORT,IP:PORT``,
balanced round robin), ``--gallery NAME``, ``--json``,
``--timeout SECONDS``, ``--tls-ca``/``--tls-cert``/``--tls-key`` (env ``FACEGALLERY_TLS_CA``,
``FACEGALLERY_CLIENT_CERT``, ``FACEGALLERY_CLIENT_KEY``), ``--tls-server-name NAME`` (env
``FACEGALLERY_TLS_SERVER_NAME``) and ``--api-key KEY`` (env ``FACEGALLERY_API_KEY``). ``keys create|list|revoke --data-dir DIR`` manage
the API keys in a data directory's store directly (a server may be running on it), ``--backend milvus --milvus-uri URI``
those of the milvus backend in its Milvus. The server and offline commands (``serve``, ``doctor``, ``export``, ``embed``,
``eval``, ``train``, ``calibrate``) live in other packages and are imported only when invoked,
so a missing optional dependency (e.g. torch for ``train``) breaks only its own command.

Exit codes: 0 success, 1 a failed call or a reported failure (message on stderr), 2 bad usage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from tqdm import tqdm

from facegallery.client._client import DEFAULT_ADDRESS, DEFAULT_GALLERY, DEFAULT_IMPORT_BATCH, DEFAULT_TIMEOUT, GalleryClient, _channel_target
from facegallery.client._exceptions import FaceGalleryClientError, InvalidArgument, NotFound, Unavailable
from facegallery.client._models import (
    Aggregation,
    CompareResult,
    DuplicatePair,
    EnrollItem,
    FaceIdentification,
    FacePolicy,
    Gallery,
    Match,
    ScoreKind,
    VerifyResult,
)
from facegallery.client.embedding_files import EXPORT_FORMAT, ExportFileError, file_format, read_jsonl, read_table, write_export
from facegallery.server.contract.images import IMAGE_SUFFIXES, has_image_suffix

__all__ = ["main", "LazyGroup", "EXPORT_FORMAT", "IMAGE_SUFFIXES"]

LOG = logging.getLogger(__name__)

#: Commands implemented elsewhere: name -> "module:attribute" of a click command, imported lazily.
LAZY_COMMANDS = {
    "serve": "facegallery.client.cli:serve_command",
    "doctor": "facegallery.client.cli:doctor_command",
    "migrate": "facegallery.server.service.migrate_cli:migrate",
    "export": "facegallery.export.dlib.cli:export",
    "embed": "facegallery.export.embed_cli:embed",
    "eval": "facegallery.client.eval_openset:eval_group",
    "train": "facegallery.export.train.cli:train",
    "calibrate": "facegallery.export.train.cli:calibrate",
}


class LazyGroup(click.Group):
    """A click group whose extra commands are imported on first use (click's lazy-loading pattern).

    Parameters
    ----------
    lazy_commands : mapping of str to str
        Command name -> ``"module:attribute"`` of a ``click.Command`` or of a function that returns one. A command whose module
        fails to import is listed as unavailable, with the reason, instead of breaking the group.
    """

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})
        self._loaded: dict[str, click.Command] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            if cmd_name not in self._loaded:
                self._loaded[cmd_name] = self._load(cmd_name)
            return self._loaded[cmd_name]
        return super().get_command(ctx, cmd_name)

    def _load(self, name: str) -> click.Command:
        target = self.lazy_commands[name]
        module_name, _, attribute = target.partition(":")
        try:
            command = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            LOG.debug("command %s (%s) unavailable: %s", name, target, exc)
            return _unavailable_command(name, f"{type(exc).__name__}: {exc}")
        if not isinstance(command, click.Command):
            command = command()  # a factory that builds the command
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} must be a click command or build one, got {type(command).__name__}")
        return command


def serve_command() -> click.Command:
    """``facegallery serve``, wired to the default-model bootstrap of ``facegallery.export.dlib``.

    The CLI is where the packages meet: the server never imports export, so the converter that
    makes the default model on first start is handed to it here.
    """
    from facegallery.export.dlib.default_model import ensure_default_model
    from facegallery.server.service.cli import make_serve_command

    return make_serve_command(default_model=ensure_default_model)


def doctor_command() -> click.Command:
    """``facegallery doctor``, checking the default dlib model directory (``facegallery.export.dlib``)
    when no ``--model-dir`` is given; the server side cannot name it, so it is handed in here."""
    from facegallery.export.dlib.default_model import default_model_dir
    from facegallery.server.service.cli import make_doctor_command

    return make_doctor_command(default_model_dir=default_model_dir)


def _count(n: int, singular: str, plural: str | None = None) -> str:
    """``"1 template"``, ``"2 templates"``: a count with its noun in the right number."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _unavailable_command(name: str, reason: str) -> click.Command:
    def fail(args: tuple[str, ...]) -> None:
        raise click.ClickException(f"the '{name}' command is unavailable ({reason})")

    return click.Command(
        name,
        callback=fail,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=f"(unavailable: {reason})",
        short_help=f"(unavailable: {reason})",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=LazyGroup, lazy_commands=LAZY_COMMANDS)
@click.version_option(package_name="facegallery")
def main() -> None:
    """facegallery: enroll people once from a photo, then identify (1:N) or verify (1:1) faces.

    Distances are Euclidean (L2) distances between face embeddings. A gallery decides who a
    face is with its policy, a fixed distance threshold or a target FPIR (the share of people
    who are not enrolled that would be taken for someone), on scores of its kind (the distance,
    or an S-norm score; lower is more similar): a face matches when its score is at most the
    threshold. Verify and compare match at distance <= threshold (0.6 for the default dlib
    model). With --json, commands print one JSON object per line (one per image for enroll and
    identify, one per item for galleries, identities and duplicates).
    """


# ---------------------------------------------------------------------------------------------
# Shared options of the client commands


@dataclasses.dataclass(frozen=True)
class _Session:
    client: GalleryClient
    as_json: bool

    def emit(self, data: Mapping[str, Any], text: str) -> None:
        """Print ``data`` as one JSON line with --json, else ``text``."""
        click.echo(json.dumps(data, ensure_ascii=False) if self.as_json else text)


_SERVER_METAVAR = "HOST:PORT[,...]"
_SERVER_HELP = (
    "Server address; several servers as numeric IP:PORT (all IPv4 or all [IPv6]:PORT) separated by commas, or "
    "one dns:///NAME:PORT with a record per server. Calls are balanced round robin; gets, lists and searches are "
    "retried on another server when one is UNAVAILABLE, enrollments, creations, deletions and imports never"
)
_TLS_SERVER_NAME_HELP = (
    "With TLS: the name every server's certificate must carry, instead of the --server host; needed for several "
    "servers on different hosts [env FACEGALLERY_TLS_SERVER_NAME]."
)


def _check_server(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--server: one address, or a well-formed list (see GalleryClient)."""
    if value is not None:
        try:
            _channel_target(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    return value


def _open_client(server: str, **kwargs: Any) -> GalleryClient:
    """``GalleryClient(server, **kwargs)``; an option combination it refuses is a usage error."""
    try:
        return GalleryClient(server, **kwargs)
    except ValueError as exc:  # e.g. TLS over several hosts without --tls-server-name
        raise click.UsageError(str(exc).replace("tls_server_name", "--tls-server-name")) from exc


def _client_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add --server/--gallery/--json/--timeout/--tls-*/--api-key, open a client, map client errors to exit code 1."""

    @click.option(
        "--server",
        envvar="FACEGALLERY_SERVER",
        default=DEFAULT_ADDRESS,
        show_default=True,
        metavar=_SERVER_METAVAR,
        callback=_check_server,
        help=f"{_SERVER_HELP} [env FACEGALLERY_SERVER].",
    )
    @click.option("--gallery", default=DEFAULT_GALLERY, show_default=True, help="Gallery to use.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per line) instead of text.")
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="Deadline of each call in seconds.",
    )
    @click.option("--tls-ca", envvar="FACEGALLERY_TLS_CA", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM CA certificate that signed the server's: connect with TLS [env FACEGALLERY_TLS_CA].")
    @click.option("--tls-cert", envvar="FACEGALLERY_CLIENT_CERT", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM client certificate, for a server that requires mTLS (needs --tls-key) [env FACEGALLERY_CLIENT_CERT].")
    @click.option("--tls-key", envvar="FACEGALLERY_CLIENT_KEY", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="PEM private key of --tls-cert [env FACEGALLERY_CLIENT_KEY].")
    @click.option("--tls-server-name", envvar="FACEGALLERY_TLS_SERVER_NAME", default=None, metavar="NAME", help=_TLS_SERVER_NAME_HELP)
    @click.option("--api-key", envvar="FACEGALLERY_API_KEY", default=None, metavar="KEY",
                  help="API key (`facegallery keys create`), sent as 'authorization: Bearer KEY' [env FACEGALLERY_API_KEY].")
    @functools.wraps(func)
    def wrapper(
        server: str,
        gallery: str,
        as_json: bool,
        timeout: float,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_server_name: str | None,
        api_key: str | None,
        **kwargs: Any,
    ) -> Any:
        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        client = _open_client(
            server, timeout=timeout, gallery=gallery, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
            tls_server_name=tls_server_name or None, api_key=api_key or None,
        )
        try:
            with client:
                return func(_Session(client, as_json), **kwargs)
        except Unavailable as exc:
            raise click.ClickException(f"{exc} (is a server running at {server}?)") from exc
        except FaceGalleryClientError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _parse_meta(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    metadata = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", ctx=ctx, param=param)
        metadata[key] = item
    return metadata


_image_path = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)


def _fmt_box(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _match_brief(match: Match | None) -> dict[str, Any] | None:
    return None if match is None else {"identity_id": match.identity_id, "distance": match.distance, "score": match.score}


def _rate(value: float) -> str:
    """An estimated FPIR/FAR for people: 2 significant digits (``0.01``, ``3.2e-05``); ``n/a`` for NaN."""
    return f"{value:.2g}" if math.isfinite(value) else "n/a"


def _score_name(kind: ScoreKind) -> str:
    return "S-norm score" if kind is ScoreKind.SNORM else "distance"


# ---------------------------------------------------------------------------------------------
# Enrollment and search


@main.command()
@click.argument("identity_id")
@click.argument("images", nargs=-1, required=True, type=_image_path)
@click.option("--name", "display_name", default="", help="Display name of the person.")
@click.option("--meta", "metadata", multiple=True, callback=_parse_meta, metavar="KEY=VALUE", help="Metadata entry (repeatable).")
@click.option("--reject-multiple", is_flag=True, help="Refuse images with several faces instead of enrolling the largest.")
@_client_command
def enroll(
    session: _Session, identity_id: str, images: tuple[Path, ...], display_name: str, metadata: dict[str, str], reject_multiple: bool
) -> None:
    """Enroll the largest face of each IMAGE as a template of the person IDENTITY_ID.

    The identity is created on first enrollment. A warning is shown when the face is within the
    threshold of another identity (a likely duplicate enrollment).
    """
    policy = FacePolicy.REJECT_MULTIPLE if reject_multiple else FacePolicy.LARGEST
    for path in images:
        result = session.client.enroll(
            identity_id, path, display_name=display_name, metadata=metadata, face_policy=policy
        )
        data = {
            "image": str(path),
            "identity_id": result.identity_id,
            "template_id": result.template_id,
            "identity_created": result.identity_created,
            "box": list(result.face.box) if result.face else None,
            "possible_duplicate": _match_brief(result.possible_duplicate),
        }
        text = f"{path}: enrolled as {result.identity_id} (template {result.template_id}"
        text += f", face {_fmt_box(result.face.box)}" if result.face else ""
        text += ", new identity)" if result.identity_created else ")"
        if result.possible_duplicate is not None:
            dup = result.possible_duplicate
            score = "" if dup.score == dup.distance else f", score {dup.score:.3f}"  # a normalised score: both
            text += f"\n  warning: also close to {dup.identity_id} (distance {dup.distance:.3f}{score})"
        session.emit(data, text)


def _l2_threshold_option(default_of: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--threshold``: an L2 decision threshold >= 0 overriding that of ``default_of`` (1:1 calls)."""
    return click.option(
        "--threshold", type=click.FloatRange(min=0), default=None, help=f"Decision threshold (L2 distance); default: the {default_of}'s."
    )


def _decision_data(result: VerifyResult | CompareResult) -> dict[str, Any]:
    return {"distance": result.distance, "threshold": result.threshold, "is_match": result.is_match, "estimated_far": result.estimated_far}


def _decision_text(result: VerifyResult | CompareResult, match: str, no_match: str) -> str:
    """``"<match> (distance d <= threshold t[, estimated FAR f])"``, or ``no_match`` with ``>``;
    L2 distances, 3 decimals."""
    verdict, op = (match, "<=") if result.is_match else (no_match, ">")
    far = "" if result.estimated_far is None else f", estimated FAR {_rate(result.estimated_far)}"
    return f"{verdict} (distance {result.distance:.3f} {op} threshold {result.threshold:.3f}{far})"


def _face_text(face: FaceIdentification) -> str:
    """One face of ``identify``: who (or unknown), its distance, and the decision on the gallery's
    scale: ``score s <= threshold t`` (``distance`` or ``S-norm score``) with the estimated FPIR."""
    box = _fmt_box(face.face.box) if face.face else "[]"
    if not face.matches:
        return f"  {box} unknown (empty gallery)"
    best = face.matches[0]
    known = face.identity_id is not None
    op = "<=" if known else ">"
    if face.score_kind is ScoreKind.DISTANCE:
        decision = f"distance {face.score:.3f} {op} threshold {face.threshold:.3f}"
    else:
        decision = f"distance {face.distance:.3f}, {_score_name(face.score_kind)} {face.score:.3f} {op} threshold {face.threshold:.3f}"
    decision += f", estimated FPIR {_rate(face.estimated_fpir)}"
    if known:
        return f"  {box} {face.identity_id} ({decision})"
    return f"  {box} unknown (nearest {best.identity_id}, {decision})"


@main.command()
@click.argument("images", nargs=-1, required=True, type=_image_path)
@click.option("--top-k", type=click.IntRange(1, 100), default=5, show_default=True, help="Candidates per face.")
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Decision threshold on the gallery's score scale (an L2 distance, or an S-norm score; see 'galleries'); default: the gallery's.",
)
@_client_command
def identify(session: _Session, images: tuple[Path, ...], top_k: int, threshold: float | None) -> None:
    """Identify every face in each IMAGE against the gallery (1:N).

    Per image, --json prints {"image", "faces": [{"box": [l, t, r, b], "identity_id" (null =
    unknown), "distance", "score", "score_kind", "threshold", "estimated_fpir", "matches":
    [{"identity_id", "distance", "score"}]}]}, largest face first; boxes are pixels, distances
    L2, scores and threshold on the score_kind scale ("DISTANCE" or "SNORM"), estimated_fpir the
    estimated share of people who are not enrolled that would score this well against someone.
    """
    for path in images:
        faces = session.client.identify(path, top_k=top_k, threshold=threshold)
        data = {
            "image": str(path),
            "faces": [
                {
                    "box": list(f.face.box) if f.face else None,
                    "identity_id": f.identity_id,
                    "distance": _finite(f.distance),
                    "score": _finite(f.score),
                    "score_kind": f.score_kind.name,
                    "threshold": f.threshold,
                    "estimated_fpir": _finite(f.estimated_fpir),
                    "matches": [_match_brief(m) for m in f.matches],
                }
                for f in faces
            ],
        }
        lines = [f"{path}: {len(faces)} face{'s' if len(faces) != 1 else ''}" if faces else f"{path}: no face"]
        lines += [_face_text(f) for f in faces]
        session.emit(data, "\n".join(lines))


@main.command()
@click.argument("identity_id")
@click.argument("image", type=_image_path)
@_l2_threshold_option("gallery")
@_client_command
def verify(session: _Session, identity_id: str, image: Path, threshold: float | None) -> None:
    """Check whether the largest face of IMAGE is the person IDENTITY_ID (1:1)."""
    result = session.client.verify(identity_id, image, threshold=threshold)
    data = {"identity_id": result.identity_id, **_decision_data(result)}
    session.emit(data, f"{identity_id}: {_decision_text(result, 'match', 'no match')}")


@main.command()
@click.argument("image_a", type=_image_path)
@click.argument("image_b", type=_image_path)
@_l2_threshold_option("model")
@_client_command
def compare(session: _Session, image_a: Path, image_b: Path, threshold: float | None) -> None:
    """Compare the largest faces of IMAGE_A and IMAGE_B (no gallery involved)."""
    result = session.client.compare(image_a, image_b, threshold=threshold)
    data = {**_decision_data(result), "probability_same": result.probability_same}
    text = _decision_text(result, "same person", "different people")
    if result.probability_same is not None:
        text += f", P(same) = {result.probability_same:.3f}"
    session.emit(data, text)


# ---------------------------------------------------------------------------------------------
# Galleries and identities


def _decides_with(gallery: Gallery) -> str:
    """What a gallery decides with now: ``"fixed threshold 0.600 (distance), estimated FPIR f"``
    (``"..., mean template, estimated FPIR f"`` with mean templates) or
    ``"target FPIR 0.01, S-norm k=100, mean template: threshold t (S-norm score), estimated FPIR f"``."""
    threshold = f"threshold {gallery.threshold:.3f} ({_score_name(gallery.score_kind)})"
    fpir = f"estimated FPIR {_rate(gallery.estimated_fpir)}"
    if gallery.policy is None or gallery.policy.kind == "threshold":
        mean = ", mean template" if gallery.policy is not None and gallery.policy.aggregation is Aggregation.MEAN else ""
        return f"fixed {threshold}{mean}, {fpir}"
    return f"{gallery.policy.describe()}: {threshold}, {fpir}"


@main.command()
@_client_command
def galleries(session: _Session) -> None:
    """List the galleries with their counts, decision policies and models.

    Each line gives the policy (a fixed threshold, or a target FPIR with its normalisation; ", mean
    template" when identities are searched by the mean of their templates), the
    threshold the gallery decides with now on its score scale (distance or S-norm score), and the
    estimated FPIR at that threshold; --json adds what the estimate rests on (threshold_basis).
    """
    for gallery in session.client.list_galleries():
        session.emit(
            gallery.to_dict(),
            f"{gallery.name}: {_count(gallery.identity_count, 'identity', 'identities')}, {_count(gallery.template_count, 'template')}; "
            f"{_decides_with(gallery)}; model {gallery.model_id[:12]}",
        )


def _policy_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--threshold / --target-fpir / --normalization / --cohort-size / --aggregation of create- and update-gallery."""
    options = [
        click.option(
            "--threshold", type=click.FloatRange(min=0, min_open=True), default=None, metavar="DISTANCE",
            help="A fixed decision threshold (L2 distance, 0.6 for dlib).",
        ),
        click.option(
            "--target-fpir", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, metavar="RATE",
            help="A target FPIR in (0, 1), e.g. 0.01: the server keeps the threshold where about this share of people "
            "who are not enrolled would be taken for someone, as the gallery grows.",
        ),
        click.option(
            "--normalization", type=click.Choice(["snorm", "none"]), default=None,
            help="Score normalisation with --target-fpir  [default: snorm]",
        ),
        click.option(
            "--cohort-size", type=click.IntRange(2, 1000), default=None, metavar="K",
            help="k of S-norm (cohort identities) with --target-fpir, 2..1000  [default: 100]",
        ),
        click.option(
            "--aggregation", type=click.Choice(["nearest", "mean"]), default=None,
            help="An identity's distance to a probe: to its nearest template, or to the mean of its templates; "
            "with --threshold or --target-fpir  [default: mean with --target-fpir, nearest with --threshold]",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _policy_keywords(
    threshold: float | None, target_fpir: float | None, normalization: str | None, cohort_size: int | None, aggregation: str | None, *, required: bool
) -> dict[str, Any]:
    """The policy keywords of ``create_gallery`` / ``update_gallery``; UsageError (exit 2) for a bad mix."""
    if threshold is not None and target_fpir is not None:
        raise click.UsageError("give --threshold or --target-fpir, not both")
    if required and threshold is None and target_fpir is None:
        raise click.UsageError("give --threshold or --target-fpir")
    if target_fpir is None and (normalization is not None or cohort_size is not None):
        raise click.UsageError("--normalization and --cohort-size go with --target-fpir")
    if threshold is None and target_fpir is None and aggregation is not None:
        raise click.UsageError("--aggregation goes with --threshold or --target-fpir")
    return {"threshold": threshold, "target_fpir": target_fpir, "normalization": normalization, "cohort_size": cohort_size, "aggregation": aggregation}


@main.command("create-gallery")
@_policy_options
@_client_command
def create_gallery(
    session: _Session, threshold: float | None, target_fpir: float | None, normalization: str | None, cohort_size: int | None, aggregation: str | None
) -> None:
    """Create the gallery named by --gallery, bound to the server's model.

    Its decision policy is a fixed --threshold, or a --target-fpir; neither gives the server's
    default (target FPIR 0.01, S-norm k=100, mean template).
    """
    policy = _policy_keywords(threshold, target_fpir, normalization, cohort_size, aggregation, required=False)
    gallery = session.client.create_gallery(session.client.gallery, **policy)
    session.emit(gallery.to_dict(), f"created gallery {gallery.name} ({_decides_with(gallery)}; model {gallery.model_id[:12]})")


@main.command("update-gallery")
@_policy_options
@_client_command
def update_gallery(
    session: _Session, threshold: float | None, target_fpir: float | None, normalization: str | None, cohort_size: int | None, aggregation: str | None
) -> None:
    """Replace the decision policy of the gallery named by --gallery (--threshold or --target-fpir).

    Later searches decide with the new policy; the line printed shows the threshold it gives now.
    """
    policy = _policy_keywords(threshold, target_fpir, normalization, cohort_size, aggregation, required=True)
    gallery = session.client.update_gallery(session.client.gallery, **policy)
    session.emit(gallery.to_dict(), f"updated gallery {gallery.name} ({_decides_with(gallery)})")


def _pair_data(pair: DuplicatePair, score_kind: ScoreKind, threshold: float) -> dict[str, Any]:
    return {**pair.to_dict(), "score_kind": score_kind.name, "threshold": threshold}


def _pair_text(pair: DuplicatePair, score_kind: ScoreKind) -> str:
    def who(identity_id: str, display_name: str) -> str:
        return f"{identity_id} ({display_name})" if display_name else identity_id

    score = f"distance {pair.distance:.3f}"
    if score_kind is not ScoreKind.DISTANCE:
        score += f", {_score_name(score_kind)} {pair.score:.3f}"
    return (
        f"  {who(pair.identity_a, pair.display_name_a)} ~ {who(pair.identity_b, pair.display_name_b)}: "
        f"{score}, estimated FPIR {_rate(pair.estimated_fpir)}"
    )


@main.command()
@click.option("--max-pairs", type=click.IntRange(1, 10000), default=100, show_default=True, help="Most pairs to list.")
@_client_command
def duplicates(session: _Session, max_pairs: int) -> None:
    """List pairs of identities the gallery's policy would take for the same person.

    Likely duplicate enrollments (one person under two ids), most similar first: pairs whose
    score is within the gallery's threshold. --json prints one object per pair {"identity_a",
    "display_name_a", "identity_b", "display_name_b", "score", "distance", "estimated_fpir",
    "score_kind", "threshold"}, nothing when there is none.
    """
    found = session.client.find_duplicates(max_pairs=max_pairs)
    if session.as_json:
        for pair in found.pairs:
            session.emit(_pair_data(pair, found.score_kind, found.threshold), "")
        return
    scale = f"{_score_name(found.score_kind)} <= threshold {found.threshold:.3f}"
    if not found.pairs:
        click.echo(f"gallery {session.client.gallery}: no likely duplicates ({scale})")
        return
    lines = [f"gallery {session.client.gallery}: {_count(len(found.pairs), 'likely duplicate pair')} ({scale})"]
    lines += [_pair_text(p, found.score_kind) for p in found.pairs]
    click.echo("\n".join(lines))


@main.command("delete-gallery")
@click.confirmation_option(prompt="Delete the gallery with all its identities and templates?")
@_client_command
def delete_gallery(session: _Session) -> None:
    """Delete the gallery named by --gallery with all its identities and templates."""
    deleted = session.client.delete_gallery(session.client.gallery)
    session.emit(
        {"gallery": session.client.gallery, **deleted.to_dict()},
        f"deleted gallery {session.client.gallery} ({_count(deleted.deleted_identities, 'identity', 'identities')}, {_count(deleted.deleted_templates, 'template')})",
    )


@main.command()
@_client_command
def identities(session: _Session) -> None:
    """List the identities of the gallery in enrollment order."""
    for identity in session.client.list_identities():
        data = identity.to_dict()
        del data["templates"]  # never filled by listing
        name = f" ({identity.display_name})" if identity.display_name else ""
        session.emit(data, f"{identity.identity_id}{name}: {_count(identity.template_count, 'template')}")


@main.command()
@click.argument("identity_id")
@_client_command
def delete(session: _Session, identity_id: str) -> None:
    """Delete the person IDENTITY_ID with all their templates."""
    deleted = session.client.delete_identity(identity_id)
    session.emit({"identity_id": identity_id, "deleted_templates": deleted}, f"deleted {identity_id} ({_count(deleted, 'template')})")


# ---------------------------------------------------------------------------------------------
# Folder import


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class _ImportPlan:
    todo: list[tuple[str, Path]] = dataclasses.field(default_factory=list)
    skipped: int = 0
    failures: list[dict[str, str]] = dataclasses.field(default_factory=list)


def _is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and has_image_suffix(path) and path.is_file()


def _plan_import(client: GalleryClient, root: Path) -> _ImportPlan:
    """Images of ``root/<identity_id>/`` not yet enrolled for that identity (by SHA-256)."""
    plan = _ImportPlan()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        identity_id = folder.name
        images = [p for p in sorted(folder.iterdir()) if _is_image_file(p)]
        try:
            enrolled = {t.source_sha256 for t in client.get_identity(identity_id).templates}
        except NotFound:
            enrolled = set()
        except InvalidArgument as exc:  # a folder name the server refuses as an id: fail its images
            plan.failures += [
                {"image": str(p), "identity_id": identity_id, "code": exc.code.name, "message": exc.message}
                for p in images
            ]
            continue
        for path in images:
            try:
                digest = _sha256(path)
            except OSError as exc:
                plan.failures.append(
                    {"image": str(path), "identity_id": identity_id, "code": type(exc).__name__, "message": str(exc)}
                )
                continue
            if digest in enrolled:
                plan.skipped += 1
            else:
                enrolled.add(digest)  # also skips a byte-identical copy later in the same folder
                plan.todo.append((identity_id, path))
    return plan


@main.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--reject-multiple", is_flag=True, help="Fail images with several faces instead of enrolling the largest.")
@_client_command
def import_(session: _Session, directory: Path, reject_multiple: bool) -> None:
    """Enroll a folder-per-identity tree: DIRECTORY/<identity_id>/*.jpg (png, webp, ...).

    Resumable: an image whose SHA-256 is already enrolled for its identity is skipped, so an
    interrupted import can be run again. Images stream to the server over one BulkEnroll call
    with a progress bar; a summary of enrolled / skipped / failed (with reasons) follows. Exits
    with 1 when any image failed.
    """
    client = session.client
    plan = _plan_import(client, directory)
    policy = FacePolicy.REJECT_MULTIPLE if reject_multiple else FacePolicy.LARGEST
    items = (EnrollItem(identity_id, image=path, face_policy=policy) for identity_id, path in plan.todo)
    enrolled = 0
    failures = list(plan.failures)
    with tqdm(total=len(plan.todo), unit="image", desc="import", disable=None) as bar:
        for item in client.bulk_enroll(items, timeout=None):
            identity_id, path = plan.todo[item.index]
            if item.ok:
                enrolled += 1
            else:
                failures.append(
                    {"image": str(path), "identity_id": identity_id, "code": item.code.name, "message": item.message}
                )
            bar.update()
    data = {"enrolled": enrolled, "skipped": plan.skipped, "failed": len(failures), "failures": failures}
    lines = [f"enrolled {enrolled}, skipped {plan.skipped} (already enrolled), failed {len(failures)}"]
    lines += [f"  {f['image']}: {f['code']}: {f['message']}" for f in failures]
    session.emit(data, "\n".join(lines))
    if failures:
        click.get_current_context().exit(1)


# ---------------------------------------------------------------------------------------------
# Embedding export / import


@main.command("export-gallery")
@click.argument("file", type=click.Path(dir_okay=False, writable=True, path_type=Path))
@_client_command
def export_gallery(session: _Session, file: Path) -> None:
    """Write every template of the gallery, with its embedding, ids and metadata, to FILE.

    The format follows FILE's suffix. .npz: arrays embeddings (N, D) float32, identity_ids (N,),
    display_names (N,) and model_id; .parquet (needs pip install 'facegallery[parquet]'):
    columns identity_id, embedding (list<float32>), display_name, the model id in the file's
    metadata. Both keep ids, names, embeddings and the model id only. Any other suffix: JSON
    Lines (format "facegallery-export/1") with everything: line 1 is {"format", "gallery":
    {name, model_id, threshold, metric, embedding_dim, ...}}, then one line per template
    {"identity_id", "display_name", "metadata", "template_id", "embedding": [float32 values],
    "source_sha256", "create_time"}. Floats read back bit-exact; restore with
    import-embeddings, no photos needed. FILE is replaced only once the export is complete (an
    interrupted export leaves no partial file); "-" streams JSON Lines to stdout.
    """
    gallery, templates = session.client.export_gallery(timeout=None)
    try:
        count = write_export(file, gallery, templates)
    except ImportError as exc:  # Parquet without pyarrow
        raise click.ClickException(str(exc)) from exc
    data = {"file": str(file), "gallery": gallery.name, "model_id": gallery.model_id, "templates": count}
    session.emit(data, f"exported {_count(count, 'template')} of gallery {gallery.name} to {file}")


@main.command("import-embeddings")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_IMPORT_BATCH, show_default=True,
              help="Templates per acknowledged batch (.npz and .parquet).")
@_client_command
def import_embeddings(session: _Session, file: Path, batch_size: int) -> None:
    """Import the templates of FILE (as export-gallery writes them) into the gallery (created if missing).

    The format follows FILE's suffix (.npz, .parquet, else JSON Lines; see export-gallery).
    Templates already present (same identity and embedding) are skipped, so an interrupted
    import is resumed by running it again. The file's model id must equal the gallery's
    (FAILED_PRECONDITION otherwise); a .npz or .parquet file without one is taken to hold the
    server's. .npz and .parquet files are sent in batches, each
    acknowledged once durably stored: the progress bar counts those, and a failure reports how
    many are safely in the gallery.
    """
    gallery = session.client.gallery
    acknowledged = 0

    def acknowledge(count: int) -> None:
        nonlocal acknowledged
        bar.update(count - acknowledged)
        acknowledged = count

    try:
        if file_format(file) == "jsonl":
            header, templates = read_jsonl(file)
            model_id = str(header.get("gallery", {}).get("model_id", ""))
            result = session.client.import_embeddings(templates, model_id=model_id, timeout=None)
        else:
            table = read_table(file)
            with tqdm(total=len(table), unit="template", desc="import", disable=None) as bar:
                try:
                    result = session.client.import_embeddings(table, timeout=None, batch_size=batch_size, progress=acknowledge)
                except FaceGalleryClientError as exc:
                    raise click.ClickException(
                        f"{exc}\n{acknowledged} of {len(table)} templates were stored before the failure; "
                        "run the same command again to import the rest (stored templates are skipped)"
                    ) from exc
    except (ExportFileError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    session.emit(
        {"file": str(file), "gallery": gallery, "imported": result.imported, "skipped": result.skipped},
        f"imported {_count(result.imported, 'template')} into gallery {gallery} ({result.skipped} already present)",
    )


# ---------------------------------------------------------------------------------------------
# API keys, on a data directory's store


#: The settings of ``serve`` that name the milvus backend's store (its defaults: app.py).
_MILVUS_URI_DEFAULT = "http://127.0.0.1:19530"
_MILVUS_PREFIX_DEFAULT = "facegallery"


def _keys_target(func: Callable[..., Any]) -> Callable[..., Any]:
    """--data-dir DIR (the embedded store directly), --backend milvus --milvus-uri URI (the milvus
    backend's store directly) or --server HOST:PORT (with an admin --api-key); the wrapped command
    gets ``keys``: a :class:`_StoreKeys` or :class:`_ServerKeys`."""

    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data directory whose store holds the keys (a server may be running on it)  "
                  "[default, without --server: the server's default data dir]")
    @click.option("--backend", type=click.Choice(["embedded", "milvus"], case_sensitive=False), envvar="FACEGALLERY_BACKEND", default="embedded",
                  show_default=True, help="The servers' backend (as serve's): milvus manages the keys in the Milvus at --milvus-uri, "
                  "which every server of it shares [env FACEGALLERY_BACKEND].")
    @click.option("--milvus-uri", envvar="FACEGALLERY_MILVUS_URI", default=_MILVUS_URI_DEFAULT, show_default=True, metavar="URI",
                  help="With --backend milvus: the Milvus (http://HOST:PORT) [env FACEGALLERY_MILVUS_URI].")
    @click.option("--milvus-token", envvar="FACEGALLERY_MILVUS_TOKEN", default="", metavar="TOKEN",
                  help="With --backend milvus: user:password or API key of the Milvus [env FACEGALLERY_MILVUS_TOKEN].")
    @click.option("--milvus-prefix", envvar="FACEGALLERY_MILVUS_PREFIX", default=_MILVUS_PREFIX_DEFAULT, show_default=True,
                  help="With --backend milvus: the collection-name prefix (as serve's) [env FACEGALLERY_MILVUS_PREFIX].")
    @click.option("--server", envvar="FACEGALLERY_SERVER", default=None, metavar=_SERVER_METAVAR, callback=_check_server,
                  help="Manage the keys through a running server instead (needs an admin --api-key); several servers as "
                  "IP:PORT,IP:PORT [env FACEGALLERY_SERVER].")
    @click.option("--api-key", envvar="FACEGALLERY_API_KEY", default=None, metavar="KEY", help="API key, with --server [env FACEGALLERY_API_KEY].")
    @click.option("--tls-ca", envvar="FACEGALLERY_TLS_CA", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="With --server: PEM CA certificate of the server's [env FACEGALLERY_TLS_CA].")
    @click.option("--tls-cert", envvar="FACEGALLERY_CLIENT_CERT", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="With --server: PEM client certificate (mTLS) [env FACEGALLERY_CLIENT_CERT].")
    @click.option("--tls-key", envvar="FACEGALLERY_CLIENT_KEY", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
                  help="With --server: PEM private key of --tls-cert [env FACEGALLERY_CLIENT_KEY].")
    @click.option("--tls-server-name", envvar="FACEGALLERY_TLS_SERVER_NAME", default=None, metavar="NAME", help=f"With --server: {_TLS_SERVER_NAME_HELP}")
    @functools.wraps(func)
    def wrapper(
        data_dir: Path | None,
        backend: str,
        milvus_uri: str,
        milvus_token: str,
        milvus_prefix: str,
        server: str | None,
        api_key: str | None,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_server_name: str | None,
        **kwargs: Any,
    ) -> Any:
        from facegallery.server.contract.errors import FaceGalleryError

        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        ctx = click.get_current_context()
        given = {name for name in ("data_dir", "backend", "server") if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
        milvus = backend.lower() == "milvus"
        if milvus and data_dir is not None:
            raise click.UsageError("--data-dir is the embedded backend's store: with --backend milvus the keys are in Milvus (--milvus-uri)")
        if milvus and {"backend", "server"} <= given:
            raise click.UsageError("give --backend milvus (the keys in Milvus directly) or --server (through a running server), not both")
        # the store directly: --data-dir, --backend milvus (unless only the environment says so and --server is given), or no --server
        direct = data_dir is not None or server is None or (milvus and ("backend" in given or "server" not in given))
        try:
            if direct and milvus:
                with _milvus_keys(milvus_uri, token=milvus_token, prefix=milvus_prefix) as keys:
                    return func(keys=keys, **kwargs)
            if direct:
                with _store_keys(data_dir) as keys:
                    return func(keys=keys, **kwargs)
            client = _open_client(
                server, api_key=api_key or None, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name or None
            )
            with client:
                return func(keys=_ServerKeys(client), **kwargs)
        except Unavailable as exc:
            raise click.ClickException(f"{exc} (is a server running at {server}?)") from exc
        except (FaceGalleryError, FaceGalleryClientError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _key_row(name: str, key_id: str, role: str, galleries: tuple[str, ...], created: float | None, revoked: float | None) -> dict[str, Any]:
    return {"name": name, "key_id": key_id, "role": role, "galleries": list(galleries), "created": created, "revoked": revoked}


@dataclasses.dataclass
class _StoreKeys:
    """The keys of a store, opened directly."""

    store: Any

    def create(self, name: str, role: str, galleries: tuple[str, ...]) -> tuple[dict[str, Any], str]:
        import time

        from facegallery.server.gallery.keys import create_key

        record, key = create_key(self.store, name, role, galleries, now=time.time())
        return record.to_json(), key

    def list(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.store.list_api_keys()]

    def revoke(self, name: str) -> dict[str, Any]:
        import time

        from facegallery.server.gallery.keys import revoke_key

        return revoke_key(self.store, name, now=time.time()).to_json()


@dataclasses.dataclass
class _ServerKeys:
    """The keys of a running server, through its key RPCs."""

    client: GalleryClient

    @staticmethod
    def _row(k: Any) -> dict[str, Any]:
        return _key_row(k.name, k.key_id, k.role, k.galleries, k.create_time and k.create_time.timestamp(), k.revoke_time and k.revoke_time.timestamp())

    def create(self, name: str, role: str, galleries: tuple[str, ...]) -> tuple[dict[str, Any], str]:
        record, key = self.client.create_key(name, role, galleries=galleries)
        return self._row(record), key

    def list(self) -> list[dict[str, Any]]:
        return [self._row(k) for k in self.client.list_keys()]

    def revoke(self, name: str) -> dict[str, Any]:
        return self._row(self.client.revoke_key(name))


@contextlib.contextmanager
def _store_keys(data_dir: Path | None) -> Iterator[_StoreKeys]:
    """The store of ``data_dir`` (created when missing, so the first key can precede the first start)."""
    from facegallery.server.contract.paths import user_data_dir
    from facegallery.server.gallery.manager import STORE_FILE
    from facegallery.server.gallery.store import SqliteTemplateStore

    store = SqliteTemplateStore(Path(data_dir if data_dir is not None else user_data_dir()) / STORE_FILE)
    try:
        yield _StoreKeys(store)
    finally:
        store.close()


@contextlib.contextmanager
def _milvus_keys(uri: str, *, token: str, prefix: str) -> Iterator[_StoreKeys]:
    """The milvus backend's store at ``uri`` (its collections created when missing, so the first
    key can precede the first server). Raises BackendUnavailable when Milvus cannot be reached."""
    from facegallery.server.gallery.manager import open_milvus_store

    try:
        store = open_milvus_store(uri, token=token, prefix=prefix)
    except RuntimeError as exc:  # no pymilvus: what to install
        raise click.ClickException(str(exc)) from exc
    try:
        yield _StoreKeys(store)
    finally:
        store.close()


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


@main.group("keys")
def keys_group() -> None:
    """API keys: create (shown once), list, revoke. A server with any key refuses calls without a
    valid one; revocation takes effect on running servers within a second.

    Roles: read (identify, verify, compare, embed, read identities and galleries) < write (also
    enroll, update and delete identities, import) < admin (also create, update, delete and export
    galleries, and manage keys). A key limited to galleries (--gallery, repeatable) sees no other
    gallery.

    Each command works on a data directory's store directly (--data-dir, the default; a server may
    be running on it, and the first admin key is made this way), on the milvus backend's store
    directly (--backend milvus --milvus-uri URI [--milvus-prefix P] [--milvus-token T]; every server
    of it sees the keys), or through a running server (--server HOST:PORT with an admin --api-key
    for every gallery).
    """


@keys_group.command("create")
@_keys_target
@click.option("--name", required=True, help="Unique name of the key (letters, digits, '.', '_', '-').")
@click.option("--role", type=click.Choice(["read", "write", "admin"]), required=True, help="What the key may do.")
@click.option("--gallery", "galleries", multiple=True, help="Limit the key to this gallery (repeatable; default: every gallery).")
@click.option("--json", "as_json", is_flag=True, help='Print {"name": .., "key": ..}.')
def keys_create(keys: _StoreKeys | _ServerKeys, name: str, role: str, galleries: tuple[str, ...], as_json: bool) -> None:
    """Create a key and print it once: only its salted hash is stored."""
    record, key = keys.create(name, role, galleries)
    if as_json:
        click.echo(json.dumps({"name": record["name"], "key": key}))
        return
    scope = ", ".join(record["galleries"]) or "every gallery"
    click.echo(f"created key {record['name']!r} ({record['role']}, {scope}); it is shown only now:", err=True)
    click.echo(key)


@keys_group.command("list")
@_keys_target
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
def keys_list(keys: _StoreKeys | _ServerKeys, as_json: bool) -> None:
    """Every key: name, role, galleries, created, revoked (never the key itself)."""
    for r in keys.list():
        if as_json:
            click.echo(json.dumps(r))
            continue
        state = "active" if r["revoked"] is None else "revoked " + _utc(r["revoked"])
        created = _utc(r["created"]) if r["created"] is not None else "?"
        click.echo(f"{r['name']}\t{r['role']}\t{','.join(r['galleries']) or '*'}\tfg_{r['key_id']}...\tcreated {created}\t{state}")


@keys_group.command("revoke")
@_keys_target
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the revoked key's record (as `keys list --json` does).")
def keys_revoke(keys: _StoreKeys | _ServerKeys, name: str, as_json: bool) -> None:
    """Revoke the key NAME: running servers refuse it within a second."""
    record = keys.revoke(name)
    click.echo(json.dumps(record) if as_json else f"revoked key {record['name']!r} at {_utc(record['revoked'])}")
