"""``facegallery serve``: the click command that runs the gRPC server; ``facegallery doctor``, which
checks a data directory offline (gallery/doctor.py).

The client CLI's main group (client/cli.py) builds this command with :func:`make_serve_command`,
handing it the default-model bootstrap: the dlib converter lives in ``facegallery.export``, which
the server never imports.

``serve`` is a thin layer over :class:`~facegallery.server.service.settings.ServeSettings`: it has
one flag per settings key (type, range, help and default all from the settings field), reads
``--config FILE`` (or ``FACEGALLERY_CONFIG``) and the ``FACEGALLERY_*`` environment before the
flags, so every ``--help`` default is the value in effect without that flag, then
:func:`server_config` turns the settings into the :class:`ServerConfig` the server runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from pydantic.fields import FieldInfo

from facegallery.server.contract.errors import BackendUnavailable, StoreCorruptError
from facegallery.server.face.detect import DetectionConfig
from facegallery.server.face.pipeline import PipelineConfig
from facegallery.server.gallery.doctor import Status, diagnose, worst
from facegallery.server.service.app import InsecureAddressError, ServerConfig, default_data_dir, is_loopback_host
from facegallery.server.service.app import serve as run_server
from facegallery.server.service.logs import configure_logging
from facegallery.server.service.settings import CONFIG_ENV, SECRET_KEYS, ServeSettings, SettingsError, flag_name

__all__ = ["make_doctor_command", "make_serve_command", "server_config"]


def server_config(settings: ServeSettings, default_model: Callable[[], Path]) -> ServerConfig:
    """The :class:`ServerConfig` (and its :class:`PipelineConfig`) of ``settings``.

    Parameters
    ----------
    settings : ServeSettings
    default_model : callable () -> Path
        The default-model bootstrap (see :func:`make_serve_command`); called when ``model_dir`` is
        unset or comes from ``FACEGALLERY_MODEL_DIR``, which the bootstrap reads itself (a
        directory without model.json there is where the dlib model is converted).

    Raises
    ------
    SettingsError
        tls_cert without tls_key (or the other way round), tls_client_ca without them, plaintext
        on a non-loopback host without insecure, a model_dir that is not a directory, or backend
        milvus without pymilvus installed; naming the keys and where their values came from.
    """

    def named(key: str) -> str:
        return f"{key} ({settings.source_of(key)})"

    if (settings.tls_cert is None) != (settings.tls_key is None):
        given, missing = ("tls_cert", "tls_key") if settings.tls_key is None else ("tls_key", "tls_cert")
        raise SettingsError(f"{named(given)} needs {missing} ({flag_name(missing)}) too")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SettingsError(f"{named('tls_client_ca')} needs tls_cert and tls_key (--tls-cert, --tls-key)")
    if settings.tls_cert is None and not settings.insecure and not is_loopback_host(settings.host):
        raise SettingsError(
            f"refusing to serve without TLS on the non-loopback address {settings.host} (host, from {settings.source_of('host')}): give tls_cert and "
            "tls_key (--tls-cert, --tls-key), listen on localhost, or set insecure (--insecure)"
        )
    if settings.backend == "milvus" and importlib.util.find_spec("pymilvus") is None:
        raise SettingsError(f"{named('backend')} = milvus needs pymilvus: pip install 'facegallery[milvus]'")
    if settings.model_dir is None or settings.source_of("model_dir").kind == "env":
        model_dir = default_model()
    elif settings.model_dir.is_dir():
        model_dir = settings.model_dir
    else:
        raise SettingsError(f"invalid model_dir = {str(settings.model_dir)!r} ({settings.source_of('model_dir')}): not a directory")
    pipeline = PipelineConfig(
        intra_op_threads=settings.intra_op_threads,
        flip_augment=settings.flip_augment,
        detection=DetectionConfig(min_face_size=settings.min_face_size, max_detect_pixels=settings.max_detect_pixels),
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        memory_budget_bytes=None if settings.memory_budget is None else settings.memory_budget << 20,
    )
    return ServerConfig(
        data_dir=settings.data_dir,
        backend=settings.backend,
        milvus_uri=settings.milvus_uri,
        milvus_token=settings.milvus_token,
        milvus_prefix=settings.milvus_prefix,
        milvus_search=settings.milvus_search,
        host=settings.host,
        port=settings.port,
        model_dir=model_dir,
        max_workers=settings.max_workers,
        batch_max_size=settings.batch_size,
        batch_max_delay_ms=settings.batch_delay_ms,
        search_threads=settings.search_threads,
        pipeline=pipeline,
        snapshot_interval_s=settings.snapshot_interval,
        max_streams=settings.max_streams,
        max_streams_per_client=settings.max_streams_per_client,
        stream_idle_s=settings.stream_idle,
        max_connections=settings.max_connections,
        metrics_port=settings.metrics_port,
        approximate_above=settings.approximate_above,
        nprobe=settings.nprobe,
        bulk_enroll_window=settings.bulk_enroll_window,
        grace_s=settings.grace,
        integrity_check=settings.integrity_check,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        tls_client_ca=settings.tls_client_ca,
        insecure=settings.insecure,
    )


def _option(key: str, field: FieldInfo) -> click.Option:
    """The flag of a settings field: its type and range, its docstring as help; no default of
    its own (the command's default map holds the settings in effect; a secret's is not shown)."""
    annotation = field.annotation
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        (annotation,) = (a for a in args if a is not type(None))
    if typing.get_origin(annotation) is typing.Annotated:  # FilePath: pydantic checks the file
        annotation = typing.get_args(annotation)[0]
    flag = flag_name(key)
    if annotation is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", key], show_default=True, help=field.description)
    kind: click.ParamType
    if typing.get_origin(annotation) is typing.Literal:
        kind = click.Choice(typing.get_args(annotation), case_sensitive=False)
    elif annotation in (int, float):
        bounds = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le") if hasattr(m, name)}
        low = bounds.get("ge", bounds.get("gt"))
        kind = (click.IntRange if annotation is int else click.FloatRange)(min=low, max=bounds.get("le"), min_open="gt" in bounds)
    elif annotation is Path:
        kind = click.Path(path_type=Path)
    else:
        kind = click.STRING
    return click.Option([flag, key], type=kind, show_default=key not in SECRET_KEYS, help=field.description)


class _BadSettings(click.ClickException):
    """A :class:`SettingsError` as one ``Error: ...`` line (no usage text), exit code 2 like a usage error."""

    exit_code = 2


class _ServeCommand(click.Command):
    """Loads the config file and the environment before the flags are parsed, as the command's
    default map: the flags then override them, and ``--help`` shows them as the defaults."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            opts, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        except click.UsageError:
            opts = {}  # the parse below reports it
        config = opts.get("config") or os.environ.get(CONFIG_ENV) or None
        try:
            settings = ServeSettings.load(None if config is None else Path(config))
        except SettingsError as exc:
            raise _BadSettings(str(exc)) from None
        ctx.default_map = {**(ctx.default_map or {}), **settings.model_dump()}
        return super().parse_args(ctx, args)


def make_serve_command(default_model: Callable[[], Path]) -> click.Command:
    """The ``serve`` click command.

    Parameters
    ----------
    default_model : callable () -> Path
        Returns the model directory served when no model_dir is set (or it is set by
        ``FACEGALLERY_MODEL_DIR``), converting it on first use
        (``facegallery.export.dlib.default_model.ensure_default_model``); called only when the
        command runs.
    """

    def serve(config: Path | None, **values: Any) -> None:
        """Run the face gallery gRPC server until SIGTERM or Ctrl-C.

        Enrolled templates are stored in DATA_DIR/gallery.sqlite3 (an acknowledged enrollment
        survives a crash); the search indexes are rebuilt or reloaded from DATA_DIR/index at start.
        With --backend milvus they are kept in the Milvus at --milvus-uri instead, shared by every
        server pointed at it (docs/milvus.md).

        Every setting is a flag, an environment variable FACEGALLERY_<KEY> (e.g.
        FACEGALLERY_MAX_WORKERS) or a key of the --config TOML file, in that order of precedence;
        the defaults shown are those in effect (docs/configuration.md).
        """
        ctx = click.get_current_context()
        flags = {key: value for key, value in values.items() if ctx.get_parameter_source(key) is ParameterSource.COMMANDLINE}
        try:
            settings = ServeSettings.load(config, flags)
            server = server_config(settings, default_model)
        except SettingsError as exc:
            raise _BadSettings(str(exc)) from None
        configure_logging(settings.log_level, settings.log_format)
        try:
            run_server(server)
        except (StoreCorruptError, InsecureAddressError) as exc:
            raise click.ClickException(str(exc)) from exc
        except BackendUnavailable as exc:
            raise click.ClickException(f"{exc} (backend milvus, milvus_uri from {settings.source_of('milvus_uri')}); is Milvus running there?") from exc

    config_option = click.Option(
        ["--config", "config"], type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar=CONFIG_ENV,
        help=f"TOML file of settings (docs/facegallery.example.toml); flags and FACEGALLERY_* variables override it [env {CONFIG_ENV}].",
    )
    params = [config_option, *(_option(key, field) for key, field in ServeSettings.model_fields.items())]
    return _ServeCommand("serve", callback=serve, params=params, help=serve.__doc__)


def make_doctor_command(default_model_dir: Callable[[], Path]) -> click.Command:
    """The ``doctor`` click command.

    Parameters
    ----------
    default_model_dir : callable () -> Path
        Returns the default model directory (``facegallery.export.dlib.default_model.default_model_dir``),
        checked when ``--model-dir`` is not given and it exists; never converts anything.
    """

    @click.command("doctor")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help=f"Data directory to check  [default: {default_data_dir()}]")
    @click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Model directory to check (every file's sha256, and the galleries' model ids)  "
                  "[default: the default dlib model directory, when it exists]")
    @click.option("--full", is_flag=True, help="Run PRAGMA integrity_check (also every index against its table, ~2x) instead of quick_check.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per check: check, status, message.")
    def doctor(data_dir: Path | None, model_dir: Path | None, full: bool, as_json: bool) -> None:
        """Check a data directory without the server: the store (SQLite integrity check, schema,
        galleries), its WAL, the index snapshots and the model files.

        One line per check, OK, WARN or FAIL. The server may be running (SQLite lets a reader in
        while it writes). Exit 0 when nothing FAILed (WARN included), 1 on any FAIL.
        """
        data_dir = data_dir if data_dir is not None else default_data_dir()
        if model_dir is None:
            default = default_model_dir()
            model_dir = default if default.is_dir() else None
        if not data_dir.is_dir():
            raise click.ClickException(f"no data directory at {data_dir}")
        findings = diagnose(data_dir, model_dir, integrity_check="full" if full else "quick")
        width = max(len(f.check) for f in findings)
        for f in findings:
            click.echo(json.dumps(f.to_json(), ensure_ascii=False) if as_json else f"{f.status.value:<4}  {f.check:<{width}}  {f.message}")
        if not as_json:
            counts = {s: sum(f.status is s for f in findings) for s in Status}
            click.echo(f"{counts[Status.OK]} OK, {counts[Status.WARN]} WARN, {counts[Status.FAIL]} FAIL", err=True)
        if worst(findings) is Status.FAIL:
            raise SystemExit(1)

    return doctor
