"""The face pipeline on real photos as users send them: rotated phone photos, greyscale, group
photos, huge files, crops and chips, and bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegallery.server.contract.errors import ImageDecodeError, ImageTooLargeError, InvalidInput
from facegallery.server.contract.face import ImageKind

OBAMA = "faces/face_recognition/barack_obama/obama.jpg"
OBAMA2 = "faces/face_recognition/barack_obama/obama2.jpg"
BIDEN = "faces/face_recognition/joe_biden/biden.jpg"


def _jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _distance(a, b) -> float:
    return float(np.linalg.norm(a.embedding - b.embedding))


@pytest.fixture(scope="module")
def obama(shared_dir, pipeline):
    data = (shared_dir / OBAMA).read_bytes()
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    (face,) = pipeline.analyze(data)
    return rgb, face


def test_same_and_different_people(shared_dir, pipeline, obama):
    _, face = obama
    (same,) = pipeline.analyze((shared_dir / OBAMA2).read_bytes())
    (other,) = pipeline.analyze((shared_dir / BIDEN).read_bytes())
    assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    assert _distance(face, same) < 0.45  # dlib-free reference: 0.357
    assert _distance(face, other) > 0.75  # 0.857
    assert face.landmarks.shape == (5, 2) and face.score > 0.9


def test_exif_rotated_phone_photo(pipeline, obama):
    """A phone stores the pixels sideways and an Orientation tag (6 = rotate 90° CW to view)."""
    rgb, upright = obama
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1)))
    lossless = io.BytesIO()
    stored.save(lossless, format="PNG", exif=exif.tobytes())
    (face,) = pipeline.analyze(lossless.getvalue())
    assert np.array_equal(face.box, upright.box)  # boxes in upright-image pixels
    assert _distance(face, upright) < 1e-5
    (from_jpeg,) = pipeline.analyze(_jpeg(np.asarray(stored), exif=exif.tobytes()))
    assert np.abs(from_jpeg.box - upright.box).max() <= 4
    assert _distance(from_jpeg, upright) < 0.1  # JPEG re-encoding noise only


def test_greyscale_photo(shared_dir, pipeline, obama):
    rgb, colour = obama
    grey = Image.fromarray(rgb).convert("L")
    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    (face,) = pipeline.analyze(buf.getvalue())
    assert _distance(face, colour) < 0.2


def test_group_photo_returns_every_face_largest_first(shared_dir, pipeline, golden):
    record = next(r for r in golden if r["image"] == "_multi/deepface/selfie-many-people.jpg")
    faces = pipeline.analyze((shared_dir / "faces" / record["image"]).read_bytes())
    assert len(faces) == len(record["faces"]) >= 4
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert len(pipeline.analyze((shared_dir / "faces" / record["image"]).read_bytes(), max_faces=2)) == 2


def test_huge_photo_is_detected_on_a_downscaled_copy(pipeline, obama):
    """A 12 MP phone photo: detection runs on a copy, the chip is cut from the full image."""
    rgb, small = obama
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 4, rgb.shape[0] * 4), Image.BICUBIC))
    (face,) = pipeline.analyze(big)
    assert np.abs(face.box / 4 - small.box).max() < 12
    assert _distance(face, small) < 0.1


def test_face_crop_and_aligned_chip(shared_dir, pipeline, obama, golden):
    rgb, face = obama
    left, top, right, bottom = np.round(face.box).astype(int)
    crop = rgb[top: bottom + 1, left: right + 1]
    (from_crop,) = pipeline.analyze(crop, kind=ImageKind.FACE_CROP)
    assert from_crop.score == 0.0
    # the whole crop is the face box, so the landmarks are the photo's, shifted by the crop origin
    assert np.abs(from_crop.landmarks + [left, top] - face.landmarks).max() <= 2  # box rounding
    # same person; the chip's padding reaches past the tight crop (black there), hence not ~0
    assert _distance(from_crop, face) < 0.3
    record = next(r for r in golden if r["faces"])
    chip = (shared_dir / "golden_dlib" / record["faces"][0]["chip"]).read_bytes()
    (from_chip,) = pipeline.analyze(chip, kind=ImageKind.ALIGNED_CHIP)
    assert np.abs(from_chip.embedding - np.asarray(record["faces"][0]["descriptor"], np.float32)).max() < 1e-4
    with pytest.raises(InvalidInput, match="150x150"):
        pipeline.analyze(crop, kind=ImageKind.ALIGNED_CHIP)


def test_no_face_gives_an_empty_list(shared_dir, pipeline):
    cat = shared_dir / "faces/_noface/skimage/chelsea.png"
    assert pipeline.analyze(cat.read_bytes()) == []
    assert pipeline.analyze(np.full((300, 400, 3), 128, np.uint8)) == []
    assert pipeline.analyze(np.zeros((5, 5, 3), np.uint8)) == []


def test_bad_input_is_a_typed_error(shared_dir, pipeline):
    data = (shared_dir / OBAMA).read_bytes()
    for bad in [b"", bytes(np.random.default_rng(1).integers(0, 256, 10_000, dtype=np.uint8)), data[: len(data) // 3]]:
        with pytest.raises(ImageDecodeError):
            pipeline.analyze(bad)
    from test_decode import _png_header_only

    with pytest.raises(ImageTooLargeError):
        pipeline.analyze(_png_header_only(30000, 30000))
    with pytest.raises(InvalidInput):
        pipeline.analyze(data, max_faces=-1)


def test_flip_augment_averages_the_mirrored_chip(shared_dir, model_dir, pipeline, obama):
    import dataclasses

    from facegallery.server.face.align import extract_chips
    from facegallery.server.face.pipeline import FacePipeline

    rgb, plain = obama
    flipped = FacePipeline.from_model_dir(model_dir, dataclasses.replace(pipeline.config, flip_augment=True))
    (face,) = flipped.analyze(rgb)
    assert np.array_equal(face.box, plain.box) and np.array_equal(face.landmarks, plain.landmarks)
    chip = extract_chips(rgb, plain.landmarks[None], pipeline.manifest.chip)
    mirrored = pipeline.embedder.embed(np.ascontiguousarray(chip[:, :, ::-1]))[0]
    np.testing.assert_allclose(face.embedding, (plain.embedding + mirrored) / 2, atol=1e-6)
    assert 0.01 < _distance(face, plain) < 0.15  # a real change, still the same face
    assert flipped.model_id == pipeline.manifest.embedding_id(True) != pipeline.model_id == pipeline.manifest.model_id


def test_model_id_covers_the_flip_augmentation():
    from fakes import fake_manifest

    from facegallery.server.face.pipeline import FacePipeline, PipelineConfig

    manifest = fake_manifest()

    def pipeline_with(config):  # the stages play no part in the id
        return FacePipeline(manifest, Path("."), detector=None, landmarks=None, embedder=None, head=None, config=config)

    assert pipeline_with(PipelineConfig()).model_id == manifest.model_id == manifest.embedding_id(False)
    assert pipeline_with(PipelineConfig(flip_augment=True)).model_id == manifest.embedding_id(True) != manifest.model_id
    assert pipeline_with(PipelineConfig(intra_op_threads=1, max_image_bytes=1000)).model_id == manifest.model_id


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height whose pixel data is a few bytes (decoding it fails)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _stageless(config):
    """A pipeline without stages: enough for what happens before decoding."""
    from fakes import fake_manifest

    from facegallery.server.face.pipeline import FacePipeline

    return FacePipeline(fake_manifest(), Path("."), detector=None, landmarks=None, embedder=None, head=None, config=config)


def _sharing_stages(pipeline, config):
    from facegallery.server.face.pipeline import FacePipeline

    return FacePipeline(
        pipeline.manifest, pipeline.model_dir, detector=pipeline.detector, landmarks=pipeline.landmarks,
        embedder=pipeline.embedder, head=pipeline.head, config=config,
    )  # fmt: skip


def test_an_image_over_the_memory_budget_is_refused_before_decoding():
    """10900x10900 is under the pixel limit; its estimate (~700 MB) is over a 500 MB budget."""
    from facegallery.server.face.pipeline import PipelineConfig

    pipeline = _stageless(PipelineConfig(memory_budget_bytes=500 << 20, memory_wait_s=5))
    data = _png_header_only(10900, 10900)  # decoding would raise ImageDecodeError (no pixel data)
    with pytest.raises(ImageTooLargeError, match="over the server's memory budget of 500 MB"):
        pipeline.analyze(data)
    assert pipeline.memory_budget.used_bytes == 0
    with pytest.raises(ImageDecodeError):  # with room in the budget it is decoded (and fails)
        _stageless(PipelineConfig(memory_budget_bytes=0)).analyze(data)


def test_a_call_waits_for_budget_held_by_others_then_is_refused():
    from facegallery.server.face.memory_budget import MemoryBudgetExhausted
    from facegallery.server.face.pipeline import PipelineConfig

    pipeline = _stageless(PipelineConfig(memory_budget_bytes=2 << 30, memory_wait_s=0.1))
    pipeline.memory_budget.acquire(1800 << 20)  # other calls
    with pytest.raises(MemoryBudgetExhausted, match="memory budget of 2048 MB is in use"):
        pipeline.analyze(_png_header_only(10900, 10900))
    pipeline.memory_budget.release(1800 << 20)
    with pytest.raises(ImageDecodeError):  # admitted now; the budget is returned after the failure
        pipeline.analyze(_png_header_only(10900, 10900))
    assert pipeline.memory_budget.used_bytes == 0


def test_estimates_and_reduction_factors():
    from facegallery.server.face.decode import read_header
    from facegallery.server.face.detect import DetectionConfig
    from facegallery.server.face.pipeline import PipelineConfig

    pipeline = _stageless(PipelineConfig())
    hostile = read_header(_png_header_only(10900, 10900))
    assert pipeline.reduce_factor(hostile, ImageKind.PHOTO, DetectionConfig()) == 4  # 119 MP -> 7.4 MP
    assert pipeline.reduce_factor(hostile, ImageKind.ALIGNED_CHIP, DetectionConfig()) == 1
    assert pipeline.reduce_factor(hostile, ImageKind.PHOTO, DetectionConfig(rescale=False)) == 1  # dlib at full size
    assert pipeline.reduce_factor(read_header(_png_header_only(4352, 3264)), ImageKind.PHOTO, DetectionConfig()) == 1
    assert 600 << 20 < pipeline.estimate_bytes(hostile, 4) < 800 << 20
    assert 1200 << 20 < pipeline.estimate_bytes(hostile, 1) < 1500 << 20


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_huge_photo_decoded_at_reduced_size_reports_full_size_pixels(pipeline, obama, fmt):
    """Over reduce_above_pixels the photo is decoded at 1/k of its side; boxes and landmarks are
    mapped back to the full image and agree with a full-size decode."""
    from facegallery.server.face.pipeline import PipelineConfig

    rgb, _ = obama
    big = np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * 4, rgb.shape[0] * 4), Image.BICUBIC))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 1}))
    data = buf.getvalue()
    from facegallery.server.face.decode import read_header
    from facegallery.server.face.detect import DetectionConfig

    detection = DetectionConfig(max_detect_pixels=500_000)  # 16.5 MP: reduced to >= 2 MP, by 2
    full = _sharing_stages(pipeline, PipelineConfig(reduce_above_pixels=0, detection=detection))
    reducing = _sharing_stages(pipeline, PipelineConfig(reduce_above_pixels=4_000_000, detection=detection))
    assert reducing.reduce_factor(read_header(data), ImageKind.PHOTO, detection) == 2
    (at_full,) = full.analyze(data)
    (at_half,) = reducing.analyze(data)
    assert np.abs(at_half.box - at_full.box).max() <= 8  # 2 px of the reduced image
    side = at_full.box[2] - at_full.box[0]  # ~950 px
    assert np.abs(at_half.landmarks - at_full.landmarks).max() <= 0.015 * side  # measured <= 9.5 px
    assert _distance(at_half, at_full) < 0.1  # measured 0.059 (PNG), as for test_huge_photo_is_detected_on_a_downscaled_copy
