"""The facegallery CLI through click's CliRunner, against the fake gRPC server (fake_gallery.py)."""

from __future__ import annotations

import json
import socket
import types
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from fake_gallery import MODEL_ID, embedding_of, fixed, fpir_of, pixels_of, running_fake_server, threshold_for

from facegallery.client import _client
from facegallery.client._exceptions import Unavailable
from facegallery.client.cli import EXPORT_FORMAT, IMAGE_SUFFIXES, LAZY_COMMANDS, LazyGroup, main
from facegallery.export.train.data import IMAGE_SUFFIXES as TRAINING_IMAGE_SUFFIXES
from facegallery.v1 import gallery_service_pb2 as pb


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("FACEGALLERY_SERVER",):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def fake():
    with running_fake_server() as (address, servicer, _):
        yield types.SimpleNamespace(address=address, servicer=servicer)


@pytest.fixture()
def run(fake):
    """Invoke ``facegallery ARGS... --server <fake>``; returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str, server: bool = True):
        return runner.invoke(main, [*args, *(["--server", fake.address] if server else [])], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def faces_dir(shared_dir: Path) -> Path:
    return shared_dir / "faces" / "face_recognition"


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The group


def test_help_lists_client_and_lazily_imported_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    client_commands = {"enroll", "identify", "verify", "compare", "galleries", "identities", "delete", "import", "duplicates"}
    client_commands |= {"create-gallery", "update-gallery", "delete-gallery"}
    assert client_commands | {"export-gallery", "import-embeddings"} | set(LAZY_COMMANDS) <= listed


@pytest.mark.parametrize("name", sorted(LAZY_COMMANDS))
def test_every_lazy_command_resolves_to_its_click_command(name):
    command = main.get_command(click.Context(main), name)
    assert command.name == name and "unavailable" not in (command.help or "")


def test_a_lazy_command_whose_module_is_missing_is_listed_and_fails_cleanly():
    @click.command()
    def here() -> None:
        """A command defined in place."""
        click.echo("here ran")

    group = LazyGroup(
        "g",
        commands=[here],
        lazy_commands={"ghost": "facegallery.no_such_module:cmd", "galleries": "facegallery.client.cli:galleries"},
    )
    runner = CliRunner()
    help_text = runner.invoke(group, ["--help"]).output
    assert "ghost" in help_text and "unavailable" in help_text and "galleries" in help_text
    failed = runner.invoke(group, ["ghost", "--any", "args"])
    assert failed.exit_code == 1 and "ModuleNotFoundError" in failed.stderr
    assert runner.invoke(group, ["here"]).output == "here ran\n"
    assert group.get_command(click.Context(group), "galleries") is main.get_command(click.Context(main), "galleries")


# ---------------------------------------------------------------------------------------------
# Client commands


def test_enroll_then_identify_json_shapes(run, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    obama = faces_dir / "barack_obama" / "obama2.jpg"
    enrolled = run("enroll", "biden", str(biden), "--name", "Joe Biden", "--meta", "party=dem", "--json")
    assert enrolled.exit_code == 0, enrolled.output
    [line] = _json_lines(enrolled.stdout)
    assert line["image"] == str(biden) and line["identity_id"] == "biden" and line["identity_created"] is True
    assert len(line["box"]) == 4 and line["possible_duplicate"] is None

    result = run("identify", str(biden), str(obama), "--json", "--top-k", "1")
    assert result.exit_code == 0, result.output
    per_image = _json_lines(result.stdout)
    assert [p["image"] for p in per_image] == [str(biden), str(obama)]
    for p in per_image:
        assert set(p) == {"image", "faces"}
        for face in p["faces"]:
            assert set(face) == {"box", "identity_id", "distance", "score", "score_kind", "threshold", "estimated_fpir", "matches"}
            assert len(face["box"]) == 4 and len(face["matches"]) == 1
            assert set(face["matches"][0]) == {"identity_id", "distance", "score"}
            assert face["score_kind"] == "DISTANCE" and face["threshold"] == 0.6 and face["score"] == face["distance"]
            assert face["estimated_fpir"] == pytest.approx(fpir_of(face["score"], pb.SCORE_KIND_DISTANCE), rel=1e-5)
    assert per_image[0]["faces"][0]["identity_id"] == "biden"
    assert per_image[0]["faces"][0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert per_image[1]["faces"][0]["identity_id"] is None
    assert per_image[1]["faces"][0]["distance"] > 0.6


def test_human_output_is_readable_text(run, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    assert "enrolled as biden" in run("enroll", "biden", str(biden)).output
    identified = run("identify", str(biden)).output
    assert identified.startswith(f"{biden}: 1 face") and "biden (distance 0.000 <= threshold 0.600, estimated FPIR 4.5e-05)" in identified
    assert "biden: match (distance 0.000 <= threshold 0.600, estimated FAR 4.5e-05)" in run("verify", "biden", str(biden)).output
    assert run("galleries").output == (
        "default: 1 identity, 1 template; fixed threshold 0.600 (distance), estimated FPIR 0.018; model fake-model-s\n"
    )
    assert "biden: 1 template" in run("identities").output


def test_verify_compare_galleries_identities_delete(run, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    obama = faces_dir / "barack_obama" / "obama2.jpg"
    run("enroll", "biden", str(biden), "--name", "Joe")

    verified = json.loads(run("verify", "biden", str(obama), "--json").stdout)
    assert set(verified) == {"identity_id", "distance", "threshold", "is_match", "estimated_far"}
    assert verified["identity_id"] == "biden" and verified["is_match"] is False and verified["threshold"] == 0.6
    assert verified["estimated_far"] == pytest.approx(fpir_of(verified["distance"], pb.SCORE_KIND_DISTANCE), rel=1e-5)

    compared = json.loads(run("compare", str(biden), str(biden), "--json").stdout)
    assert compared["is_match"] is True and compared["distance"] == pytest.approx(0.0, abs=1e-6)
    assert set(compared) == {"distance", "threshold", "is_match", "estimated_far", "probability_same"}

    [gallery] = _json_lines(run("galleries", "--json").stdout)
    assert gallery["name"] == "default" and gallery["model_id"] == MODEL_ID and gallery["identity_count"] == 1
    assert gallery["policy"] == {"threshold": 0.6, "target_fpir": None, "normalization": "NONE", "cohort_size": 0, "aggregation": "NEAREST"}
    assert (gallery["score_kind"], gallery["threshold"], gallery["threshold_basis"]) == ("DISTANCE", 0.6, "fixed threshold")
    assert gallery["estimated_fpir"] == pytest.approx(fpir_of(0.6, pb.SCORE_KIND_DISTANCE), rel=1e-5)

    [identity] = _json_lines(run("identities", "--json").stdout)
    assert identity["identity_id"] == "biden" and identity["display_name"] == "Joe" and identity["template_count"] == 1

    deleted = json.loads(run("delete", "biden", "--json").stdout)
    assert deleted == {"identity_id": "biden", "deleted_templates": 1}
    assert run("identities", "--json").stdout == ""


def test_gallery_option_and_server_envvar(fake, faces_dir, monkeypatch):
    monkeypatch.setenv("FACEGALLERY_SERVER", fake.address)
    fake.servicer.galleries["staff"] = {"policy": fixed(0.5), "identities": {}}
    runner = CliRunner()
    result = runner.invoke(main, ["enroll", "ann", str(faces_dir / "joe_biden" / "biden.jpg"), "--gallery", "staff"])
    assert result.exit_code == 0, result.output
    assert list(fake.servicer.galleries["staff"]["identities"]) == ["ann"]
    assert fake.servicer.galleries["default"]["identities"] == {}


def test_errors_exit_with_1_and_usage_errors_with_2(run, faces_dir):
    biden = str(faces_dir / "joe_biden" / "biden.jpg")
    not_found = run("verify", "nobody", biden)
    assert not_found.exit_code == 1 and "NOT_FOUND" in not_found.stderr and not_found.stdout == ""
    assert run("identify", "/nonexistent.jpg").exit_code == 2
    assert run("enroll", "x", biden, "--meta", "novalue").exit_code == 2
    assert run("identify", biden, "--top-k", "0").exit_code == 2
    assert run("enroll", "x").exit_code == 2


def test_unreachable_server_exits_1_with_a_hint(faces_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    result = CliRunner().invoke(main, ["galleries", "--server", address, "--timeout", "5"])
    assert result.exit_code == 1 and "UNAVAILABLE" in result.stderr and address in result.stderr


# ---------------------------------------------------------------------------------------------
# Folder import and embedding export / import


def test_import_folder_is_resumable_and_reports_failures(run, fake, faces_dir, tmp_path):
    root = tmp_path / "people"
    for identity in ("joe_biden", "kit_harington"):
        (root / identity).mkdir(parents=True)
        for photo in sorted((faces_dir / identity).iterdir()):
            (root / identity / photo.name).symlink_to(photo)
    biden = faces_dir / "joe_biden" / "biden.jpg"
    (root / "joe_biden" / "copy_of_biden.JPG").symlink_to(biden)  # same bytes: skipped as already enrolled
    (root / "kit_harington" / "broken.png").write_bytes(b"not a png")
    (root / "tab\tname").mkdir()  # a folder name the server refuses as an identity id
    (root / "tab\tname" / "biden.jpg").symlink_to(biden)
    (root / "kit_harington" / "notes.txt").write_text("ignored: not an image suffix")
    (root / "README.md").write_text("ignored: not a folder")

    first = run("import", str(root), "--json")
    assert first.exit_code == 1  # one image failed
    summary = json.loads(first.stdout)
    assert (summary["enrolled"], summary["skipped"], summary["failed"]) == (5, 1, 2)
    bad_id, broken = summary["failures"]
    assert bad_id["identity_id"] == "tab\tname" and bad_id["code"] == "INVALID_ARGUMENT"
    assert broken["image"].endswith("broken.png") and broken["identity_id"] == "kit_harington"
    assert broken["code"] == "INVALID_ARGUMENT" and broken["message"]
    stored = fake.servicer.galleries["default"]["identities"]
    assert {k: len(v["templates"]) for k, v in stored.items()} == {"joe_biden": 2, "kit_harington": 3}

    (root / "kit_harington" / "broken.png").unlink()
    (root / "tab\tname" / "biden.jpg").unlink()
    second = run("import", str(root))
    assert second.exit_code == 0
    assert second.stdout.splitlines()[0] == "enrolled 0, skipped 6 (already enrolled), failed 0"
    assert {k: len(v["templates"]) for k, v in stored.items()} == {"joe_biden": 2, "kit_harington": 3}


def test_export_gallery_then_import_embeddings_round_trip(run, fake, faces_dir, tmp_path):
    for identity, name in (("joe_biden", "biden.jpg"), ("kit_harington", "john1.jpeg")):
        run("enroll", identity, str(faces_dir / identity / name), "--meta", f"who={identity}")
    path = tmp_path / "gallery.jsonl"

    exported = run("export-gallery", str(path), "--json")
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["templates"] == 2
    header, *lines = _json_lines(path.read_text())
    assert header["format"] == EXPORT_FORMAT and header["gallery"]["model_id"] == MODEL_ID
    assert [line["identity_id"] for line in lines] == ["joe_biden", "kit_harington"]
    assert lines[0]["metadata"] == {"who": "joe_biden"} and len(lines[0]["source_sha256"]) == 64

    imported = run("import-embeddings", str(path), "--gallery", "copy", "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.stdout)["imported"] == 2
    assert json.loads(run("import-embeddings", str(path), "--gallery", "copy", "--json").stdout)["skipped"] == 2
    original = fake.servicer.galleries["default"]["identities"]
    copied = fake.servicer.galleries["copy"]["identities"]
    for identity in original:
        np.testing.assert_array_equal(copied[identity]["templates"][0]["embedding"], original[identity]["templates"][0]["embedding"])
        assert copied[identity]["metadata"] == original[identity]["metadata"]


def _enroll_two(run, faces_dir) -> None:
    for identity, name in (("joe_biden", "biden.jpg"), ("kit_harington", "john1.jpeg")):
        run("enroll", identity, str(faces_dir / identity / name))


def test_export_gallery_interrupted_leaves_the_previous_file(run, faces_dir, tmp_path, monkeypatch):
    _enroll_two(run, faces_dir)
    path = tmp_path / "gallery.jsonl"
    path.write_text("the previous export\n")
    real = _client.GalleryClient.export_gallery

    def failing(self, *args, **kwargs):
        gallery, templates = real(self, *args, **kwargs)

        def broken():
            yield next(templates)
            raise Unavailable("connection lost", code=None)

        return gallery, broken()

    monkeypatch.setattr(_client.GalleryClient, "export_gallery", failing)
    result = run("export-gallery", str(path))
    assert result.exit_code == 1 and "connection lost" in result.stderr
    assert path.read_text() == "the previous export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.jsonl"]  # no partial temporary file


def test_export_gallery_to_stdout_streams(run, faces_dir):
    _enroll_two(run, faces_dir)
    result = run("export-gallery", "-")
    assert result.exit_code == 0, result.output
    header, *templates = _json_lines(result.stdout.split("exported ")[0])
    assert header["format"] == EXPORT_FORMAT and len(templates) == 2


def test_image_suffixes_are_one_set_with_netpbm():
    assert IMAGE_SUFFIXES is TRAINING_IMAGE_SUFFIXES
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm"} == IMAGE_SUFFIXES


def test_import_embeddings_rejects_a_malformed_file(run, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"format": "something-else"}\n')
    result = run("import-embeddings", str(path))
    assert result.exit_code == 1 and "format" in result.stderr
    path.write_text(json.dumps({"format": EXPORT_FORMAT, "gallery": {"model_id": MODEL_ID}}) + "\n{\"identity_id\": 1}\n")
    result = run("import-embeddings", str(path))
    assert result.exit_code == 1 and "line 2" in result.stderr
    # binary files: a one-line error naming the line, no traceback
    path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG, say
    result = run("import-embeddings", str(path))
    assert result.exit_code == 1 and "line 1 is not UTF-8" in result.stderr and "Traceback" not in result.output
    path.write_bytes(json.dumps({"format": EXPORT_FORMAT, "gallery": {"model_id": MODEL_ID}}).encode() + b"\n\xff\xfe\x00\x81garbage\n")
    result = run("import-embeddings", str(path))
    assert result.exit_code == 1 and "line 2 is not UTF-8" in result.stderr and "Traceback" not in result.output


def test_create_and_delete_gallery(run, fake, faces_dir):
    created = _json_lines(run("create-gallery", "--gallery", "staff", "--threshold", "0.5", "--json").stdout)
    assert created[0]["name"] == "staff" and created[0]["threshold"] == pytest.approx(0.5)
    assert fake.servicer.galleries["staff"]["policy"].threshold == pytest.approx(0.5)
    again = run("create-gallery", "--gallery", "staff")
    assert again.exit_code == 1 and "ALREADY_EXISTS" in again.output
    assert run("enroll", "ann", str(faces_dir / "barack_obama" / "obama.jpg"), "--gallery", "staff").exit_code == 0
    refused = run("delete-gallery", "--gallery", "staff")  # no confirmation on stdin
    assert refused.exit_code != 0 and "staff" in fake.servicer.galleries
    deleted = _json_lines(run("delete-gallery", "--gallery", "staff", "--yes", "--json").stdout)
    assert deleted == [{"gallery": "staff", "deleted_identities": 1, "deleted_templates": 1}]
    assert "staff" not in fake.servicer.galleries


def test_create_gallery_with_a_target_fpir_and_galleries_shows_the_policy(run, fake):
    created = run("create-gallery", "--gallery", "open", "--target-fpir", "0.01", "--cohort-size", "50")
    assert created.exit_code == 0, created.output
    snorm_threshold = threshold_for(0.01, pb.SCORE_KIND_SNORM)
    assert created.stdout == (
        f"created gallery open (target FPIR 0.01, S-norm k=50, mean template: threshold {snorm_threshold:.3f} (S-norm score), "
        "estimated FPIR 0; model fake-model-s)\n"
    )
    assert fake.servicer.requests[-1][1].policy == pb.DecisionPolicy(target_fpir=0.01, cohort_size=50)  # aggregation left to the server
    assert fake.servicer.galleries["open"]["policy"] == pb.DecisionPolicy(
        target_fpir=0.01, normalization=pb.SCORE_NORMALIZATION_SNORM, cohort_size=50, aggregation=pb.TEMPLATE_AGGREGATION_MEAN
    )
    plain = _json_lines(
        run("create-gallery", "--gallery", "plain", "--target-fpir", "0.1", "--normalization", "none", "--aggregation", "nearest", "--json").stdout
    )
    assert fake.servicer.requests[-1][1].policy.aggregation == pb.TEMPLATE_AGGREGATION_NEAREST
    assert plain[0]["policy"] == {"threshold": None, "target_fpir": 0.1, "normalization": "NONE", "cohort_size": 100, "aggregation": "NEAREST"}
    assert plain[0]["score_kind"] == "DISTANCE" and plain[0]["threshold"] == pytest.approx(threshold_for(0.1, pb.SCORE_KIND_DISTANCE), rel=1e-6)
    assert "target FPIR 0.01, S-norm k=100, mean template" in run("create-gallery", "--gallery", "by-default").stdout  # the server's default
    fixed_mean = run("create-gallery", "--gallery", "fixed-mean", "--threshold", "0.5", "--aggregation", "mean")
    assert fixed_mean.exit_code == 0, fixed_mean.output
    request = fake.servicer.requests[-1][1]
    assert not request.HasField("threshold") and request.policy == pb.DecisionPolicy(threshold=0.5, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    assert fixed_mean.stdout == "created gallery fixed-mean (fixed threshold 0.500 (distance), mean template, estimated FPIR 0; model fake-model-s)\n"

    lines = run("galleries").stdout.splitlines()
    assert (
        f"open: 0 identities, 0 templates; target FPIR 0.01, S-norm k=50, mean template: threshold {snorm_threshold:.3f} (S-norm score), "
        "estimated FPIR 0; model fake-model-s"
    ) in lines
    assert f"plain: 0 identities, 0 templates; target FPIR 0.1, no normalisation: threshold {plain[0]['threshold']:.3f} (distance), estimated FPIR 0; model fake-model-s" in lines
    assert "fixed-mean: 0 identities, 0 templates; fixed threshold 0.500 (distance), mean template, estimated FPIR 0; model fake-model-s" in lines
    assert "default: 0 identities, 0 templates; fixed threshold 0.600 (distance), estimated FPIR 0; model fake-model-s" in lines  # nearest
    as_json = {g["name"]: g for g in _json_lines(run("galleries", "--json").stdout)}
    assert as_json["open"]["threshold_basis"] == "the fake's logistic false-match curve" and as_json["open"]["score_kind"] == "SNORM"


@pytest.mark.parametrize(
    "args",
    [
        ["--threshold", "0.5", "--target-fpir", "0.01"],
        ["--threshold", "0.5", "--normalization", "none"],
        ["--cohort-size", "50"],
        ["--target-fpir", "1.5"],
        ["--target-fpir", "0.01", "--cohort-size", "1"],
        ["--target-fpir", "0.01", "--normalization", "zscore"],
        ["--threshold", "0"],
        ["--aggregation", "mean"],
        ["--threshold", "0.5", "--aggregation", "median"],
    ],
    ids=[
        "both", "normalization-with-threshold", "k-alone", "fpir-range", "k-range", "normalization-choice", "zero-threshold",
        "aggregation-alone", "aggregation-choice",
    ],
)
def test_policy_options_that_make_no_policy_are_usage_errors(run, fake, args):
    for command in ("create-gallery", "update-gallery"):
        result = run(command, "--gallery", "g", *args)
        assert result.exit_code == 2, (command, args, result.output)
    assert fake.servicer.requests == []


def test_update_gallery_then_identify_decides_on_the_new_scale(run, fake, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    obama = faces_dir / "barack_obama" / "obama2.jpg"
    run("enroll", "biden", str(biden))
    missing = run("update-gallery")
    assert missing.exit_code == 2 and "--threshold or --target-fpir" in missing.output

    updated = run("update-gallery", "--target-fpir", "0.3")
    assert updated.exit_code == 0, updated.output
    threshold = threshold_for(0.3, pb.SCORE_KIND_SNORM)
    assert updated.stdout == (
        f"updated gallery default (target FPIR 0.3, S-norm k=100, mean template: threshold {threshold:.3f} (S-norm score), estimated FPIR 0.3)\n"
    )
    assert [r.policy for name, r in fake.servicer.requests if name == "UpdateGallery"] == [pb.DecisionPolicy(target_fpir=0.3)]

    [per_image] = _json_lines(run("identify", str(obama), "--json").stdout)
    [face] = per_image["faces"]
    assert face["score_kind"] == "SNORM" and face["threshold"] == pytest.approx(threshold, rel=1e-6)
    assert face["score"] == pytest.approx((face["distance"] - 1.0) / 0.1, rel=1e-5) and face["matches"][0]["score"] == face["score"]
    assert face["estimated_fpir"] == pytest.approx(fpir_of(face["score"], pb.SCORE_KIND_SNORM), rel=1e-5)
    verdict = "<=" if face["identity_id"] else ">"
    text = run("identify", str(obama)).stdout.splitlines()[1]
    assert f"distance {face['distance']:.3f}, S-norm score {face['score']:.3f} {verdict} threshold {threshold:.3f}, estimated FPIR" in text
    # the override is on the S-norm scale, so it may be negative
    lenient = _json_lines(run("identify", str(obama), "--threshold", f"{face['score'] + 0.01}", "--json").stdout)[0]
    assert lenient["faces"][0]["identity_id"] == "biden"

    fixed_again = _json_lines(run("update-gallery", "--threshold", "0.55", "--json").stdout)[0]
    assert fixed_again["policy"]["threshold"] == 0.55 and fixed_again["score_kind"] == "DISTANCE"
    assert fixed_again["policy"]["aggregation"] == "NEAREST"
    assert run("update-gallery", "--gallery", "nowhere", "--threshold", "0.5").exit_code == 1


def test_update_gallery_aggregation_changes_the_distance_identify_reports(run, fake, faces_dir):
    first, second = faces_dir / "joe_biden" / "biden.jpg", faces_dir / "barack_obama" / "obama2.jpg"
    run("enroll", "joe", str(first))
    run("enroll", "joe", str(second))  # two templates of one identity
    e1, e2 = (embedding_of(pixels_of(path.read_bytes())) for path in (first, second))

    nearest = _json_lines(run("identify", str(first), "--json").stdout)[0]["faces"][0]
    assert nearest["distance"] == pytest.approx(0.0, abs=1e-6)  # "default" is a fixed 0.6 on the nearest template

    updated = run("update-gallery", "--threshold", "0.6", "--aggregation", "mean")
    assert updated.exit_code == 0, updated.output
    assert updated.stdout.startswith("updated gallery default (fixed threshold 0.600 (distance), mean template, estimated FPIR ")
    assert [r.policy for name, r in fake.servicer.requests if name == "UpdateGallery"] == [
        pb.DecisionPolicy(threshold=0.6, aggregation=pb.TEMPLATE_AGGREGATION_MEAN)
    ]
    by_mean = _json_lines(run("identify", str(first), "--json").stdout)[0]["faces"][0]
    expected = float(np.linalg.norm(e1 - (e1 + e2) / 2))  # half the distance between the two templates
    assert expected > 0.1 and by_mean["distance"] == pytest.approx(expected, rel=1e-5)
    assert "mean template" in run("galleries").stdout

    back = _json_lines(run("update-gallery", "--threshold", "0.6", "--aggregation", "nearest", "--json").stdout)[0]
    assert back["policy"]["aggregation"] == "NEAREST"
    assert _json_lines(run("identify", str(first), "--json").stdout)[0]["faces"][0]["distance"] == pytest.approx(0.0, abs=1e-6)


def test_identify_human_line_of_an_unknown_face_names_the_nearest(run, faces_dir):
    run("enroll", "biden", str(faces_dir / "joe_biden" / "biden.jpg"))
    [face] = _json_lines(run("identify", str(faces_dir / "barack_obama" / "obama2.jpg"), "--json").stdout)[0]["faces"]
    line = run("identify", str(faces_dir / "barack_obama" / "obama2.jpg")).stdout.splitlines()[1]
    expected = fpir_of(face["distance"], pb.SCORE_KIND_DISTANCE)
    assert line.endswith(f"unknown (nearest biden, distance {face['distance']:.3f} > threshold 0.600, estimated FPIR {expected:.2g})")


def test_verify_and_compare_leave_out_the_far_without_a_curve(run, fake, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    run("enroll", "biden", str(biden))
    fake.servicer.has_far_curve = False
    assert run("verify", "biden", str(biden)).stdout == "biden: match (distance 0.000 <= threshold 0.600)\n"
    assert json.loads(run("verify", "biden", str(biden), "--json").stdout)["estimated_far"] is None
    assert run("compare", str(biden), str(biden)).stdout == "same person (distance 0.000 <= threshold 0.600)\n"


def test_duplicates(run, fake, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    none = run("duplicates")
    assert none.exit_code == 0 and none.stdout == "gallery default: no likely duplicates (distance <= threshold 0.600)\n"
    assert run("duplicates", "--json").stdout == ""
    run("enroll", "biden", str(biden), "--name", "Joe Biden")
    assert run("enroll", "joe", str(biden)).stdout.endswith("\n  warning: also close to biden (distance 0.000)\n")
    run("enroll", "obama", str(faces_dir / "barack_obama" / "obama2.jpg"))

    text = run("duplicates").stdout.splitlines()
    expected = fpir_of(0.0, pb.SCORE_KIND_DISTANCE)
    assert text == [
        "gallery default: 1 likely duplicate pair (distance <= threshold 0.600)",
        f"  biden (Joe Biden) ~ joe: distance 0.000, estimated FPIR {expected:.2g}",
    ]
    [pair] = _json_lines(run("duplicates", "--max-pairs", "3", "--json").stdout)
    assert pair == {
        "identity_a": "biden", "display_name_a": "Joe Biden", "identity_b": "joe", "display_name_b": "",
        "score": pytest.approx(0.0, abs=1e-6), "distance": pytest.approx(0.0, abs=1e-6),
        "estimated_fpir": pytest.approx(expected, rel=1e-4), "score_kind": "DISTANCE", "threshold": 0.6,
    }  # fmt: skip
    assert [r.max_pairs for name, r in fake.servicer.requests if name == "FindDuplicates"][-1] == 3
    assert run("duplicates", "--max-pairs", "0").exit_code == 2
    assert run("duplicates", "--gallery", "nowhere").exit_code == 1

    run("update-gallery", "--target-fpir", "0.3")  # S-norm scores: the line gives both
    snormed = run("duplicates").stdout.splitlines()
    threshold = threshold_for(0.3, pb.SCORE_KIND_SNORM)
    assert snormed[0] == f"gallery default: 1 likely duplicate pair (S-norm score <= threshold {threshold:.3f})"
    assert snormed[1].startswith("  biden (Joe Biden) ~ joe: distance 0.000, S-norm score -10.000, estimated FPIR ")
    again = run("enroll", "joe", str(biden), "--json")
    assert json.loads(again.stdout)["possible_duplicate"] == {"identity_id": "biden", "distance": 0.0, "score": -10.0}
    assert "warning: also close to biden (distance 0.000, score -10.000)" in run("enroll", "joe", str(biden)).stdout


def test_an_fpir_the_server_cannot_estimate_reads_n_a_and_null(run, fake, faces_dir):
    biden = faces_dir / "joe_biden" / "biden.jpg"
    run("enroll", "biden", str(biden))
    run("enroll", "joe", str(biden))
    fake.servicer.can_estimate_fpir = False
    assert "biden (distance 0.000 <= threshold 0.600, estimated FPIR n/a)" in run("identify", str(biden)).stdout
    assert _json_lines(run("identify", str(biden), "--json").stdout)[0]["faces"][0]["estimated_fpir"] is None
    assert "estimated FPIR n/a; model" in run("galleries").stdout
    assert _json_lines(run("galleries", "--json").stdout)[0]["estimated_fpir"] is None
    assert run("duplicates").stdout.splitlines()[1].endswith("estimated FPIR n/a")
    assert _json_lines(run("duplicates", "--json").stdout)[0]["estimated_fpir"] is None
