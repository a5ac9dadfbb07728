"""``facegallery calibrate`` (export/train/calibrate.py): threshold and false-match curve in model.json.

Fast: a model directory with placeholder files and aligned-chip "photos" whose pixel value is the
embedding a stand-in embedder returns, so the distances are known by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import facegallery.export.train.calibrate as calibrate_module
from facegallery.export.train.calibrate import all_pairs_distances, false_match_curve
from facegallery.export.train.cli import calibrate as calibrate_command
from facegallery.server.contract.manifest import MANIFEST_NAME, ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.gallery.decision import FalseMatchCurve

CHIP = 4
# Positions on a line (the embedding is (x, 0)): three people, two photos each.
POSITIONS = {"ann": (0, 1), "bob": (3, 4), "cat": (6, 7)}
# The 12 different-person distances, by hand:
#   ann-bob |0-3| |0-4| |1-3| |1-4| = 3 4 2 3;  ann-cat 6 7 5 6;  bob-cat 3 4 2 3
#   sorted: 2 2 3 3 3 3 4 4 5 6 6 7 -> F1 at each distinct distance = (# <= d) / 12
EXPECTED_DISTANCES = [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
EXPECTED_RATES = [0.1667, 0.5, 0.6667, 0.75, 0.9167, 1.0]  # 2/12 6/12 8/12 9/12 11/12 12/12


class LineEmbedder:
    """Stand-in for Embedder: the embedding of a chip is (its red value / 10, 0)."""

    @classmethod
    def from_manifest(cls, model_dir, manifest, **threads):
        return cls()

    def embed(self, chips: np.ndarray) -> np.ndarray:
        x = np.asarray(chips)[:, 0, 0, 0].astype(np.float32) / 10
        return np.stack([x, np.zeros_like(x)], axis=1)


def _model_dir(root: Path) -> Path:
    """A model directory whose files are placeholders (calibrate only checks their checksums)."""
    root.mkdir()
    files = {}
    for role in ("embedder", "detector", "landmarks"):
        (root / f"{role}.bin").write_bytes(role.encode())
        files[role] = ModelFile(f"{role}.bin", sha256_file(root / f"{role}.bin"))
    template = ((0.8, 0.2), (0.6, 0.2), (0.1, 0.2), (0.3, 0.2), (0.5, 0.6))
    ModelManifest(name="line", version="1", embedding_dim=2, metric="euclidean", threshold=9.0,
                  chip=ChipSpec(CHIP, 0.25, template), files=files).write(root)
    return root


def _chip_photos(root: Path) -> Path:
    """``root/<person>/<n>.png``: uniform chips of value 10 x position."""
    for person, xs in POSITIONS.items():
        (root / person).mkdir(parents=True)
        for n, x in enumerate(xs):
            Image.fromarray(np.full((CHIP, CHIP, 3), 10 * x, np.uint8)).save(root / person / f"{n}.png")
    return root


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(calibrate_module, "Embedder", LineEmbedder)
    return _model_dir(tmp_path / "model"), _chip_photos(tmp_path / "people"), tmp_path / "cache"


def test_calibrate_writes_threshold_and_false_match_curve(setup):
    model, people, cache = setup
    result = calibrate_module.calibrate(model, people, far=0.25, kind="aligned-chip", cache_dir=cache, progress=False)
    assert (result.genuine, result.impostor, result.identities, result.images) == (3, 12, 3, 6)
    assert result.far <= 0.25 and result.tar == 1.0  # the same-person pairs are all at distance 1
    manifest = ModelManifest.load(model)  # the placeholder files' checksums still verify
    assert manifest.threshold == pytest.approx(result.threshold)
    record = manifest.false_match
    assert record == result.false_match
    assert record["distances"] == EXPECTED_DISTANCES and record["rates"] == EXPECTED_RATES
    assert record["pairs"] == 12 and "people" in record["data"]
    curve = FalseMatchCurve.from_json(record)
    assert curve.rate(3.0) == 0.5 and curve.rate(1.9) == 0.0 and curve.pairs == 12
    assert "false_match" not in manifest.calibration  # stored once, as model.json false_match


def test_calibrate_cli_dry_run_leaves_model_json_alone(setup):
    model, people, cache = setup
    before = (model / MANIFEST_NAME).read_text()
    args = [str(model), str(people), "--far", "0.25", "--kind", "aligned-chip", "--min-images", "2", "--cache-dir", str(cache)]
    result = CliRunner().invoke(calibrate_command, [*args, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "false-match curve: 6 points" in result.output and "unchanged" in result.output
    assert (model / MANIFEST_NAME).read_text() == before
    result = CliRunner().invoke(calibrate_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["false_match"]["rates"] == EXPECTED_RATES
    assert ModelManifest.load(model).false_match["distances"] == EXPECTED_DISTANCES


def test_false_match_curve_of_hand_made_embeddings():
    embeddings = np.array([[x, 0.0] for xs in POSITIONS.values() for x in xs], np.float32)
    labels = np.repeat(np.arange(3), 2)
    distances, same = all_pairs_distances(embeddings, labels)
    assert sorted(distances[same]) == [1.0, 1.0, 1.0]
    record = false_match_curve(distances[~same], data="hand-made")
    assert record == {"distances": EXPECTED_DISTANCES, "rates": EXPECTED_RATES, "pairs": 12, "data": "hand-made"}


def test_false_match_curve_counts_each_rate_exactly():
    rng = np.random.default_rng(0)
    dist = rng.gamma(20.0, 0.05, size=100_000)
    record = false_match_curve(dist, data="gamma")
    curve = FalseMatchCurve.from_json(record)  # ascending distances, non-decreasing rates
    assert 60 <= len(curve.distances) <= 81 and curve.pairs == len(dist)
    exact = np.array([(dist <= d).mean() for d in curve.distances])
    np.testing.assert_allclose(curve.rates, exact, rtol=5e-4)  # 4 significant digits
    assert curve.rates[0] == pytest.approx(1e-5) and curve.rates[-1] == 1.0  # from 1 / pairs to 1
    assert 0.5 in record["rates"]  # the median is always tabulated
    assert curve.distances[-1] == pytest.approx(dist.max(), abs=1e-5)


def test_false_match_curve_needs_two_distinct_distances():
    assert false_match_curve(np.full(10, 0.7), data="ties") is None
    assert false_match_curve(np.array([0.7]), data="one") is None
