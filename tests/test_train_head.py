"""The learned same-person head (export/train/head.py) and its server runtime (server/face/same_head.py).

Real embeddings: dlib's own 128-D descriptors of the shared photos (``golden_dlib/golden.jsonl``,
raw, not L2-normalised, signed components), one face per image, identity = source/folder. The head
is fitted on half of the identities and judged on pairs of the other half.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx
import pytest
import torch

from facegallery.export.onnx_common import OPSET
from facegallery.export.train.head import CHI2_EPS, SameHeadNet, export_head, fit_head, pair_features
from facegallery.server.contract.errors import EmbeddingShapeError, ModelError
from facegallery.server.contract.manifest import ModelFile, ModelManifest, sha256_file
from facegallery.server.face.same_head import SameHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def descriptors(golden: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 128) float32 dlib descriptors, (N,) identity labels, (N,) bool "held-out identity"."""
    rows, names = [], []
    for record in golden:
        source = record["image"].split("/")
        if source[0].startswith("_") or len(record["faces"]) != 1:
            continue
        rows.append(record["faces"][0]["descriptor"])
        names.append("/".join(source[:2]))
    identities = sorted(set(names))
    labels = np.array([identities.index(n) for n in names])
    # A fixed, content-based split of the identities into two halves.
    held_out = np.array([hashlib.sha256(n.encode()).digest()[0] % 2 == 1 for n in names])
    return np.asarray(rows, dtype=np.float32), labels, held_out


def test_pair_features_by_hand():
    a = torch.tensor([[1.0, -0.5, 0.0, -0.2]])
    b = torch.tensor([[0.5, 0.5, 0.0, -0.6]])
    assert pair_features(a, b, "abs_diff").tolist()[0] == pytest.approx([0.5, 1.0, 0.0, 0.4])
    # chi2 with the |a|+|b| denominator: 0.25/1.5, 1/1 (a+b would be 0 here), 0/eps = 0, 0.16/0.8
    chi2 = pair_features(a, b, "chi2").tolist()[0]
    assert chi2 == pytest.approx([0.25 / (1.5 + CHI2_EPS), 1.0 / (1.0 + CHI2_EPS), 0.0, 0.16 / (0.8 + CHI2_EPS)])
    # never negative, never above |a - b|
    x, y = torch.randn(200, 16), torch.randn(200, 16)
    f = pair_features(x, y, "chi2")
    assert torch.all(f >= 0) and torch.all(f <= (x - y).abs() + 1e-6) and torch.isfinite(f).all()
    with pytest.raises(ValueError, match="head kind"):
        pair_features(a, b, "cosine")


@pytest.mark.parametrize("kind", ["abs_diff", "chi2"])
def test_head_separates_unseen_identities(descriptors, kind):
    embeddings, labels, held_out = descriptors
    fit = fit_head(embeddings[~held_out], labels[~held_out], kind=kind, n_pairs=4000, steps=300, seed=0)
    # every pair of the held-out identities' images
    test, test_labels = embeddings[held_out], labels[held_out]
    i, j = np.triu_indices(len(test), k=1)
    same = test_labels[i] == test_labels[j]
    assert same.sum() >= 50 and (~same).sum() >= 1000
    with torch.no_grad():
        p = fit.head(torch.from_numpy(test[i]), torch.from_numpy(test[j])).numpy()
    tar, tnr = float(np.mean(p[same] >= 0.5)), float(np.mean(p[~same] < 0.5))
    # chance is 0.5 balanced accuracy; dlib descriptors of unseen people separate far better
    assert (tar + tnr) / 2 > 0.85, (tar, tnr)
    assert float(np.mean(p[same])) > float(np.mean(p[~same])) + 0.4


@pytest.fixture(scope="module")
def exported_head(tmp_path_factory, descriptors) -> tuple[SameHeadNet, object]:
    embeddings, labels, _ = descriptors
    head = fit_head(embeddings, labels, kind="chi2", n_pairs=2000, steps=100, seed=1).head
    path = tmp_path_factory.mktemp("head") / "head.onnx"
    assert export_head(head, path) <= 1e-5
    assert [p.name for p in path.parent.iterdir()] == ["head.onnx"]  # written atomically, no temp left
    assert onnx.load(path).opset_import[0].version == OPSET
    return head, path


def test_server_head_matches_torch(exported_head, descriptors):
    head, path = exported_head
    embeddings = descriptors[0]
    runtime = SameHead(path, embedding_dim=128, kind="chi2")
    for n in (1, 7, 50):
        a, b = embeddings[:n], embeddings[-n:]
        with torch.no_grad():
            expected = head(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        got = runtime.probability_same(a, b)
        assert got.shape == (n,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert runtime.probability_same(np.zeros((0, 128), np.float32), np.zeros((0, 128), np.float32)).shape == (0,)
    with pytest.raises(EmbeddingShapeError):
        runtime.probability_same(embeddings[:2], embeddings[:3])
    with pytest.raises(EmbeddingShapeError):
        runtime.probability_same(embeddings[:2, :64], embeddings[:2, :64])
    with pytest.raises(ModelError, match=r"expected tensor\(float\) \[N, 64\]"):
        SameHead(path, embedding_dim=64, kind="chi2")


def test_from_manifest(exported_head, model_dir, tmp_path):
    default = ModelManifest.load(model_dir, verify=False)
    assert SameHead.from_manifest(model_dir, default) is None
    _, path = exported_head
    (tmp_path / "head.onnx").write_bytes(path.read_bytes())
    files = {**default.files, "head": ModelFile("head.onnx", sha256_file(tmp_path / "head.onnx"))}
    with_head = dataclasses.replace(default, files=files, head={"kind": "chi2"})
    head = SameHead.from_manifest(tmp_path, with_head)
    assert isinstance(head, SameHead) and head.kind == "chi2"
    with pytest.raises(ModelError, match="both"):
        SameHead.from_manifest(tmp_path, dataclasses.replace(default, files=files))
