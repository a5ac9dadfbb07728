"""The gRPC ``facegallery.v1.GalleryService``: protobuf <-> :class:`GalleryManager` calls, nothing else.

Every method converts the request, calls the manager, converts the result. Errors are raised by
the manager as ``FaceGalleryError`` subclasses and turned into statuses by the interceptor
(interceptors.py); the statuses each method can end with are listed in its docstring. Wire
defaults live here: an empty gallery name means ``default``, ``top_k`` 0 means 5, ``page_size``
0 means 100, ``max_pairs`` 0 means 100, an empty ``model_id`` beside an embedding means the
server's own (``manager.pipeline.model_id``); a ``DecisionPolicy`` without a rule means the
default policy on create, an UNSPECIFIED normalisation or aggregation the default of its rule,
``cohort_size`` 0 the default k. A ``Gallery`` message is its store record plus ``manager.decision_status``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from facegallery.server.contract.errors import EmbeddingShapeError, InvalidInput, NotFound
from facegallery.server.contract.face import Face, ImageKind
from facegallery.server.face.memory_budget import MemoryBudgetExhausted
from facegallery.server.gallery.decision import DEFAULT_POLICY, Aggregation, DecisionPolicy, DecisionStatus, Normalization, ScoreKind
from facegallery.server.gallery.keys import ApiKeyRecord, Role, create_key, revoke_key
from facegallery.server.gallery.manager import DEFAULT_GALLERY, DEFAULT_PAGE_SIZE, DEFAULT_TOP_K, STATUS_WAIT_S, FacePolicy, GalleryManager, PreparedEnrollment
from facegallery.server.gallery.results import DuplicatePair, EnrollResult, Identification, Match
from facegallery.server.gallery.store import ExportedTemplate, GalleryRecord, IdentityRecord, NewTemplate, TemplateBatch, TemplateRecord
from facegallery.server.service.auth import caller_key, check_gallery
from facegallery.server.service.status import status_message
from facegallery.server.service.streams import StreamLimiter, with_idle_timeout
from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

__all__ = ["GalleryServicer", "server_version"]

LOG = logging.getLogger(__name__)

_IMAGE_KINDS = {
    pb.IMAGE_KIND_UNSPECIFIED: ImageKind.PHOTO,
    pb.IMAGE_KIND_PHOTO: ImageKind.PHOTO,
    pb.IMAGE_KIND_FACE_CROP: ImageKind.FACE_CROP,
    pb.IMAGE_KIND_ALIGNED_CHIP: ImageKind.ALIGNED_CHIP,
}
_FACE_POLICIES = {
    pb.FACE_POLICY_UNSPECIFIED: FacePolicy.LARGEST,
    pb.FACE_POLICY_LARGEST: FacePolicy.LARGEST,
    pb.FACE_POLICY_REJECT_MULTIPLE: FacePolicy.REJECT_MULTIPLE,
}
_NORMALIZATIONS = {
    pb.SCORE_NORMALIZATION_NONE: Normalization.NONE,
    pb.SCORE_NORMALIZATION_SNORM: Normalization.SNORM,
}
_NORMALIZATION_MESSAGES = {v: k for k, v in _NORMALIZATIONS.items()}
_AGGREGATIONS = {
    pb.TEMPLATE_AGGREGATION_NEAREST: Aggregation.NEAREST,
    pb.TEMPLATE_AGGREGATION_MEAN: Aggregation.MEAN,
}
_AGGREGATION_MESSAGES = {v: k for k, v in _AGGREGATIONS.items()}
_SCORE_KINDS = {ScoreKind.DISTANCE: pb.SCORE_KIND_DISTANCE, ScoreKind.SNORM: pb.SCORE_KIND_SNORM}
#: FindDuplicates pairs when the request's max_pairs is 0.
DEFAULT_MAX_PAIRS = 100
_UPDATABLE = {"display_name", "metadata"}
#: BulkEnroll items of one stream whose images are analysed at once (``GalleryServicer(bulk_enroll_window=)``).
DEFAULT_BULK_ENROLL_WINDOW = 4
_E = TypeVar("_E", ImageKind, FacePolicy, Normalization, Aggregation)
_M = TypeVar("_M")  # a request message of a stream


@dataclasses.dataclass
class _BulkItem:
    """One BulkEnroll item between its arrival and its result.

    ``error``: why it fails before enrollment (reported in order); else ``arguments``, its
    ``GalleryManager.enroll`` keywords, and ``prepared``, their ``prepare_enrollment`` running on
    the stream's pool.
    """

    index: int
    request: pb.EnrollRequest
    error: Exception | None = None
    arguments: dict[str, Any] | None = None
    prepared: futures.Future[PreparedEnrollment] | None = None

    def prepared_now(self) -> bool:
        """Whether the item can be stored without waiting for its preparation."""
        return self.prepared is None or self.prepared.done()


_END = object()


def _read_bulk_messages(messages: Iterator[pb.BulkEnrollRequest], slots: threading.Semaphore, events: queue.Queue, stop: threading.Event) -> None:
    """A BulkEnroll stream's reader thread: each message, read once one of ``slots`` is free, goes
    on ``events`` as ``("message", m)``; then ``("end", None)``, or ``("error", exc)`` when the
    stream fails (idle timeout, cancelled call). Returns once ``stop`` is set."""
    try:
        while True:
            slots.acquire()
            if stop.is_set():
                return
            message = next(messages, _END)
            if message is _END:
                events.put(("end", None))
                return
            events.put(("message", message))
    except BaseException as exc:  # handed to the handler, which ends the stream with it
        events.put(("error", exc))


def server_version() -> str:
    """The installed facegallery distribution's version."""
    try:
        return importlib.metadata.version("facegallery")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class GalleryServicer(pb_grpc.GalleryServiceServicer):
    """``GalleryService`` over a :class:`GalleryManager` (see gallery_service.proto for semantics)."""

    def __init__(
        self,
        manager: GalleryManager,
        *,
        streams: StreamLimiter | None = None,
        stream_idle_s: float | None = None,
        bulk_enroll_window: int = DEFAULT_BULK_ENROLL_WINDOW,
    ) -> None:
        """``streams`` caps concurrent client streams (None: no cap); ``stream_idle_s`` ends a
        stream that sends nothing for that long (None: never); see streams.py.
        ``bulk_enroll_window`` (>= 1) is how many items of one BulkEnroll stream are analysed at
        once (:meth:`_bulk_enroll`)."""
        if bulk_enroll_window < 1:
            raise ValueError(f"bulk_enroll_window must be >= 1, got {bulk_enroll_window}")
        self.manager = manager
        self.streams = streams
        self.stream_idle_s = stream_idle_s
        self.bulk_enroll_window = bulk_enroll_window

    @contextlib.contextmanager
    def _stream(self, request_iterator: Iterable[_M], context: grpc.ServicerContext, what: str) -> Iterator[Iterator[_M]]:
        """A slot of the stream limiter and the stream's messages with the idle timeout.

        Raises ResourceExhausted (RESOURCE_EXHAUSTED) over a cap; the messages raise
        StreamIdleError (DEADLINE_EXCEEDED) after ``stream_idle_s`` without one.
        """
        slot = self.streams.slot(context.peer()) if self.streams is not None else contextlib.nullcontext()
        with slot:
            yield with_idle_timeout(request_iterator, self.stream_idle_s, what) if self.stream_idle_s else iter(request_iterator)

    # -- galleries ---------------------------------------------------------------------------

    def CreateGallery(self, request: pb.CreateGalleryRequest, context: grpc.ServicerContext) -> pb.Gallery:
        """OK; INVALID_ARGUMENT bad name, threshold or policy, or both threshold and policy;
        ALREADY_EXISTS name taken."""
        policy = _policy(request.policy, required=False) if request.HasField("policy") else None
        record = self.manager.create_gallery(request.name, threshold=_threshold(request), policy=policy)
        return self._gallery_message(record)

    def GetGallery(self, request: pb.GetGalleryRequest, context: grpc.ServicerContext) -> pb.Gallery:
        """OK; INVALID_ARGUMENT bad name; NOT_FOUND unknown gallery."""
        return self._gallery_message(self.manager.get_gallery(request.name))

    def ListGalleries(self, request: pb.ListGalleriesRequest, context: grpc.ServicerContext) -> pb.ListGalleriesResponse:
        """OK. Waits at most ``STATUS_WAIT_S`` in all for recalibrations under way (``Gallery.recalibrating``)."""
        galleries = []
        key = caller_key(context)
        deadline = time.monotonic() + STATUS_WAIT_S
        for record in self.manager.list_galleries():
            if key is not None and not key.allows(record.name):
                continue  # a key limited to galleries sees only those
            try:
                galleries.append(self._gallery_message(record, wait_s=max(0.0, deadline - time.monotonic())))
            except NotFound:  # deleted since it was listed
                continue
        return pb.ListGalleriesResponse(galleries=galleries)

    def DeleteGallery(self, request: pb.DeleteGalleryRequest, context: grpc.ServicerContext) -> pb.DeleteGalleryResponse:
        """OK; INVALID_ARGUMENT bad name; NOT_FOUND unknown gallery."""
        deletion = self.manager.delete_gallery(request.name)
        return pb.DeleteGalleryResponse(deleted_identities=deletion.deleted_identities, deleted_templates=deletion.deleted_templates)

    def UpdateGallery(self, request: pb.UpdateGalleryRequest, context: grpc.ServicerContext) -> pb.Gallery:
        """OK; INVALID_ARGUMENT bad name, no rule or a policy out of range; NOT_FOUND unknown gallery."""
        record = self.manager.update_gallery(request.name, policy=_policy(request.policy, required=True))
        return self._gallery_message(record)

    def FindDuplicates(self, request: pb.FindDuplicatesRequest, context: grpc.ServicerContext) -> pb.FindDuplicatesResponse:
        """OK (none -> empty ``pairs``); INVALID_ARGUMENT bad name or max_pairs; NOT_FOUND unknown gallery."""
        name = _gallery_name(request.gallery)
        pairs = self.manager.find_duplicates(name, max_pairs=request.max_pairs or DEFAULT_MAX_PAIRS)
        status = self.manager.decision_status(name)
        return pb.FindDuplicatesResponse(
            pairs=[_duplicate_pair(p) for p in pairs], score_kind=_score_kind(status.score_kind), threshold=status.threshold
        )

    def _gallery_message(self, record: GalleryRecord, *, wait_s: float = STATUS_WAIT_S) -> pb.Gallery:
        """The ``Gallery`` message of a record and its gallery's current decision status, waiting
        at most ``wait_s`` seconds for a recalibration under way (``Gallery.recalibrating``)."""
        return _gallery(record, self.manager.decision_status(record.name, wait_s=wait_s))

    # -- enrollment --------------------------------------------------------------------------

    def Enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        """OK once durably stored; INVALID_ARGUMENT bad id, undecodable image, no face, bad embedding;
        NOT_FOUND unknown gallery; FAILED_PRECONDITION several faces under REJECT_MULTIPLE, or a
        gallery of another model than the server's (image) or the embedding's ``model_id``;
        RESOURCE_EXHAUSTED image over the limits."""
        return self._enroll(request)

    def BulkEnroll(self, request_iterator: Iterable[pb.BulkEnrollRequest], context: grpc.ServicerContext) -> Iterator[pb.BulkEnrollResponse]:
        """One result per request, in order: the EnrollResponse, or the google.rpc.Status (with
        its ErrorInfo) Enroll would have failed with; the stream itself ends OK (or
        CANCELLED/DEADLINE_EXCEEDED from the client, RESOURCE_EXHAUSTED/DEADLINE_EXCEEDED from
        the stream limits)."""
        with self._stream(request_iterator, context, "BulkEnroll") as messages:
            yield from self._bulk_enroll(messages, context)

    def _bulk_enroll(self, messages: Iterator[pb.BulkEnrollRequest], context: grpc.ServicerContext) -> Iterator[pb.BulkEnrollResponse]:
        """The items' results in request order, the images of up to ``bulk_enroll_window`` items
        analysed at once.

        Each item is prepared (checks, and for an image decode, detect, landmarks, embed:
        manager.py ``GalleryManager.prepare_enrollment``) ahead on a pool of
        ``bulk_enroll_window`` threads of this stream, so the chips of several items share the
        batching embedder and both cores; the items are then stored one by one on the stream's
        thread in request order (``store_enrollment``), so template ids, identity creation,
        metadata merges and duplicate checks are those of sequential enrollment. A reader thread
        takes the messages, so results go out as soon as they are ready even while the client
        waits for them before sending more. Memory: at most
        ``bulk_enroll_window`` messages read and not answered (besides streams.py's read-ahead),
        and every analysis holds its estimate of the pipeline's memory budget;
        an item the budget refused while this stream's other items held it is analysed again once
        they are done, as it would have been alone.
        """
        window = self.bulk_enroll_window
        events: queue.Queue = queue.Queue()  # ("message", m) / ("end", None) / ("error", exc) / ("prepared", None)
        slots = threading.Semaphore(window)  # messages read but not answered
        stop = threading.Event()
        threading.Thread(target=_read_bulk_messages, args=(messages, slots, events, stop), name="bulk-enroll-reader", daemon=True).start()
        pending: collections.deque[_BulkItem] = collections.deque()
        pool = futures.ThreadPoolExecutor(max_workers=window, thread_name_prefix="bulk-enroll")
        ended, index = False, 0
        try:
            while True:
                while pending and (ended or pending[0].prepared_now()):
                    yield self._finish_bulk_item(pending.popleft(), pending)
                    slots.release()
                if not pending and ended:
                    break
                what, value = events.get()
                if what == "message":
                    item = self._start_bulk_item(pool, index, value.request, context)
                    pending.append(item)
                    index += 1
                    if item.prepared is not None:
                        item.prepared.add_done_callback(lambda _: events.put(("prepared", None)))
                elif what == "end":
                    ended = True
                elif what == "error":
                    raise value
        finally:  # also when the client goes away: running analyses finish, queued ones are dropped
            stop.set()
            slots.release()  # a reader waiting for a slot sees stop
            pool.shutdown(wait=True, cancel_futures=True)

    def _start_bulk_item(self, pool: futures.Executor, index: int, request: pb.EnrollRequest, context: grpc.ServicerContext) -> _BulkItem:
        """Check the caller's access to the item's gallery and start its preparation."""
        try:
            check_gallery(context, request.gallery)  # outside the caller key's galleries: as if missing
            arguments = _enroll_arguments(request)
        except Exception as exc:  # reported in order, as the item's result
            return _BulkItem(index, request, error=exc)
        return _BulkItem(index, request, arguments=arguments, prepared=pool.submit(self.manager.prepare_enrollment, **arguments, early_merge_check=False))

    def _finish_bulk_item(self, item: _BulkItem, pending: Iterable[_BulkItem]) -> pb.BulkEnrollResponse:
        """Store one prepared item; its result or its status."""
        try:
            if item.error is not None:
                raise item.error
            assert item.prepared is not None and item.arguments is not None
            if isinstance(item.prepared.exception(), MemoryBudgetExhausted):  # perhaps held by this stream's own items
                futures.wait([p.prepared for p in pending if p.prepared is not None])
                prepared = self.manager.prepare_enrollment(**item.arguments, early_merge_check=False)  # again, alone
            else:
                prepared = item.prepared.result()
            response = _enroll_response(self.manager.store_enrollment(prepared))
        except Exception as exc:  # one item must not end the stream; the interceptor's rule per item
            return pb.BulkEnrollResponse(index=item.index, error=status_message(exc, f"BulkEnroll item {item.index}", item.request))
        return pb.BulkEnrollResponse(index=item.index, response=response)

    def _enroll(self, request: pb.EnrollRequest) -> pb.EnrollResponse:
        """``manager.enroll`` of one request."""
        return _enroll_response(self.manager.enroll(**_enroll_arguments(request)))

    # -- search ------------------------------------------------------------------------------

    def Identify(self, request: pb.IdentifyRequest, context: grpc.ServicerContext) -> pb.IdentifyResponse:
        """OK (no face -> empty ``faces``); INVALID_ARGUMENT undecodable image, bad top_k/threshold;
        NOT_FOUND unknown gallery; FAILED_PRECONDITION gallery of another model; RESOURCE_EXHAUSTED."""
        image, kind = _image(request, "image")
        results = self.manager.identify(
            _gallery_name(request.gallery),
            image,
            kind=kind,
            top_k=request.top_k or DEFAULT_TOP_K,
            threshold=_threshold(request),
            max_faces=request.max_faces,
        )
        return pb.IdentifyResponse(faces=[_identification(r) for r in results], model_id=self.manager.pipeline.model_id)

    def IdentifyEmbedding(self, request: pb.IdentifyEmbeddingRequest, context: grpc.ServicerContext) -> pb.IdentifyEmbeddingResponse:
        """OK; INVALID_ARGUMENT bad embedding, top_k or threshold; NOT_FOUND; FAILED_PRECONDITION the
        embedding's ``model_id`` (empty: the server's) differs from the gallery's."""
        result = self.manager.identify_embedding(
            _gallery_name(request.gallery),
            _vector(request.embedding),
            top_k=request.top_k or DEFAULT_TOP_K,
            threshold=_threshold(request),
            model_id=_model_id(request),
        )
        return pb.IdentifyEmbeddingResponse(result=_identification(result))

    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext) -> pb.VerifyResponse:
        """OK; INVALID_ARGUMENT no face, undecodable image, bad id; NOT_FOUND unknown gallery or
        identity; FAILED_PRECONDITION model mismatch; RESOURCE_EXHAUSTED."""
        image, kind = _image(request, "image")
        result = self.manager.verify(
            _gallery_name(request.gallery),
            request.identity_id,
            image,
            kind=kind,
            threshold=_threshold(request),
        )
        return pb.VerifyResponse(
            identity_id=result.identity_id,
            distance=result.distance,
            threshold=result.threshold,
            is_match=result.is_match,
            face=_face(result.face),
            probability_same=result.probability_same,  # None leaves the optional field unset
            estimated_far=result.estimated_far,
        )

    def Compare(self, request: pb.CompareRequest, context: grpc.ServicerContext) -> pb.CompareResponse:
        """OK; INVALID_ARGUMENT no face in either image, undecodable image; RESOURCE_EXHAUSTED."""
        image_a, kind_a = _image(request, "image_a")
        image_b, kind_b = _image(request, "image_b")
        result = self.manager.compare(image_a, image_b, kind_a=kind_a, kind_b=kind_b, threshold=_threshold(request))
        return pb.CompareResponse(
            distance=result.distance,
            threshold=result.threshold,
            is_match=result.is_match,
            face_a=_face(result.face_a),
            face_b=_face(result.face_b),
            probability_same=result.probability_same,  # None leaves the optional field unset
            estimated_far=result.estimated_far,
        )

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        """OK (no face -> empty ``faces``); INVALID_ARGUMENT undecodable image; RESOURCE_EXHAUSTED."""
        image, kind = _image(request, "image")
        faces = self.manager.embed(image, kind=kind, max_faces=request.max_faces)
        return pb.EmbedResponse(
            faces=[pb.EmbeddedFace(face=_face(f), embedding=_embedding(f.embedding)) for f in faces],
            model_id=self.manager.pipeline.model_id,
        )

    # -- identities and templates ------------------------------------------------------------

    def GetIdentity(self, request: pb.GetIdentityRequest, context: grpc.ServicerContext) -> pb.Identity:
        """OK; INVALID_ARGUMENT bad id; NOT_FOUND unknown gallery or identity."""
        return _identity(self.manager.get_identity(_gallery_name(request.gallery), request.identity_id))

    def ListIdentities(self, request: pb.ListIdentitiesRequest, context: grpc.ServicerContext) -> pb.ListIdentitiesResponse:
        """OK; INVALID_ARGUMENT bad page_size or page_token; NOT_FOUND unknown gallery."""
        page = self.manager.list_identities(_gallery_name(request.gallery), page_size=request.page_size or DEFAULT_PAGE_SIZE, page_token=request.page_token)
        return pb.ListIdentitiesResponse(identities=[_identity(r) for r in page.identities], next_page_token=page.next_page_token)

    def UpdateIdentity(self, request: pb.UpdateIdentityRequest, context: grpc.ServicerContext) -> pb.Identity:
        """OK; INVALID_ARGUMENT bad id or unknown mask path; NOT_FOUND unknown gallery or identity."""
        paths = set(request.update_mask.paths) or _UPDATABLE
        unknown = paths - _UPDATABLE
        if unknown:
            raise InvalidInput(f"update_mask may name {sorted(_UPDATABLE)}, got {sorted(unknown)}")
        identity = request.identity
        record = self.manager.update_identity(
            _gallery_name(request.gallery),
            identity.identity_id,
            display_name=identity.display_name if "display_name" in paths else None,
            metadata=dict(identity.metadata) if "metadata" in paths else None,
        )
        return _identity(record)

    def DeleteIdentity(self, request: pb.DeleteIdentityRequest, context: grpc.ServicerContext) -> pb.DeleteIdentityResponse:
        """OK; INVALID_ARGUMENT bad id; NOT_FOUND unknown gallery or identity."""
        return pb.DeleteIdentityResponse(deleted_templates=self.manager.delete_identity(_gallery_name(request.gallery), request.identity_id))

    def DeleteTemplate(self, request: pb.DeleteTemplateRequest, context: grpc.ServicerContext) -> pb.DeleteTemplateResponse:
        """OK; NOT_FOUND unknown gallery or template."""
        return pb.DeleteTemplateResponse(identity_deleted=self.manager.delete_template(_gallery_name(request.gallery), request.template_id))

    # -- export / import ---------------------------------------------------------------------

    def ExportGallery(self, request: pb.ExportGalleryRequest, context: grpc.ServicerContext) -> Iterator[pb.ExportGalleryResponse]:
        """The gallery, then every template; NOT_FOUND unknown gallery."""
        record, templates = self.manager.export_gallery(_gallery_name(request.gallery))
        try:
            yield pb.ExportGalleryResponse(gallery=self._gallery_message(record))
            for template in templates:
                yield pb.ExportGalleryResponse(template=_exported(template))
        finally:
            templates.close()

    def ImportEmbeddings(self, request_iterator: Iterable[pb.ImportEmbeddingsRequest], context: grpc.ServicerContext) -> pb.ImportEmbeddingsResponse:
        """OK with counts, once everything is stored; INVALID_ARGUMENT empty stream, a first message
        that is not a header or a later one that is, missing model_id, bad id or embedding, a batch
        whose columns differ in length; FAILED_PRECONDITION model_id differs from the gallery's;
        NOT_FOUND a gallery outside the caller key's."""
        with self._stream(request_iterator, context, "ImportEmbeddings") as messages:
            first = next(messages, None)
            if first is None or first.WhichOneof("item") != "header":
                raise InvalidInput("the first message of an import stream must be its header (gallery and model_id)", field="header")
            check_gallery(context, first.header.gallery)  # outside the caller key's galleries: as if missing
            result = self.manager.import_embeddings(_gallery_name(first.header.gallery), first.header.model_id, _import_templates(messages))
        return pb.ImportEmbeddingsResponse(imported=result.imported, skipped=result.skipped)

    # -- server info -------------------------------------------------------------------------

    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext) -> pb.GetServerInfoResponse:
        """OK. ``model.model_id`` is the pipeline's (the manifest's plus the flip augmentation)."""
        m = self.manager.model
        model = pb.ModelInfo(
            name=m.name,
            version=m.version,
            model_id=self.manager.pipeline.model_id,
            embedding_dim=m.embedding_dim,
            metric=m.metric,
            threshold=m.threshold,
            chip_size=m.chip.size,
            has_head=m.head is not None,
            manifest_json=json.dumps(m.to_json(), sort_keys=True),
        )
        return pb.GetServerInfoResponse(version=server_version(), model=model)

    # -- API keys (auth.py: admin keys not limited to galleries) -------------------------------

    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.CreateKeyResponse:
        """OK with the key, shown only here; INVALID_ARGUMENT bad name or role; ALREADY_EXISTS name taken."""
        if request.role not in _ROLES:
            raise InvalidInput("role must be KEY_ROLE_READ, KEY_ROLE_WRITE or KEY_ROLE_ADMIN", field="role")
        record, key = create_key(self.manager.store, request.name, _ROLES[request.role], request.galleries, now=time.time())
        return pb.CreateKeyResponse(key=_api_key(record), secret=key)

    def ListKeys(self, request: pb.ListKeysRequest, context: grpc.ServicerContext) -> pb.ListKeysResponse:
        """OK: every key, revoked ones too, without secrets."""
        return pb.ListKeysResponse(keys=[_api_key(r) for r in self.manager.store.list_api_keys()])

    def RevokeKey(self, request: pb.RevokeKeyRequest, context: grpc.ServicerContext) -> pb.ApiKey:
        """OK (idempotent); NOT_FOUND unknown key."""
        return _api_key(revoke_key(self.manager.store, request.name, now=time.time()))


# ---------------------------------------------------------------------------------------------
# Conversions

_ROLES = {pb.KEY_ROLE_READ: Role.READ, pb.KEY_ROLE_WRITE: Role.WRITE, pb.KEY_ROLE_ADMIN: Role.ADMIN}


def _api_key(record: ApiKeyRecord) -> pb.ApiKey:
    message = pb.ApiKey(name=record.name, key_id=record.key_id, role=int(record.role), galleries=list(record.galleries), create_time=_timestamp(record.created))
    if record.revoked is not None:
        message.revoke_time.CopyFrom(_timestamp(record.revoked))
    return message


def _gallery_name(name: str) -> str:
    return name or DEFAULT_GALLERY


def _image_kind(kind: int) -> ImageKind:
    return _enum_value(_IMAGE_KINDS, kind, "image kind")


def _enroll_arguments(request: pb.EnrollRequest) -> dict[str, Any]:
    """``GalleryManager.enroll`` keywords of an Enroll request (its image bytes or embedding)."""
    source = request.WhichOneof("source")
    embedded = source == "embedding"
    return {
        "gallery": _gallery_name(request.gallery),
        "identity_id": request.identity_id,
        "image": request.image.data if source == "image" else None,
        "kind": _image_kind(request.image.kind) if source == "image" else ImageKind.PHOTO,
        "embedding": _vector(request.embedding) if embedded else None,
        "model_id": _model_id(request) if embedded else None,  # the proto ignores it for images
        "display_name": request.display_name,
        "metadata": dict(request.metadata),
        "face_policy": _face_policy(request.face_policy),
        "request_id": request.request_id,
    }


def _enroll_response(result: EnrollResult) -> pb.EnrollResponse:
    return pb.EnrollResponse(
        identity_id=result.identity_id,
        template_id=result.template_id,
        identity_created=result.identity_created,
        source_sha256=result.source_sha256,
        face=_optional_face(result.face),
        possible_duplicate=None if result.possible_duplicate is None else _match(result.possible_duplicate),
    )


def _face_policy(policy: int) -> FacePolicy:
    return _enum_value(_FACE_POLICIES, policy, "face policy")


def _policy(message: pb.DecisionPolicy, *, required: bool) -> DecisionPolicy:
    """The engine's policy of a request's ``DecisionPolicy`` (the gallery layer checks the ranges).

    No rule: ``DEFAULT_POLICY`` unless ``required`` (or normalisation / cohort size /
    aggregation are set, which mean nothing without a rule): InvalidInput. UNSPECIFIED
    normalisation: SNORM with a target FPIR, NONE with a threshold; UNSPECIFIED aggregation:
    MEAN with a target FPIR (as ``DEFAULT_POLICY``), NEAREST with a threshold; cohort_size 0: the
    default k (with a threshold, any other k is InvalidInput; a SNORM threshold is refused by
    ``check_policy``).
    """
    rule = message.WhichOneof("rule")
    if rule is None:
        if required:
            raise InvalidInput("the decision policy needs a rule: threshold or target_fpir")
        if (
            message.normalization != pb.SCORE_NORMALIZATION_UNSPECIFIED
            or message.cohort_size
            or message.aggregation != pb.TEMPLATE_AGGREGATION_UNSPECIFIED
        ):
            raise InvalidInput("normalization, cohort_size and aggregation need a rule: threshold or target_fpir")
        return DEFAULT_POLICY
    fields: dict[str, object] = {}
    if message.normalization != pb.SCORE_NORMALIZATION_UNSPECIFIED:
        fields["normalization"] = _enum_value(_NORMALIZATIONS, message.normalization, "score normalization")
    if message.cohort_size:
        fields["cohort_size"] = message.cohort_size
    if message.aggregation != pb.TEMPLATE_AGGREGATION_UNSPECIFIED:
        fields["aggregation"] = _enum_value(_AGGREGATIONS, message.aggregation, "template aggregation")
    if rule == "threshold":
        if message.cohort_size:
            raise InvalidInput("cohort_size goes with target_fpir; a fixed threshold has no cohort")
        return DecisionPolicy(threshold=message.threshold, **fields)  # type: ignore[arg-type]
    fields.setdefault("aggregation", Aggregation.MEAN)
    return DecisionPolicy.targeting(message.target_fpir, **fields)  # type: ignore[arg-type]


def _enum_value(table: dict[int, _E], value: int, what: str) -> _E:
    """The engine's member for proto enum ``value``; InvalidInput for a number the table lacks."""
    try:
        return table[value]
    except KeyError:
        raise InvalidInput(f"unknown {what} {value}") from None


def _model_id(request: pb.EnrollRequest | pb.IdentifyEmbeddingRequest) -> str | None:
    """The model id an embedding came from; None when unset (the server's own applies)."""
    return request.model_id or None


def _threshold(request) -> float | None:
    """The request's optional ``threshold`` field; None when unset (the default applies)."""
    return request.threshold if request.HasField("threshold") else None


def _image(request, field: str) -> tuple[bytes, ImageKind]:
    if not request.HasField(field):
        raise InvalidInput(f"{field} is required")
    image = getattr(request, field)
    return image.data, _image_kind(image.kind)


def _vector(embedding: pb.Embedding) -> np.ndarray:
    return np.asarray(embedding.values, dtype=np.float32)


def _embedding(vector: np.ndarray) -> pb.Embedding:
    return pb.Embedding(values=vector.tolist())


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


def _face(face: Face) -> pb.Face:
    left, top, right, bottom = (float(v) for v in face.box)
    return pb.Face(
        box=pb.BoundingBox(left=left, top=top, right=right, bottom=bottom),
        landmarks=[pb.Point(x=float(x), y=float(y)) for x, y in np.asarray(face.landmarks).reshape(-1, 2)],
        score=float(face.score),
    )


def _optional_face(face: Face | None) -> pb.Face | None:
    """None for no face: a protobuf constructor leaves a field passed as None unset."""
    return None if face is None else _face(face)


def _score_kind(kind: ScoreKind) -> int:
    return _SCORE_KINDS[kind]


def _match(match: Match) -> pb.Match:
    return pb.Match(
        identity_id=match.identity_id, display_name=match.display_name, distance=match.distance, template_id=match.template_id, score=match.score
    )


def _finite(value: float) -> float | None:
    """``value``, or None (the optional field left unset) for the engine's +inf (no candidate)
    and NaN (nothing to estimate from)."""
    return value if math.isfinite(value) else None


def _identification(result: Identification) -> pb.FaceIdentification:
    return pb.FaceIdentification(
        face=_optional_face(result.face),
        matches=[_match(m) for m in result.matches],
        identity_id=result.identity_id,
        distance=_finite(result.distance),
        threshold=result.threshold,
        score=_finite(result.score),
        score_kind=_score_kind(result.score_kind),
        estimated_fpir=_finite(result.estimated_fpir),
    )


def _policy_message(policy: DecisionPolicy) -> pb.DecisionPolicy:
    """A stored policy as the wire reports it: the rule, its normalisation, k with a target FPIR,
    and its aggregation."""
    aggregation = _AGGREGATION_MESSAGES[policy.aggregation]
    if policy.threshold is not None:
        return pb.DecisionPolicy(threshold=policy.threshold, normalization=pb.SCORE_NORMALIZATION_NONE, aggregation=aggregation)
    return pb.DecisionPolicy(
        target_fpir=policy.target_fpir,
        normalization=_NORMALIZATION_MESSAGES[policy.normalization],
        cohort_size=policy.cohort_size,
        aggregation=aggregation,
    )


def _gallery(record: GalleryRecord, status: DecisionStatus) -> pb.Gallery:
    return pb.Gallery(
        name=record.name,
        model_id=record.model_id,
        threshold=status.threshold,
        metric=record.metric,
        embedding_dim=record.embedding_dim,
        identity_count=record.identity_count,
        template_count=record.template_count,
        create_time=_timestamp(record.created),
        policy=_policy_message(status.policy),
        score_kind=_score_kind(status.score_kind),
        estimated_fpir=_finite(status.estimated_fpir),
        threshold_basis=status.basis,
        recalibrating=status.recalibrating,
    )


def _duplicate_pair(pair: DuplicatePair) -> pb.DuplicatePair:
    return pb.DuplicatePair(
        identity_a=pair.identity_a,
        display_name_a=pair.display_name_a,
        identity_b=pair.identity_b,
        display_name_b=pair.display_name_b,
        score=pair.score,
        distance=pair.distance,
        estimated_fpir=_finite(pair.estimated_fpir),
    )


def _template(template: TemplateRecord) -> pb.Template:
    return pb.Template(
        template_id=template.template_id,
        identity_id=template.identity_id,
        source_sha256=template.source_sha256,
        face=_optional_face(template.face),
        create_time=_timestamp(template.created),
    )


def _identity(record: IdentityRecord) -> pb.Identity:
    return pb.Identity(
        identity_id=record.identity_id,
        display_name=record.display_name,
        metadata=record.metadata,
        template_count=record.template_count,
        templates=[_template(t) for t in record.templates],
        create_time=_timestamp(record.created),
        update_time=_timestamp(record.updated),
    )


def _exported(template: ExportedTemplate) -> pb.ExportedTemplate:
    return pb.ExportedTemplate(
        identity_id=template.identity_id,
        display_name=template.display_name,
        metadata=template.metadata,
        template_id=template.template_id,
        embedding=_embedding(template.embedding),
        source_sha256=template.source_sha256,
        create_time=_timestamp(template.created),
    )


def _import_templates(messages: Iterator[pb.ImportEmbeddingsRequest]) -> Iterator[NewTemplate | TemplateBatch]:
    """The templates and batches of an import stream after its header; InvalidInput for another
    header or an empty message."""
    for index, message in enumerate(messages, start=1):
        item = message.WhichOneof("item")
        if item == "template":
            yield _new_template(message.template)
        elif item == "batch":
            yield _template_batch(message.batch)
        else:
            raise InvalidInput(f"message {index} of the import stream is neither a template nor a batch (only the first message is the header)", field="template")


def _template_batch(batch: pb.TemplateBatch) -> TemplateBatch:
    """The batch's columns; its embeddings a read-only ``(n * D,) float32`` view of the message's bytes."""
    if len(batch.embeddings) % 4:
        raise EmbeddingShapeError(f"batch embeddings must be little-endian float32 values (4 bytes each), got {len(batch.embeddings)} bytes", field="batch.embeddings")
    return TemplateBatch(list(batch.identity_ids), np.frombuffer(batch.embeddings, dtype="<f4"), list(batch.display_names))


def _new_template(template: pb.ExportedTemplate) -> NewTemplate:
    created = template.create_time.ToNanoseconds() / 1e9 if template.HasField("create_time") else None
    return NewTemplate(
        template.identity_id,
        _vector(template.embedding),
        display_name=template.display_name,
        metadata=dict(template.metadata),
        source_sha256=template.source_sha256,
        created=created,
    )
