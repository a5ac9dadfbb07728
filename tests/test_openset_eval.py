"""``facegallery eval openset``: the protocol builder, the open-set metrics, the embedding cache,
the run against the real gallery code (offline, synthetic embeddings) and one slow end-to-end run
on a few real LFW people."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facegallery.export.evaluate import metrics, openset
from facegallery.export.evaluate.openset import Answer, PolicyOptions, Probe, build_protocol, list_identity_images

from fakes import FakePipeline, person_embedding

# ---------------------------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------------------------

#: identity -> number of photos
COUNTS = {"ann": 1, "bob": 2, "cat": 3, "dan": 4, "eve": 8, "fay": 1, "gus": 1}


def listing(counts: dict[str, int] = COUNTS) -> dict[str, list[str]]:
    # unsorted on purpose: build_protocol sorts each identity's photos
    return {name: [f"{name}/{name}_{i:04d}.jpg" for i in reversed(range(1, n + 1))] for name, n in counts.items()}


def test_list_identity_images_skips_hidden_non_images_and_empty_folders(tmp_path):
    for rel in ["ann/b.jpg", "ann/a.PNG", "ann/.hidden.jpg", "ann/notes.txt", ".trash/x.jpg", "bob/x.jpeg", "loose.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "ann" / "sub.jpg").mkdir()  # a directory with an image suffix is not an image
    assert list_identity_images(tmp_path) == {"ann": ["ann/a.PNG", "ann/b.jpg"], "bob": ["bob/x.jpeg"]}
    with pytest.raises(FileNotFoundError):
        list_identity_images(tmp_path / "missing")


def test_protocol_k1_enrolls_first_photo_probes_the_next_ones_and_strangers_have_one_photo():
    p = build_protocol(listing(), enroll_per_identity=1, max_probes=5)
    assert p.enrolled == {"bob": ("bob/bob_0001.jpg",), "cat": ("cat/cat_0001.jpg",), "dan": ("dan/dan_0001.jpg",), "eve": ("eve/eve_0001.jpg",)}
    assert [x.path for x in p.genuine if x.identity_id == "eve"] == [f"eve/eve_{i:04d}.jpg" for i in range(2, 7)]  # 5 of 7
    assert len(p.genuine) == 1 + 2 + 3 + 5
    assert p.impostors == (Probe("ann/ann_0001.jpg", "ann"), Probe("fay/fay_0001.jpg", "fay"), Probe("gus/gus_0001.jpg", "gus"))
    assert p.neither == () and p.left_out == ()
    assert len(p.image_paths()) == 4 + 11 + 3 and p.image_paths() == sorted(p.image_paths())


def test_protocol_k3_people_with_two_or_three_photos_are_neither():
    p = build_protocol(listing(), enroll_per_identity=3, max_probes=2)
    assert p.enrolled == {"dan": ("dan/dan_0001.jpg", "dan/dan_0002.jpg", "dan/dan_0003.jpg"), "eve": ("eve/eve_0001.jpg", "eve/eve_0002.jpg", "eve/eve_0003.jpg")}
    assert [x.path for x in p.genuine] == ["dan/dan_0004.jpg", "eve/eve_0004.jpg", "eve/eve_0005.jpg"]
    assert p.neither == ("bob", "cat")
    assert [x.identity_id for x in p.impostors] == ["ann", "fay", "gus"]  # the same strangers as for K = 1


def test_protocol_gallery_size_draws_a_seeded_subset_and_drops_the_others_probes():
    counts = {f"p{i:02d}": 3 for i in range(20)} | {f"s{i:02d}": 1 for i in range(5)}
    a = build_protocol(listing(counts), gallery_size=5, seed=1)
    assert a == build_protocol(listing(counts), gallery_size=5, seed=1)
    assert len(a.enrolled) == 5 and len(a.left_out) == 15 and set(a.enrolled) | set(a.left_out) == {f"p{i:02d}" for i in range(20)}
    assert {x.identity_id for x in a.genuine} == set(a.enrolled) and len(a.genuine) == 10
    assert len(a.impostors) == 5  # the left-out people are not strangers
    others = {tuple(build_protocol(listing(counts), gallery_size=5, seed=s).enrolled) for s in range(2, 6)}
    assert len(others | {tuple(a.enrolled)}) > 1
    assert build_protocol(listing(counts), gallery_size=20).left_out == ()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gallery_size": 5}, "gallery_size must be 1..4"),
        ({"gallery_size": 0}, "gallery_size must be 1..4"),
        ({"enroll_per_identity": 0}, "enroll_per_identity"),
        ({"max_probes": 0}, "max_probes"),
    ],
    ids=["too-big", "zero", "k0", "probes0"],
)
def test_protocol_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_protocol(listing(), **kwargs)


def test_policy_options_reject_contradictions():
    with pytest.raises(ValueError, match="not both"):
        PolicyOptions(threshold=0.6, target_fpir=0.01)
    with pytest.raises(ValueError, match="go with a target FPIR"):
        PolicyOptions(normalization="snorm")
    with pytest.raises(ValueError, match="aggregation goes with"):
        PolicyOptions(aggregation="mean")
    PolicyOptions(target_fpir=0.01, normalization="none", cohort_size=50)


# ---------------------------------------------------------------------------------------------
# Metrics, by hand
# ---------------------------------------------------------------------------------------------

# 4 genuine searches: scores 0.2 (right), 0.3 (wrong person on top), 0.5 (right), 0.9 (right)
GENUINE = np.array([0.2, 0.3, 0.5, 0.9])
CORRECT = np.array([True, False, True, True])
# 10 strangers
IMPOSTOR = np.array([0.4, 0.6, 0.7, 0.8, 0.85, 0.95, 1.0, 1.1, 1.2, np.inf])


def test_open_set_rates_by_hand():
    assert metrics.open_set_rates(GENUINE, CORRECT, IMPOSTOR, 0.5) == (0.1, 0.5)  # 0.4 | 0.2, 0.5
    assert metrics.open_set_rates(GENUINE, CORRECT, IMPOSTOR, 0.3) == (0.0, 0.25)  # the wrong top at 0.3 is no hit
    assert metrics.open_set_rates(GENUINE, CORRECT, IMPOSTOR, math.inf) == (1.0, 0.75)
    fpir, dir_ = metrics.open_set_rates([], [], [], 1.0)
    assert math.isnan(fpir) and math.isnan(dir_)


def test_threshold_and_dir_at_fpir_by_hand():
    # FPIR 0.1 of 10: one stranger may pass -> just below the second stranger score, 0.6
    t = metrics.threshold_at_fpir(IMPOSTOR, 0.1)
    assert 0.59 < t < 0.6
    point = metrics.dir_at_fpir(GENUINE, CORRECT, IMPOSTOR, 0.1)
    assert point == {"dir": 0.5, "threshold": t, "fpir": 0.1, "impostors": 10}
    # 0.15 still allows one; 0.2 allows two (t just below 0.7)
    assert metrics.dir_at_fpir(GENUINE, CORRECT, IMPOSTOR, 0.15)["threshold"] == t
    assert metrics.dir_at_fpir(GENUINE, CORRECT, IMPOSTOR, 0.2)["fpir"] == 0.2
    # 0.01 needs 100 strangers
    assert metrics.min_impostors_for_fpir(0.01) == 100 and metrics.min_impostors_for_fpir(0.001) == 1000 and metrics.min_impostors_for_fpir(0.1) == 10
    assert metrics.dir_at_fpir(GENUINE, CORRECT, IMPOSTOR, 0.01) is None
    assert metrics.dir_at_fpir([], [], IMPOSTOR, 0.1) is None


def test_threshold_at_fpir_keeps_tied_strangers_out():
    assert metrics.threshold_at_fpir([0.5, 0.5, 0.7, 0.9], 0.25) < 0.5  # one may pass, but two tie at 0.5


def test_det_curve_by_hand():
    fpir, fnir, thresholds = metrics.det_curve(GENUINE, CORRECT, IMPOSTOR)
    assert thresholds[0] == 0.2 and thresholds[-1] == 1.2 and np.all(np.diff(thresholds) > 0)
    at = dict(zip(thresholds.tolist(), zip(fpir.tolist(), fnir.tolist())))
    assert at[0.2] == (0.0, 0.75)
    assert at[0.5] == (0.1, 0.5)
    assert at[0.9] == pytest.approx((0.5, 0.25))
    assert at[1.2] == pytest.approx((0.9, 0.25))  # the wrong-top search is never a hit
    assert np.all(np.diff(fpir) >= 0) and np.all(np.diff(fnir) <= 0)


# ---------------------------------------------------------------------------------------------
# The run and its figures, against a scripted gallery
# ---------------------------------------------------------------------------------------------


class ScriptedGallery:
    """A gallery whose answers are a function of the probe's first coordinate (its "score")."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.enrolled: list[tuple[str, np.ndarray]] = []

    def enroll(self, templates):
        self.enrolled = list(templates)
        return len(self.enrolled)

    def identify(self, embedding):
        score, who = float(embedding[0]), {1.0: "bob", 2.0: "cat"}.get(float(embedding[1]))
        decision = who if score <= self.threshold else None
        return Answer(who, decision, score, score, self.threshold, "distance", min(1.0, score))

    def status(self):
        return {"name": f"threshold {self.threshold:g}"}


def test_run_and_summary_count_answers_and_faceless_images():
    p = build_protocol(listing({"bob": 3, "cat": 2, "dan": 2, "s1": 1, "s2": 1, "s3": 1}), max_probes=5)
    e = {path: np.array([0.0, 0.0], np.float32) for path in p.image_paths()}
    e["dan/dan_0001.jpg"] = None  # dan cannot be enrolled: his probe is dropped
    e["bob/bob_0002.jpg"] = np.array([0.3, 1.0], np.float32)  # right, accepted
    e["bob/bob_0003.jpg"] = np.array([0.7, 1.0], np.float32)  # right on top, rejected
    e["cat/cat_0002.jpg"] = np.array([0.4, 1.0], np.float32)  # bob on top: accepted as the wrong person
    e["s1/s1_0001.jpg"] = np.array([0.45, 2.0], np.float32)  # a stranger accepted
    e["s2/s2_0001.jpg"] = np.array([0.9, 2.0], np.float32)
    e["s3/s3_0001.jpg"] = None
    run = openset.run_protocol(p, e, ScriptedGallery(), workers=2, progress=False)
    assert [i for i, _ in run.genuine] == [Probe("bob/bob_0002.jpg", "bob"), Probe("bob/bob_0003.jpg", "bob"), Probe("cat/cat_0002.jpg", "cat")]
    assert run.no_face == {"enroll": 1, "unenrolled": 1, "genuine": 0, "impostors": 1}
    s = openset.summarize(run, fpirs=(0.5,))
    assert (s["gallery"], s["templates"], s["genuine"], s["impostors"]) == (2, 2, 3, 2)
    assert s["rank1"] == pytest.approx(2 / 3)
    assert s["dir_at_fpir"] == {"0.5": pytest.approx(2 / 3)}  # t just below 0.9: both bob probes
    policy = s["policy"]
    assert policy["name"] == "threshold 0.5" and policy["fpir"] == 0.5
    assert policy["dir"] == pytest.approx(1 / 3) and policy["wrong_identity"] == pytest.approx(1 / 3)
    assert policy["threshold"] == 0.5 and policy["score_kind"] == "distance" and policy["inconsistent"] == 0
    assert policy["estimated_fpir_mean_impostor"] == pytest.approx((0.45 + 0.9) / 2)
    assert policy["estimated_fpir_at_measured"] == {"0.5": pytest.approx(0.45)}  # the stranger of rank 1 of 2
    json.dumps(s, allow_nan=False)
    assert openset.jsonable({"a": [math.nan, 1.0], "b": math.inf, "c": "x"}) == {"a": [None, 1.0], "b": None, "c": "x"}
    text = "\n".join(openset.format_summary(s))
    assert "closed-set rank-1: 0.667" in text and "FPIR 0.5000" in text and "WARNING" not in text


def test_summary_flags_answers_that_contradict_their_threshold():
    class Contrary(ScriptedGallery):
        def identify(self, embedding):
            a = super().identify(embedding)
            return Answer(a.top_identity, a.top_identity, a.score, a.distance, a.threshold, a.score_kind, a.estimated_fpir)

    p = build_protocol(listing({"bob": 2, "s1": 1}))
    e = {"bob/bob_0001.jpg": np.zeros(2, np.float32), "bob/bob_0002.jpg": np.array([0.9, 1.0], np.float32), "s1/s1_0001.jpg": np.array([0.2, 2.0], np.float32)}
    s = openset.summarize(openset.run_protocol(p, e, Contrary(), progress=False))
    assert s["policy"]["inconsistent"] == 1
    assert "WARNING: 1 answers" in "\n".join(openset.format_summary(s))


# ---------------------------------------------------------------------------------------------
# The real gallery code, offline, on synthetic embeddings
# ---------------------------------------------------------------------------------------------


def synthetic(n_people: int, n_strangers: int, photos: int = 3):
    """A listing and embeddings: person i's photos are fakes.person_embedding(i, 0, blue)."""
    counts = {f"p{i:03d}": photos for i in range(n_people)} | {f"s{i:03d}": 1 for i in range(n_strangers)}
    images = listing(counts)
    embeddings = {}
    for name, paths in images.items():
        red, green = int(name[1:]), 0 if name[0] == "p" else 1
        for j, path in enumerate(sorted(paths)):
            embeddings[path] = person_embedding(red, green, 40 + 60 * j)
    return images, embeddings


def test_offline_run_uses_the_gallery_layer_decisions():
    from facegallery.client.eval_openset import open_gallery

    images, embeddings = synthetic(12, 15)
    protocol = build_protocol(images, max_probes=2)
    with open_gallery(FakePipeline(), PolicyOptions(threshold=0.6)) as gallery:
        run = openset.run_protocol(protocol, embeddings, gallery, progress=False)
    s = openset.summarize(run)
    assert (s["gallery"], s["genuine"], s["impostors"]) == (12, 24, 15)
    assert s["rank1"] == 1.0 and s["policy"]["dir"] == 1.0 and s["policy"]["fpir"] == 0.0  # fakes: people ~sqrt(2) apart
    assert s["policy"]["name"] == "threshold 0.6" and s["policy"]["score_kind"] == "distance" and s["policy"]["threshold"] == 0.6
    assert s["policy"]["status"]["basis"] and s["policy"]["inconsistent"] == 0
    assert s["dir_at_fpir"] == {"0.1": 1.0, "0.01": None, "0.001": None}
    # scores are the gallery's L2 distances
    (probe, answer) = run.genuine[0]
    enrolled = embeddings[protocol.enrolled[probe.identity_id][0]]
    assert answer.score == pytest.approx(float(np.linalg.norm(embeddings[probe.path] - enrolled)), abs=1e-5)


def test_offline_run_with_a_target_fpir_policy():
    from facegallery.client.eval_openset import open_gallery

    images, embeddings = synthetic(20, 10)
    with open_gallery(FakePipeline(), PolicyOptions(target_fpir=0.05, normalization="none")) as gallery:
        run = openset.run_protocol(build_protocol(images), embeddings, gallery, progress=False)
    s = openset.summarize(run)
    assert s["policy"]["name"].startswith("target FPIR 0.05, no normalisation") and s["policy"]["score_kind"] == "distance"
    assert s["policy"]["inconsistent"] == 0
    assert all(a.estimated_fpir is None or 0 <= a.estimated_fpir <= 1 for _, a in run.impostors)


def test_offline_gallery_refuses_a_bad_policy_as_usage_error():
    import click

    from facegallery.client.eval_openset import open_gallery

    with pytest.raises(click.UsageError, match="cohort size"):
        with open_gallery(FakePipeline(), PolicyOptions(target_fpir=0.01, cohort_size=5000)):
            pass


# ---------------------------------------------------------------------------------------------
# The command, with the model and the images faked
# ---------------------------------------------------------------------------------------------


def tree(root: Path, images: dict[str, list[str]]) -> Path:
    for paths in images.values():
        for rel in paths:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"not decoded: embeddings are faked")
    return root


@pytest.fixture
def fake_embedding_run(tmp_path, monkeypatch):
    """``eval openset`` over a synthetic tree with the pipeline and the embedding faked."""
    import facegallery.export.evaluate.cli as eval_cli
    import facegallery.export.evaluate.embedding_cache as cache

    images, embeddings = synthetic(12, 15)
    root = tree(tmp_path / "faces", images)
    monkeypatch.setattr(eval_cli, "load_pipeline", lambda model_dir, flip_augment=False: FakePipeline())
    monkeypatch.setattr(cache, "cached_embeddings", lambda pipeline, images_dir, paths, **kw: {p: embeddings[p] for p in paths})
    return root


def invoke(*args: str):
    from facegallery.client.eval_openset import eval_group

    return CliRunner().invoke(eval_group(), ["openset", *args])


def test_cli_json_has_the_documented_shape(fake_embedding_run, tmp_path):
    result = invoke("--images", str(fake_embedding_run), "--threshold", "0.6", "--json", "--plot", str(tmp_path / "det.png"))
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert {"gallery", "genuine", "impostors", "rank1", "dir_at_fpir", "policy"} <= set(s)
    assert set(s["dir_at_fpir"]) == {"0.1", "0.01", "0.001"} and {"name", "fpir", "dir"} <= set(s["policy"])
    assert (s["gallery"], s["genuine"], s["impostors"], s["policy"]["fpir"], s["policy"]["dir"]) == (12, 24, 15, 0.0, 1.0)
    assert s["model_id"] == FakePipeline().model_id and set(s["seconds"]) == {"model", "embeddings", "enroll", "probes"}
    assert (tmp_path / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_text_and_gallery_size(fake_embedding_run):
    result = invoke("--images", str(fake_embedding_run), "--gallery-size", "5", "--seed", "3", "--target-fpir", "0.1", "--normalization", "none")
    assert result.exit_code == 0, result.output
    assert "gallery: 5 identities" in result.output and "15 impostor" in result.output and "policy 'target FPIR 0.1, no normalisation" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--threshold", "0.6", "--target-fpir", "0.01"], "not both"),
        (["--normalization", "snorm"], "go with a target FPIR"),
        (["--aggregation", "mean"], "aggregation goes with"),
        (["--server", "localhost:1"], "--server and --gallery go together"),
        (["--gallery-size", "1000"], "gallery_size must be 1..12"),
    ],
    ids=["both-policies", "normalization-alone", "aggregation-alone", "server-alone", "gallery-too-big"],
)
def test_cli_usage_errors(fake_embedding_run, args, message):
    result = invoke("--images", str(fake_embedding_run), *args)
    assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------------------------------------
# The embedding cache
# ---------------------------------------------------------------------------------------------


class CountingPipeline:
    """Enough of FacePipeline for embed_lfw_images: decode limits, model id, analyze (one face per image)."""

    def __init__(self, model_id: str = "m" * 64) -> None:
        from facegallery.server.face.pipeline import PipelineConfig

        self.config = PipelineConfig()
        self.manifest = FakePipeline().manifest
        self.model_id = model_id
        self.calls = 0

    def analyze(self, rgb):
        from facegallery.server.contract.face import Face

        self.calls += 1
        if rgb.mean() == 0:
            return []
        e = np.full(128, float(rgb.mean()), np.float32)
        return [Face(box=np.array([0, 0, 9, 9], np.float32), landmarks=np.zeros((5, 2), np.float32), score=1.0, embedding=e)]


def png(value: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_embedding_cache_reuses_current_entries_and_redoes_changed_images(tmp_path):
    import os

    from facegallery.export.evaluate.embedding_cache import cache_file, cached_embeddings

    root, cache = tmp_path / "faces", tmp_path / "cache"
    for rel, value in {"a/1.png": 10, "a/2.png": 20, "b/1.png": 0}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(png(value))
    paths = ["a/1.png", "a/2.png", "b/1.png"]
    first = CountingPipeline()
    e1 = cached_embeddings(first, root, paths, cache_dir=cache, progress=False)
    assert first.calls == 3 and e1["b/1.png"] is None and e1["a/2.png"][0] == 20
    assert cache_file(first.model_id, root, cache).is_file()
    again = CountingPipeline()
    e2 = cached_embeddings(again, root, paths, cache_dir=cache, progress=False)
    assert again.calls == 0 and e2["b/1.png"] is None and np.array_equal(e2["a/1.png"], e1["a/1.png"])
    (root / "a/2.png").write_bytes(png(30))  # a new size (or mtime) is a new image
    os.utime(root / "a/2.png", ns=(1, 1))
    changed = CountingPipeline()
    assert cached_embeddings(changed, root, paths, cache_dir=cache, progress=False)["a/2.png"][0] == 30 and changed.calls == 1
    other = CountingPipeline("n" * 64)  # another model: its own file
    cached_embeddings(other, root, paths[:1], cache_dir=cache, progress=False)
    assert other.calls == 1 and cache_file(other.model_id, root, cache) != cache_file(first.model_id, root, cache)


def test_embedding_cache_ignores_a_corrupt_file(tmp_path):
    from facegallery.export.evaluate.embedding_cache import cache_file, cached_embeddings

    root, cache = tmp_path / "faces", tmp_path / "cache"
    (root / "a").mkdir(parents=True)
    (root / "a/1.png").write_bytes(png(10))
    pipeline = CountingPipeline()
    cache.mkdir()
    cache_file(pipeline.model_id, root, cache).write_bytes(b"garbage")
    assert cached_embeddings(pipeline, root, ["a/1.png"], cache_dir=cache, progress=False)["a/1.png"][0] == 10


# ---------------------------------------------------------------------------------------------
# End to end with the real model on a few LFW people
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_openset_on_real_lfw_people(shared_dir, model_dir, tmp_path, monkeypatch):
    lfw = shared_dir / "faces" / "lfw"
    people = sorted(d.name for d in lfw.iterdir() if d.is_dir())
    enrolled = [p for p in people if 4 <= len(list((lfw / p).iterdir())) <= 6][:6]
    strangers = [p for p in people if len(list((lfw / p).iterdir())) == 1][:12]
    root = tmp_path / "lfw"
    for person in enrolled + strangers:
        (root / person).mkdir(parents=True)
        for image in (lfw / person).iterdir():
            (root / person / image.name).symlink_to(image)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["--images", str(root), "--model-dir", str(model_dir), "--threshold", "0.6", "--max-probes", "2", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert (s["gallery"], s["genuine"] + s["no_face"]["genuine"], s["impostors"] + s["no_face"]["impostors"]) == (6, 12, 12)
    assert s["rank1"] >= 0.9 and s["policy"]["dir"] >= 0.8 and s["policy"]["score_kind"] == "distance"
    assert s["dir_at_fpir"]["0.1"] is not None and s["dir_at_fpir"]["0.01"] is None
    assert list((tmp_path / "cache" / "facegallery" / "embeddings").glob("*.npz"))
    again = invoke(*args)  # from the cache: the same figures
    assert json.loads(again.stdout)["policy"] == s["policy"]


def test_offline_run_with_the_default_policy_on_a_gallery_big_enough_for_snorm():
    from facegallery.client.eval_openset import open_gallery
    from facegallery.server.gallery.decision import SNORM_MIN_IDENTITIES

    images, embeddings = synthetic(SNORM_MIN_IDENTITIES + 20, 40, photos=2)
    with open_gallery(FakePipeline(), PolicyOptions()) as gallery:
        run = openset.run_protocol(build_protocol(images), embeddings, gallery, progress=False)
    s = openset.summarize(run)
    assert s["policy"]["score_kind"] == "snorm" and s["policy"]["status"]["score_kind"] == "snorm"
    assert s["policy"]["inconsistent"] == 0 and "threshold_range" not in s["policy"]
    assert s["rank1"] == 1.0 and s["policy"]["dir"] > 0.9 and s["policy"]["fpir"] <= 0.1


@pytest.mark.parametrize(
    "options, expected",
    [
        (PolicyOptions(), "DEFAULT_POLICY"),
        (PolicyOptions(threshold=0.5), "threshold 0.5"),
        (PolicyOptions(threshold=0.5, aggregation="mean"), "threshold 0.5, mean template"),
        (PolicyOptions(target_fpir=0.01, normalization="none", aggregation="nearest"), "target FPIR 0.01, no normalisation"),
        (PolicyOptions(target_fpir=0.02, cohort_size=50, aggregation="nearest"), "target FPIR 0.02, S-norm k=50"),
    ],
    ids=["default", "fixed", "fixed-mean", "target-none", "target-snorm"],
)
def test_policy_options_become_the_gallery_layer_policy(options, expected):
    from facegallery.client.eval_openset import _decision_policy
    from facegallery.server.gallery.decision import DEFAULT_POLICY

    assert _decision_policy(options).describe() == (DEFAULT_POLICY.describe() if expected == "DEFAULT_POLICY" else expected)


def test_policy_options_left_out_take_the_servers_create_gallery_defaults():
    from facegallery.client.eval_openset import _decision_policy
    from facegallery.server.gallery.decision import DEFAULT_POLICY

    policy = _decision_policy(PolicyOptions(target_fpir=0.05))
    assert (policy.normalization, policy.cohort_size, policy.aggregation) == (DEFAULT_POLICY.normalization, DEFAULT_POLICY.cohort_size, DEFAULT_POLICY.aggregation)


def test_offline_run_with_mean_templates():
    from facegallery.client.eval_openset import open_gallery

    images, embeddings = synthetic(12, 15, photos=5)
    with open_gallery(FakePipeline(), PolicyOptions(threshold=0.6, aggregation="mean")) as gallery:
        run = openset.run_protocol(build_protocol(images, enroll_per_identity=3), embeddings, gallery, progress=False)
    s = openset.summarize(run)
    assert s["policy"]["name"] == "threshold 0.6, mean template" and (s["gallery"], s["templates"], s["genuine"]) == (12, 36, 24)
    assert s["rank1"] == 1.0 and s["policy"]["inconsistent"] == 0
    # the distance is to the mean of the three enrolled templates
    probe, answer = run.genuine[0]
    mean = np.mean([embeddings[path] for path in build_protocol(images, enroll_per_identity=3).enrolled[probe.identity_id]], axis=0)
    assert answer.distance == pytest.approx(float(np.linalg.norm(embeddings[probe.path] - mean)), abs=1e-5)
