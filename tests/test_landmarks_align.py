"""Landmarks and face chips against dlib 20.0.1's own outputs (../shared/golden_dlib).

The golden set holds, per face, dlib's MMOD rect, the 5 landmarks ``dlib.shape_predictor``
found in it, and the chip ``dlib.get_face_chip(img, shape, 150, 0.25)`` made from them (one
face at a time). Images are decoded as the golden set was: Pillow ``convert("RGB")``, no EXIF
transpose.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facegallery.export.dlib.dat_format import DlibFormatError
from facegallery.export.dlib.shape_predictor import convert_shape_predictor, read_shape_predictor
from facegallery.server.contract.errors import InvalidInput
from facegallery.server.contract.manifest import ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.face.align import (
    DLIB_5POINT_TEMPLATE,
    chip_transform,
    extract_chip,
    extract_chips,
    pyramid_down2,
)
from facegallery.server.face.landmarks import LandmarkPredictor, dlib_rectangles

DLIB_CHIP = ChipSpec(150, 0.25, DLIB_5POINT_TEMPLATE)
MODELS_DIR = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"
SHAPE_PREDICTOR_DAT = MODELS_DIR / "shape_predictor_5_face_landmarks.dat"


@pytest.fixture(scope="module")
def landmarks_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("landmarks") / "landmarks.npz"
    convert_shape_predictor(SHAPE_PREDICTOR_DAT, path)
    return path


@pytest.fixture(scope="module")
def predictor(landmarks_npz: Path) -> LandmarkPredictor:
    return LandmarkPredictor.from_npz(landmarks_npz)


@pytest.fixture(scope="module")
def parity(golden: list[dict], shared_dir: Path, predictor: LandmarkPredictor) -> dict[str, np.ndarray]:
    """One pass over every golden face: landmark and chip differences from dlib.

    Each image is decoded once; landmarks come from the golden rects, chips from the golden
    landmarks, all faces of an image in one ``extract_chips`` call (which must not make a
    face's chip depend on the other faces, since the golden chips were made one by one).
    """
    landmark_diff, chip_diff, chip_pixels = [], [], []
    for record in golden:
        if not record["faces"]:
            continue
        rgb = np.asarray(Image.open(shared_dir / "faces" / record["image"]).convert("RGB"))
        rects = np.array([f["rect"] for f in record["faces"]], dtype=np.float64)
        dlib_points = np.array([f["landmarks5"] for f in record["faces"]], dtype=np.float64)
        ours = predictor.predict(rgb, rects)
        landmark_diff.extend(np.abs(ours - dlib_points).max(axis=(1, 2)))
        chips = extract_chips(rgb, dlib_points, DLIB_CHIP)
        for face, chip in zip(record["faces"], chips):
            dlib_chip = np.asarray(Image.open(shared_dir / "golden_dlib" / face["chip"]).convert("RGB"))
            diff = np.abs(chip.astype(np.int16) - dlib_chip.astype(np.int16))
            chip_diff.append(diff.max())
            chip_pixels.append(np.count_nonzero(diff))
    return {"landmark": np.array(landmark_diff), "chip": np.array(chip_diff), "chip_pixels": np.array(chip_pixels)}


# -- conversion -----------------------------------------------------------------------------

def test_convert_shape_predictor_reports_the_5_point_model(tmp_path: Path) -> None:
    info = convert_shape_predictor(SHAPE_PREDICTOR_DAT, tmp_path / "sp.npz")
    assert info == {"num_parts": 5, "cascades": 15, "trees_per_cascade": 500, "tree_depth": 4, "feature_pixels": 800}
    with np.load(tmp_path / "sp.npz") as npz:
        assert npz["initial_shape"].shape == (5, 2)
        assert npz["leaf_values"].shape == (15, 500, 16, 5, 2)
        assert npz["split_idx1"].max() < 800 and npz["anchor_idx"].max() < 5
        # The mean shape is box-normalised: every part lies inside the unit box.
        assert np.all((npz["initial_shape"] > 0) & (npz["initial_shape"] < 1))


@pytest.mark.parametrize("cut", ["truncated", "trailing"])
def test_read_shape_predictor_rejects_damaged_files(cut: str) -> None:
    data = SHAPE_PREDICTOR_DAT.read_bytes()
    damaged = data[: len(data) // 3] if cut == "truncated" else data + b"\x01\x00"
    with pytest.raises(DlibFormatError):
        read_shape_predictor(damaged)


# -- landmarks ------------------------------------------------------------------------------

@pytest.mark.slow
def test_landmarks_match_dlib_on_every_golden_face(parity: dict[str, np.ndarray]) -> None:
    diff = parity["landmark"]
    exact = int(np.count_nonzero(diff == 0))
    print(f"landmarks: {exact}/{diff.size} faces identical to dlib, max abs diff {diff.max():.1f} px")
    assert diff.size == 501
    assert diff.max() <= 1.5
    assert exact >= 0.99 * diff.size


def test_float_boxes_round_like_dlib_rectangles(golden: list[dict], shared_dir: Path,
                                                predictor: LandmarkPredictor) -> None:
    record = next(r for r in golden if len(r["faces"]) >= 2)
    rgb = np.asarray(Image.open(shared_dir / "faces" / record["image"]).convert("RGB"))
    rects = np.array([f["rect"] for f in record["faces"]], dtype=np.float64)
    jitter = np.where(np.arange(rects.size).reshape(rects.shape) % 2, 0.4, -0.49)
    np.testing.assert_array_equal(predictor.predict(rgb, rects + jitter),
                                  np.array([f["landmarks5"] for f in record["faces"]], dtype=np.float32))


def test_dlib_rectangles_round_half_away_from_zero_exactly() -> None:
    # std::lround: 0.49999999999999994 is below one half (floor(|x| + 0.5) would give 1).
    boxes = np.array([[0.49999999999999994, -0.49999999999999994, 2.5, -2.5]])
    np.testing.assert_array_equal(dlib_rectangles(boxes), [[0, 0, 3, -3]])
    assert dlib_rectangles(np.zeros((0, 4))).shape == (0, 4)


def test_landmarks_edge_cases(predictor: LandmarkPredictor) -> None:
    rgb = np.zeros((40, 30, 3), np.uint8)
    out = predictor.predict(rgb, np.zeros((0, 4)))
    assert out.shape == (0, 5, 2) and out.dtype == np.float32
    # A box far outside the image reads only zero features; it still yields 5 points in the box.
    far = predictor.predict(rgb, np.array([[1000.0, 1000.0, 1099.0, 1099.0]]))
    assert far.shape == (1, 5, 2)
    assert np.all((far >= 1000) & (far <= 1099))
    with pytest.raises(InvalidInput):
        predictor.predict(rgb[..., 0], np.array([[0.0, 0.0, 10.0, 10.0]]))
    with pytest.raises(InvalidInput):
        predictor.predict(rgb, np.array([[0.0, 0.0, 10.0]]))


def test_from_manifest_loads_the_landmarks_file(landmarks_npz: Path) -> None:
    manifest = ModelManifest(
        name="t", version="1", embedding_dim=128, metric="euclidean", threshold=0.6, chip=DLIB_CHIP,
        files={"landmarks": ModelFile(landmarks_npz.name, sha256_file(landmarks_npz))},
    )
    assert LandmarkPredictor.from_manifest(landmarks_npz.parent, manifest).num_parts == 5


# -- face chips -----------------------------------------------------------------------------

@pytest.mark.slow
def test_chips_match_dlib_on_every_golden_face(parity: dict[str, np.ndarray]) -> None:
    diff = parity["chip"]
    exact = int(np.count_nonzero(diff == 0))
    print(f"chips: {exact}/{diff.size} identical to dlib's get_face_chip, max abs grey-level diff {diff.max()}, "
          f"{parity['chip_pixels'].sum()} differing channel values in all")
    assert diff.size == 501
    assert diff.max() <= 1
    assert exact >= 0.99 * diff.size


def _similar_landmarks(scale: float, angle: float, shift: tuple[float, float], spec: ChipSpec) -> np.ndarray:
    """The template's chip points moved by a known similarity transform into an image."""
    chip_points = (spec.padding + np.asarray(spec.template)) / (2 * spec.padding + 1) * spec.size
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return chip_points @ (scale * rot).T + np.asarray(shift)


@pytest.mark.parametrize("size,padding", [(150, 0.25), (112, 0.1), (96, 0.0)])
@pytest.mark.parametrize("scale,angle", [(1.0, 0.0), (2.7, 0.3), (0.6, -1.2)])
def test_chip_transform_recovers_a_known_similarity(size: int, padding: float, scale: float, angle: float) -> None:
    spec = ChipSpec(size, padding, DLIB_5POINT_TEMPLATE)
    shift = (40.5, -7.25)
    details = chip_transform(_similar_landmarks(scale, angle, shift, spec), spec)
    assert details.size == size
    assert details.angle == pytest.approx(angle, abs=1e-12)
    # The chip centre (size/2, size/2) maps to the rect centre; the rect is size*scale wide.
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    center = scale * rot @ np.array([size / 2, size / 2]) + np.asarray(shift)
    half = (size * scale - 1) / 2
    assert details.rect == pytest.approx((center[0] - half, center[1] - half, center[0] + half, center[1] + half),
                                         abs=1e-9)


def test_unrotated_same_size_chip_is_a_crop(shared_dir: Path) -> None:
    """The fast path: angle exactly 0 and rect size = chip size copies the lround'ed rect."""
    rgb = np.asarray(Image.open(shared_dir / "faces" / "skimage" / "eileen_collins" / "astronaut.png").convert("RGB"))
    # A 4-point dyadic template keeps every step exact, so the angle is exactly 0.
    spec = ChipSpec(128, 0.0, ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)))
    landmarks = np.array(spec.template) * 128 + np.array([100.0, 20.0])
    details = chip_transform(landmarks, spec)
    # dlib's rect is centred on T(size/2, size/2), half a pixel right/down of the chip grid.
    assert details.angle == 0 and details.rect == (100.5, 20.5, 227.5, 147.5)
    np.testing.assert_array_equal(extract_chip(rgb, landmarks, spec), rgb[21:149, 101:229])


def test_chip_of_a_rotated_template_samples_the_rotated_grid(shared_dir: Path) -> None:
    """A small rotation (no pyramid): chip pixel (c, r) is the bilinear sample at T(c + 1/2, r + 1/2).

    T is the similarity template -> landmarks; the half pixel is dlib's convention (the chip
    rect is centred on T(size/2, size/2) and is size*scale - 1 wide).
    """
    rgb = np.asarray(Image.open(shared_dir / "faces" / "skimage" / "eileen_collins" / "astronaut.png").convert("RGB"))
    spec = ChipSpec(96, 0.1, DLIB_5POINT_TEMPLATE)
    angle, shift = 0.2, (120.0, 30.0)
    chip = extract_chip(rgb, _similar_landmarks(1.0, angle, shift, spec), spec)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    for r, c in [(0, 0), (10, 50), (47, 47), (95, 3), (60, 90), (95, 95)]:
        u, v = c + 0.5, r + 0.5
        x, y = cos_a * u - sin_a * v + shift[0], sin_a * u + cos_a * v + shift[1]
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        patch = rgb[y0:y0 + 2, x0:x0 + 2].astype(np.float64)
        want = (1 - fy) * ((1 - fx) * patch[0, 0] + fx * patch[0, 1]) + fy * ((1 - fx) * patch[1, 0] + fx * patch[1, 1])
        np.testing.assert_array_equal(chip[r, c], np.floor(want + 1e-9).astype(np.uint8), err_msg=str((r, c)))


def test_pyramid_down2_is_the_separable_14641_filter() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(23, 30, 3), dtype=np.uint8)
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])
    want = np.array([[[(kernel * img[2 * r:2 * r + 5, 2 * c:2 * c + 5, ch].astype(np.int64)).sum() // 256
                       for ch in range(3)] for c in range((30 - 3) // 2)] for r in range((23 - 3) // 2)])
    np.testing.assert_array_equal(pyramid_down2(img), want)
    assert pyramid_down2(img[:8]).shape == (0, 0, 3)


def test_chip_input_validation() -> None:
    rgb = np.zeros((50, 50, 3), np.uint8)
    assert extract_chips(rgb, np.zeros((0, 5, 2)), DLIB_CHIP).shape == (0, 150, 150, 3)
    with pytest.raises(InvalidInput):
        extract_chip(rgb[..., 0], np.zeros((5, 2)), DLIB_CHIP)
    with pytest.raises(InvalidInput):
        extract_chip(rgb.astype(np.float32), np.zeros((5, 2)), DLIB_CHIP)
    with pytest.raises(InvalidInput):
        extract_chip(rgb, np.zeros((4, 2)), DLIB_CHIP)
    # A face entirely outside the image gives a black chip.
    far = _similar_landmarks(3.0, 0.5, (5000.0, 5000.0), DLIB_CHIP)
    assert not extract_chip(rgb, far, DLIB_CHIP).any()
