"""The real default model served twice over one data directory, with and without test-time flip
augmentation: the two pipelines embed differently, so they are two models and neither serves the
other's galleries (FAILED_PRECONDITION naming both model ids)."""

from __future__ import annotations

from pathlib import Path

import pytest

import facegallery.client as fc
from facegallery.server.contract.manifest import ModelManifest
from facegallery.server.face.pipeline import PipelineConfig
from facegallery.server.service.app import ServerConfig, create_server

OBAMA = "faces/face_recognition/barack_obama/obama.jpg"
OBAMA2 = "faces/face_recognition/barack_obama/obama2.jpg"


def _serve(data_dir: Path, model_dir: Path, *, flip_augment: bool):
    pipeline = PipelineConfig(flip_augment=flip_augment, intra_op_threads=1)  # threads are not part of the model id
    config = ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, model_dir=model_dir, pipeline=pipeline, snapshot_interval_s=None, grace_s=1.0)
    return create_server(config)


def _names_both(error: fc.FaceGalleryClientError, a: str, b: str) -> bool:
    return a[:12] in error.message and b[:12] in error.message


def test_a_server_with_flip_augmentation_refuses_a_gallery_enrolled_without_it(tmp_path, model_dir, shared_dir):
    manifest = ModelManifest.load(model_dir, verify=False)
    plain_id, flipped_id = manifest.embedding_id(False), manifest.embedding_id(True)
    assert plain_id != flipped_id
    obama, obama2 = shared_dir / OBAMA, shared_dir / OBAMA2

    plain = _serve(tmp_path, model_dir, flip_augment=False)
    try:
        with fc.GalleryClient(f"127.0.0.1:{plain.port}", timeout=60.0) as client:
            assert client.server_info().model.model_id == plain_id == manifest.model_id
            client.enroll("obama", obama)
            assert client.get_gallery().model_id == plain_id
            [probe] = client.embed(obama2)
            assert client.identify(obama2)[0].identity_id == "obama"
    finally:
        plain.stop(1.0)

    flipped = _serve(tmp_path, model_dir, flip_augment=True)
    try:
        with fc.GalleryClient(f"127.0.0.1:{flipped.port}", timeout=60.0) as client:
            assert client.server_info().model.model_id == flipped_id
            with pytest.raises(fc.FailedPrecondition) as refused:
                client.identify(obama2)
            assert _names_both(refused.value, plain_id, flipped_id), refused.value.message
            with pytest.raises(fc.FailedPrecondition) as refused:
                client.enroll("obama", obama2)
            assert _names_both(refused.value, plain_id, flipped_id), refused.value.message
            with pytest.raises(fc.FailedPrecondition):
                client.identify_embedding(probe.embedding)  # unset: the server's (flipped) model
            # an embedding of the gallery's own model needs no pipeline: it can still be searched
            assert client.identify_embedding(probe.embedding, model_id=plain_id).identity_id == "obama"
            assert client.get_gallery().template_count == 1

            # a gallery this server creates is of its own model, and refuses the plain embedding
            client.create_gallery("flipped")
            assert client.get_gallery("flipped").model_id == flipped_id
            client.enroll("obama", obama, gallery="flipped")
            assert client.identify(obama2, gallery="flipped")[0].identity_id == "obama"
            with pytest.raises(fc.FailedPrecondition) as refused:
                client.identify_embedding(probe.embedding, model_id=plain_id, gallery="flipped")
            assert _names_both(refused.value, plain_id, flipped_id), refused.value.message
    finally:
        flipped.stop(1.0)
