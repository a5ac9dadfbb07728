"""An in-memory GalleryService for client and CLI tests: a real gRPC server, a fake engine.

The fake follows the proto's contract (statuses, paging, streams, export/import) with a trivial
"pipeline": an image is decoded with Pillow; a single-colour image has no face, any other image
has one face covering it, whose embedding is derived from the decoded pixels (so the same pixels
always give the same embedding, at distance 0, and different pictures are ~1 apart). Requests are
recorded so tests can check what the client sent.

Decisions follow the proto's open-set contract with one made-up model: strangers' distances are
centred on 1.0 with spread 0.1, so the fake's S-norm score of a distance d is ``(d - 1) / 0.1``
(no cohort, and no minimum gallery size) and its FPIR and FAR at a score z (a distance: z =
``(d - 1) / 0.1`` first) are ``logistic(z)`` (:func:`fpir_of`). A fixed policy decides on
distances; a target-FPIR policy on S-norm scores (normalization SNORM) or distances (NONE), at
the score where that curve equals the target (:func:`threshold_for`). Searches measure each
identity's nearest template, or under TEMPLATE_AGGREGATION_MEAN the mean of its templates
(reported under its first template id). ``galleries[name]`` holds
``{"policy": pb.DecisionPolicy, "identities": {...}}``; "default" has a fixed 0.6 (nearest
template), new galleries without a policy get target FPIR 0.01 with S-norm k=100 and mean
templates, as on the real server.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

DIM = 8
THRESHOLD = 0.6
MODEL_ID = "fake-model-sha256"
#: The fake's stranger distances: mean and spread (its S-norm score is (d - MEAN) / SPREAD).
STRANGER_MEAN, STRANGER_SPREAD = 1.0, 0.1
DEFAULT_POLICY = pb.DecisionPolicy(
    target_fpir=0.01, normalization=pb.SCORE_NORMALIZATION_SNORM, cohort_size=100, aggregation=pb.TEMPLATE_AGGREGATION_MEAN
)
BASIS_FIXED = "fixed threshold"
BASIS_CURVE = "the fake's logistic false-match curve"


def fixed(threshold: float, aggregation: int = pb.TEMPLATE_AGGREGATION_NEAREST) -> pb.DecisionPolicy:
    """The fake's stored form of a fixed policy."""
    return pb.DecisionPolicy(threshold=threshold, normalization=pb.SCORE_NORMALIZATION_NONE, aggregation=aggregation)


def score_kind_of(policy: pb.DecisionPolicy) -> int:
    """``pb.ScoreKind`` a gallery of ``policy`` decides on."""
    snormed = policy.WhichOneof("rule") == "target_fpir" and policy.normalization == pb.SCORE_NORMALIZATION_SNORM
    return pb.SCORE_KIND_SNORM if snormed else pb.SCORE_KIND_DISTANCE


def score_of(distance: float, kind: int) -> float:
    """The fake's score of an L2 ``distance`` on the ``kind`` scale."""
    return (distance - STRANGER_MEAN) / STRANGER_SPREAD if kind == pb.SCORE_KIND_SNORM else distance


def fpir_of(score: float, kind: int) -> float:
    """The fake's FPIR (and FAR) at ``score``: logistic of the S-norm score; 1 for +inf."""
    z = score if kind == pb.SCORE_KIND_SNORM else score_of(score, pb.SCORE_KIND_SNORM)
    return 1.0 if z == math.inf else 1.0 / (1.0 + math.exp(-z))


def threshold_for(target_fpir: float, kind: int) -> float:
    """The score on the ``kind`` scale where :func:`fpir_of` equals ``target_fpir``."""
    z = math.log(target_fpir / (1.0 - target_fpir))
    return z if kind == pb.SCORE_KIND_SNORM else STRANGER_MEAN + STRANGER_SPREAD * z


def pixels_of(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB of encoded bytes, as the fake decodes them."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def embedding_of(pixels: np.ndarray) -> np.ndarray:
    """(DIM,) float32 unit vector derived from the pixels' bytes."""
    seed = int.from_bytes(hashlib.sha256(pixels.tobytes()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeGalleryServicer(pb_grpc.GalleryServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[tuple[str, object]] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.unavailable: collections.Counter[str] = collections.Counter()  # rpc -> UNAVAILABLE replies left
        self.delay_s = 0.0  # GetServerInfo sleeps this long before replying
        self.has_far_curve = True  # False: Verify/Compare leave estimated_far unset
        self.can_estimate_fpir = True  # False: every estimated_fpir is NaN, as for a small gallery without a curve
        self.galleries: dict[str, dict] = {}
        self.next_template_id = 1
        self._new_gallery("default", fixed(THRESHOLD))

    # helpers ----------------------------------------------------------------------------------

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call; fail it with UNAVAILABLE while ``self.unavailable[method]`` lasts."""
        self.calls[method] += 1
        if self.unavailable[method] > 0:
            self.unavailable[method] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting")

    def _new_gallery(self, name: str, policy: pb.DecisionPolicy) -> dict:
        self.galleries[name] = {"policy": policy, "identities": {}}
        return self.galleries[name]

    @staticmethod
    def _policy(message: pb.DecisionPolicy, context: grpc.ServicerContext, *, required: bool) -> pb.DecisionPolicy:
        """The stored form of a request's policy (defaults filled in), or INVALID_ARGUMENT."""
        rule = message.WhichOneof("rule")
        if rule is None:
            if required or message.normalization or message.cohort_size or message.aggregation:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a decision policy needs a threshold or a target FPIR")
            return DEFAULT_POLICY
        if message.aggregation not in (pb.TEMPLATE_AGGREGATION_UNSPECIFIED, pb.TEMPLATE_AGGREGATION_NEAREST, pb.TEMPLATE_AGGREGATION_MEAN):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown template aggregation {message.aggregation}")
        if rule == "threshold":
            if not message.threshold > 0 or message.normalization == pb.SCORE_NORMALIZATION_SNORM:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a fixed threshold is a positive L2 distance, without normalisation")
            return fixed(message.threshold, message.aggregation or pb.TEMPLATE_AGGREGATION_NEAREST)
        cohort = message.cohort_size or 100
        if not 0 < message.target_fpir < 1 or not 2 <= cohort <= 1000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target FPIR must be in (0, 1) and cohort size 2..1000")
        normalization = message.normalization or pb.SCORE_NORMALIZATION_SNORM
        aggregation = message.aggregation or pb.TEMPLATE_AGGREGATION_MEAN
        return pb.DecisionPolicy(target_fpir=message.target_fpir, normalization=normalization, cohort_size=cohort, aggregation=aggregation)

    def _fpir(self, score: float, kind: int) -> float:
        return fpir_of(score, kind) if self.can_estimate_fpir else math.nan

    def _decision(self, gallery: dict) -> tuple[int, float, float, str]:
        """``(score_kind, threshold, estimated_fpir, basis)`` of a gallery now."""
        policy = gallery["policy"]
        kind = score_kind_of(policy)
        if policy.WhichOneof("rule") == "threshold":
            threshold, basis = policy.threshold, BASIS_FIXED
        else:
            threshold, basis = threshold_for(policy.target_fpir, kind), BASIS_CURVE
        return kind, threshold, self._fpir(threshold, kind) if gallery["identities"] else 0.0, basis

    def _gallery(self, name: str, context: grpc.ServicerContext) -> dict:
        gallery = self.galleries.get(name or "default")
        if gallery is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"gallery {name!r} not found")
        return gallery

    def _gallery_message(self, name: str) -> pb.Gallery:
        gallery = self.galleries[name]
        kind, threshold, estimated_fpir, basis = self._decision(gallery)
        message = pb.Gallery(
            name=name,
            model_id=MODEL_ID,
            threshold=threshold,
            metric="euclidean",
            embedding_dim=DIM,
            identity_count=len(gallery["identities"]),
            template_count=sum(len(i["templates"]) for i in gallery["identities"].values()),
            policy=gallery["policy"],
            score_kind=kind,
            estimated_fpir=None if math.isnan(estimated_fpir) else estimated_fpir,
            threshold_basis=basis,
        )
        message.create_time.FromSeconds(1_700_000_000)
        return message

    @staticmethod
    def _faces(data: bytes, context: grpc.ServicerContext) -> list[tuple[pb.Face, np.ndarray]]:
        try:
            pixels = pixels_of(data)
        except Exception:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the image cannot be decoded")
        if np.ptp(pixels) == 0:
            return []
        h, w = pixels.shape[:2]
        face = pb.Face(box=pb.BoundingBox(left=0, top=0, right=w - 1, bottom=h - 1), score=1.0)
        face.landmarks.extend(pb.Point(x=w * (i + 1) / 6, y=h / 2) for i in range(5))
        return [(face, embedding_of(pixels))]

    def _search(self, gallery: dict, vector: np.ndarray, top_k: int, threshold: float | None = None) -> pb.FaceIdentification:
        """Rank ``gallery``'s identities for ``vector`` and decide, at ``threshold`` (on the
        gallery's score scale) or, when None, at the gallery's own."""
        kind, own_threshold, _, _ = self._decision(gallery)
        threshold = own_threshold if threshold is None else threshold
        mean = gallery["policy"].aggregation == pb.TEMPLATE_AGGREGATION_MEAN
        best: list[pb.Match] = []
        for identity_id, identity in gallery["identities"].items():
            templates = identity["templates"]
            if mean:
                i, distance = 0, float(np.linalg.norm(np.mean([t["embedding"] for t in templates], axis=0) - vector))
            else:
                distances = [float(np.linalg.norm(t["embedding"] - vector)) for t in templates]
                i = int(np.argmin(distances))
                distance = distances[i]
            best.append(
                pb.Match(
                    identity_id=identity_id,
                    display_name=identity["display_name"],
                    distance=distance,
                    template_id=templates[i]["template_id"],
                    score=score_of(distance, kind),
                )
            )
        best.sort(key=lambda m: m.score)
        score = best[0].score if best else None
        fpir = self._fpir(score, kind) if best else 0.0
        result = pb.FaceIdentification(
            threshold=threshold,
            distance=best[0].distance if best else None,
            score=score,
            score_kind=kind,
            estimated_fpir=None if math.isnan(fpir) else fpir,
        )
        result.matches.extend(best[: top_k or 5])
        if best and score <= threshold:
            result.identity_id = best[0].identity_id
        return result

    def _far(self, distance: float) -> float | None:
        return fpir_of(distance, pb.SCORE_KIND_DISTANCE) if self.has_far_curve else None

    def _enroll(self, request: pb.EnrollRequest, context: grpc.ServicerContext) -> pb.EnrollResponse:
        self._check_id(request.identity_id, context)
        gallery = self._gallery(request.gallery, context)
        response = pb.EnrollResponse(identity_id=request.identity_id)
        if request.HasField("image"):
            faces = self._faces(request.image.data, context)
            if not faces:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no face found in the image")
            face, vector = faces[0]
            response.face.CopyFrom(face)
            response.source_sha256 = hashlib.sha256(request.image.data).hexdigest()
        else:
            vector = np.asarray(request.embedding.values, dtype=np.float32)
            if vector.shape != (DIM,):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected {DIM} values, got {vector.size}")
        with self.lock:
            others = {k: v for k, v in gallery["identities"].items() if k != request.identity_id}
            nearest = self._search({"policy": gallery["policy"], "identities": others}, vector, 1)
            if nearest.identity_id:
                response.possible_duplicate.CopyFrom(nearest.matches[0])
            identity = gallery["identities"].get(request.identity_id)
            if identity is None:
                identity = gallery["identities"][request.identity_id] = {
                    "display_name": request.display_name,
                    "metadata": {},
                    "templates": [],
                }
                response.identity_created = True
            elif request.display_name:
                identity["display_name"] = request.display_name
            identity["metadata"].update(request.metadata)
            response.template_id = self.next_template_id
            self.next_template_id += 1
            identity["templates"].append(
                {
                    "template_id": response.template_id,
                    "embedding": vector,
                    "sha": response.source_sha256,
                    "face": response.face if response.HasField("face") else None,
                }
            )
        return response

    def _identity_message(self, identity_id: str, identity: dict, with_templates: bool) -> pb.Identity:
        message = pb.Identity(
            identity_id=identity_id,
            display_name=identity["display_name"],
            metadata=identity["metadata"],
            template_count=len(identity["templates"]),
        )
        if with_templates:
            for t in identity["templates"]:
                template = pb.Template(template_id=t["template_id"], identity_id=identity_id, source_sha256=t["sha"])
                if t["face"] is not None:
                    template.face.CopyFrom(t["face"])
                message.templates.append(template)
        return message

    @staticmethod
    def _check_id(identity_id: str, context) -> None:
        if not identity_id or any(ord(c) < 32 for c in identity_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed identity_id {identity_id!r}")

    def _identity(self, request, context) -> tuple[dict, dict]:
        gallery = self._gallery(request.gallery, context)
        identity_id = request.identity_id if hasattr(request, "identity_id") else request.identity.identity_id
        self._check_id(identity_id, context)
        identity = gallery["identities"].get(identity_id)
        if identity is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"identity {identity_id!r} not found")
        return gallery, identity

    # rpcs -------------------------------------------------------------------------------------

    def CreateGallery(self, request, context):
        self.requests.append(("CreateGallery", request))
        if request.name in self.galleries:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"gallery {request.name!r} already exists")
        if request.HasField("threshold") and request.HasField("policy"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give threshold or policy, not both")
        if request.HasField("threshold"):
            policy = self._policy(pb.DecisionPolicy(threshold=request.threshold), context, required=True)
        else:
            policy = self._policy(request.policy, context, required=False)
        self._new_gallery(request.name, policy)
        return self._gallery_message(request.name)

    def UpdateGallery(self, request, context):
        self._count("UpdateGallery", context)
        self.requests.append(("UpdateGallery", request))
        gallery = self._gallery(request.name, context)
        gallery["policy"] = self._policy(request.policy, context, required=True)
        return self._gallery_message(request.name or "default")

    def FindDuplicates(self, request, context):
        self._count("FindDuplicates", context)
        self.requests.append(("FindDuplicates", request))
        gallery = self._gallery(request.gallery, context)
        if not 0 <= request.max_pairs <= 10000:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_pairs must be 1..10000, got {request.max_pairs}")
        kind, threshold, _, _ = self._decision(gallery)
        items = list(gallery["identities"].items())
        pairs = []
        for i, (id_a, a) in enumerate(items):
            for id_b, b in items[i + 1 :]:
                distance = min(float(np.linalg.norm(x["embedding"] - y["embedding"])) for x in a["templates"] for y in b["templates"])
                score = score_of(distance, kind)
                if score <= threshold:
                    pairs.append(
                        pb.DuplicatePair(
                            identity_a=id_a,
                            display_name_a=a["display_name"],
                            identity_b=id_b,
                            display_name_b=b["display_name"],
                            score=score,
                            distance=distance,
                            estimated_fpir=None if math.isnan(self._fpir(score, kind)) else self._fpir(score, kind),
                        )
                    )
        pairs.sort(key=lambda p: p.score)
        return pb.FindDuplicatesResponse(pairs=pairs[: request.max_pairs or 100], score_kind=kind, threshold=threshold)

    def GetGallery(self, request, context):
        self._gallery(request.name, context)
        return self._gallery_message(request.name)

    def ListGalleries(self, request, context):
        return pb.ListGalleriesResponse(galleries=[self._gallery_message(n) for n in self.galleries])

    def DeleteGallery(self, request, context):
        gallery = self._gallery(request.name, context)
        del self.galleries[request.name]
        return pb.DeleteGalleryResponse(
            deleted_identities=len(gallery["identities"]),
            deleted_templates=sum(len(i["templates"]) for i in gallery["identities"].values()),
        )

    def Enroll(self, request, context):
        self._count("Enroll", context)
        self.requests.append(("Enroll", request))
        return self._enroll(request, context)

    def BulkEnroll(self, request_iterator, context):
        for index, item in enumerate(request_iterator):
            self.requests.append(("BulkEnroll", item.request))
            status: dict = {}

            class _ItemContext:  # captures an abort of this item instead of failing the stream
                def abort(self, code, message):
                    status.update(code=code, message=message)
                    raise _ItemFailed

            try:
                response = self._enroll(item.request, _ItemContext())
            except _ItemFailed:
                yield pb.BulkEnrollResponse(index=index, error=status_pb2.Status(code=status["code"].value[0], message=status["message"]))
            else:
                yield pb.BulkEnrollResponse(index=index, response=response)

    def Identify(self, request, context):
        self.requests.append(("Identify", request))
        gallery = self._gallery(request.gallery, context)
        threshold = request.threshold if request.HasField("threshold") else None
        response = pb.IdentifyResponse(model_id=MODEL_ID)
        for face, vector in self._faces(request.image.data, context):
            result = self._search(gallery, vector, request.top_k, threshold)
            result.face.CopyFrom(face)
            response.faces.append(result)
        return response

    def IdentifyEmbedding(self, request, context):
        gallery = self._gallery(request.gallery, context)
        vector = np.asarray(request.embedding.values, dtype=np.float32)
        if vector.shape != (DIM,):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected {DIM} values, got {vector.size}")
        threshold = request.threshold if request.HasField("threshold") else None
        return pb.IdentifyEmbeddingResponse(result=self._search(gallery, vector, request.top_k, threshold))

    def Verify(self, request, context):
        gallery, identity = self._identity(request, context)
        faces = self._faces(request.image.data, context)
        if not faces:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no face found in the image")
        face, vector = faces[0]
        distance = min(float(np.linalg.norm(t["embedding"] - vector)) for t in identity["templates"])
        policy = gallery["policy"]
        default = policy.threshold if policy.WhichOneof("rule") == "threshold" else THRESHOLD  # 1:1 stays on L2
        threshold = request.threshold if request.HasField("threshold") else default
        return pb.VerifyResponse(
            identity_id=request.identity_id,
            distance=distance,
            threshold=threshold,
            is_match=distance <= threshold,
            face=face,
            estimated_far=self._far(distance),
        )

    def Compare(self, request, context):
        a, b = self._faces(request.image_a.data, context), self._faces(request.image_b.data, context)
        if not a or not b:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no face found in an image")
        distance = float(np.linalg.norm(a[0][1] - b[0][1]))
        threshold = request.threshold if request.HasField("threshold") else THRESHOLD
        return pb.CompareResponse(
            distance=distance,
            threshold=threshold,
            is_match=distance <= threshold,
            face_a=a[0][0],
            face_b=b[0][0],
            estimated_far=self._far(distance),
        )

    def Embed(self, request, context):
        faces = self._faces(request.image.data, context)
        return pb.EmbedResponse(
            model_id=MODEL_ID,
            faces=[pb.EmbeddedFace(face=f, embedding=pb.Embedding(values=v.tolist())) for f, v in faces],
        )

    def GetIdentity(self, request, context):
        _, identity = self._identity(request, context)
        return self._identity_message(request.identity_id, identity, with_templates=True)

    def ListIdentities(self, request, context):
        self._count("ListIdentities", context)
        gallery = self._gallery(request.gallery, context)
        start = int(request.page_token or 0)
        size = request.page_size or 100
        items = list(gallery["identities"].items())
        page = items[start : start + size]
        response = pb.ListIdentitiesResponse(
            identities=[self._identity_message(k, v, with_templates=False) for k, v in page]
        )
        if start + size < len(items):
            response.next_page_token = str(start + size)
        return response

    def UpdateIdentity(self, request, context):
        self.requests.append(("UpdateIdentity", request))
        _, identity = self._identity(request, context)
        paths = set(request.update_mask.paths) or {"display_name", "metadata"}
        if "display_name" in paths:
            identity["display_name"] = request.identity.display_name
        if "metadata" in paths:
            identity["metadata"] = dict(request.identity.metadata)
        return self._identity_message(request.identity.identity_id, identity, with_templates=False)

    def DeleteIdentity(self, request, context):
        gallery, identity = self._identity(request, context)
        del gallery["identities"][request.identity_id]
        return pb.DeleteIdentityResponse(deleted_templates=len(identity["templates"]))

    def DeleteTemplate(self, request, context):
        gallery = self._gallery(request.gallery, context)
        for identity_id, identity in gallery["identities"].items():
            for t in identity["templates"]:
                if t["template_id"] == request.template_id:
                    identity["templates"].remove(t)
                    if not identity["templates"]:
                        del gallery["identities"][identity_id]
                    return pb.DeleteTemplateResponse(identity_deleted=not identity["templates"])
        context.abort(grpc.StatusCode.NOT_FOUND, f"template {request.template_id} not found")

    def ExportGallery(self, request, context):
        name = request.gallery or "default"
        gallery = self._gallery(name, context)
        yield pb.ExportGalleryResponse(gallery=self._gallery_message(name))
        for identity_id, identity in list(gallery["identities"].items()):
            for t in identity["templates"]:
                template = pb.ExportedTemplate(
                    identity_id=identity_id,
                    display_name=identity["display_name"],
                    metadata=identity["metadata"],
                    template_id=t["template_id"],
                    embedding=pb.Embedding(values=t["embedding"].tolist()),
                    source_sha256=t["sha"],
                )
                template.create_time.FromSeconds(1_700_000_000 + t["template_id"])
                yield pb.ExportGalleryResponse(template=template)

    def ImportEmbeddings(self, request_iterator, context):
        imported = skipped = 0
        gallery = None
        for request in request_iterator:
            self.requests.append(("ImportEmbeddings", request))
            if gallery is None:
                if request.header.model_id != MODEL_ID:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {request.header.model_id!r} is not {MODEL_ID!r}")
                name = request.header.gallery or "default"
                gallery = self.galleries.get(name) or self._new_gallery(name, DEFAULT_POLICY)
                continue
            t = request.template
            vector = np.asarray(t.embedding.values, dtype=np.float32)
            identity = gallery["identities"].setdefault(
                t.identity_id, {"display_name": t.display_name, "metadata": dict(t.metadata), "templates": []}
            )
            if any(np.array_equal(x["embedding"], vector) for x in identity["templates"]):
                skipped += 1
                continue
            identity["templates"].append(
                {"template_id": self.next_template_id, "embedding": vector, "sha": t.source_sha256, "face": None}
            )
            self.next_template_id += 1
            imported += 1
        return pb.ImportEmbeddingsResponse(imported=imported, skipped=skipped)

    def GetServerInfo(self, request, context):
        self._count("GetServerInfo", context)
        time.sleep(self.delay_s)
        return pb.GetServerInfoResponse(
            version="0.0-fake",
            model=pb.ModelInfo(
                name="fake",
                version="1",
                model_id=MODEL_ID,
                embedding_dim=DIM,
                metric="euclidean",
                threshold=THRESHOLD,
                chip_size=150,
                manifest_json='{"format": "facegallery-model/1", "name": "fake"}',
            ),
        )


class _ItemFailed(Exception):
    pass


@contextlib.contextmanager
def running_fake_server() -> Iterator[tuple[str, FakeGalleryServicer, health.HealthServicer]]:
    """A real gRPC server on a free localhost port with the fake servicer and grpc.health.v1.

    Yields ``(address, servicer, health_servicer)``; the health status starts SERVING.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FakeGalleryServicer()
    pb_grpc.add_GalleryServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, health_servicer
    finally:
        server.stop(grace=None)
