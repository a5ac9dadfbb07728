"""The Milvus collections of the ``milvus`` backend, and calls to them that fail as engine errors.

One set of collections per deployment (``prefix``, default ``facegallery``: manager.py's
``DEFAULT_MILVUS_PREFIX``), shared by every
gallery and every facegallery server pointed at the Milvus (docs/milvus.md gives the scheme):

==========================  ============================================================================
``<p>_galleries``           one row per gallery: key (random at creation), name, settings (JSON)
``<p>_heads``               one row per (gallery, writer): the newest change ``seq`` the writer committed
``<p>_identities``          one row per identity; primary key = identity key = hash(gallery key, identity id)
``<p>_templates_d<D>``      one row per template of D-dimensional embeddings (FLOAT_VECTOR(D), L2),
                            with the writer and ``seq`` of the change that added it
``<p>_removals``            one row per removal change: writer, ``seq``, the removed template ids
``<p>_requests``            remembered Enroll request ids (idempotency)
``<p>_calibrations``        each gallery's newest calibration (JSON)
``<p>_api_keys``            API keys (salted hashes, keys.py)
==========================  ============================================================================

Every collection has the gallery key (where it has one) as its partition key, so a gallery's rows
sit together and a gallery filter prunes the others (Milvus's multi-tenancy by partition key).
Milvus needs a vector field in every collection; those without embeddings carry a constant
2-dimensional one (``v``). Every read is at consistency level Strong: it sees every write
acknowledged before it was sent, from any server (read-your-writes across servers).

Errors: a Milvus that cannot be reached, or that times out, raises
:class:`~facegallery.server.contract.errors.BackendUnavailable` (UNAVAILABLE, retryable).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException

from facegallery.server.contract.errors import BackendUnavailable

__all__ = ["MilvusCollections", "key63", "CALL_TIMEOUT_S", "GRPC_OPTIONS", "QUERY_LIMIT", "SEARCH_LIMIT"]

LOG = logging.getLogger(__name__)
T = TypeVar("T")
# pymilvus logs every failed call (with a traceback) and every reconnection attempt; each failure
# reaches the caller as an exception here, raised with Milvus's message (BackendUnavailable), and
# the server logs and reports it once: the library's own log would repeat it per retry.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

#: Seconds one Milvus call may take before it fails as BackendUnavailable.
CALL_TIMEOUT_S = 15.0
#: gRPC channel options of every Milvus connection. pymilvus sends HTTP/2 keepalive pings every 10 s
#: even on an idle connection; a gRPC server left at the library defaults (Milvus Lite is one) takes
#: pings without calls as abuse and, after two, closes the connection (GOAWAY ``too_many_pings``),
#: failing the next call or connection as UNAVAILABLE. Pinging only while calls are open keeps
#: keepalive's dead-peer detection for calls; idle connections are checked by the server's health
#: monitor (calls of its own). Defaults: gRPC's doc/keepalive.md.
GRPC_OPTIONS = {"grpc.keepalive_permit_without_calls": False}
#: Rows per query page (Milvus caps offset + limit of one query at 16384).
QUERY_LIMIT = 16384
#: Most neighbours one Milvus search returns per query (Milvus's ``topk`` cap, 16384).
SEARCH_LIMIT = 16384
#: Milvus status codes that mean "not serving now": 503 (service unavailable) and 2200 (not ready).
#: pymilvus's own failures to connect or to answer in time carry a gRPC status code, or its generic
#: codes 1 / 2 with a message saying so (:func:`_is_unavailable`); a bad request is never retryable.
_UNAVAILABLE_CODES = {503, 2200}
_UNAVAILABLE_WORDS = ("connect", "deadline", "unavailable", "timeout", "timed out", "not ready")
#: Milvus error code of a call on a collection that is not loaded (after a Milvus restart).
_NOT_LOADED = 101
_DUMMY = [0.0, 0.0]
_VARCHAR = 65535


def key63(*parts: object) -> int:
    """A positive 63-bit key of ``parts`` (blake2b of their text): identity keys and row keys that
    every server computes alike, so concurrent writes of one identity upsert one row."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") & (2**63 - 1)) or 1


class MilvusCollections:
    """A Milvus connection with this backend's collections (module docstring), created when missing.

    Parameters
    ----------
    uri : str
        ``http://host:19530`` (Milvus standalone, a cluster's proxy, or ``milvus-lite server``).
    token : str
        ``user:password`` or an API key; ``""`` for none.
    prefix : str
        Collection-name prefix (several deployments can share one Milvus; manager.py's
        ``DEFAULT_MILVUS_PREFIX`` for servers).
    timeout_s : float
        Seconds one call may take (:data:`CALL_TIMEOUT_S`) before it fails as BackendUnavailable.
    """

    def __init__(self, uri: str, *, token: str = "", prefix: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.uri = uri
        self.prefix = prefix
        self.timeout_s = timeout_s
        try:
            self.client = MilvusClient(uri=uri, token=token, timeout=timeout_s, grpc_options=GRPC_OPTIONS)
        except MilvusException as exc:
            raise BackendUnavailable(f"Milvus at {uri} cannot be reached: {exc.message}") from exc
        self._known: set[str] = set()
        for name, fields in _SCHEMAS.items():
            self._ensure(f"{prefix}_{name}", fields)

    # -- schema --------------------------------------------------------------------------------

    def templates(self, dim: int) -> str:
        """The collection of D-dimensional templates (created on first use)."""
        name = f"{self.prefix}_templates_d{int(dim)}"
        if name not in self._known:
            self._ensure(name, _template_fields(int(dim)), vector="embedding")
        return name

    def name(self, collection: str) -> str:
        """The full name of one of the fixed collections (``galleries``, ``heads``, ...)."""
        return f"{self.prefix}_{collection}"

    def _ensure(self, name: str, fields: list[tuple], *, vector: str = "v") -> None:
        def create() -> None:
            if not self.client.has_collection(name):
                schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
                for field_name, dtype, kwargs in fields:
                    schema.add_field(field_name, dtype, **kwargs)
                index = self.client.prepare_index_params()
                index.add_index(vector, index_type="FLAT", metric_type="L2")
                self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")
                LOG.info("created Milvus collection %s", name)
            self.client.load_collection(name)

        self.call(create)
        self._known.add(name)

    # -- calls ---------------------------------------------------------------------------------

    def call(self, fn: Callable[[], T], *, reload: bool = True) -> T:
        """``fn()``, with a Milvus that cannot be reached raised as BackendUnavailable. A
        restarted Milvus holds its collections released: they are loaded again and ``fn``
        retried once."""
        try:
            return fn()
        except MilvusException as exc:
            if reload and (exc.code == _NOT_LOADED or "call load()" in str(exc.message)):
                LOG.info("Milvus at %s has released the collections (restarted?): loading them again", self.uri)
                for name in sorted(self._known):
                    self.call(lambda name=name: self.client.load_collection(name), reload=False)  # type: ignore[misc]
                return self.call(fn, reload=False)
            if _is_unavailable(exc):
                raise BackendUnavailable(f"Milvus at {self.uri} is unavailable: {exc.message}") from exc
            raise

    def query(self, collection: str, expr: str, fields: list[str], *, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows matching ``expr`` (with no ``limit``, every one: one query, or pages of the
        query iterator past :data:`QUERY_LIMIT`), Strong consistency."""
        first = min(limit, QUERY_LIMIT) if limit is not None else QUERY_LIMIT
        rows = self.call(lambda: list(self.client.query(collection, filter=expr, output_fields=fields, limit=first, consistency_level="Strong")))
        if len(rows) < QUERY_LIMIT or (limit is not None and limit <= QUERY_LIMIT):
            return rows
        rows = list(self.iterate(collection, expr, fields, batch=QUERY_LIMIT))
        return rows if limit is None else rows[:limit]

    def iterate(self, collection: str, expr: str, fields: list[str], *, batch: int = 4096) -> Iterator[dict[str, Any]]:
        """Every row matching ``expr``, fetched ``batch`` rows at a time (Milvus's query iterator)."""
        iterator = self.call(lambda: self.client.query_iterator(collection, filter=expr, output_fields=fields, batch_size=batch, consistency_level="Strong"))
        try:
            while rows := self.call(iterator.next):
                yield from rows
        finally:
            iterator.close()

    def search(self, collection: str, x: np.ndarray, expr: str, limit: int) -> list[list[tuple[int, float]]]:
        """The ``limit`` (<= :data:`SEARCH_LIMIT`) nearest rows of ``expr`` to each query of
        ``x`` ``(n, D) float32`` by the ``embedding`` field, Strong consistency: per query, a list
        of ``(pk, squared L2 distance)`` ascending (Milvus's L2 metric is the squared distance)."""
        hits = self.call(
            lambda: self.client.search(
                collection, data=x.tolist(), anns_field="embedding", filter=expr, limit=limit, output_fields=["pk"], search_params={"metric_type": "L2"}, consistency_level="Strong"
            )
        )
        return [[(int(hit["pk"]), float(hit["distance"])) for hit in row] for row in hits]

    def get(self, collection: str, keys: list[int], fields: list[str]) -> list[dict[str, Any]]:
        """Rows by primary key (missing ones left out)."""
        if not keys:
            return []
        out: list[dict[str, Any]] = []
        for start in range(0, len(keys), 1000):
            chunk = [int(k) for k in keys[start : start + 1000]]
            out.extend(self.query(collection, f"pk in {chunk}", fields, limit=len(chunk)))
        return out

    def count(self, collection: str, expr: str) -> int:
        """How many rows match ``expr``."""
        rows = self.call(lambda: self.client.query(collection, filter=expr, output_fields=["count(*)"], consistency_level="Strong"))
        return int(rows[0]["count(*)"])

    def upsert(self, collection: str, rows: list[dict[str, Any]]) -> None:
        """Insert or replace rows by primary key; durable in Milvus when it returns."""
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            self.call(lambda chunk=chunk: self.client.upsert(collection, [_with_dummy(r) for r in chunk]))  # type: ignore[misc]

    def insert(self, collection: str, rows: list[dict[str, Any]]) -> None:
        """Insert new rows (their primary keys are new)."""
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            self.call(lambda chunk=chunk: self.client.insert(collection, [_with_dummy(r) for r in chunk]))  # type: ignore[misc]

    def delete(self, collection: str, expr: str) -> None:
        """Delete the rows matching ``expr``."""
        self.call(lambda: self.client.delete(collection, filter=expr))

    def ping(self) -> None:
        """One cheap round trip; raises BackendUnavailable when Milvus does not answer."""
        self.call(lambda: self.client.get_server_version(timeout=min(self.timeout_s, 3.0)))

    def close(self) -> None:
        """Close the connection (later calls fail)."""
        self.client.close()


def _is_unavailable(exc: MilvusException) -> bool:
    """Whether ``exc`` says Milvus cannot be reached or did not answer in time (BackendUnavailable)."""
    code = exc.code
    if getattr(code, "name", None) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):  # a grpc.StatusCode, from pymilvus's retries
        return True
    return code in _UNAVAILABLE_CODES or any(word in str(exc.message).lower() for word in _UNAVAILABLE_WORDS)


def _with_dummy(row: dict[str, Any]) -> dict[str, Any]:
    return row if "embedding" in row or "v" in row else {**row, "v": _DUMMY}


def _field(name: str, dtype: DataType, **kwargs: Any) -> tuple:
    return (name, dtype, kwargs)


_PK = _field("pk", DataType.INT64, is_primary=True)
_GALLERY = _field("gallery_key", DataType.INT64, is_partition_key=True)
_V = _field("v", DataType.FLOAT_VECTOR, dim=2)
_DOC = _field("doc", DataType.JSON)

_SCHEMAS: dict[str, list[tuple]] = {
    "galleries": [_PK, _field("name", DataType.VARCHAR, max_length=256), _DOC, _V],
    "heads": [_PK, _GALLERY, _field("writer", DataType.INT64), _field("seq", DataType.INT64), _field("written", DataType.INT64), _V],
    "identities": [
        _PK,
        _GALLERY,
        _field("identity_id", DataType.VARCHAR, max_length=1024),
        _field("display_name", DataType.VARCHAR, max_length=1024),
        _field("metadata", DataType.VARCHAR, max_length=_VARCHAR),
        _field("created", DataType.DOUBLE),
        _field("updated", DataType.DOUBLE),
        _V,
    ],
    "removals": [_PK, _GALLERY, _field("writer", DataType.INT64), _field("seq", DataType.INT64), _field("template_ids", DataType.ARRAY, element_type=DataType.INT64, max_capacity=4096), _V],
    "requests": [_PK, _GALLERY, _DOC, _V],
    "calibrations": [_PK, _GALLERY, _DOC, _V],
    "api_keys": [_PK, _field("key_id", DataType.VARCHAR, max_length=256), _DOC, _V],
}


def _template_fields(dim: int) -> list[tuple]:
    return [
        _PK,
        _GALLERY,
        _field("identity_key", DataType.INT64),
        _field("identity_id", DataType.VARCHAR, max_length=1024),
        _field("writer", DataType.INT64),
        _field("seq", DataType.INT64),
        _field("embedding", DataType.FLOAT_VECTOR, dim=dim),
        _field("source_sha256", DataType.VARCHAR, max_length=64),
        _field("face", DataType.VARCHAR, max_length=_VARCHAR),
        _field("created", DataType.DOUBLE),
    ]
