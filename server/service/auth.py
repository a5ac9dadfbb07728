"""API-key authentication and authorisation of the GalleryService methods (health and reflection stay open).

:class:`AuthInterceptor` reads ``authorization: Bearer KEY`` metadata and checks the key against
the store's ``api_keys`` table (``facegallery.server.gallery.keys``):

* no key was ever created in the store: every call passes, as before keys existed (the server
  refuses a non-loopback address in that state unless ``insecure``, app.py);
* a missing, malformed, unknown or revoked key: UNAUTHENTICATED (reason ``UNAUTHENTICATED``);
* a key whose role is below the method's (:data:`METHOD_ROLES`), or a key limited to galleries
  calling the key RPCs (CreateKey, ListKeys, RevokeKey: it could mint an unlimited key):
  PERMISSION_DENIED (reason ``PERMISSION_DENIED``);
* a key limited to galleries that names another gallery in its request (field ``gallery``, or
  ``name`` for the gallery RPCs; in ImportEmbeddings each message's as it arrives): NOT_FOUND with
  reason ``GALLERY_NOT_FOUND`` and the very status of a gallery that does not exist, so gallery
  names do not leak.

The store is the truth, shared by every server on the data directory (and by ``facegallery keys
--data-dir``), so verifications are cached for :data:`CACHE_TTL_S` seconds only (and whether any
key exists likewise): a key revoked in the store is refused within that time on a running server.

The servicer learns the caller's key from the call's context: the interceptor sets the attribute
:data:`KEY_ATTRIBUTE` on the ``grpc.ServicerContext`` (one object per call, so nothing leaks
between calls); :func:`caller_key` reads it (None = no authentication), :func:`check_gallery`
raises GalleryNotFound for a gallery outside it. ListGalleries lists only the key's galleries;
BulkEnroll checks each item's gallery in the servicer, so an item outside the key's galleries gets
the per-item NOT_FOUND of a missing gallery and the stream goes on.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from facegallery.server.contract.errors import FaceGalleryError, GalleryNotFound
from facegallery.server.gallery.keys import ApiKeyRecord, KeyStore, Role, verify_key
from facegallery.server.gallery.manager import DEFAULT_GALLERY
from facegallery.server.service.interceptors import rewrap_handler
from facegallery.server.service.status import make_status, rich_status

__all__ = [
    "AUTH_FAILURE_REASONS",
    "CACHE_TTL_S",
    "KEY_ATTRIBUTE",
    "METHOD_ROLES",
    "REASON_UNAUTHENTICATED",
    "REASON_PERMISSION_DENIED",
    "AuthInterceptor",
    "caller_key",
    "check_gallery",
]

LOG = logging.getLogger(__name__)

#: Seconds a verification (and "are there keys at all") is trusted before the store is read again.
CACHE_TTL_S = 1.0
#: Attribute of the call's ServicerContext holding the caller's ApiKeyRecord.
KEY_ATTRIBUTE = "facegallery_api_key"
REASON_UNAUTHENTICATED = "UNAUTHENTICATED"
REASON_PERMISSION_DENIED = "PERMISSION_DENIED"
#: Why a call was refused, as handed to ``on_failure`` (the metric facegallery_auth_failures_total):
#: no key (or not a Bearer one), a key that is unknown, wrong or revoked (verify_key does not tell
#: them apart), a role too low (or a key limited to galleries calling the key RPCs).
AUTH_FAILURE_REASONS = ("missing_key", "invalid_key", "permission_denied")
#: Entries of the verification cache before it is emptied (bounds memory under a flood of keys).
_CACHE_MAX = 10_000

_READ = ("Identify", "IdentifyEmbedding", "Verify", "Compare", "Embed", "GetIdentity", "ListIdentities", "GetGallery", "ListGalleries", "FindDuplicates", "GetServerInfo")
_WRITE = ("Enroll", "BulkEnroll", "UpdateIdentity", "DeleteIdentity", "DeleteTemplate", "ImportEmbeddings")
_ADMIN = ("CreateGallery", "UpdateGallery", "DeleteGallery", "ExportGallery", "CreateKey", "ListKeys", "RevokeKey")
#: GalleryService method -> the least role that may call it; a method not listed needs admin.
METHOD_ROLES: dict[str, Role] = {**{m: Role.READ for m in _READ}, **{m: Role.WRITE for m in _WRITE}, **{m: Role.ADMIN for m in _ADMIN}}
#: Key management: an admin key limited to galleries may not (it could mint an unlimited key).
_KEY_METHODS = frozenset({"CreateKey", "ListKeys", "RevokeKey"})
#: Methods whose request names its gallery in ``name`` instead of ``gallery``.
_NAME_FIELD = frozenset({"CreateGallery", "GetGallery", "UpdateGallery", "DeleteGallery"})


def caller_key(context: grpc.ServicerContext) -> ApiKeyRecord | None:
    """The key the call was made with; None when the server has no keys (no authentication)."""
    return getattr(context, KEY_ATTRIBUTE, None)


def check_gallery(context: grpc.ServicerContext, gallery: str) -> None:
    """Raise GalleryNotFound (the message of a missing gallery) if the caller's key may not see ``gallery``."""
    key = caller_key(context)
    name = gallery or DEFAULT_GALLERY
    if key is not None and not key.allows(name):
        raise GalleryNotFound(f"gallery {name!r} does not exist")


def _bearer(context: grpc.ServicerContext) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class AuthInterceptor(grpc.ServerInterceptor):
    """API keys for the methods under ``service_prefix`` (see the module docstring).

    Parameters
    ----------
    service_prefix : str
        e.g. ``"/facegallery.v1.GalleryService/"``; other services pass untouched.
    store : KeyStore or None
        The store holding ``api_keys``; may be set later (attribute ``store``), before the server
        is ready (the readiness interceptor answers UNAVAILABLE until then).
    ttl_s : float
        Seconds a verification is cached.
    on_failure : callable (reason) -> None, optional
        Called once per refused call (UNAUTHENTICATED or PERMISSION_DENIED, not the NOT_FOUND of
        gallery scoping) with one of :data:`AUTH_FAILURE_REASONS`; the server counts them (metrics.py).
    """

    def __init__(
        self,
        service_prefix: str,
        store: KeyStore | None = None,
        *,
        ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self._prefix = service_prefix
        self._on_failure = on_failure
        self.store = store
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._enabled: tuple[float, bool] | None = None
        self._cache: dict[bytes, tuple[float, ApiKeyRecord | None]] = {}

    # -- verification ------------------------------------------------------------------------

    def enabled(self) -> bool:
        """True when the store holds any key (re-read after ``ttl_s``)."""
        now = self._clock()
        with self._lock:
            if self._enabled is not None and self._enabled[0] > now:
                return self._enabled[1]
        assert self.store is not None
        value = self.store.has_api_keys()
        with self._lock:
            self._enabled = (now + self._ttl, value)
        return value

    def verify(self, key: str) -> ApiKeyRecord | None:
        """The active record of ``key`` or None, from the cache when checked within ``ttl_s``."""
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        assert self.store is not None
        record = verify_key(self.store, key)
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl, record)
        return record

    def _authorise(self, method: str, context: grpc.ServicerContext) -> ApiKeyRecord | None:
        """The caller's key (None: authentication is off); aborts UNAUTHENTICATED / PERMISSION_DENIED."""
        if not self.enabled():
            return None
        token = _bearer(context)
        record = self.verify(token) if token else None
        if record is None:
            LOG.info("refused %s: %s API key", method, "a wrong or revoked" if token else "no")
            self._failed("invalid_key" if token else "missing_key")
            context.abort_with_status(
                make_status(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "a valid API key is required (metadata 'authorization: Bearer KEY')" if not token else "the API key is not valid (unknown or revoked)",
                    REASON_UNAUTHENTICATED,
                )
            )
        required = METHOD_ROLES.get(method, Role.ADMIN)
        if record.role < required:
            self._failed("permission_denied")
            context.abort_with_status(
                make_status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs a key of role {required.label} or higher; key {record.name!r} is {record.role.label}",
                    REASON_PERMISSION_DENIED,
                    {"required_role": required.label, "key": record.name},
                )
            )
        if method in _KEY_METHODS and record.galleries:
            self._failed("permission_denied")
            context.abort_with_status(
                make_status(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs an admin key not limited to galleries; key {record.name!r} is limited to some",
                    REASON_PERMISSION_DENIED,
                    {"required_role": Role.ADMIN.label, "key": record.name},
                )
            )
        setattr(context, KEY_ATTRIBUTE, record)
        return record

    def _failed(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)

    # -- the interceptor ---------------------------------------------------------------------

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not full.startswith(self._prefix):
            return handler
        method = full[len(self._prefix) :]
        gallery_field = "name" if method in _NAME_FIELD else "gallery"
        request_streaming = handler.request_streaming

        def check(record: ApiKeyRecord | None, request: Any, context: grpc.ServicerContext) -> None:
            if record is None or not record.galleries:
                return
            fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
            if gallery_field in fields:
                try:
                    check_gallery(context, getattr(request, gallery_field))
                except GalleryNotFound as exc:
                    context.abort_with_status(rich_status(exc, full, request))

        def prepare(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                record = self._authorise(method, context)
            except FaceGalleryError as exc:  # the key store failed (BackendUnavailable: Milvus not answering): its status, not UNKNOWN
                context.abort_with_status(rich_status(exc, full, request))
            if not request_streaming:  # a stream's items name their galleries: the servicer checks each (check_gallery)
                check(record, request, context)
            return request

        def wrap(behavior: Callable, response_streaming: bool) -> Callable:
            if response_streaming:

                @functools.wraps(behavior)
                def streaming(request: Any, context: grpc.ServicerContext):
                    yield from behavior(prepare(request, context), context)

                return streaming

            @functools.wraps(behavior)
            def unary(request: Any, context: grpc.ServicerContext):
                return behavior(prepare(request, context), context)

            return unary

        return rewrap_handler(handler, wrap)
