"""``GalleryClient``: the synchronous Python client of the facegallery gRPC service."""

from __future__ import annotations

import collections
import dataclasses
import enum
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facegallery.client import _convert
from facegallery.client._exceptions import ClientClosedError, DeadlineExceeded, NotFound, ServerError, Unavailable, from_rpc_error
from facegallery.client._models import (
    Aggregation,
    ApiKey,
    BulkEnrollItem,
    CompareResult,
    DuplicatesResult,
    EmbeddedFace,
    EnrollItem,
    EnrollResult,
    ExportedTemplate,
    FaceIdentification,
    FacePolicy,
    Gallery,
    GalleryDeletion,
    Identity,
    ImageInput,
    ImageKind,
    ImportResult,
    Normalization,
    ServerInfo,
    VerifyResult,
)
from facegallery.client.embedding_files import EmbeddingTable
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

__all__ = [
    "GalleryClient",
    "UseClientDefault",
    "USE_CLIENT_DEFAULT",
    "DEFAULT_ADDRESS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_RETRIES",
    "DEFAULT_GALLERY",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_IMPORT_BATCH",
]

LOG = logging.getLogger(__name__)

DEFAULT_ADDRESS = "localhost:50051"
#: Seconds allowed for one unary call (a large photo's detection takes a few seconds on a CPU).
DEFAULT_TIMEOUT = 30.0
#: Retries of idempotent calls on UNAVAILABLE; gRPC caps attempts at 5, i.e. 4 retries.
DEFAULT_RETRIES = 3
DEFAULT_GALLERY = "default"
#: 80 MiB: the server's default image byte limit (64 MiB, server/face/decode.py) plus headroom, so an
#: oversized image gets the server's RESOURCE_EXHAUSTED message rather than a transport error.
DEFAULT_MAX_MESSAGE_BYTES = 80 * 1024 * 1024

_SERVICE = "facegallery.v1.GalleryService"
# Calls that may be repeated without changing the outcome. Enroll/BulkEnroll would add the
# template twice, Create*/Delete* would turn a lost reply into ALREADY_EXISTS / NOT_FOUND, and a
# client stream (ImportEmbeddings) cannot be replayed once it has sent its first message.
# UpdateGallery sets the whole policy, so a repeat leaves the same policy.
_IDEMPOTENT_METHODS = (
    "GetGallery",
    "ListGalleries",
    "UpdateGallery",
    "FindDuplicates",
    "Identify",
    "IdentifyEmbedding",
    "Verify",
    "Compare",
    "Embed",
    "GetIdentity",
    "ListIdentities",
    "UpdateIdentity",
    "ExportGallery",
    "GetServerInfo",
)
# Backoff of the retry policy (gRFC A6): the n-th retry waits a random time in
# [0, min(INITIAL * MULTIPLIER**(n-1), MAX)].
_INITIAL_BACKOFF_S = 0.2
_MAX_BACKOFF_S = 5.0
_BACKOFF_MULTIPLIER = 2.0
_MAX_ATTEMPTS = 5  # the cap gRPC applies to maxAttempts
_READY_POLL_S = 0.1  # health-check interval of wait_ready
#: Templates per ImportEmbeddings batch of a table: 8 MiB of 128-value embeddings, one server
#: transaction each (bench/import_npz.py: larger batches gain nothing measurable).
DEFAULT_IMPORT_BATCH = 16_384
#: Batch calls of a table import in flight: one being stored while the next is sent.
_IMPORT_IN_FLIGHT = 2

T = TypeVar("T")


class UseClientDefault:
    """Type of :data:`USE_CLIENT_DEFAULT`, the per-call ``timeout`` default.

    Distinct from ``None``, which means "no deadline at all".
    """

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: Per-call ``timeout`` sentinel: use the client's ``timeout`` (or ``stream_timeout`` for streams).
USE_CLIENT_DEFAULT = UseClientDefault()


class _ClientState(enum.Enum):
    UNOPENED = 1  # no channel yet; the first call (or open() / with) opens it
    OPENED = 2
    CLOSED = 3  # closed for good: a closed client cannot be reopened


def _service_config(retries: int, *, round_robin: bool = False) -> str:
    """gRPC service config (JSON) retrying the idempotent methods on UNAVAILABLE; with
    ``round_robin``, also gRPC's ``round_robin`` load-balancing policy (else gRPC's default,
    ``pick_first``)."""
    method_config: dict[str, Any] = {
        "name": [{"service": _SERVICE, "method": method} for method in _IDEMPOTENT_METHODS],
    }
    if retries > 0:
        method_config["retryPolicy"] = {
            "maxAttempts": min(retries + 1, _MAX_ATTEMPTS),
            "initialBackoff": f"{_INITIAL_BACKOFF_S}s",
            "maxBackoff": f"{_MAX_BACKOFF_S}s",
            "backoffMultiplier": _BACKOFF_MULTIPLIER,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    config: dict[str, Any] = {"methodConfig": [method_config]}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(config)


@dataclasses.dataclass(frozen=True)
class _Target:
    """Where a client connects: see :func:`_channel_target`."""

    addresses: tuple[str, ...]  # the servers as given (stripped, for a list)
    target: str  # the gRPC channel target
    round_robin: bool  # balance calls over the target's addresses
    host: str | None  # several addresses of one host: that host (IPv6 in brackets), the TLS name


_HOST_NAMES_IN_A_LIST = (
    "a list of servers takes numeric addresses only (gRPC's ipv4:/ipv6: targets); servers known by host name belong "
    "behind one DNS name with an address record per server: dns:///NAME:PORT"
)


def _endpoint(entry: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``(ip, port)`` of a numeric ``IPv4:PORT`` or ``[IPv6]:PORT`` address; ValueError for anything else."""
    if entry.startswith("["):
        host, sep, port = entry[1:].partition("]:")
        family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = ipaddress.IPv6Address
    else:
        host, sep, port = entry.rpartition(":")
        family = ipaddress.IPv4Address
    try:
        ip = family(host)
    except ValueError:
        ip = None
    number = int(port) if sep and port.isascii() and port.isdigit() else 0
    if ip is None or not 0 < number < 65536:
        raise ValueError(f"{entry!r} is not a numeric IPv4:PORT or [IPv6]:PORT address; {_HOST_NAMES_IN_A_LIST}")
    return ip, number


def _channel_target(address: str | Sequence[str]) -> _Target:
    """The gRPC target of one server address or of several.

    One address (``str`` without a comma, or a one-item sequence) is the channel target as
    given, as before: ``host:port`` or any gRPC target (``dns:``, ``unix:``, ``ipv4:``, ...); an
    explicit ``dns:`` target is balanced round robin over the addresses its name resolves to.
    Several (a comma-separated ``str`` or a sequence, one address per item) must be numeric
    ``IPv4:PORT`` or ``[IPv6]:PORT`` addresses of one family, listed once each; they become one
    ``ipv4:`` / ``ipv6:`` target, balanced round robin.

    Raises
    ------
    ValueError
        No address, an empty one, or a list with a host name, a missing port, mixed IPv4 and IPv6,
        or an address listed twice.
    TypeError
        A sequence item that is not a ``str``.
    """
    if isinstance(address, str):
        if "," not in address:
            if not address.strip():
                raise ValueError("the server address is empty")
            return _Target((address,), address, address.startswith("dns:"), None)
        entries = [entry.strip() for entry in address.split(",")]
    else:
        entries = list(address)
        for entry in entries:
            if not isinstance(entry, str):
                raise TypeError(f"server addresses must be strings, got {type(entry).__name__}")
            if "," in entry:
                raise ValueError(f"one address per item of a sequence, got {entry!r}")
        entries = [entry.strip() for entry in entries]
        if not entries:
            raise ValueError("no server address given")
    if any(not entry for entry in entries):
        raise ValueError(f"an empty server address in {address!r}")
    if len(entries) == 1:
        return _Target((entries[0],), entries[0], entries[0].startswith("dns:"), None)
    endpoints = [_endpoint(entry) for entry in entries]
    if len({ip.version for ip, _ in endpoints}) > 1:
        raise ValueError(f"{address!r} mixes IPv4 and IPv6 addresses: list servers of one family (one ipv4: or ipv6: target)")
    numeric = [f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}" for ip, port in endpoints]
    twice = sorted({n for n in numeric if numeric.count(n) > 1})
    if twice:
        raise ValueError(f"server address {twice[0]} is listed twice in {address!r}")
    hosts = {str(ip) if ip.version == 4 else f"[{ip}]" for ip, _ in endpoints}
    scheme = "ipv4" if endpoints[0][0].version == 4 else "ipv6"
    return _Target(tuple(entries), f"{scheme}:{','.join(numeric)}", True, hosts.pop() if len(hosts) == 1 else None)


def _pem(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def _tls_credentials(
    ca: str | os.PathLike[str] | bytes | None, cert: str | os.PathLike[str] | bytes | None, key: str | os.PathLike[str] | bytes | None
) -> grpc.ChannelCredentials | None:
    """``grpc.ssl_channel_credentials`` from the ``tls_*`` arguments; None when all are None."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate and its private key)")
    return grpc.ssl_channel_credentials(root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert))


class GalleryClient:
    """Client of a facegallery server (enroll, identify, verify, manage galleries).

    Use it as a context manager, or call :meth:`close` when done::

        with GalleryClient("localhost:50051") as client:
            client.enroll("ann", "ann.jpg")
            for face in client.identify("visitor.jpg"):
                print(face.identity_id, face.distance)

    Images may be given as a path (``str`` or ``os.PathLike``, sent byte for byte), encoded
    ``bytes``, a ``PIL.Image.Image`` or a ``(H, W)`` / ``(H, W, 3)`` / ``(H, W, 4)`` uint8 numpy
    array (grey / RGB / RGBA); PIL images and arrays are encoded to PNG on the client. Boxes and
    landmarks are pixels of the original image after EXIF orientation; distances are Euclidean
    (L2) distances between embeddings (lower is more similar). A gallery decides 1:N searches
    with its decision policy, a fixed L2 threshold or a target FPIR (to each identity's nearest
    template or its mean template), on scores of its ``score_kind`` (the distance, or an S-norm
    score): a match is ``score <= threshold``. Verify and compare decide on
    ``distance <= threshold`` (0.6 for the default dlib model).

    Several servers that answer from the same galleries can be given as one comma-separated
    string or a sequence of addresses (with the embedded store each server keeps its own data
    directory, so that means replicas loaded with the same galleries; an enrollment through one
    is not seen by another, and a ``list_identities`` page token is valid only on the server
    that issued it)::

        GalleryClient("10.0.0.5:50051,10.0.0.6:50051")
        GalleryClient(["10.0.0.5:50051", "10.0.0.6:50051"])

    One channel then spreads the calls over them with gRPC's ``round_robin`` load-balancing
    policy: each call goes to the next server whose connection is ready, a server that is down
    is skipped until gRPC has reconnected to it, and an idempotent call that meets an
    UNAVAILABLE server is retried (see ``retries``), each attempt picked afresh, so on another
    server while one is down. Enroll, BulkEnroll, creations, deletions and imports are never
    retried, with or without a ``request_id`` (an enrollment with one may be called again by
    the caller; the repeat may go to another server, which knows the ``request_id`` only if it
    shares the first one's store). gRPC may still resend a call that never reached a server
    (its "transparent retry"), which cannot repeat an effect.

    Parameters
    ----------
    address : str or sequence of str
        ``host:port`` of the server, or any gRPC target (``dns:///name:port``, ``unix:path``,
        ...), used as given; an explicit ``dns:`` target is balanced round robin over every
        address its name resolves to (one DNS name with an A/AAAA record per server). Several
        servers: numeric ``IPv4:PORT`` or ``[IPv6]:PORT`` addresses, all IPv4 or all IPv6,
        comma-separated or as a sequence; host names are not accepted in a list (gRPC's
        ``ipv4:``/``ipv6:`` targets take none; a name would be resolved once, never again):
        servers known by name belong behind one ``dns:`` name.
    timeout : float or None, keyword-only
        Default deadline in seconds of each unary call (and of each page of
        :meth:`list_identities`); None = no deadline. Every method takes ``timeout=`` to override
        it for one call.
    stream_timeout : float or None, keyword-only
        Default deadline in seconds of a whole streaming call (:meth:`bulk_enroll`,
        :meth:`export_gallery`, :meth:`import_embeddings`), whose length grows with the data;
        None (the default) = no deadline.
    retries : int, keyword-only
        How often an idempotent call (gets, lists, searches, ``update_identity``,
        ``update_gallery``, ``find_duplicates``, ``server_info``) is retried when the server is UNAVAILABLE, with exponential backoff (0.2 s doubling up to
        5 s, randomised) by gRPC's built-in retry policy; gRPC caps it at 4. 0 disables retries.
        Enrollments, creations, deletions and imports are never retried. With several servers
        a retry may go to another one; with 0, a call to a server that just went down fails
        with :class:`Unavailable` (the next call goes elsewhere).
    gallery : str, keyword-only
        Gallery used when a method's ``gallery`` argument is None.
    max_message_bytes : int, keyword-only
        Largest message sent or received, in bytes (images travel in one message).
    credentials : grpc.ChannelCredentials or None, keyword-only
        TLS credentials; None = an insecure (plaintext) channel unless a ``tls_*`` argument is given.
    tls_ca, tls_cert, tls_key : str, Path, bytes or None, keyword-only
        PEM files (paths) or PEM bytes: any of them opens a TLS channel
        (``grpc.ssl_channel_credentials``). ``tls_ca`` = the CA that signed the server's
        certificate (None = the system roots); ``tls_cert`` and ``tls_key`` = this client's
        certificate and private key for a server that requires mTLS (both or neither).
        The server's certificate must name the host of ``address`` (a DNS name or an IP
        address in its subject alternative names); with several addresses of one host, that
        host; with several hosts, give ``tls_server_name``.
    tls_server_name : str or None, keyword-only
        With TLS: the name every server's certificate must carry, checked instead of the
        address's host and sent as the calls' ``:authority`` (``grpc.default_authority``), e.g.
        the service's DNS name on the certificate of each of several servers given by IP.
        Required with TLS and several addresses of different hosts.
    api_key : str or None, keyword-only
        An API key (``facegallery keys create``): sent as ``authorization: Bearer KEY`` metadata
        on every GalleryService call. A server with keys refuses calls without a valid one
        (:class:`Unauthenticated`) or with too low a role (:class:`PermissionDenied`).

    Raises
    ------
    ValueError
        A negative ``retries`` or ``timeout``; ``tls_cert`` without ``tls_key`` or the other
        way round; ``credentials`` together with a ``tls_*`` argument; an empty ``api_key``;
        a malformed address list (see ``address``); TLS with several hosts and no
        ``tls_server_name``, or ``tls_server_name`` without TLS.
    TypeError
        An address sequence with an item that is not a ``str``.
    OSError
        A ``tls_*`` file cannot be read.
    """

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = None,
        retries: int = DEFAULT_RETRIES,
        gallery: str = DEFAULT_GALLERY,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        tls_ca: str | os.PathLike[str] | bytes | None = None,
        tls_cert: str | os.PathLike[str] | bytes | None = None,
        tls_key: str | os.PathLike[str] | bytes | None = None,
        tls_server_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        for name, value in (("timeout", timeout), ("stream_timeout", stream_timeout)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 seconds or None, got {value}")
        self._target = _channel_target(address)
        #: The server addresses, one per server (one gRPC target for one address).
        self.addresses = self._target.addresses
        #: ``address`` as given (a sequence: joined with commas), for messages.
        self.address = address if isinstance(address, str) else ",".join(self.addresses)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.retries = retries
        self.gallery = gallery
        self.max_message_bytes = max_message_bytes
        self._credentials = credentials if credentials is not None else _tls_credentials(tls_ca, tls_cert, tls_key)
        if credentials is not None and (tls_ca, tls_cert, tls_key) != (None, None, None):
            raise ValueError("give either credentials or tls_ca/tls_cert/tls_key, not both")
        self._authority = self._tls_authority(tls_server_name)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip() or any(c.isspace() for c in api_key.strip())):
            raise ValueError("api_key must be a key string such as 'fg_...'")
        self._api_key = api_key.strip() if api_key is not None else None
        self._state = _ClientState.UNOPENED
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.GalleryServiceStub | None = None

    def _tls_authority(self, tls_server_name: str | None) -> str | None:
        """The ``grpc.default_authority`` of the channel: None keeps gRPC's (the target's host).

        Needed with TLS and several addresses: gRPC checks every server's certificate against
        the channel's one authority, which for an ``ipv4:a,b`` target is the whole list."""
        if tls_server_name is not None:
            if self._credentials is None:
                raise ValueError("tls_server_name needs TLS (tls_ca, tls_cert/tls_key or credentials)")
            if not tls_server_name.strip() or any(c.isspace() or c in ",/" for c in tls_server_name):
                raise ValueError(f"tls_server_name must be one host name or IP address, got {tls_server_name!r}")
            return tls_server_name
        if self._credentials is None or len(self.addresses) == 1:
            return None
        if self._target.host is None:
            raise ValueError(
                f"with TLS, servers on several hosts ({self.address}) need tls_server_name: the name every server's "
                "certificate carries"
            )
        return self._target.host

    # -----------------------------------------------------------------------------------------
    # Lifecycle

    def __repr__(self) -> str:
        return f"GalleryClient({self.address!r}, gallery={self.gallery!r}, state={self._state.name.lower()})"

    def __enter__(self) -> GalleryClient:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def is_closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._state is _ClientState.CLOSED

    def open(self) -> None:
        """Create the channel (done implicitly by the first call or by ``with``).

        Raises
        ------
        ClientClosedError
            The client was closed; a closed client cannot be reopened.
        """
        if self._state is _ClientState.CLOSED:
            raise ClientClosedError("this GalleryClient is closed; create a new one")
        if self._state is _ClientState.OPENED:
            return
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(self.retries, round_robin=self._target.round_robin)),
        ]
        if self._authority is not None:
            options.append(("grpc.default_authority", self._authority))
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self._target.target, options=options)
        else:
            self._channel = grpc.secure_channel(self._target.target, self._credentials, options=options)
        calls = self._channel if self._api_key is None else grpc.intercept_channel(self._channel, _BearerKey(self._api_key))
        self._stub = pb_grpc.GalleryServiceStub(calls)
        self._state = _ClientState.OPENED
        LOG.debug(
            "opened channel to %s (retries=%d%s)", self._target.target, self.retries, ", round_robin" if self._target.round_robin else ""
        )

    def close(self) -> None:
        """Close the channel; further calls raise :class:`ClientClosedError`. Idempotent."""
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None
        self._state = _ClientState.CLOSED

    def _open_stub(self) -> pb_grpc.GalleryServiceStub:
        self.open()
        assert self._stub is not None
        return self._stub

    # -----------------------------------------------------------------------------------------
    # Plumbing

    def _deadline(self, timeout: float | None | UseClientDefault, default: float | None) -> float | None:
        return default if isinstance(timeout, UseClientDefault) else timeout

    def _gallery(self, gallery: str | None) -> str:
        return self.gallery if gallery is None else gallery

    def _unary(self, method: str, request: Any, timeout: float | None | UseClientDefault) -> Any:
        stub = self._open_stub()
        try:
            return getattr(stub, method)(request, timeout=self._deadline(timeout, self.timeout))
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -----------------------------------------------------------------------------------------
    # Galleries

    def create_gallery(
        self,
        name: str,
        *,
        threshold: float | None = None,
        target_fpir: float | None = None,
        normalization: Normalization | str | None = None,
        cohort_size: int | None = None,
        aggregation: Aggregation | str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Gallery:
        """Create an empty gallery bound to the server's model, with a decision policy.

        Give at most one of ``threshold`` and ``target_fpir``; none = the server's default
        policy (a target FPIR of 0.01 with S-norm and mean templates).

        Parameters
        ----------
        name : str
            1..128 characters of ``[A-Za-z0-9_.-]``.
        threshold : float or None
            A fixed decision threshold (L2 distance, > 0).
        target_fpir : float or None
            A target FPIR in (0, 1): the server keeps the threshold where about this fraction
            of people who are not enrolled would be matched to someone.
        normalization : Normalization, "snorm", "none" or None
            Score normalisation of a target-FPIR policy; None = S-norm.
        cohort_size : int or None
            k of S-norm, 2..1000; None = the server's default (100).
        aggregation : Aggregation, "nearest", "mean" or None
            How an identity's templates give its distance to a probe: its nearest template, or
            the mean of its templates; with either rule. None = mean with ``target_fpir``,
            nearest with ``threshold``.

        Raises
        ------
        AlreadyExists
            The name is taken.
        InvalidArgument
            A malformed name, or a policy out of range (e.g. S-norm with a fixed threshold).
        ValueError
            Both ``threshold`` and ``target_fpir``, or ``normalization`` / ``cohort_size`` /
            ``aggregation`` without either (nothing was sent).
        """
        policy = _convert.policy_message(
            threshold=threshold, target_fpir=target_fpir, normalization=normalization, cohort_size=cohort_size, aggregation=aggregation
        )
        request = pb.CreateGalleryRequest(name=name)
        if threshold is not None and normalization is None and cohort_size is None and aggregation is None:
            request.threshold = threshold  # a bare threshold: the field servers before policies read too
        elif policy is not None:
            request.policy.CopyFrom(policy)
        return _convert.gallery(self._unary("CreateGallery", request, timeout))

    def update_gallery(
        self,
        name: str | None = None,
        *,
        threshold: float | None = None,
        target_fpir: float | None = None,
        normalization: Normalization | str | None = None,
        cohort_size: int | None = None,
        aggregation: Aggregation | str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Gallery:
        """Replace a gallery's decision policy (None = the client's gallery); later searches use it.

        Give exactly one of ``threshold`` and ``target_fpir``; the other keywords are as for
        :meth:`create_gallery`. Idempotent, so retried on UNAVAILABLE.

        Returns
        -------
        Gallery
            With the new policy and the threshold, score kind and estimated FPIR it decides
            with now.

        Raises
        ------
        NotFound
            Unknown gallery.
        InvalidArgument
            A policy out of range.
        ValueError
            Neither or both of ``threshold`` and ``target_fpir`` (nothing was sent).
        """
        policy = _convert.policy_message(
            threshold=threshold, target_fpir=target_fpir, normalization=normalization, cohort_size=cohort_size, aggregation=aggregation
        )
        if policy is None:
            raise ValueError("give threshold or target_fpir")
        request = pb.UpdateGalleryRequest(name=self._gallery(name), policy=policy)
        return _convert.gallery(self._unary("UpdateGallery", request, timeout))

    def get_gallery(
        self, name: str | None = None, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT
    ) -> Gallery:
        """One gallery with its identity and template counts (None = the client's gallery).

        Raises
        ------
        NotFound
            Unknown gallery.
        """
        return _convert.gallery(self._unary("GetGallery", pb.GetGalleryRequest(name=self._gallery(name)), timeout))

    def list_galleries(self, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT) -> list[Gallery]:
        """Every gallery of the server."""
        response = self._unary("ListGalleries", pb.ListGalleriesRequest(), timeout)
        return [_convert.gallery(g) for g in response.galleries]

    def delete_gallery(
        self, name: str, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT
    ) -> GalleryDeletion:
        """Delete a gallery with all its identities and templates.

        Raises
        ------
        NotFound
            Unknown gallery.
        """
        response = self._unary("DeleteGallery", pb.DeleteGalleryRequest(name=name), timeout)
        return GalleryDeletion(int(response.deleted_identities), int(response.deleted_templates))

    def find_duplicates(
        self,
        gallery: str | None = None,
        *,
        max_pairs: int = 100,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> DuplicatesResult:
        """Pairs of different identities the gallery's policy would confuse (likely the same person
        enrolled twice), most similar first.

        Parameters
        ----------
        gallery : str or None
            None = the client's gallery.
        max_pairs : int
            Most pairs to return, 1..10000.

        Returns
        -------
        DuplicatesResult
            The pairs (score <= the gallery's threshold), their score kind and the threshold;
            no pairs is not an error.

        Raises
        ------
        NotFound
            Unknown gallery.
        InvalidArgument
            ``max_pairs`` out of range.
        """
        request = pb.FindDuplicatesRequest(gallery=self._gallery(gallery), max_pairs=max_pairs)
        return _convert.duplicates_result(self._unary("FindDuplicates", request, timeout))

    # -----------------------------------------------------------------------------------------
    # Enrollment

    def enroll(
        self,
        identity_id: str,
        image: ImageInput | None = None,
        *,
        embedding: Any = None,
        display_name: str = "",
        metadata: Mapping[str, str] | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        face_policy: FacePolicy = FacePolicy.LARGEST,
        model_id: str | None = None,
        request_id: str | None = None,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> EnrollResult:
        """Enroll one face as a new template of ``identity_id`` (created if new).

        Give exactly one of ``image`` and ``embedding``. The call returns once the template is
        durably stored. Never retried by the client (without ``request_id`` a retry would add the
        template twice); with a ``request_id``, calling again after an error such as
        ``Unavailable`` or ``DeadlineExceeded`` is safe: a request the server did store is
        answered with its first reply.

        Parameters
        ----------
        identity_id : str
            The caller's id for the person, 1..256 characters.
        image : ImageInput
            Path, bytes, PIL image or uint8 array (see the class docstring).
        embedding : (D,) float32 array-like
            A precomputed embedding of the server model's dimension, instead of an image.
        display_name : str
            Set on creation, or updated when non-empty.
        metadata : mapping of str to str
            Merged into the identity's metadata.
        kind : ImageKind
            What the image contains (photo, face crop, aligned chip).
        face_policy : FacePolicy
            Enroll the largest face, or refuse images with several faces.
        model_id : str or None
            With ``embedding`` only: the model id the embedding was computed with
            (``server_info().model.model_id`` of the server that embedded it, or
            ``Gallery.model_id`` of the gallery it was exported from). None = the server's own.
        request_id : str or None
            Idempotency key, 1..128 printable ASCII characters (e.g. ``str(uuid.uuid4())``),
            remembered by the server for 24 hours while the template exists (see
            :class:`EnrollItem`). None = none.

        Returns
        -------
        EnrollResult
            Template id, face (pixels) and a possible duplicate identity.

        Raises
        ------
        InvalidArgument
            Undecodable image, no face, wrong embedding length, empty id.
        FailedPrecondition
            Several faces under ``FacePolicy.REJECT_MULTIPLE``; a gallery of another model than
            the server's (image) or ``model_id`` (embedding); ``request_id`` sent before with
            a different request (reason ``REQUEST_ID_REUSED``).
        ResourceExhausted
            Image over the server's byte or pixel limit.
        NotFound
            Unknown gallery.
        TypeError, ValueError, OSError
            An image argument the client cannot read or encode, or ``model_id`` with an image
            (nothing was sent).
        """
        item = EnrollItem(
            identity_id=identity_id,
            image=image,
            embedding=embedding,
            display_name=display_name,
            metadata=metadata or {},
            kind=kind,
            face_policy=face_policy,
            model_id=model_id,
            request_id=request_id,
        )
        request = _convert.enroll_request(item, self._gallery(gallery))
        return _convert.enroll_result(self._unary("Enroll", request, timeout))

    def bulk_enroll(
        self,
        items: Iterable[EnrollItem],
        *,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Iterator[BulkEnrollItem]:
        """Enroll many faces over one stream, yielding each item's result as soon as it is stored.

        ``items`` is consumed lazily (images given as paths are read only when sent), so
        thousands of images never sit in memory together. One bad item fails that item only:
        its result has ``ok=False`` with the status and message :meth:`enroll` would have raised.

        Parameters
        ----------
        items : iterable of EnrollItem
        gallery : str or None
            Gallery of every item; None = the client's gallery.
        timeout : float or None
            Deadline of the whole stream in seconds; default: the client's ``stream_timeout``.

        Items are sent as fast as the stream's flow control takes them (gRPC reads ``items`` on
        its own thread), so the server always has the next items at hand: it analyses several at
        once (``bulk_enroll_window``, 4 by default) and answers in request order.

        Yields
        ------
        BulkEnrollItem
            In request order; ``index`` is the item's 0-based position.

        Raises
        ------
        FaceGalleryClientError
            The stream itself failed (server unreachable, deadline, unknown gallery, ...).
        TypeError, ValueError, OSError
            An item the client could not read or encode: raised after the results of the items
            before it; the items after it are not sent.
        """
        stub = self._open_stub()
        name = self._gallery(gallery)
        failures: list[BaseException] = []

        def requests() -> Iterator[pb.BulkEnrollRequest]:
            try:
                for item in items:
                    yield pb.BulkEnrollRequest(request=_convert.enroll_request(item, name))
            except Exception as exc:  # re-raised in the caller's thread once the stream ends
                failures.append(exc)

        responses = stub.BulkEnroll(requests(), timeout=self._deadline(timeout, self.stream_timeout))
        return self._stream_results(responses, _convert.bulk_enroll_item, failures)

    @staticmethod
    def _stream_results(
        responses: Any, convert: Callable[[Any], T], failures: list[BaseException] | None = None
    ) -> Iterator[T]:
        try:
            for response in responses:
                yield convert(response)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            responses.cancel()  # no-op once the call completed; stops it when abandoned early
        if failures:
            raise failures[0]

    # -----------------------------------------------------------------------------------------
    # Search

    def identify(
        self,
        image: ImageInput,
        *,
        top_k: int = 5,
        threshold: float | None = None,
        max_faces: int = 0,
        kind: ImageKind = ImageKind.PHOTO,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> list[FaceIdentification]:
        """1:N search: who is each face of the image?

        Parameters
        ----------
        image : ImageInput
        top_k : int
            Candidates per face, 1..100.
        threshold : float or None
            Overrides the gallery's current threshold, on the gallery's score scale
            (``Gallery.score_kind``: an L2 distance or an S-norm score); None = the gallery's.
        max_faces : int
            Faces to search, largest first; 0 = all.

        Returns
        -------
        list of FaceIdentification
            One per face, largest face first; empty when the image has no face (not an error).
            ``identity_id`` is None for an unknown face; ``score``, ``threshold``,
            ``score_kind`` and ``estimated_fpir`` say how confident the decision is.

        Raises
        ------
        InvalidArgument
            Undecodable image, top_k out of range.
        ResourceExhausted
            Image over the server's limits.
        NotFound
            Unknown gallery.
        FailedPrecondition
            The gallery was built with another model.
        """
        request = pb.IdentifyRequest(
            gallery=self._gallery(gallery), image=_convert.image_message(image, kind), top_k=top_k, max_faces=max_faces
        )
        if threshold is not None:
            request.threshold = threshold
        response = self._unary("Identify", request, timeout)
        return [_convert.face_identification(f) for f in response.faces]

    def identify_embedding(
        self,
        embedding: Any,
        *,
        top_k: int = 5,
        threshold: float | None = None,
        model_id: str | None = None,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> FaceIdentification:
        """1:N search for a ``(D,)`` float32 embedding (no image processing); ``face`` is None.

        Parameters
        ----------
        embedding : (D,) float32 array-like
        top_k : int
            Candidates, 1..100.
        threshold : float or None
            Overrides the gallery's current threshold, on the gallery's score scale; None = the
            gallery's.
        model_id : str or None
            The model id the embedding was computed with (``server_info().model.model_id`` of
            the server that embedded it, or ``Gallery.model_id``). None = the server's own.

        Raises
        ------
        InvalidArgument
            Wrong embedding length.
        NotFound
            Unknown gallery.
        FailedPrecondition
            The gallery holds another model than ``model_id`` (or the server's).
        """
        request = pb.IdentifyEmbeddingRequest(
            gallery=self._gallery(gallery), embedding=_convert.embedding_message(embedding), top_k=top_k, model_id=model_id or ""
        )
        if threshold is not None:
            request.threshold = threshold
        return _convert.face_identification(self._unary("IdentifyEmbedding", request, timeout).result)

    def verify(
        self,
        identity_id: str,
        image: ImageInput,
        *,
        threshold: float | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> VerifyResult:
        """1:1: is the largest face of ``image`` the person ``identity_id``?

        Parameters
        ----------
        threshold : float or None
            Decision threshold (L2 distance); None = the server's default.

        Returns
        -------
        VerifyResult
            L2 distance to the identity's nearest template, threshold, ``is_match`` and the
            estimated FAR at that distance (when the model has a false-match curve).

        Raises
        ------
        InvalidArgument
            Undecodable image or no face.
        NotFound
            Unknown identity or gallery.
        """
        request = pb.VerifyRequest(
            gallery=self._gallery(gallery), identity_id=identity_id, image=_convert.image_message(image, kind)
        )
        if threshold is not None:
            request.threshold = threshold
        return _convert.verify_result(self._unary("Verify", request, timeout))

    def compare(
        self,
        image_a: ImageInput,
        image_b: ImageInput,
        *,
        threshold: float | None = None,
        kind: ImageKind = ImageKind.PHOTO,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> CompareResult:
        """L2 distance between the largest faces of two images (no gallery involved).

        Raises
        ------
        InvalidArgument
            An undecodable image or one without a face.
        """
        request = pb.CompareRequest(
            image_a=_convert.image_message(image_a, kind), image_b=_convert.image_message(image_b, kind)
        )
        if threshold is not None:
            request.threshold = threshold
        return _convert.compare_result(self._unary("Compare", request, timeout))

    def embed(
        self,
        image: ImageInput,
        *,
        max_faces: int = 0,
        kind: ImageKind = ImageKind.PHOTO,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> list[EmbeddedFace]:
        """Detect, align and embed every face of an image (largest first; 0 ``max_faces`` = all).

        Returns
        -------
        list of EmbeddedFace
            Each with a ``(D,) float32`` embedding of the server's model
            (``server_info().model.model_id``, the ``model_id`` to send with it to another
            server); empty when there is no face.

        Raises
        ------
        InvalidArgument
            Undecodable image.
        """
        request = pb.EmbedRequest(image=_convert.image_message(image, kind), max_faces=max_faces)
        return [_convert.embedded_face(f) for f in self._unary("Embed", request, timeout).faces]

    # -----------------------------------------------------------------------------------------
    # Identities and templates

    def get_identity(
        self,
        identity_id: str,
        *,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Identity:
        """One identity with its templates (their faces and source-image SHA-256).

        Raises
        ------
        NotFound
            Unknown identity or gallery.
        """
        request = pb.GetIdentityRequest(gallery=self._gallery(gallery), identity_id=identity_id)
        return _convert.identity(self._unary("GetIdentity", request, timeout))

    def list_identities(
        self,
        *,
        page_size: int = 0,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Iterator[Identity]:
        """Every identity in enrollment order, fetched a page at a time as iteration proceeds.

        Parameters
        ----------
        page_size : int
            Identities per request, 1..1000; 0 = the server's default (100).
        timeout : float or None
            Deadline of each page's call.

        Yields
        ------
        Identity
            Without templates (``templates`` is empty; use :meth:`get_identity`).

        Raises
        ------
        NotFound
            Unknown gallery (raised on first iteration).
        """
        name = self._gallery(gallery)
        self._open_stub()
        return self._pages(name, page_size, timeout)

    def _pages(self, gallery: str, page_size: int, timeout: float | None | UseClientDefault) -> Iterator[Identity]:
        token = ""
        while True:
            request = pb.ListIdentitiesRequest(gallery=gallery, page_size=page_size, page_token=token)
            response = self._unary("ListIdentities", request, timeout)
            for message in response.identities:
                yield _convert.identity(message)
            token = response.next_page_token
            if not token:
                return

    def update_identity(
        self,
        identity_id: str,
        *,
        display_name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> Identity:
        """Set the display name and/or replace the whole metadata map (None = leave unchanged).

        Raises
        ------
        ValueError
            Neither ``display_name`` nor ``metadata`` given (nothing was sent).
        NotFound
            Unknown identity or gallery.
        """
        paths = []
        message = pb.Identity(identity_id=identity_id)
        if display_name is not None:
            paths.append("display_name")
            message.display_name = display_name
        if metadata is not None:
            paths.append("metadata")
            message.metadata.update(_convert.metadata_dict(metadata))
        if not paths:
            raise ValueError("give display_name and/or metadata to update")
        request = pb.UpdateIdentityRequest(
            gallery=self._gallery(gallery), identity=message, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
        return _convert.identity(self._unary("UpdateIdentity", request, timeout))

    def delete_identity(
        self,
        identity_id: str,
        *,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> int:
        """Delete an identity with all its templates; returns the number of templates deleted.

        Raises
        ------
        NotFound
            Unknown identity or gallery.
        """
        request = pb.DeleteIdentityRequest(gallery=self._gallery(gallery), identity_id=identity_id)
        return int(self._unary("DeleteIdentity", request, timeout).deleted_templates)

    def delete_template(
        self,
        template_id: int,
        *,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> bool:
        """Delete one template; returns True when its identity lost its last template and was deleted.

        Raises
        ------
        NotFound
            Unknown template or gallery.
        """
        request = pb.DeleteTemplateRequest(gallery=self._gallery(gallery), template_id=template_id)
        return bool(self._unary("DeleteTemplate", request, timeout).identity_deleted)

    # -----------------------------------------------------------------------------------------
    # Export / import

    def export_gallery(
        self, gallery: str | None = None, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT
    ) -> tuple[Gallery, Iterator[ExportedTemplate]]:
        """Stream every template of a gallery with its embedding and identity data.

        Returns
        -------
        gallery : Gallery
            Read from the stream's first message (model id, threshold, counts).
        templates : iterator of ExportedTemplate
            The templates, each with a ``(D,) float32`` embedding, received as iteration proceeds.

        Raises
        ------
        NotFound
            Unknown gallery.
        ServerError
            The stream did not start with the gallery.
        """
        stub = self._open_stub()
        request = pb.ExportGalleryRequest(gallery=self._gallery(gallery))
        responses = stub.ExportGallery(request, timeout=self._deadline(timeout, self.stream_timeout))
        try:
            first = next(responses)
        except StopIteration:
            raise ServerError("the export stream ended before sending the gallery") from None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        if not first.HasField("gallery"):
            responses.cancel()
            raise ServerError("the export stream did not start with the gallery")
        return _convert.gallery(first.gallery), self._stream_results(
            responses, lambda r: _convert.exported_template(r.template)
        )

    def import_embeddings(
        self,
        templates: Iterable[ExportedTemplate] | EmbeddingTable,
        *,
        model_id: str | None = None,
        gallery: str | None = None,
        timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT,
        batch_size: int = DEFAULT_IMPORT_BATCH,
        progress: Callable[[int], None] | None = None,
    ) -> ImportResult:
        """Import precomputed templates (as from :meth:`export_gallery`) without the photos.

        The gallery is created if it does not exist. Templates already present (same identity
        and embedding) are skipped, so an interrupted import can simply be run again.

        An :class:`~facegallery.client.embedding_files.EmbeddingTable` (a ``.npz`` or
        ``.parquet`` file) is sent in batches of ``batch_size`` templates, one call per batch
        (two in flight), and each batch's reply comes once it is durably stored: ``progress``
        then gets the number of the table's first templates stored (or skipped), so after a
        failure, even a server killed mid-import, everything reported is in the gallery and a
        rerun finishes the rest. Single templates go in one stream, committed by the server in
        groups of 256; ``progress`` is not called.

        Parameters
        ----------
        templates : iterable of ExportedTemplate, or EmbeddingTable
            Consumed lazily; each ``embedding`` is ``(D,) float32`` (a table's ``(N, D) float32``).
        model_id : str, optional
            Model id of the pipeline that computed the embeddings (``Gallery.model_id`` of the
            exported gallery); must equal the target gallery's. None: the table's ``model_id``,
            else the server's (which a new gallery gets, and an existing one of another model
            refuses with FailedPrecondition).
        timeout : float or None
            Deadline of the whole import; default: the client's ``stream_timeout``.
        batch_size : int
            Templates per batch of a table (16,384 of 128 values are 8 MiB); at most what fits
            in ``max_message_bytes``.
        progress : callable, optional
            Called with the count of a table's templates acknowledged so far, in file order.

        Raises
        ------
        FailedPrecondition
            ``model_id`` differs from the gallery's.
        InvalidArgument
            An embedding of the wrong length or an invalid identity id.
        ValueError
            ``model_id`` differs from the table's, or ``batch_size`` < 1.
        TypeError, ValueError
            A template the client could not encode (raised after the stream; nothing after it
            was sent).
        """
        stub = self._open_stub()
        name = self._gallery(gallery)
        deadline = self._deadline(timeout, self.stream_timeout)
        if isinstance(templates, EmbeddingTable):
            if model_id is not None and templates.model_id is not None and model_id != templates.model_id:
                raise ValueError(f"model_id {model_id!r} differs from the table's {templates.model_id!r}")
            header = pb.ImportEmbeddingsHeader(gallery=name, model_id=model_id or templates.model_id or self._import_model_id())
            return self._import_table(stub, header, templates, deadline, batch_size, progress)
        header = pb.ImportEmbeddingsHeader(gallery=name, model_id=model_id or self._import_model_id())
        failures: list[BaseException] = []

        def requests() -> Iterator[pb.ImportEmbeddingsRequest]:
            yield pb.ImportEmbeddingsRequest(header=header)
            try:
                for template in templates:
                    yield pb.ImportEmbeddingsRequest(template=_convert.exported_template_message(template))
            except Exception as exc:  # re-raised in the caller's thread once the stream ends
                failures.append(exc)

        try:
            response = stub.ImportEmbeddings(requests(), timeout=deadline)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        if failures:
            raise failures[0]
        return ImportResult(imported=int(response.imported), skipped=int(response.skipped))

    def _import_model_id(self) -> str:
        """The model id of an import that names none: the server's. Not the gallery's from
        GetGallery, whose reply waits for the gallery's calibration (minutes at 1M templates,
        just when an interrupted bulk load is resumed); a gallery of another model refuses it."""
        return self.server_info().model.model_id

    def _import_table(
        self,
        stub: pb_grpc.GalleryServiceStub,
        header: pb.ImportEmbeddingsHeader,
        table: EmbeddingTable,
        timeout: float | None,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> ImportResult:
        """One ImportEmbeddings call per batch of ``table``, :data:`_IMPORT_IN_FLIGHT` at a time;
        replies are taken in order, so ``progress`` counts a prefix of the table."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n, d = table.embeddings.shape
        rows = max(1, min(batch_size, self.max_message_bytes // (2 * 4 * max(d, 1))))  # half the limit: ids and headroom
        end = None if timeout is None else time.monotonic() + timeout
        imported = skipped = done = 0
        pending: collections.deque[tuple[int, grpc.Future]] = collections.deque()
        try:
            for start in range(0, max(n, 1), rows):  # an empty table still creates the gallery
                stop = min(start + rows, n)
                batch = pb.TemplateBatch(
                    identity_ids=table.identity_ids[start:stop],
                    display_names=table.display_names[start:stop] if table.display_names is not None else (),
                    embeddings=np.ascontiguousarray(table.embeddings[start:stop], dtype="<f4").tobytes(),
                )
                messages = (pb.ImportEmbeddingsRequest(header=header), pb.ImportEmbeddingsRequest(batch=batch))
                remaining = None if end is None else max(end - time.monotonic(), 0.001)
                pending.append((stop, stub.ImportEmbeddings.future(iter(messages), timeout=remaining)))
                while len(pending) >= _IMPORT_IN_FLIGHT or (pending and stop == n):
                    done, future = pending.popleft()
                    response = future.result()
                    imported += int(response.imported)
                    skipped += int(response.skipped)
                    if progress is not None:
                        progress(done)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            for _, future in pending:  # after a failure: the later batches are dropped (a rerun skips what they stored)
                future.cancel()
        return ImportResult(imported=imported, skipped=skipped)

    # -----------------------------------------------------------------------------------------
    # Server

    # -----------------------------------------------------------------------------------------
    # API keys (an admin key not limited to galleries)

    def create_key(
        self, name: str, role: str, *, galleries: Iterable[str] = (), timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT
    ) -> tuple[ApiKey, str]:
        """Create an API key; returns its record and the key text, shown only now.

        ``role``: ``"read"``, ``"write"`` or ``"admin"``; ``galleries``: limit the key to these
        (empty = every gallery).

        Raises
        ------
        ValueError
            An unknown role (nothing was sent).
        AlreadyExists
            The name is taken.
        PermissionDenied
            The caller's key is not an admin key for every gallery.
        """
        if role not in _convert.KEY_ROLES:
            raise ValueError(f"role must be read, write or admin, not {role!r}")
        request = pb.CreateKeyRequest(name=name, role=_convert.KEY_ROLES[role], galleries=list(galleries))
        response = self._unary("CreateKey", request, timeout)
        return _convert.api_key(response.key), response.secret

    def list_keys(self, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT) -> list[ApiKey]:
        """Every API key, revoked ones too (never their secrets)."""
        return [_convert.api_key(k) for k in self._unary("ListKeys", pb.ListKeysRequest(), timeout).keys]

    def revoke_key(self, name: str, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT) -> ApiKey:
        """Revoke a key (idempotent): servers refuse it within a second. Raises NotFound."""
        return _convert.api_key(self._unary("RevokeKey", pb.RevokeKeyRequest(name=name), timeout))

    def server_info(self, *, timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT) -> ServerInfo:
        """Server version and the loaded model's manifest (model id, threshold, embedding size)."""
        return _convert.server_info(self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout))

    def health(self, *, service: str = "", timeout: float | None | UseClientDefault = USE_CLIENT_DEFAULT) -> str:
        """Status of the standard ``grpc.health.v1`` check: ``"SERVING"``, ``"NOT_SERVING"``, ...

        With several servers, one of them answers (the next in the round robin); the check is
        not retried.

        Parameters
        ----------
        service : str
            Service name to ask about; ``""`` = the server as a whole.

        Raises
        ------
        Unavailable
            The server cannot be reached.
        NotFound
            The server does not know ``service``.
        """
        self._open_stub()
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout, self.timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float | None = DEFAULT_TIMEOUT, *, service: str = "") -> None:
        """Block until the server's health status is SERVING (models and galleries loaded).

        Polls the ``grpc.health.v1`` Check every 0.1 s; each check waits for the server to
        start listening (``wait_for_ready``). With several servers, each check asks the next
        one in the round robin, so this returns once one of them is SERVING.

        Parameters
        ----------
        timeout : float or None
            Seconds to wait at most; None = forever.
        service : str
            Service name to wait for; ``""`` = the server as a whole.

        Raises
        ------
        DeadlineExceeded
            Not SERVING within ``timeout`` seconds.
        Unimplemented
            The server has no health service.
        """
        self._open_stub()
        stub = health_pb2_grpc.HealthStub(self._channel)
        end = None if timeout is None else time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=service)
        while True:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"the server at {self.address} was not ready within {timeout} s")
            try:
                response = stub.Check(request, timeout=remaining, wait_for_ready=True)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if isinstance(error, DeadlineExceeded):
                    raise DeadlineExceeded(f"the server at {self.address} was not ready within {timeout} s") from exc
                # UNAVAILABLE: the server went away; NOT_FOUND: it has not registered `service` yet.
                if not isinstance(error, (Unavailable, NotFound)):
                    raise error from exc
            else:
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(_READY_POLL_S if remaining is None else max(0.0, min(_READY_POLL_S, remaining)))


class _ClientCallDetails(
    collections.namedtuple("_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer KEY`` metadata to every call."""

    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, getattr(details, "wait_for_ready", None), getattr(details, "compression", None)
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)
