"""export/evaluate: metrics on hand-made distances whose answers are known, and the pairs-file readers."""

from __future__ import annotations

import numpy as np
import pytest

from facegallery.export.evaluate.lfw import read_pairs
from facegallery.export.evaluate.metrics import best_threshold, rank1, tar_at_far, threshold_at_far, verification_10fold
from facegallery.export.evaluate.plots import roc_curve


def test_best_threshold_separable():
    d = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = np.array([1, 1, 1, 0, 0, 0], bool)
    t, acc = best_threshold(d, same)
    assert acc == 1.0 and 0.3 < t < 0.7 and t == pytest.approx(0.5)


def test_best_threshold_with_one_overlap_and_missing_face():
    d = np.array([0.1, 0.2, 0.65, np.inf, 0.5, 0.8, 0.9])  # genuine 0.65 above impostor 0.5; one missing face
    same = np.array([1, 1, 1, 1, 0, 0, 0], bool)
    t, acc = best_threshold(d, same)
    assert acc == pytest.approx(5 / 7)  # best: accept <=0.2 or <=0.65 -> 5 of 7 correct either way


def test_10fold_uses_training_folds_only():
    rng = np.random.default_rng(0)
    folds = np.repeat(np.arange(1, 11), 20)
    same = np.tile(np.r_[np.ones(10, bool), np.zeros(10, bool)], 10)
    d = np.where(same, rng.uniform(0.0, 0.5, 200), rng.uniform(0.55, 1.0, 200))
    result = verification_10fold(d, same, folds)
    assert result["accuracy"] == 1.0 and result["std"] == 0.0
    assert 0.5 <= result["threshold"] <= 0.55
    assert len(result["fold_accuracies"]) == 10
    # flip one genuine pair in fold 3 far beyond every impostor: only that fold loses one pair
    d2 = d.copy()
    d2[np.flatnonzero((folds == 3) & same)[0]] = 5.0
    r2 = verification_10fold(d2, same, folds)
    assert r2["fold_accuracies"][2] == pytest.approx(19 / 20)
    assert r2["accuracy"] == pytest.approx(1 - 1 / 200)


def test_tar_at_far_counts_allowed_false_accepts():
    impostor = np.linspace(0.5, 1.5, 2000)  # 2000 impostors -> FAR 1e-3 allows 2 accepted
    genuine = np.array([0.2, 0.4, 0.5005, 0.501, 0.52, 0.9])
    d = np.r_[genuine, impostor]
    same = np.r_[np.ones(6, bool), np.zeros(2000, bool)]
    t = threshold_at_far(d, same, 1e-3)
    assert impostor[1] <= t < impostor[2]
    r = tar_at_far(d, same, 1e-3)
    assert r["far"] == pytest.approx(2 / 2000)
    assert r["tar"] == pytest.approx(4 / 6)  # 0.2, 0.4, 0.5005, 0.501 lie below impostor[2] = 0.5010005
    assert r["genuine"] == 6 and r["impostor"] == 2000


def test_rank1():
    gallery = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    labels = np.array(["a", "b", "c"])
    probes = np.array([[1, 1], [9, 1], [6, 5], [0, 8]], np.float32)
    truth = np.array(["a", "b", "c", "c"])
    assert rank1(gallery, labels, probes, truth) == pytest.approx(3 / 4)  # (6,5) is nearer b


def test_roc_curve_is_monotone():
    d = np.array([0.1, 0.3, 0.35, 0.6, np.inf])
    same = np.array([1, 0, 1, 0, 1], bool)
    far, tar = roc_curve(d, same)
    assert far.tolist() == [0, 0.5, 0.5, 1.0]
    assert tar.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_10fold_needs_two_folds():
    with pytest.raises(ValueError, match="at least 2 folds"):
        verification_10fold(np.array([0.1, 0.9]), np.array([1, 0], bool), np.array([1, 1]))


# LFW's own pairs.txt: "<folds> <n>", then per fold n matched "name n1 n2" and n mismatched
# "name1 n1 name2 n2" lines (tab-separated in the original; spaces are accepted too).
LFW_PAIRS_TXT = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabaneh\t1\tDean_Barker\t1
Abdel_Madi_Shabaneh\t1\tGiancarlo_Fisichella\t1
Amber_Tamblyn 1 2
Anders_Fogh_Rasmussen 1 12
Aaron_Sorkin 2 Frank_Solich 5

Abbas_Kiarostami 1 Fiona_Milne 1
"""

PAIRS_TSV = """fold\tname1\timage1\tname2\timage2\tsame
1\tAbel_Pacheco\tAbel_Pacheco_0001.jpg\tAbel_Pacheco\tAbel_Pacheco_0004.jpg\t1
1\tAbdel_Madi_Shabaneh\tAbdel_Madi_Shabaneh_0001.jpg\tDean_Barker\tDean_Barker_0001.jpg\t0
2\tAmber_Tamblyn\tAmber_Tamblyn_0001.jpg\tAmber_Tamblyn\tAmber_Tamblyn_0002.jpg\ttrue
2\tAaron_Sorkin\tAaron_Sorkin_0002.jpg\tFrank_Solich\tFrank_Solich_0005.jpg\tfalse
"""


def test_read_pairs_lfw_pairs_txt(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text(LFW_PAIRS_TXT)
    pairs = read_pairs(path)
    assert len(pairs) == 8
    assert pairs.folds.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert pairs.same.tolist() == [True, True, False, False] * 2
    assert pairs.first[:4] == ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Akhmed_Zakayev/Akhmed_Zakayev_0001.jpg",
                               "Abdel_Madi_Shabaneh/Abdel_Madi_Shabaneh_0001.jpg", "Abdel_Madi_Shabaneh/Abdel_Madi_Shabaneh_0001.jpg")
    assert pairs.second[:4] == ("Abel_Pacheco/Abel_Pacheco_0004.jpg", "Akhmed_Zakayev/Akhmed_Zakayev_0003.jpg",
                                "Dean_Barker/Dean_Barker_0001.jpg", "Giancarlo_Fisichella/Giancarlo_Fisichella_0001.jpg")
    assert pairs.second[5] == "Anders_Fogh_Rasmussen/Anders_Fogh_Rasmussen_0012.jpg"
    assert pairs.names[6] == ("Aaron_Sorkin", "Frank_Solich")
    assert pairs.first[6] == "Aaron_Sorkin/Aaron_Sorkin_0002.jpg" and pairs.second[6] == "Frank_Solich/Frank_Solich_0005.jpg"
    assert len(pairs.image_paths()) == 15  # 16 references, Abdel_Madi_Shabaneh_0001 twice


def test_read_pairs_view1_header_is_one_fold(tmp_path):
    path = tmp_path / "pairsDevTrain.txt"
    path.write_text("1\nAbel_Pacheco\t1\t4\nAaron_Sorkin\t2\tFrank_Solich\t5\n")
    pairs = read_pairs(path)
    assert pairs.folds.tolist() == [1, 1] and pairs.same.tolist() == [True, False]


def test_read_pairs_tsv(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text(PAIRS_TSV)
    pairs = read_pairs(path)
    assert pairs.folds.tolist() == [1, 1, 2, 2]
    assert pairs.same.tolist() == [True, False, True, False]
    assert pairs.first == ("Abel_Pacheco/Abel_Pacheco_0001.jpg", "Abdel_Madi_Shabaneh/Abdel_Madi_Shabaneh_0001.jpg",
                           "Amber_Tamblyn/Amber_Tamblyn_0001.jpg", "Aaron_Sorkin/Aaron_Sorkin_0002.jpg")
    assert pairs.second[1] == "Dean_Barker/Dean_Barker_0001.jpg"
    assert pairs.names[3] == ("Aaron_Sorkin", "Frank_Solich")


def test_both_formats_give_the_same_pairs(tmp_path):
    """The TSV above is lines 1, 3, 5 and 7 of the pairs.txt above."""
    (tmp_path / "pairs.txt").write_text(LFW_PAIRS_TXT)
    (tmp_path / "pairs.tsv").write_text(PAIRS_TSV)
    lfw, tsv = read_pairs(tmp_path / "pairs.txt"), read_pairs(tmp_path / "pairs.tsv")
    sub = lfw.subset(np.isin(np.arange(len(lfw)), [0, 2, 4, 6]))
    assert (sub.first, sub.second, sub.names) == (tsv.first, tsv.second, tsv.names)
    assert sub.folds.tolist() == tsv.folds.tolist() and sub.same.tolist() == tsv.same.tolist()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pairs file"),
        ("1 2\nA 1 2\nB 1 C 1\n", "announces 1 fold.*= 4 lines, got 2"),
        ("1 1\nA 1 C 2\nB 1 C 1\n", r":2: expected a matched pair 'name n1 n2' of fold 1"),
        ("1 1\nA 1 2\nB 1 2\n", r":3: expected a mismatched pair 'name1 n1 name2 n2' of fold 1"),
        ("name1\tname2\nA\tB\n", "lacks fold, image1, image2, same"),
        ("fold\tname1\timage1\tname2\timage2\tsame\n1\tA\ta.jpg\tB\tb.jpg\tyes\n", r":2: expected an integer fold"),
    ],
    ids=["empty", "short", "matched-shape", "mismatched-shape", "tsv-header", "tsv-same"],
)
def test_read_pairs_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "pairs"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


def test_eval_lfw_rejects_bad_pairs_before_loading_a_model(tmp_path):
    from click.testing import CliRunner

    from facegallery.client.cli import main

    images = tmp_path / "lfw"
    images.mkdir()
    (tmp_path / "bad.txt").write_text("1 1\nA 1 C 2\nB 1 C 1\n")
    (tmp_path / "view1.txt").write_text("1\nA 1 2\nB 1 C 1\n")
    for name, message in [("bad.txt", "expected a matched pair"), ("view1.txt", "needs at least 2")]:
        result = CliRunner().invoke(main, ["eval", "lfw", "--pairs", str(tmp_path / name), "--images", str(images), "--model-dir", str(tmp_path / "none")])
        assert result.exit_code == 2, result.output
        assert message in result.output
    help_text = CliRunner().invoke(main, ["eval", "lfw", "--help"]).output
    assert "pairs.txt" in help_text and "fold name1 image1 name2 image2 same" in help_text
