"""Engine exceptions to gRPC statuses: the one mapping, used by unary and streaming calls alike.

The engine's exceptions (:mod:`facegallery.server.contract.errors`) carry the *name* of their
status (``"NOT_FOUND"``); this module, inside the gRPC layer, turns it into ``grpc.StatusCode``.
An exception that is not a deliberate engine error becomes INTERNAL with a generic message, so
no internals reach a client; the caller logs its traceback.
"""

from __future__ import annotations

import logging
import sqlite3

import grpc

from facegallery.server.contract.errors import FaceGalleryError, StoreCorruptError

__all__ = ["INTERNAL_MESSAGE", "status_of", "store_damage"]

LOG = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal server error (the server log has the details)"


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for ``exc`` raised while serving ``method``.

    A :class:`FaceGalleryError` maps to ``grpc.StatusCode[exc.code]`` with the exception's message
    (logged at DEBUG); a damaged store (:func:`store_damage`) to DATA_LOSS; anything else to
    INTERNAL and :data:`INTERNAL_MESSAGE`, its traceback logged at ERROR.
    """
    if isinstance(exc, FaceGalleryError):
        LOG.debug("%s -> %s: %s", method, exc.code, exc)
        return grpc.StatusCode[exc.code], str(exc)
    if store_damage(exc) is not None:
        LOG.error("the store failed in %s", method, exc_info=exc)
        return grpc.StatusCode.DATA_LOSS, "the server's store is damaged; the server is NOT_SERVING (its log names the file and the repair options)"
    LOG.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def store_damage(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s cause/context chain that says the store is damaged, or None.

    Damage is a :class:`sqlite3.DatabaseError` other than :class:`sqlite3.OperationalError`
    ("database disk image is malformed", "file is not a database"; not "database is locked" or a
    disk I/O error), or a :class:`StoreCorruptError`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StoreCorruptError) or (isinstance(current, sqlite3.DatabaseError) and not isinstance(current, sqlite3.OperationalError)):
            return current
        current = current.__cause__ or current.__context__
    return None
