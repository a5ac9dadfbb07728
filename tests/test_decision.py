"""Open-set decisions (decision.py, open_set.py) on hand-made scores and embeddings whose S-norm
scores, thresholds and FPIR estimates are computed by hand in the comments."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
from fakes import DIM, FakePipeline

from facegallery.server.contract.errors import GalleryClosed, InvalidInput
from facegallery.server.gallery.decision import (
    DEFAULT_POLICY,
    Aggregation,
    LOO_MIN_IDENTITIES,
    SNORM_MIN_IDENTITIES,
    DecisionPolicy,
    FalseMatchCurve,
    GumbelMin,
    Normalization,
    ScoreKind,
    calibrate,
    check_policy,
    choose_score_kind,
    cohort_stats,
    probe_cohort_stats,
    snorm,
)
from facegallery.server.gallery.manager import GalleryManager
from facegallery.server.gallery.store import NewTemplate, TemplateBatch

CURVE = FalseMatchCurve.from_json({"distances": [0.3, 0.5, 0.7, 1.0], "rates": [0.0, 0.001, 0.01, 0.5], "pairs": 1000, "data": "hand-made"})


def on_axis(x: float) -> np.ndarray:
    """An embedding at ``x`` on the first axis: L2 distances between them are differences of x."""
    e = np.zeros(DIM, np.float32)
    e[0] = x
    return e


def test_snorm_by_hand():
    # d = 0.5; probe cohort mean 0.9, sd 0.1; template cohort mean 1.0, sd 0.2:
    # ((0.5 - 0.9) / 0.1 + (0.5 - 1.0) / 0.2) / 2 = (-4 - 2.5) / 2
    assert snorm(0.5, 0.9, 0.1, 1.0, 0.2) == pytest.approx(-3.25)
    assert cohort_stats(np.array([0.8, 1.0, 5.0]), 2) == pytest.approx((0.9, 0.1))
    assert all(math.isnan(v) for v in cohort_stats(np.array([0.8]), 2))


def test_probe_cohort_leaves_the_candidate_out():
    ranked = np.array([0.1, 0.5, 0.7, 0.9])
    mu, sigma = probe_cohort_stats(ranked, np.array([0, 1, 3]), 2)
    # candidate 0: [0.5, 0.7]; candidate 1: [0.1, 0.7]; candidate 3 is beyond the k + 1 head: [0.1, 0.5]
    np.testing.assert_allclose(mu, [0.6, 0.4, 0.3])
    np.testing.assert_allclose(sigma, [0.1, 0.3, 0.2])


def test_false_match_curve_interpolates_and_inverts():
    assert CURVE.rate(0.2) == 0.0 and CURVE.rate(0.6) == pytest.approx(0.0055) and CURVE.rate(2.0) == 0.5
    assert CURVE.distance_at(0.0055) == pytest.approx(0.6)
    # 10 independent comparisons at F1 = 0.01: 1 - 0.99^10
    assert CURVE.gallery_fpir(0.7, 10) == pytest.approx(1 - 0.99**10)
    assert CURVE.gallery_fpir(CURVE.gallery_threshold(0.05, 10), 10) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        FalseMatchCurve.from_json({"distances": [0.5, 0.4], "rates": [0.1, 0.2]})
    assert FalseMatchCurve.from_json(None) is None


def test_gumbel_fit_by_moments():
    samples = np.array([1.0, 2.0, 3.0, 4.0])  # mean 2.5, population sd sqrt(1.25)
    fit = GumbelMin.fit(samples)
    scale = math.sqrt(1.25) * math.sqrt(6) / math.pi
    assert (fit.loc, fit.scale) == pytest.approx((2.5 + 0.57721566 * scale, scale))
    assert fit.cdf(fit.quantile(0.01)) == pytest.approx(0.01)
    assert fit.quantile(0.01) == pytest.approx(fit.loc + scale * math.log(-math.log(0.99)))


def test_calibrate_chooses_its_estimate():
    loo = np.linspace(0.4, 1.0, LOO_MIN_IDENTITIES)
    fixed = calibrate(DecisionPolicy.fixed(0.6), 500, ScoreKind.DISTANCE, loo, CURVE, fallback_threshold=0.6)
    tail = GumbelMin.fit(loo)
    assert fixed.threshold == 0.6 and fixed.estimated_fpir(0.6) == pytest.approx(tail.cdf(0.6))
    target = DecisionPolicy.targeting(0.01, normalization=Normalization.NONE)
    big = calibrate(target, 500, ScoreKind.DISTANCE, loo, CURVE, fallback_threshold=0.6)
    assert big.threshold == pytest.approx(tail.quantile(0.01)) and "Gumbel" in big.basis
    small = calibrate(target, 10, ScoreKind.DISTANCE, loo[:9], CURVE, fallback_threshold=0.6)
    # F1(t) = 1 - 0.99^(1/10) = 0.0010045..., just past the 0.001 point at 0.5 on the segment to 0.7
    per = 1 - 0.99**0.1
    assert small.threshold == pytest.approx(0.5 + 0.2 * (per - 0.001) / 0.009) and "curve" in small.basis
    assert small.estimated_fpir(small.threshold) == pytest.approx(0.01)
    bare = calibrate(target, 10, ScoreKind.DISTANCE, loo[:9], None, fallback_threshold=0.6)
    assert bare.threshold == 0.6 and math.isnan(bare.estimated_fpir(0.5))
    assert bare.estimated_fpir(math.inf) == 1.0 and calibrate(target, 0, ScoreKind.DISTANCE, [], None, fallback_threshold=0.6).estimated_fpir(0.1) == 0.0


def test_policies_check_and_round_trip():
    assert DEFAULT_POLICY == DecisionPolicy.targeting(0.01, normalization=Normalization.SNORM, cohort_size=100, aggregation=Aggregation.MEAN)
    for policy in (DEFAULT_POLICY, DecisionPolicy.fixed(0.55), DecisionPolicy.targeting(0.001, normalization=Normalization.NONE, cohort_size=20)):
        assert DecisionPolicy.from_json(policy.to_json()) == check_policy(policy)
    assert DEFAULT_POLICY.describe() == "target FPIR 0.01, S-norm k=100, mean template" and DecisionPolicy.fixed(0.6).describe() == "threshold 0.6"
    for bad in (DecisionPolicy(), DecisionPolicy(threshold=0.5, target_fpir=0.1), DecisionPolicy.fixed(-1), DecisionPolicy.targeting(1.0),
                DecisionPolicy.targeting(0.01, cohort_size=1), DecisionPolicy(threshold=0.5, normalization=Normalization.SNORM)):
        with pytest.raises(InvalidInput):
            check_policy(bad)
    assert choose_score_kind(DEFAULT_POLICY, SNORM_MIN_IDENTITIES - 1) is ScoreKind.DISTANCE
    assert choose_score_kind(DEFAULT_POLICY, SNORM_MIN_IDENTITIES) is ScoreKind.SNORM
    assert choose_score_kind(DecisionPolicy.fixed(0.6), 10**6) is ScoreKind.DISTANCE


@pytest.fixture
def axis_gallery(tmp_path):
    """Identities a, b, c, d at x = 0, 1, 3, 6; S-norm with a cohort of k = 2."""
    manager = GalleryManager.open(tmp_path, FakePipeline())
    manager.create_gallery("axis", policy=DecisionPolicy.targeting(0.01, cohort_size=2))
    manager.import_embeddings("axis", manager.pipeline.model_id, [NewTemplate(n, on_axis(x)) for n, x in zip("abcd", (0, 1, 3, 6))])
    yield manager
    manager.close()


def test_snorm_scores_of_a_probe_by_hand(axis_gallery):
    gallery = axis_gallery._gallery("axis")
    with gallery._lock.read():
        (scored,) = gallery.scorer.score(gallery._index, on_axis(0.4)[None], 2, version=0, kind=ScoreKind.SNORM)
    # probe at 0.4: distances a 0.4, b 0.6, c 2.6, d 5.6; head of k + 1 = 3: [0.4, 0.6, 2.6]
    # a: probe cohort [0.6, 2.6] (1.6, 1.0); a's nearest others b 1, c 3 -> (2, 1):   ((0.4-1.6)/1 + (0.4-2)/1)/2 = -1.4
    # b: probe cohort [0.4, 2.6] (1.5, 1.1); b's nearest others a 1, c 2 -> (1.5, .5): ((0.6-1.5)/1.1 + (0.6-1.5)/0.5)/2
    assert [s.hit.identity_id for s in scored] == ["a", "b"]
    assert [s.score for s in scored] == pytest.approx([-1.4, ((0.6 - 1.5) / 1.1 + (0.6 - 1.5) / 0.5) / 2])
    assert [s.hit.distance for s in scored] == pytest.approx([0.4, 0.6])


def test_leave_one_out_drops_the_probe_from_every_cohort(axis_gallery):
    gallery = axis_gallery._gallery("axis")
    with gallery._lock.read():
        found = dict(gallery.scorer.leave_one_out(gallery._read, 4, kind=ScoreKind.SNORM))
    # a (x=0) against b, c, d: distances 1, 3, 6. b: probe cohort [3, 6] (4.5, 1.5); b's others
    # without a: c 2, d 5 -> (3.5, 1.5). ((1-4.5)/1.5 + (1-3.5)/1.5)/2 = -2
    assert found["a"].hit.identity_id == "b" and found["a"].score == pytest.approx(-2.0)
    # d (x=6) against c 3, b 5, a 6. c: probe cohort [5, 6] (5.5, .5); c's others without d: b 2, a 3 -> (2.5, .5)
    # ((3-5.5)/.5 + (3-2.5)/.5)/2 = (-5 + 1)/2 = -2
    assert found["d"].hit.identity_id == "c" and found["d"].score == pytest.approx(-2.0)


def test_small_gallery_decides_on_the_curve_and_reports_fpir(tmp_path):
    pipeline = FakePipeline()
    pipeline.manifest = dataclasses.replace(pipeline.manifest, false_match={"distances": [0.3, 0.5, 0.7, 1.0], "rates": [0.0, 0.001, 0.01, 0.5]})
    manager = GalleryManager.open(tmp_path, pipeline)
    try:
        manager.create_gallery("g", policy=DecisionPolicy.targeting(0.01, normalization=Normalization.NONE))
        manager.import_embeddings("g", pipeline.model_id, [NewTemplate(n, on_axis(x)) for n, x in zip("abcd", (0, 1, 3, 6))])
        status = manager.decision_status("g")
        per = 1 - 0.99**0.25  # 4 identities
        expected = 0.5 + 0.2 * (per - 0.001) / 0.009
        assert status.score_kind is ScoreKind.DISTANCE and status.threshold == pytest.approx(expected) and status.estimated_fpir == pytest.approx(0.01)
        near = manager.identify_embedding("g", on_axis(-0.52))  # 0.52 from a: 1 - (1 - F1(0.52))^4, F1 = 0.001 + 0.009 * 0.1
        assert near.identity_id == "a" and near.score == pytest.approx(0.52) and near.estimated_fpir == pytest.approx(1 - (1 - 0.0019) ** 4)
        assert manager.identify_embedding("g", on_axis(-0.55)).identity_id is None  # past the threshold (0.5335)
        duplicate = manager.enroll("g", "a2", embedding=on_axis(-0.05)).possible_duplicate
        assert duplicate is not None and duplicate.identity_id == "a"
        (pair,) = manager.find_duplicates("g")
        assert {pair.identity_a, pair.identity_b} == {"a", "a2"} and pair.distance == pytest.approx(0.05)
    finally:
        manager.close()


def test_mean_templates_follow_every_write_and_a_restart(tmp_path):
    pipeline = FakePipeline()
    manager = GalleryManager.open(tmp_path, pipeline)
    policy = DecisionPolicy.fixed(0.5, aggregation=Aggregation.MEAN)
    manager.create_gallery("m", policy=policy)
    a0 = manager.enroll("m", "a", embedding=on_axis(0)).template_id
    a2 = manager.enroll("m", "a", embedding=on_axis(2)).template_id
    manager.enroll("m", "b", embedding=on_axis(5))
    hit = manager.identify_embedding("m", on_axis(1), top_k=2)  # a's mean is at 1, b at 5
    assert [(m.identity_id, m.template_id) for m in hit.matches] == [("a", a0), ("b", a2 + 1)]
    assert [m.distance for m in hit.matches] == pytest.approx([0.0, 4.0]) and hit.identity_id == "a"
    manager.delete_template("m", a0)  # a's mean moves to 2, now stored under its remaining template
    hit = manager.identify_embedding("m", on_axis(1))
    assert (hit.matches[0].template_id, hit.distance) == (a2, pytest.approx(1.0)) and hit.identity_id is None
    manager.close()
    manager = GalleryManager.open(tmp_path, pipeline)  # means are rebuilt from the store
    try:
        assert manager.get_gallery("m").policy == policy
        assert manager.identify_embedding("m", on_axis(1)).distance == pytest.approx(1.0)
        manager.update_gallery("m", policy=DecisionPolicy.fixed(0.5))  # back to nearest templates
        assert manager.identify_embedding("m", on_axis(4.5)).distance == pytest.approx(0.5)
        manager.update_gallery("m", policy=policy)
        manager.delete_identity("m", "a")
        assert [m.identity_id for m in manager.identify_embedding("m", on_axis(1), top_k=5).matches] == ["b"]
    finally:
        manager.close()


def test_an_import_batch_gives_new_and_existing_identities_the_means_of_all_their_templates(tmp_path):
    pipeline = FakePipeline()
    manager = GalleryManager.open(tmp_path, pipeline)
    try:
        manager.create_gallery("m", policy=DecisionPolicy.fixed(0.5, aggregation=Aggregation.MEAN))
        a0 = manager.enroll("m", "a", embedding=on_axis(0)).template_id
        ids = ["n", "a", "n", "m", "n"]  # n: three templates created in the batch; a: one more for a stored identity
        manager.import_embeddings("m", pipeline.model_id, [TemplateBatch(ids, np.stack([on_axis(v) for v in (10, 2, 12, 20, 14)]).reshape(-1))])
        for probe, identity, template in ((1, "a", a0), (12, "n", a0 + 1), (20, "m", a0 + 4)):  # means 0+2 -> 1, 10+12+14 -> 12, 20
            hit = manager.identify_embedding("m", on_axis(probe), top_k=3)
            assert (hit.identity_id, hit.matches[0].template_id) == (identity, template)
            assert hit.distance == pytest.approx(0.0, abs=1e-6) and len(hit.matches) == 3
        manager.enroll("m", "n", embedding=on_axis(16))  # n's mean moves to 13, recomputed from the store
        assert manager.identify_embedding("m", on_axis(13)).distance == pytest.approx(0.0, abs=1e-6)
    finally:
        manager.close()


def _strangers(n: int, seed: int, offset: int = 0) -> list[NewTemplate]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return [NewTemplate(f"p{offset + i}", 0.5 * row / np.linalg.norm(row)) for i, row in enumerate(x)]


def _hold_recalibrations(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make every leave-one-out pass (a recalibration) wait until the test sets ``release``;
    ``entered`` is set when one starts."""
    from facegallery.server.gallery.open_set import OpenSetScorer

    entered, release = threading.Event(), threading.Event()
    leave_one_out = OpenSetScorer.leave_one_out

    def held(self, *args, **kwargs):
        entered.set()
        assert release.wait(10), "the recalibration was held for 10 s: a call waited for it"
        return leave_one_out(self, *args, **kwargs)

    monkeypatch.setattr(OpenSetScorer, "leave_one_out", held)
    return entered, release


def test_a_status_report_does_not_wait_for_the_recalibration_after_a_bulk_import(tmp_path, monkeypatch):
    from facegallery.server.gallery import open_set

    monkeypatch.setattr(open_set, "STATUS_FULL_WAIT_SIZE", 500)  # as if 400 templates were many
    pipeline = FakePipeline()
    manager = GalleryManager.open(tmp_path, pipeline)
    try:
        manager.create_gallery("g", policy=DecisionPolicy.targeting(0.01, normalization=Normalization.NONE))
        manager.import_embeddings("g", pipeline.model_id, _strangers(400, 0))
        first = manager.decision_status("g")
        assert not first.recalibrating and first.identities == 400
        entered, release = _hold_recalibrations(monkeypatch)
        manager.import_embeddings("g", pipeline.model_id, _strangers(400, 1, offset=400))  # +100 %: searches would wait
        status = manager.decision_status("g", wait_s=0)
        assert status.recalibrating and (status.threshold, status.identities, status.basis) == (first.threshold, 400, first.basis)
        assert entered.wait(10) and not release.is_set()  # started in the background, still held
        release.set()
        after = manager.decision_status("g")
        assert not after.recalibrating and after.identities == 800
        assert manager.decision_status("g", wait_s=0) == after
        manager.import_embeddings("g", pipeline.model_id, _strangers(800, 2, offset=800))
        waited = manager.decision_status("g", wait_s=30)  # done within the wait: the new calibration
        assert not waited.recalibrating and waited.identities == 1600
        monkeypatch.setattr(open_set, "STATUS_FULL_WAIT_SIZE", 20_000)
        manager.import_embeddings("g", pipeline.model_id, _strangers(1600, 3, offset=1600))
        small = manager.decision_status("g", wait_s=0)  # a small gallery's recalibration is waited for
        assert not small.recalibrating and small.identities == 3200
        monkeypatch.setattr(open_set, "STATUS_FULL_WAIT_SIZE", 500)
        release.clear()  # the next recalibration is held again
        manager.update_gallery("g", policy=DecisionPolicy.targeting(0.001, normalization=Normalization.NONE))
        provisional = manager.decision_status("g", wait_s=0)  # no calibration under the new policy yet
        assert provisional.recalibrating and provisional.basis.startswith("provisional, while the leave-one-out calibration runs")
        release.set()
        stricter = manager.decision_status("g")
        assert not stricter.recalibrating and stricter.basis.startswith("Gumbel fit") and stricter.threshold < small.threshold
    finally:
        manager.close()


def _calibrated_400(tmp_path, monkeypatch) -> tuple[GalleryManager, FakePipeline]:
    """A gallery "g" of 400 strangers, calibrated, whose status calls wait for a recalibration
    at most their ``wait_s`` (STATUS_FULL_WAIT_SIZE lowered to 500)."""
    from facegallery.server.gallery import open_set

    monkeypatch.setattr(open_set, "STATUS_FULL_WAIT_SIZE", 500)
    pipeline = FakePipeline()
    manager = GalleryManager.open(tmp_path, pipeline)
    manager.create_gallery("g", policy=DecisionPolicy.targeting(0.01, normalization=Normalization.NONE))
    manager.import_embeddings("g", pipeline.model_id, _strangers(400, 0))
    manager.decision_status("g")
    return manager, pipeline


def test_close_waits_for_a_background_recalibration_and_then_refuses_calls(tmp_path, monkeypatch, caplog):
    manager, pipeline = _calibrated_400(tmp_path, monkeypatch)
    entered, release = _hold_recalibrations(monkeypatch)  # once let go, its first read finds the gallery closed
    saved = []
    monkeypatch.setattr(manager.store, "save_calibration", lambda *args: saved.append(args))
    manager.import_embeddings("g", pipeline.model_id, _strangers(400, 1, offset=400))
    assert manager.decision_status("g", wait_s=0).recalibrating and entered.wait(10)
    closer = threading.Thread(target=manager.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # waiting for the recalibration
    release.set()
    closer.join(10)
    assert not closer.is_alive() and saved == []  # stopped before it stored anything
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    with pytest.raises(GalleryClosed) as raised:
        manager.identify_embedding("g", on_axis(0))
    assert (raised.value.code, raised.value.reason) == ("UNAVAILABLE", "NOT_READY")
    for call in (manager.list_galleries, lambda: manager.get_gallery("g"), lambda: manager.create_gallery("h")):
        with pytest.raises(GalleryClosed):  # not the closed store's RuntimeError (INTERNAL)
            call()


def test_close_waits_for_a_recalibration_at_most_its_timeout(tmp_path, monkeypatch):
    manager, pipeline = _calibrated_400(tmp_path, monkeypatch)
    entered, release = _hold_recalibrations(monkeypatch)
    manager.import_embeddings("g", pipeline.model_id, _strangers(400, 1, offset=400))
    assert manager.decision_status("g", wait_s=0).recalibrating and entered.wait(10)
    manager.close(timeout_s=0.2)  # returns although the recalibration is still held
    assert not release.is_set()
    release.set()
    with pytest.raises(GalleryClosed):
        manager.decision_status("g")


def test_a_restart_decides_with_the_stored_calibration_until_the_gallery_changes(tmp_path, monkeypatch):
    from facegallery.server.gallery.open_set import OpenSetScorer

    runs = []  # leave-one-out passes (recalibrations) of gallery "g"
    leave_one_out = OpenSetScorer.leave_one_out

    def counted(self, *args, **kwargs):
        runs.extend([1] if self.gallery == "g" else [])
        return leave_one_out(self, *args, **kwargs)

    monkeypatch.setattr(OpenSetScorer, "leave_one_out", counted)
    pipeline = FakePipeline()
    policy = DecisionPolicy.targeting(0.01, normalization=Normalization.NONE)
    manager = GalleryManager.open(tmp_path, pipeline)
    manager.create_gallery("g", policy=policy)
    manager.import_embeddings("g", pipeline.model_id, _strangers(400, 0))
    first = manager.decision_status("g")
    assert len(runs) == 1 and first.basis.startswith("Gumbel fit of leave-one-out") and 0 < first.threshold < 1
    manager.close()

    manager = GalleryManager.open(tmp_path, pipeline)
    try:  # same gallery, same policy: no leave-one-out search, the same decision
        restored = manager.decision_status("g")
        assert len(runs) == 1 and restored == first
        manager.update_gallery("g", policy=DecisionPolicy.targeting(0.001, normalization=Normalization.NONE))
        stricter = manager.decision_status("g")
        assert len(runs) == 2 and stricter.threshold < first.threshold
        manager.update_gallery("g", policy=policy)
        assert manager.decision_status("g").threshold == pytest.approx(first.threshold) and len(runs) == 3
        manager.import_embeddings("g", pipeline.model_id, _strangers(200, 1, offset=400))  # +50 %: stale
    finally:
        manager.close()

    manager = GalleryManager.open(tmp_path, pipeline)
    try:  # the stored calibration is 200 changes old for 400 templates: recomputed before deciding
        grown = manager.decision_status("g")
        assert len(runs) == 4 and grown.identities == 600
    finally:
        manager.close()
