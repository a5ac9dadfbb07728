"""``model.json``: the embedding id covers exactly what changes an embedding; writes are atomic."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import pytest
from fakes import fake_manifest

from facegallery.server.contract.manifest import MANIFEST_NAME, ChipSpec, ModelFile, ModelManifest


def _with_embedder_sha(manifest: ModelManifest, sha256: str) -> ModelManifest:
    files = dict(manifest.files, embedder=ModelFile(manifest.files["embedder"].path, sha256))
    return manifest.with_updates(files=files)


def _with_chip(manifest: ModelManifest, **changes) -> ModelManifest:
    return manifest.with_updates(chip=dataclasses.replace(manifest.chip, **changes))


BASE = fake_manifest()

#: One manifest per ingredient of the embedding id, each differing from BASE in that one thing.
CHANGED = {
    "embedder-file": _with_embedder_sha(BASE, "0" * 64),
    "embedding-dim": BASE.with_updates(embedding_dim=64),
    "metric": BASE.with_updates(metric="cosine"),
    "chip-size": _with_chip(BASE, size=112),
    "chip-padding": _with_chip(BASE, padding=0.2),
    "chip-template": _with_chip(BASE, template=((0.21, 0.3),) + BASE.chip.template[1:]),
    "embedder-input": BASE.with_updates(embedder_input=dict(BASE.embedder_input, range=[-1, 1])),
}

#: Fields that do not change the embedding a face gets, hence not its id.
UNCHANGED = {
    "name-version": BASE.with_updates(name="renamed", version="2"),
    "threshold": BASE.with_updates(threshold=0.5),
    "detector-landmarks-files": BASE.with_updates(
        files=dict(BASE.files, detector=ModelFile("d.onnx", "1" * 64), landmarks=ModelFile("l.onnx", "2" * 64))
    ),
    "sources-calibration": BASE.with_updates(sources={"x.dat": "3" * 64}, calibration={"far": 1e-3}),
    "detector-params": BASE.with_updates(detector={"window": 80}),
    "embedder-path": BASE.with_updates(files=dict(BASE.files, embedder=ModelFile("elsewhere.onnx", BASE.files["embedder"].sha256))),
}


def test_embedding_id_is_64_hex_and_model_id_is_the_id_without_flip():
    assert re.fullmatch(r"[0-9a-f]{64}", BASE.embedding_id())
    assert BASE.model_id == BASE.embedding_id(False) == BASE.embedding_id()
    assert BASE.model_id != BASE.files["embedder"].sha256  # no longer the embedder file's hash alone


def test_flip_augmentation_changes_the_id():
    assert BASE.embedding_id(True) != BASE.embedding_id(False)
    assert re.fullmatch(r"[0-9a-f]{64}", BASE.embedding_id(True))


@pytest.mark.parametrize("name", CHANGED)
def test_each_ingredient_changes_the_id(name):
    changed = CHANGED[name]
    assert changed.embedding_id(False) != BASE.embedding_id(False)
    assert changed.embedding_id(True) != BASE.embedding_id(True)


def test_every_ingredient_gives_a_distinct_id():
    ids = [m.embedding_id(flip) for m in (BASE, *CHANGED.values()) for flip in (False, True)]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", UNCHANGED)
def test_other_fields_leave_the_id_alone(name):
    assert UNCHANGED[name].embedding_id(False) == BASE.embedding_id(False)
    assert UNCHANGED[name].embedding_id(True) == BASE.embedding_id(True)


def test_the_id_is_stable_across_json_round_trips_and_dict_order():
    again = ModelManifest.from_json(json.loads(json.dumps(BASE.to_json())))
    assert again.embedding_id(False) == BASE.embedding_id(False) and again.embedding_id(True) == BASE.embedding_id(True)
    reordered = BASE.with_updates(embedder_input=dict(reversed(list(BASE.embedder_input.items()))))
    assert reordered.embedding_id() == BASE.embedding_id()
    assert fake_manifest().embedding_id() == BASE.embedding_id()  # a fresh equal manifest, same id
    as_ints = BASE.with_updates(chip=ChipSpec(150, 0.25, ((0, 1),) * 5))  # numbers, not their Python types
    assert as_ints.embedding_id() == BASE.with_updates(chip=ChipSpec(150, 0.25, ((0.0, 1.0),) * 5)).embedding_id()


def test_write_is_atomic_and_round_trips(tmp_path):
    path = BASE.write(tmp_path)
    assert path == tmp_path / MANIFEST_NAME and path.read_text(encoding="utf-8").endswith("}\n")
    assert ModelManifest.from_json(json.loads(path.read_text(encoding="utf-8"))) == BASE
    BASE.with_updates(threshold=0.5).write(tmp_path)  # replaces the file, leaves no temporary behind
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST_NAME]
    assert json.loads(path.read_text(encoding="utf-8"))["threshold"] == 0.5


def test_the_id_is_pinned():
    """Galleries store the id: a change of what is hashed, or how, must be deliberate (and bump
    ``EMBEDDING_ID_FORMAT``), never a side effect of refactoring."""
    manifest = ModelManifest(
        name="pinned", version="1", embedding_dim=128, metric="euclidean", threshold=0.6,
        chip=ChipSpec(150, 0.25, ((0.1, 0.2), (0.3, 0.2), (0.7, 0.2), (0.5, 0.2), (0.5, 0.6))),
        files={"embedder": ModelFile("embedder.onnx", "ab" * 32)},
    )  # fmt: skip
    canonical = (
        '{"chip":{"padding":0.25,"size":150,"template":[[0.1,0.2],[0.3,0.2],[0.7,0.2],[0.5,0.2],[0.5,0.6]]},'
        '"embedder_input":{"color":"RGB","dtype":"float32","layout":"NHWC","name":"image","range":[0,255]},'
        '"embedder_sha256":"' + "ab" * 32 + '","embedding_dim":128,"flip_augment":false,'
        '"format":"facegallery-embedding-id/1","metric":"euclidean"}'
    )
    assert manifest.embedding_id(False) == hashlib.sha256(canonical.encode()).hexdigest()
    assert manifest.embedding_id(False) == "cd0a766a4065d442c1d8085060dca8e2bc1e5e23680e1f7ac2b7362d14556152"
    assert manifest.embedding_id(True) == "78a533a881f0bf8f022e1cb7f8e5fcf4cd55715364eff81c3f9016a092582a6b"
