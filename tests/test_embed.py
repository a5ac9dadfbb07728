"""dlib ResNet → ONNX conversion and the Embedder, against dlib 20.0.1's own descriptors."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from facegallery.export.dlib.convert import DLIB_SOURCES, find_dlib_models
from facegallery.export.dlib.dat_format import DlibFormatError
from facegallery.export.dlib.resnet import Affine, DlibResNet, convert_resnet, read_resnet
from facegallery.export.onnx_common import IR_VERSION, OPSET, save_model
from facegallery.server.contract.errors import InvalidInput, ModelError
from facegallery.server.contract.manifest import ChipSpec, ModelFile, ModelManifest, sha256_file
from facegallery.server.face.embed import Embedder
from facegallery.server.face.onnx_session import open_session

# Spec (b) "Face recognition ResNet": parameter count of the dlib model and its layer census.
DLIB_PARAM_COUNT = 5_614_592
CHIP, DIM = 150, 128


@pytest.fixture(scope="module")
def dat_path() -> Path:
    return find_dlib_models() / DLIB_SOURCES["embedder"]


@pytest.fixture(scope="module")
def net(dat_path: Path) -> DlibResNet:
    return read_resnet(dat_path)


@pytest.fixture(scope="module")
def converted(dat_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    onnx_path = tmp_path_factory.mktemp("resnet") / "embedder.onnx"
    info = convert_resnet(dat_path, onnx_path)
    return onnx_path, info


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Embedder:
    """The served embedder: the default model directory's, through its model.json."""
    return Embedder.from_manifest(model_dir, ModelManifest.load(model_dir, verify=False), intra_op_threads=1)


@pytest.fixture(scope="module")
def golden_chips(golden: list[dict], shared_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """All golden chips ``(F, 150, 150, 3) uint8`` and dlib's descriptors ``(F, 128) float32``."""
    faces = [face for record in golden for face in record["faces"]]
    root = shared_dir / "golden_dlib"
    chips = np.stack([np.asarray(Image.open(root / face["chip"]).convert("RGB")) for face in faces])
    descriptors = np.array([face["descriptor"] for face in faces], dtype=np.float32)
    return chips, descriptors


def test_convert_reports_the_file_values(converted: tuple[Path, dict]) -> None:
    _, info = converted
    # Values stored in the .dat (spec (a) input_rgb_image_sized, loss_metric_2).
    assert info == {
        "embedding_dim": 128,
        "chip_size": 150,
        "input_mean_rgb": [122.782, 117.001, 104.298],
        "scale": 1 / 256,
        "threshold": 0.6,
    }


def test_reader_layer_census_and_params(net: DlibResNet) -> None:
    census = collections.Counter(type(layer).__name__ for layer in net.layers)
    assert (census["Conv"], census["Affine"], census["AddPrev"], census["AvgPool"], census["MaxPool"]) == (29, 29, 14, 5, 1)
    assert net.param_count == DLIB_PARAM_COUNT
    assert net.margin == pytest.approx(0.04) and net.dist_thresh == pytest.approx(0.6)


@pytest.mark.parametrize("edit", [lambda b: b[:-1], lambda b: b + b"\x00"], ids=["truncated", "trailing-byte"])
def test_reader_needs_the_exact_file(dat_path: Path, tmp_path: Path, edit) -> None:
    bad = tmp_path / "resnet.dat"
    bad.write_bytes(edit(dat_path.read_bytes()))
    with pytest.raises(DlibFormatError):
        read_resnet(bad)


def test_graph_is_valid_and_holds_every_weight(converted: tuple[Path, dict], net: DlibResNet) -> None:
    model = onnx.load(converted[0])
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET == 17
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert (ops["Conv"], ops["Add"], ops["AveragePool"], ops["GlobalAveragePool"], ops["MaxPool"], ops["MatMul"]) == (29, 14, 4, 1, 1, 1)
    # The 5 Pads: channel 32->64, 64->128, 128->256 on the pooled shortcuts, 3x3->4x4 and 1x1->2x2 on
    # the main branches of the last two down-blocks (spec (b) table).
    assert ops["Pad"] == 5
    # Folding the 29 affines into their convs drops their 2*C parameters and nothing else.
    init = {t.name: t for t in model.graph.initializer}
    weight_names = {name for node in model.graph.node if node.op_type in ("Conv", "MatMul") for name in node.input[1:]}
    graph_weights = sum(int(np.prod(init[name].dims)) for name in weight_names)
    affine_params = sum(2 * layer.gamma.size for layer in net.layers if isinstance(layer, Affine))
    assert graph_weights == DLIB_PARAM_COUNT - affine_params


@pytest.mark.slow
def test_matches_dlib_on_all_golden_chips(embedder: Embedder, golden_chips: tuple[np.ndarray, np.ndarray]) -> None:
    chips, expected = golden_chips
    got = np.concatenate([embedder.embed(chips[i : i + 32]) for i in range(0, len(chips), 32)])
    assert got.shape == expected.shape == (501, DIM) and got.dtype == np.float32
    max_diff = float(np.abs(got - expected).max())
    assert max_diff < 1e-4, f"max abs diff vs dlib {max_diff:.3g}"


def test_batch_independent(embedder: Embedder, golden_chips: tuple[np.ndarray, np.ndarray]) -> None:
    chips = golden_chips[0][::70][:7]
    batched = embedder.embed(chips)
    single = np.concatenate([embedder.embed(chip[None]) for chip in chips])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    # uint8 and float32 inputs are the same pixels
    np.testing.assert_array_equal(embedder.embed(chips.astype(np.float32)), batched)


def test_empty_batch(embedder: Embedder) -> None:
    out = embedder.embed(np.zeros((0, CHIP, CHIP, 3), np.uint8))
    assert out.shape == (0, DIM) and out.dtype == np.float32


@pytest.mark.parametrize(
    "shape, dtype",
    [((CHIP, CHIP, 3), np.uint8), ((1, CHIP - 1, CHIP, 3), np.uint8), ((1, CHIP, CHIP, 4), np.uint8), ((1, CHIP, CHIP, 3), np.float64)],
    ids=["no-batch-axis", "wrong-size", "rgba", "float64"],
)
def test_rejects_bad_chips(embedder: Embedder, shape: tuple[int, ...], dtype: type) -> None:
    with pytest.raises(InvalidInput):
        embedder.embed(np.zeros(shape, dtype))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chip_size": 112, "embedding_dim": DIM},
        {"chip_size": CHIP, "embedding_dim": 512},
        {"chip_size": CHIP, "embedding_dim": DIM, "input_name": "input"},
    ],
    ids=["chip-size", "embedding-dim", "input-name"],
)
def test_load_rejects_mismatched_declaration(converted: tuple[Path, dict], kwargs: dict) -> None:
    with pytest.raises(ModelError):
        Embedder(converted[0], intra_op_threads=1, **kwargs)


def test_load_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot load embedder .*absent.onnx"):
        Embedder(tmp_path / "absent.onnx", chip_size=CHIP, embedding_dim=DIM)


def test_open_session_reports_a_corrupt_file_as_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a protobuf")
    with pytest.raises(ModelError, match=r"cannot load detector graph .*garbage\.onnx"):
        open_session(bad, intra_op_threads=1, what="detector graph")


def _identity_model() -> onnx.ModelProto:
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["N"])  # noqa: E731
    graph = onnx.helper.make_graph([node], "identity", [value("x")], [value("y")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def test_open_session_settings_and_save_model_leaves_only_the_file(tmp_path: Path) -> None:
    path = save_model(_identity_model(), tmp_path / "identity.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["identity.onnx"]  # no temporary file left behind
    session = open_session(path, intra_op_threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_array_equal(session.run(["y"], {"x": np.arange(3, dtype=np.float32)})[0], [0, 1, 2])


def test_save_model_failure_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_model(_identity_model(), tmp_path / "identity.onnx")
    before = path.read_bytes()

    def torn(model, f, *args, **kwargs):
        f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", torn)
    with pytest.raises(OSError, match="disk full"):
        save_model(_identity_model(), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["identity.onnx"]


def _manifest(onnx_path: Path, **embedder_input: object) -> ModelManifest:
    return ModelManifest(
        name="dlib_face_recognition_resnet_model_v1",
        version="1",
        embedding_dim=DIM,
        metric="euclidean",
        threshold=0.6,
        chip=ChipSpec(CHIP, 0.25, ((0.0, 0.0),) * 5),
        files={"embedder": ModelFile(onnx_path.name, sha256_file(onnx_path))},
        embedder_input={"name": "image", "layout": "NHWC", "color": "RGB", "range": [0, 255], "dtype": "float32", **embedder_input},
    )


def test_repr_lists_the_declaration(embedder: Embedder) -> None:
    text = repr(embedder)
    assert "chip_size=150" in text and "embedding_dim=128" in text and "input_name='image'" in text


def test_from_manifest_rejects_unsupported_input_convention(converted: tuple[Path, dict]) -> None:
    onnx_path = converted[0]
    with pytest.raises(ModelError):
        Embedder.from_manifest(onnx_path.parent, _manifest(onnx_path, layout="NCHW"))
    with pytest.raises(ModelError):
        Embedder.from_manifest(onnx_path.parent, _manifest(onnx_path, range=[0, 1]))
