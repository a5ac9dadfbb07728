"""End-to-end parity with dlib 20.0.1 on the real photos of ../shared/golden_dlib.

For every golden image the whole pipeline runs (detect -> landmarks -> chip -> embed) in its
dlib-compatible setting (no automatic rescaling; dlib's upsample count for that image), and each
face dlib found must be found again (IoU >= 0.9), with landmarks within 1.5 px and, for at least
98% of the faces, an embedding within L2 0.03 of dlib's descriptor.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from facegallery.server.face.detect import DetectionConfig

pytestmark = pytest.mark.slow


def iou(a, b) -> float:
    """Intersection over union of two inclusive-pixel rectangles (left, top, right, bottom)."""
    w = min(a[2], b[2]) - max(a[0], b[0]) + 1
    h = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def golden_results(golden, shared_dir, pipeline):
    """(golden record, faces found by our pipeline) for every golden image."""

    def run(record):
        # decoded exactly as the golden data was: Pillow convert("RGB"), no EXIF transpose
        rgb = np.asarray(Image.open(shared_dir / "faces" / record["image"]).convert("RGB"))
        config = DetectionConfig(upsample=record["face_upsample"], rescale=False)
        return record, pipeline.analyze(rgb, detection=config)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, golden))


def _matches(golden_results):
    """One row per golden face: (image, golden face, our best-IoU face or None, IoU)."""
    rows = []
    for record, faces in golden_results:
        for gface in record["faces"]:
            scored = [(iou(gface["rect"], f.box), f) for f in faces]
            best_iou, best = max(scored, key=lambda t: t[0], default=(0.0, None))
            rows.append((record["image"], gface, best, best_iou))
    return rows


def test_golden_set_size(golden):
    assert len(golden) >= 470 and sum(len(r["faces"]) for r in golden) >= 490


def test_every_golden_face_is_found(golden_results):
    rows = _matches(golden_results)
    missed = [(img, g["rect"], round(i, 3)) for img, g, _, i in rows if i < 0.9]
    assert not missed, f"{len(missed)} of {len(rows)} golden faces not found with IoU >= 0.9: {missed[:10]}"


def test_no_extra_faces_on_no_face_photos(golden_results):
    noface = [(r["image"], len(faces)) for r, faces in golden_results if r["image"].startswith("_noface/")]
    assert len(noface) == 12
    assert [n for _, n in noface] == [len(r["faces"]) for r, _ in golden_results if r["image"].startswith("_noface/")]


def test_landmarks_within_1_5_px(golden_results):
    rows = [(img, g, f) for img, g, f, i in _matches(golden_results) if i >= 0.9]
    errors = np.array([np.abs(np.asarray(g["landmarks5"], np.float32) - f.landmarks).max() for _, g, f in rows])
    assert errors.size >= 490
    assert errors.max() <= 1.5, f"worst landmark error {errors.max():.2f} px"


def test_embeddings_match_dlib(golden_results):
    rows = [(img, g, f) for img, g, f, i in _matches(golden_results) if i >= 0.9]
    dist = np.array([np.linalg.norm(np.asarray(g["descriptor"], np.float32) - f.embedding) for _, g, f in rows])
    share = float(np.mean(dist <= 0.03))
    assert share >= 0.98, f"only {share:.3f} of faces within L2 0.03 (median {np.median(dist):.4f}, max {dist.max():.4f})"
    # and nothing is wildly off: a different face would be ~0.6+ away
    assert dist.max() < 0.3
