"""The settings of ``facegallery serve``: one object from a TOML file, the environment and flags.

Every key can be given three ways; the first found wins:

1. the command-line flag ``--KEY`` (underscores as dashes: ``--max-workers``);
2. the environment variable ``FACEGALLERY_KEY`` (``FACEGALLERY_MAX_WORKERS``; other
   ``FACEGALLERY_*`` variables, such as the client's ``FACEGALLERY_SERVER`` and
   ``FACEGALLERY_API_KEY``, are ignored);
3. the TOML file named by ``--config FILE`` or ``FACEGALLERY_CONFIG`` (top-level ``key = value``;
   ``docs/facegallery.example.toml`` lists every key with its default);

and else the built-in default, the module constant the code itself uses. :meth:`ServeSettings.load`
builds the object (pydantic-settings: the flags as init values, then ``EnvSettingsSource``, then
``TomlConfigSettingsSource``) and raises :class:`SettingsError`, one line naming each bad key and
where its value came from, for an invalid value from any source, an unknown key in the file or an
unreadable file. Each field's docstring (with its unit) is also its ``serve --help`` text.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, FilePath, PrivateAttr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, InitSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from facegallery.server.face.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_DELAY_MS
from facegallery.server.face.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from facegallery.server.face.detect import DEFAULT_MAX_DETECT_PIXELS, DEFAULT_MIN_FACE_SIZE
from facegallery.server.face.pipeline import PipelineConfig
from facegallery.server.service.app import (
    DEFAULT_GRACE_S,
    DEFAULT_HOST,
    DEFAULT_MAX_WORKERS,
    DEFAULT_MILVUS_PREFIX,
    DEFAULT_MILVUS_URI,
    DEFAULT_PORT,
    DEFAULT_SEARCH_THREADS,
    DEFAULT_SNAPSHOT_INTERVAL_S,
    ServerConfig,
    default_data_dir,
)
from facegallery.server.service.logs import DEFAULT_LOG_FORMAT, DEFAULT_LOG_LEVEL, LogFormat, LogLevel

__all__ = ["CONFIG_ENV", "ENV_PREFIX", "SECRET_KEYS", "ServeSettings", "SettingsError", "Source", "env_name", "flag_name"]

ENV_PREFIX = "FACEGALLERY_"
#: Environment variable naming the TOML file when ``--config`` is not given.
CONFIG_ENV = "FACEGALLERY_CONFIG"
#: Keys whose values are secrets: never shown (``serve --help`` defaults, error messages, repr).
SECRET_KEYS = frozenset({"milvus_token"})


def env_name(key: str) -> str:
    """The environment variable of a settings key: ``max_workers`` -> ``FACEGALLERY_MAX_WORKERS``."""
    return f"{ENV_PREFIX}{key.upper()}"


def flag_name(key: str) -> str:
    """The command-line flag of a settings key: ``max_workers`` -> ``--max-workers``."""
    return "--" + key.replace("_", "-")


class SettingsError(ValueError):
    """Invalid settings: a bad value (naming the key and its source), an unknown key in the TOML
    file, or a TOML file that cannot be read or parsed."""


class Source(NamedTuple):
    """Where a setting's value came from: ``kind`` is ``"flag"``, ``"env"``, ``"file"`` or
    ``"default"``; ``where`` names it for people (``"--port"``, ``"environment variable
    FACEGALLERY_PORT"``, ``"config file serve.toml"``, ``"default"``)."""

    kind: str
    where: str

    def __str__(self) -> str:
        return self.where


class ServeSettings(BaseSettings):
    """Everything ``facegallery serve`` is configured with (see the module docstring); build it
    with :meth:`load`. Sizes are in bytes, pixels or MiB and times in seconds or milliseconds, as
    each field says."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", use_attribute_docstrings=True, frozen=True)

    data_dir: Path = Field(default_factory=default_data_dir)
    """Store and index directory (gallery.sqlite3 and index/) of the embedded backend; default: the user data directory."""
    backend: Literal["embedded", "milvus"] = ServerConfig.backend
    """Where the galleries are kept: embedded (SQLite in data_dir, one server) or milvus (a Milvus at milvus_uri, shared by
    every server pointed at it; nothing on local disk; docs/milvus.md)."""
    milvus_uri: str = Field(DEFAULT_MILVUS_URI, min_length=1)
    """With backend milvus: the Milvus to use (http://HOST:PORT, https:// for TLS). A call to it that takes over 15 s fails
    with UNAVAILABLE (BACKEND_UNAVAILABLE); health is NOT_SERVING while it does not answer its ping (every second)."""
    milvus_token: str = Field(ServerConfig.milvus_token, repr=False)
    """With backend milvus: user:password or API key of the Milvus (empty: none); never shown or logged."""
    milvus_prefix: str = Field(DEFAULT_MILVUS_PREFIX, min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """With backend milvus: prefix of the collection names (letters, digits, _), so that several deployments can share one Milvus."""
    milvus_search: Literal["server", "milvus"] = ServerConfig.milvus_search
    """With backend milvus: where searches run: server (each gallery's embeddings in memory, fastest) or milvus (Milvus searches
    them; the server keeps 16 bytes per template, for galleries larger than its memory; docs/milvus.md)."""
    host: str = DEFAULT_HOST
    """Address to listen on. Without tls_cert/tls_key only a loopback address (localhost, 127.0.0.1, ::1) is allowed, unless insecure."""
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    """Port to listen on (0 picks a free one, logged at start)."""
    model_dir: Path | None = None
    """Model directory with model.json. Default: the dlib model in the user data directory, converted on first start (a few
    seconds); from FACEGALLERY_MODEL_DIR, a directory without model.json is where the dlib model is converted."""
    log_level: LogLevel = DEFAULT_LOG_LEVEL
    """Least severity logged: DEBUG, INFO, WARNING or ERROR (any case)."""
    log_format: LogFormat = DEFAULT_LOG_FORMAT
    """Log lines as text, or json: one JSON object per line (time, level, logger, message, request_id, and rpc, code,
    duration_s, peer on a call's access line)."""
    max_workers: int = Field(DEFAULT_MAX_WORKERS, ge=1)
    """Calls served at once (gRPC threads)."""
    batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1)
    """Most face chips per batch across concurrent calls (1 = no batching)."""
    batch_delay_ms: float = Field(DEFAULT_MAX_DELAY_MS, ge=0)
    """Longest wait for more chips before a batch runs, milliseconds."""
    min_face_size: int = Field(DEFAULT_MIN_FACE_SIZE, ge=8)
    """Smallest face to find, pixels."""
    max_detect_pixels: int = Field(DEFAULT_MAX_DETECT_PIXELS, ge=10_000)
    """Largest image area the detector runs on, pixels; bigger photos are detected on a downscaled copy."""
    max_image_bytes: int = Field(DEFAULT_MAX_IMAGE_BYTES, ge=1)
    """Largest encoded image, bytes; larger ones are refused with RESOURCE_EXHAUSTED."""
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    """Largest decoded image, pixels; larger ones are refused with RESOURCE_EXHAUSTED."""
    memory_budget: int | None = Field(None, ge=0)
    """Working memory all image calls may hold at once, MiB (estimated from each image's header); a call that does not fit
    waits up to 2 s, then gets RESOURCE_EXHAUSTED. Default: 25% of physical memory; 0 = no budget."""
    flip_augment: bool = PipelineConfig.flip_augment
    """Embed each face chip and its mirror image and average (better accuracy, 2x embedding cost). It changes the model id:
    galleries made without it are refused, and the other way round."""
    intra_op_threads: int = Field(PipelineConfig.intra_op_threads, ge=0)
    """onnxruntime threads per model (0 = one per core)."""
    search_threads: int = Field(DEFAULT_SEARCH_THREADS, ge=1)
    """faiss threads per search."""
    snapshot_interval: float = Field(DEFAULT_SNAPSHOT_INTERVAL_S, gt=0)
    """Seconds between index snapshots of changed galleries."""
    grace: float = Field(DEFAULT_GRACE_S, ge=0)
    """Seconds in-flight calls get to finish on SIGTERM/SIGINT."""
    integrity_check: Literal["quick", "full"] = ServerConfig.integrity_check
    """SQLite check of the store at start: quick (PRAGMA quick_check, ~0.1 s per 100,000 templates), or full (PRAGMA
    integrity_check, also checks every index against its table, ~2x). A damaged store is refused."""
    max_streams: int = Field(ServerConfig.max_streams, ge=1)
    """BulkEnroll/ImportEmbeddings streams open at once (they get threads beyond max_workers); more are refused."""
    max_streams_per_client: int = Field(ServerConfig.max_streams_per_client, ge=1)
    """Streams open at once from one client address."""
    stream_idle: float = Field(ServerConfig.stream_idle_s, gt=0)
    """Seconds a stream may send nothing before it is ended (DEADLINE_EXCEEDED)."""
    max_connections: int = Field(ServerConfig.max_connections, ge=1)
    """TCP connections accepted at once (per listening address)."""
    tls_cert: FilePath | None = ServerConfig.tls_cert
    """PEM server certificate (chain): serve TLS. Needs tls_key."""
    tls_key: FilePath | None = ServerConfig.tls_key
    """PEM private key of tls_cert."""
    tls_client_ca: FilePath | None = ServerConfig.tls_client_ca
    """PEM CA certificate(s): require mTLS, refusing at the handshake clients without a certificate signed by it."""
    insecure: bool = ServerConfig.insecure
    """Allow plaintext, or no API keys, on a non-loopback host (logged as a warning): without TLS and keys anyone who
    reaches the port can read and change every gallery. Create keys with `facegallery keys create --data-dir`."""
    approximate_above: int = Field(ServerConfig.approximate_above, ge=0)
    """Templates from which a gallery searches an approximate IVF index instead of exact search (identities, for
    its mean templates); 0 = always exact."""
    nprobe: int = Field(ServerConfig.nprobe, ge=1)
    """IVF lists an approximate search visits: more = higher recall, slower (64: recall@1 0.994, docs/scale.md)."""
    bulk_enroll_window: int = Field(ServerConfig.bulk_enroll_window, ge=1)
    """Items of one BulkEnroll stream whose images are analysed at once."""
    metrics_port: int = Field(ServerConfig.metrics_port, ge=0, le=65535)
    """Serve Prometheus metrics on http://HOST:PORT/metrics (HOST = host); 0 = off."""

    _sources: dict[str, Source] = PrivateAttr(default_factory=dict)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("backend", "milvus_search", mode="before")
    @classmethod
    def _lower_case_backend(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, config_file: Path | None = None, flags: Mapping[str, Any] | None = None) -> ServeSettings:
        """The settings from ``flags`` (key -> value, given on the command line), the
        ``FACEGALLERY_*`` environment and the TOML ``config_file`` (None = none), in that order.

        Raises
        ------
        SettingsError
            A value that is not valid for its key, an unknown key in ``config_file``, or a file
            that does not exist or is not valid TOML; one line naming each key and source.
        ValueError
            A key of ``flags`` that is not a settings key (a programming error, not a user's).
        """
        flags = dict(flags or {})
        unknown = sorted(set(flags) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"not settings keys: {', '.join(unknown)}")
        file_values: dict[str, Any] = {}
        toml = None
        if config_file is not None:
            if not Path(config_file).is_file():
                raise SettingsError(f"config file {config_file}: no such file")
            try:
                toml = TomlConfigSettingsSource(cls, toml_file=config_file)  # reads the file
                file_values = toml()
            except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
                raise SettingsError(f"config file {config_file}: {exc}") from None
        env = EnvSettingsSource(cls)
        sources = {key: Source("default", "default") for key in cls.model_fields}
        sources.update((key, Source("file", f"config file {config_file}")) for key in file_values)
        sources.update((key, Source("env", f"environment variable {env_name(key)}")) for key in env())
        sources.update((key, Source("flag", flag_name(key))) for key in flags)
        try:
            settings = cls(_build_sources=((InitSettingsSource(cls, flags), env, *([toml] if toml is not None else [])), flags))
        except ValidationError as exc:
            raise SettingsError("; ".join(_describe(error, sources, config_file) for error in exc.errors())) from None
        settings._sources = sources
        return settings

    def source_of(self, key: str) -> Source:
        """Where the value of ``key`` came from (``Source("default", "default")`` for an object not made by :meth:`load`)."""
        if key not in type(self).model_fields:
            raise KeyError(key)
        return self._sources.get(key, Source("default", "default"))


def _describe(error: Mapping[str, Any], sources: Mapping[str, Source], config_file: Path | None) -> str:
    """One pydantic error as ``invalid KEY = VALUE (SOURCE): why``; an unknown key of the file as such."""
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":  # only the file has keys of its own choosing
        return f"unknown key {key!r} in config file {config_file} (the keys are the flags of `facegallery serve --help`, with underscores)"
    source = sources.get(str(error["loc"][0]) if error["loc"] else "", Source("default", "default"))
    value = "(hidden)" if key in SECRET_KEYS else repr(error["input"])
    return f"invalid {key} = {value} ({source}): {error['msg']}"
