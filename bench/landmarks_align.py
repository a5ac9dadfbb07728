"""Benchmark: ms per face for the numpy landmark predictor and face-chip extraction.

Runs on the golden dlib faces of ../shared (real photos, 150 px LFW crops up to 4000 px
originals): landmarks from dlib's rects (all faces of an image in one call, and one face per
call), chips from dlib's landmarks (150 px, padding 0.25). Decoding is not timed.

    /work/venv/bin/python bench/landmarks_align.py [--limit 200]
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image

from facegallery.export.dlib.shape_predictor import convert_shape_predictor
from facegallery.server.contract.manifest import ChipSpec
from facegallery.server.face.align import DLIB_5POINT_TEMPLATE, extract_chip
from facegallery.server.face.landmarks import LandmarkPredictor

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = Path(importlib.util.find_spec("face_recognition_models").submodule_search_locations[0]) / "models"


@click.command()
@click.option("--limit", default=0, help="Use only the first N golden images with faces (0 = all).")
def main(limit: int) -> None:
    records = [json.loads(line) for line in (SHARED / "golden_dlib" / "golden.jsonl").read_text().splitlines()]
    records = [r for r in records if r["faces"]][: limit or None]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        convert_shape_predictor(MODELS / "shape_predictor_5_face_landmarks.dat", Path(tmp) / "sp.npz")
        convert_s = time.perf_counter() - start
        predictor = LandmarkPredictor.from_npz(Path(tmp) / "sp.npz")
    spec = ChipSpec(150, 0.25, DLIB_5POINT_TEMPLATE)

    batched = single = chips = 0.0
    faces = 0
    for record in records:
        rgb = np.asarray(Image.open(SHARED / "faces" / record["image"]).convert("RGB"))
        rects = np.array([f["rect"] for f in record["faces"]], dtype=np.float64)
        start = time.perf_counter()
        predictor.predict(rgb, rects)
        batched += time.perf_counter() - start
        for rect, face in zip(rects, record["faces"]):
            start = time.perf_counter()
            predictor.predict(rgb, rect[None])
            single += time.perf_counter() - start
            start = time.perf_counter()
            extract_chip(rgb, np.array(face["landmarks5"], dtype=np.float64), spec)
            chips += time.perf_counter() - start
        faces += len(rects)

    print(f"{len(records)} images, {faces} faces; shape predictor .dat -> .npz conversion {convert_s:.2f} s")
    print(f"landmarks, one call per image : {1000 * batched / faces:7.2f} ms/face")
    print(f"landmarks, one call per face  : {1000 * single / faces:7.2f} ms/face")
    print(f"face chip 150 px, per face    : {1000 * chips / faces:7.2f} ms/face")
    print(f"landmarks + chip per face     : {1000 * (single + chips) / faces:7.2f} ms/face "
          f"({faces / (single + chips):.0f} faces/s on one core)")


if __name__ == "__main__":
    main()
