"""An in-memory GalleryService for client and CLI tests: a real gRPC server, a fake engine.

The fake follows the proto's contract (statuses, paging, streams, export/import) with a trivial
"pipeline": an image is decoded with Pillow; a single-colour image has no face, any other image
has one face covering it, whose embedding is derived from the decoded pixels (so the same pixels
always give the same embedding, at distance 0, and different pictures are ~1 apart). Requests are
recorded so tests can check what the client sent.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from facegallery.v1 import gallery_service_pb2 as pb
from facegallery.v1 import gallery_service_pb2_grpc as pb_grpc

DIM = 8
THRESHOLD = 0.6
MODEL_ID = "fake-model-sha256"


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
        self.galleries: dict[str, dict] = {}
        self.next_template_id = 1
        self._new_gallery("default", THRESHOLD)

    # helpers ----------------------------------------------------------------------------------

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        """Count the call; fail it with UNAVAILABLE while ``self.unavailable[method]`` lasts."""
        self.calls[method] += 1
        if self.unavailable[method] > 0:
            self.unavailable[method] -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is starting")

    def _new_gallery(self, name: str, threshold: float) -> dict:
        self.galleries[name] = {"threshold": threshold, "identities": {}}
        return self.galleries[name]

    def _gallery(self, name: str, context: grpc.ServicerContext) -> dict:
        gallery = self.galleries.get(name or "default")
        if gallery is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"gallery {name!r} not found")
        return gallery

    def _gallery_message(self, name: str) -> pb.Gallery:
        gallery = self.galleries[name]
        message = pb.Gallery(
            name=name,
            model_id=MODEL_ID,
            threshold=gallery["threshold"],
            metric="euclidean",
            embedding_dim=DIM,
            identity_count=len(gallery["identities"]),
            template_count=sum(len(i["templates"]) for i in gallery["identities"].values()),
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

    def _search(self, gallery: dict, vector: np.ndarray, top_k: int, threshold: float) -> pb.FaceIdentification:
        best: list[pb.Match] = []
        for identity_id, identity in gallery["identities"].items():
            distances = [float(np.linalg.norm(t["embedding"] - vector)) for t in identity["templates"]]
            i = int(np.argmin(distances))
            best.append(
                pb.Match(
                    identity_id=identity_id,
                    display_name=identity["display_name"],
                    distance=distances[i],
                    template_id=identity["templates"][i]["template_id"],
                )
            )
        best.sort(key=lambda m: m.distance)
        result = pb.FaceIdentification(threshold=threshold, distance=best[0].distance if best else float("inf"))
        result.matches.extend(best[: top_k or 5])
        if best and best[0].distance <= threshold:
            result.identity_id = best[0].identity_id
        return result

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
            nearest = self._search({"identities": others}, vector, 1, gallery["threshold"])
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
        self._new_gallery(request.name, request.threshold if request.HasField("threshold") else THRESHOLD)
        return self._gallery_message(request.name)

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
                yield pb.BulkEnrollResult(index=index, code=status["code"].value[0], message=status["message"])
            else:
                yield pb.BulkEnrollResult(index=index, code=0, response=response)

    def Identify(self, request, context):
        self.requests.append(("Identify", request))
        gallery = self._gallery(request.gallery, context)
        threshold = request.threshold if request.HasField("threshold") else gallery["threshold"]
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
        threshold = request.threshold if request.HasField("threshold") else gallery["threshold"]
        return pb.IdentifyEmbeddingResponse(result=self._search(gallery, vector, request.top_k, threshold))

    def Verify(self, request, context):
        gallery, identity = self._identity(request, context)
        faces = self._faces(request.image.data, context)
        if not faces:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no face found in the image")
        face, vector = faces[0]
        distance = min(float(np.linalg.norm(t["embedding"] - vector)) for t in identity["templates"])
        threshold = request.threshold if request.HasField("threshold") else gallery["threshold"]
        return pb.VerifyResponse(
            identity_id=request.identity_id, distance=distance, threshold=threshold, is_match=distance <= threshold, face=face
        )

    def Compare(self, request, context):
        a, b = self._faces(request.image_a.data, context), self._faces(request.image_b.data, context)
        if not a or not b:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no face found in an image")
        distance = float(np.linalg.norm(a[0][1] - b[0][1]))
        threshold = request.threshold if request.HasField("threshold") else THRESHOLD
        return pb.CompareResponse(
            distance=distance, threshold=threshold, is_match=distance <= threshold, face_a=a[0][0], face_b=b[0][0]
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
                if request.model_id != MODEL_ID:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model {request.model_id!r} is not {MODEL_ID!r}")
                name = request.gallery or "default"
                gallery = self.galleries.get(name) or self._new_gallery(name, THRESHOLD)
            if not request.HasField("template"):
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
        return pb.ServerInfo(
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
