"""MMOD face detector: conversion, and detections against dlib 20.0.1's own (../shared/golden_dlib).

The golden file holds, per image, dlib's ``cnn_face_detection_model_v1(img, 0)`` detections
(``detections_upsample0``, with confidences) and, for images of at most 1000 px a side, the
upsample-1 detections as ``faces[].rect`` (``face_upsample == 1``; no confidences). The full set
(477 images) takes minutes; this module checks a deterministic subset of about 40 megapixels:
at upsample 0 every image of at most 0.1 MP, every ``face_upsample == 0`` image of at most 1 MP
and every 10th other image (from the 6th), and at upsample 1 every 10th ``face_upsample == 1`` image.
"""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from facegallery.export.dlib.mmod import convert_mmod
from facegallery.server.contract.errors import InvalidInput
from facegallery.server.face.detect import DetectionConfig, Detections, FaceDetector, plan_scale
from facegallery.server.face.dlib_geometry import lround, rect_area, rect_down, rect_up
from facegallery.server.face.image_pyramid import pyramid_up_size, tiled_pyramid_layout

MODELS_DIR = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
MMOD_DAT = MODELS_DIR / "mmod_human_face_detector.dat"

#: Large photos for the default (rescaling) policy: up to 4352 px and 13 MP.
LARGE_PHOTOS = (
    "deepface/scarlett_johansson/img49.jpg",
    "deepface/george_clooney/img40.jpg",
    "face_recognition/steve_wozniak/steve_wozniak1.jpg",
    "_multi/deepface/couple.jpg",
    "_multi/face_recognition/obama_and_biden.jpg",
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("mmod") / "detector.onnx"
    return path, convert_mmod(MMOD_DAT, path)


@pytest.fixture(scope="module")
def detector(converted) -> FaceDetector:
    path, params = converted
    return FaceDetector(path, params, intra_op_threads=1)


def _load(shared_dir: Path, name: str) -> np.ndarray:
    # Decoded as the golden file was: Pillow convert("RGB"), no EXIF transpose.
    with Image.open(shared_dir / "faces" / name) as im:
        return np.asarray(im.convert("RGB"))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """True IoU of inclusive boxes ``a`` (N,4) against ``b`` (M,4) -> (N, M)."""
    a, b = a[:, None, :].astype(np.float64), b[None, :, :].astype(np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1, 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0] + 1) * (r[..., 3] - r[..., 1] + 1)  # noqa: E731
    inter = iw * ih
    return inter / (area(a) + area(b) - inter)


def _golden_cases(golden: list[dict]) -> list[tuple[dict, int]]:
    """The deterministic subset of (golden row, upsample) described in the module docstring."""
    cases, rest = [], []
    for row in golden:
        pixels = row["width"] * row["height"]
        if pixels <= 100_000 or (row["face_upsample"] == 0 and pixels <= 1_000_000):
            cases.append((row, 0))
        else:
            rest.append(row)
    cases += [(row, 0) for row in rest[5::10]]
    cases += [(row, 1) for row in [r for r in golden if r["face_upsample"] == 1][::10]]
    return cases


def test_convert_mmod_parameters(converted):
    path, params = converted
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert params["window"] == [80, 80]
    assert (params["stride"], params["offset"]) == (8, 14)
    assert (params["pyramid_down"], params["padding"], params["outer_padding"]) == (6, 10, 11)
    assert params["nms_iou"] == pytest.approx(0.33827613511) and params["nms_covered"] == 1.0
    np.testing.assert_allclose(params["mean_rgb"], [122.782, 117.001, 104.298], atol=1e-4)
    assert params["scale"] == 1 / 256


def test_tiled_pyramid_layout_640x480():
    # Spec (b): a 640x480 image gives a 662 x 1782 tensor with 24 levels; pyramid_up -> 1282 x 961.
    rects, shape = tiled_pyramid_layout(480, 640, downscale=6, padding=10, outer_padding=11)
    assert shape == (1782, 662) and len(rects) == 24
    assert tuple(rects[0]) == (11, 11, 650, 490)
    assert pyramid_up_size(480, 640) == (961, 1282)


def _lround_exact(x: float) -> int:
    """std::lround in exact rational arithmetic: halves away from zero."""
    q = abs(Fraction(x))
    return int(math.copysign(math.floor(q + Fraction(1, 2)), x))


#: Values where ``sign(x) * floor(|x| + 0.5)`` (rounding |x| + 0.5 to a double first) is wrong,
#: halves of both signs, and a half at 1e15 (still representable: the spacing there is 1/8).
_LROUND_CASES = [0.49999999999999994, -0.49999999999999994, 2.5, -2.5, 0.5, -0.5, 1.5, 1e15 + 0.5,
                 -(1e15 + 0.5), 2.0**52 + 1, -(2.0**52 + 1), 3.4999999999999996, 0.0, -0.0, 7.0, -1e-300]


@pytest.mark.parametrize("x", _LROUND_CASES, ids=repr)
def test_lround_is_std_lround_for_scalars_and_arrays(x):
    expected = _lround_exact(x)
    got = lround(x)
    assert got == expected and type(got) is int
    assert lround(np.float64(x)) == expected and type(lround(np.float64(x))) is int
    array = lround(np.array([x, x]))
    assert array.dtype == np.int64 and array.tolist() == [expected, expected]


def test_lround_exact_next_to_every_half():
    halves = np.arange(-2000, 2000) + 0.5
    values = np.concatenate([halves, np.nextafter(halves, np.inf), np.nextafter(halves, -np.inf), halves * 1e9])
    expected = [_lround_exact(float(v)) for v in values]
    assert lround(values).tolist() == expected
    assert [lround(float(v)) for v in values] == expected


def test_rect_down_and_up_follow_pyramid_down_2():
    # image_pyramid.h: rect_down maps each corner p to p / 2 - (1.25, 0.75); rect_up inverts it.
    assert rect_down((10.0, 20.0, 30.0, 40.0)) == (3.75, 9.25, 13.75, 19.25)
    assert rect_up((3.75, 9.25, 13.75, 19.25)) == (10.0, 20.0, 30.0, 40.0)
    boxes = np.array([[10.0, 20.0, 30.0, 40.0], [-5.0, 0.0, 99.0, 7.0]])
    two = rect_down(boxes, 2)
    assert isinstance(two, np.ndarray) and two.shape == (2, 4)
    np.testing.assert_array_equal(two, [rect_down(rect_down(tuple(b))) for b in boxes])
    np.testing.assert_array_equal(rect_up(two, 2), boxes)
    assert rect_down((1.0, 2.0, 3.0, 4.0), 0) == (1.0, 2.0, 3.0, 4.0)
    # pyramid_up's size is the rounded bottom-right corner of rect_up(image rect), plus one.
    assert pyramid_up_size(480, 640) == (lround(rect_up((0, 0, 639, 479))[3]) + 1, lround(rect_up((0, 0, 639, 479))[2]) + 1)


def test_rect_area_of_inclusive_rectangles():
    assert rect_area((0, 0, 9, 4)) == 50.0 and rect_area((0.5, 0.0, 2.0, 1.0)) == 5.0
    assert rect_area((5, 0, 4, 3)) == 0.0 and rect_area((0, 5, 3, 4)) == 0.0  # empty
    areas = rect_area(np.array([[0, 0, 9, 4], [5, 0, 4, 3]], dtype=np.int64))
    assert areas.dtype == np.int64 and areas.tolist() == [50, 0]


@pytest.mark.slow
def test_matches_dlib_golden(detector, golden, shared_dir):
    cases = _golden_cases(golden)
    n_faces = identical = 0
    max_score_diff = 0.0
    for row, upsample in cases:
        rgb = _load(shared_dir, row["image"])
        assert rgb.shape[:2] == (row["height"], row["width"])
        found = detector.detect(rgb, DetectionConfig(rescale=False, upsample=upsample))
        if upsample == 0:
            dets = row["detections_upsample0"]
            boxes = np.array([[d["left"], d["top"], d["right"], d["bottom"]] for d in dets]).reshape(-1, 4)
            scores = np.array([d["confidence"] for d in dets])
        else:
            boxes, scores = np.array([f["rect"] for f in row["faces"]]).reshape(-1, 4), None
        where = f"{row['image']} upsample={upsample}"
        assert len(found) == len(boxes), f"{where}: {found.boxes.tolist()} vs dlib {boxes.tolist()}"
        if not len(boxes):
            continue
        iou = _iou(boxes, found.boxes)
        best = iou.argmax(axis=1)
        assert np.all(iou.max(axis=1) >= 0.9), f"{where}: {found.boxes.tolist()} vs dlib {boxes.tolist()}"
        if scores is not None:
            diff = np.abs(found.scores[best] - scores)
            assert np.all(diff <= 1e-3), f"{where}: scores {found.scores.tolist()} vs dlib {scores.tolist()}"
            max_score_diff = max(max_score_diff, float(diff.max()))
        n_faces += len(boxes)
        identical += int(np.sum(np.all(found.boxes[best] == boxes, axis=1)))
    assert n_faces > 150
    # The numpy pyramid and decoding are exact, so boxes are identical, not merely overlapping.
    assert identical == n_faces, f"{identical}/{n_faces} boxes identical (max score diff {max_score_diff:.1e})"


@pytest.mark.parametrize("name", LARGE_PHOTOS)
def test_default_policy_finds_golden_faces_on_large_photos(detector, golden, shared_dir, name):
    row = next(r for r in golden if r["image"] == name)
    rgb = _load(shared_dir, name)
    plan = plan_scale(*rgb.shape[:2], DetectionConfig())
    assert plan.size[0] * plan.size[1] <= 1.1 * DetectionConfig().max_detect_pixels
    found = detector.detect(rgb)
    truth = np.array([f["rect"] for f in row["faces"]]).reshape(-1, 4)
    assert len(truth) and len(found)
    iou = _iou(truth, found.boxes)
    assert np.all(iou.max(axis=1) >= 0.7), f"{name}: {found.boxes.tolist()} vs dlib {truth.tolist()}"


def test_default_policy_small_image_is_dlib_upsample_1(detector, golden, shared_dir):
    small = [r for r in golden if r["face_upsample"] == 1 and r["width"] * r["height"] < 100_000]
    row = next(r for r in small if len(r["faces"]) >= 2)
    rgb = _load(shared_dir, row["image"])
    assert plan_scale(*rgb.shape[:2], DetectionConfig()).upsample == 1
    found = detector.detect(rgb)
    np.testing.assert_array_equal(found.boxes, np.array([f["rect"] for f in row["faces"]], dtype=np.float32))


def test_noise_image_does_not_crash(detector):
    rgb = np.random.default_rng(0).integers(0, 256, size=(480, 640, 3), dtype=np.uint8)
    for config in (DetectionConfig(), DetectionConfig(rescale=False)):
        found = detector.detect(rgb, config)
        assert found.boxes.shape == (len(found), 4) and found.scores.shape == (len(found),)
        assert np.all(np.diff(found.scores) <= 0)


@pytest.mark.parametrize("size", [(10, 10), (1, 1), (3, 200), (29, 29)])
def test_tiny_images_give_empty_detections(detector, size):
    rgb = np.full((*size, 3), 128, dtype=np.uint8)
    for config in (DetectionConfig(), DetectionConfig(rescale=False)):
        found = detector.detect(rgb, config)
        assert isinstance(found, Detections)
        assert found.boxes.shape == (0, 4) and found.scores.shape == (0,)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((20, 20), np.uint8),
        np.zeros((20, 20, 4), np.uint8),
        np.zeros((20, 20, 3), np.float32),
        np.zeros((0, 20, 3), np.uint8),
        [[0, 0, 0]],
    ],
)
def test_invalid_input_raises(detector, bad):
    with pytest.raises(InvalidInput):
        detector.detect(bad)
