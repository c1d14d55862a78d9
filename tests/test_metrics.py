"""Metrics against references computed by hand (no sklearn)."""
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import metrics as M  # noqa: E402
from utils import UserError  # noqa: E402

# ---------------------------------------------------------------- 6 queries x 6 items, ranked by hand
# Tie rule: stable argsort on -scores, equal scores keep index order.
SCORES = np.array([
    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # order 0 1 2 3 4 5
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # order 5 4 3 2 1 0
    [0.5, 0.9, 0.1, 0.8, 0.3, 0.7],  # order 1 3 5 0 4 2
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],  # all tied -> order 0 1 2 3 4 5
    [0.3, 0.1, 0.4, 0.1, 0.5, 0.9],  # (no relevant item)
    [0.2, 0.2, 0.9, 0.9, 0.1, 0.0],  # ties -> order 2 3 0 1 4 5
])
RELEVANT = np.array([
    [1, 0, 1, 0, 0, 0],  # ranked relevance 1 0 1 0 0 0
    [1, 0, 0, 0, 0, 0],  # ranked relevance 0 0 0 0 0 1
    [0, 0, 1, 1, 1, 0],  # ranked relevance 0 1 0 0 1 1
    [0, 0, 0, 1, 0, 0],  # ranked relevance 0 0 0 1 0 0
    [0, 0, 0, 0, 0, 0],  # ranked relevance 0 0 0 0 0 0
    [1, 0, 0, 1, 0, 1],  # ranked relevance 0 1 1 0 0 1  (tie 2|3: non-relevant 2 first)
], dtype=bool)
# P@1: first ranked item relevant?           1, 0, 0, 0, 0, 0
# P@3: hits in first 3 / 3                   2/3, 0, 1/3, 0, 0, 2/3
# P@5: hits in first 5 / 5                   2/5, 0, 2/5, 1/5, 0, 2/5
# P@10 -> k clipped to 6: all hits / 6       2/6, 1/6, 3/6, 1/6, 0, 3/6
# AP: mean of precision at each hit
#   q0 (1/1 + 2/3)/2 = 5/6;  q1 1/6;  q2 (1/2 + 2/5 + 3/6)/3 = 7/15;  q3 1/4;  q4 nan;  q5 (1/2 + 2/3 + 3/6)/3 = 5/9
#   mAP over the 5 queries with a relevant item = (150 + 30 + 84 + 45 + 100)/180 / 5 = 409/900
# R@1: 1 0 0 0 0 0      R@5: 1 0 1 1 0 1
# first relevant rank: 1, 6, 2, 4, (none: skipped), 2 -> sorted 1 2 2 4 6 -> median 2
P1 = [1, 0, 0, 0, 0, 0]
P3 = [2 / 3, 0, 1 / 3, 0, 0, 2 / 3]
P5 = [2 / 5, 0, 2 / 5, 1 / 5, 0, 2 / 5]
P10 = [2 / 6, 1 / 6, 3 / 6, 1 / 6, 0, 3 / 6]
AP = [5 / 6, 1 / 6, 7 / 15, 1 / 4, np.nan, 5 / 9]


def test_precision_at_k_by_hand():
    for k, ref in ((1, P1), (3, P3), (5, P5), (10, P10)):
        np.testing.assert_allclose(M.precision_at_k(SCORES, RELEVANT, k), ref, err_msg=f"k={k}")


def test_average_precision_and_map_by_hand():
    ap = M.average_precision(SCORES, RELEVANT)
    np.testing.assert_allclose(ap, AP)  # nan == nan in assert_allclose
    assert np.nanmean(ap) == pytest.approx(409 / 900)


def test_recall_at_k_and_median_rank_by_hand():
    np.testing.assert_array_equal(M.recall_at_k(SCORES, RELEVANT, 1), [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(M.recall_at_k(SCORES, RELEVANT, 5), [1, 0, 1, 1, 0, 1])
    assert M.median_rank(SCORES, RELEVANT) == 2.0
    assert np.isnan(M.median_rank(SCORES[4:5], RELEVANT[4:5]))


def test_retrieval_accepts_torch_and_rejects_bad_input():
    ap = M.average_precision(torch.tensor(SCORES, dtype=torch.bfloat16), torch.tensor(RELEVANT))
    assert ap[0] == pytest.approx(5 / 6)  # bf16 keeps these values' order
    with pytest.raises(UserError, match="shape"):
        M.precision_at_k(SCORES, RELEVANT[:, :5], 1)
    bad = SCORES.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        M.average_precision(bad, RELEVANT)
    with pytest.raises(UserError, match="k must be"):
        M.recall_at_k(SCORES, RELEVANT, 0)


# ---------------------------------------------------------------- confusion-matrix metrics
# 4 classes; class 2 is never predicted, class 3 never occurs (but receives one wrong prediction).
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 0, 1, 1, 1, 3, 0, 1]
CM = [[3, 1, 0, 0],
      [0, 2, 0, 1],
      [1, 1, 0, 0],
      [0, 0, 0, 0]]
# recall: 3/4, 2/3, 0, nan -> UAR = (3/4 + 2/3 + 0)/3 = 17/36 ; WAR = (3+2+0)/9 = 5/9
# F1 = 2TP/(2TP+FP+FN): c0 6/(6+1+1) = 3/4 ; c1 4/(4+2+1) = 4/7 ; c2 0 ; c3 absent -> macro (3/4 + 4/7 + 0)/3 = 37/84
# (counting the absent class as 0 would give 37/112; counting its recall as 0 would give UAR 17/48)


def test_confusion_metrics_by_hand():
    cm = M.confusion_matrix(Y_TRUE, Y_PRED, 4)
    np.testing.assert_array_equal(cm, CM)
    assert cm.dtype.kind == "i"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # absent class must not trigger divide-by-zero / empty-mean warnings
        np.testing.assert_allclose(M.per_class_recall(cm), [3 / 4, 2 / 3, 0, np.nan])
        assert M.uar(cm) == pytest.approx(17 / 36)
        assert M.war(cm) == pytest.approx(5 / 9)
        assert M.macro_f1(cm) == pytest.approx(37 / 84)
        assert np.isnan(M.uar(np.zeros((3, 3)))) and np.isnan(M.war(np.zeros((3, 3))))


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(UserError, match="y_pred"):
        M.confusion_matrix([0, 1], [0, 4], 4)
    with pytest.raises(UserError, match="labels"):
        M.confusion_matrix([0, 1], [0], 4)


def test_topk_with_ties():
    scores = np.array([
        [0.5, 0.5, 0.1],  # y=1 ties with 0; index 0 ranks first -> rank 2
        [0.2, 0.7, 0.7],  # y=2 ties with 1 -> rank 2
        [0.3, 0.3, 0.3],  # y=2, all tied -> rank 3
        [0.4, 0.4, 0.0],  # y=0 wins its tie -> rank 1
    ])
    y = [1, 2, 2, 0]
    assert M.topk_accuracy(scores, y, 1) == pytest.approx(1 / 4)
    assert M.topk_accuracy(scores, y, 2) == pytest.approx(3 / 4)
    assert M.topk_accuracy(scores, y, 3) == 1.0
    assert M.topk_accuracy(scores, y, 5) == 1.0  # k clipped to C
    # same answer as ranking with the stable argsort used for retrieval
    order = np.argsort(-scores, axis=1, kind="stable")
    assert M.topk_accuracy(scores, y, 2) == np.mean([yi in o[:2] for yi, o in zip(y, order)])
    with pytest.raises(UserError, match="class ids"):
        M.topk_accuracy(scores, [0, 1, 2, 3], 1)


def test_topk_matches_stable_argsort_under_heavy_ties():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(300, 6)).astype(np.float32)  # ~every row has ties
    y = rng.integers(0, 6, size=300)
    order = np.argsort(-scores, axis=1, kind="stable")
    for k in range(1, 7):
        ref = np.mean([yi in o[:k] for yi, o in zip(y, order)])
        assert M.topk_accuracy(torch.tensor(scores), torch.tensor(y), k) == pytest.approx(ref), k


def test_classification_report_by_hand():
    # argmax of each row gives Y_PRED, so the report must reproduce the hand numbers above
    scores = np.eye(4)[Y_PRED] * 0.9 + 0.01 * np.arange(4)[::-1]  # second best = lowest other index
    rep = M.classification_report(torch.tensor(scores), torch.tensor(Y_TRUE), ["a", "b", "c", "d"])
    json.dumps(rep, allow_nan=False)  # plain JSON, nan -> None
    assert rep["top1"] == pytest.approx(5 / 9) and rep["war"] == pytest.approx(5 / 9)
    assert rep["uar"] == pytest.approx(17 / 36) and rep["macro_f1"] == pytest.approx(37 / 84)
    assert rep["per_class_recall"] == pytest.approx({"a": 3 / 4, "b": 2 / 3, "c": 0.0, "d": None})
    assert rep["confusion"] == CM
    # top-5 is clipped to the 4 classes -> 1.0
    assert rep["top5"] == 1.0
    with pytest.raises(UserError, match="class names"):
        M.classification_report(scores, Y_TRUE, ["a", "b"])


# ---------------------------------------------------------------- prototypes and zero-shot scores

def test_prototypes_normalise_before_averaging():
    emb = torch.tensor([[10.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    classes, protos = M.class_prototypes(emb, ["happy", "happy", "sad"])
    assert classes == ["happy", "sad"]
    # happy: mean([1,0], [0,1]) = [.5,.5] -> [1,1]/sqrt2 (the raw mean [5,.5] would point elsewhere)
    np.testing.assert_allclose(protos, [[2 ** -0.5, 2 ** -0.5], [0.6, 0.8]])


def test_prototypes_match_normalised_mean_and_given_order():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(7, 5)) * rng.uniform(0.5, 3, size=(7, 1))
    labels = np.array(["b", "a", "b", "x", "a", "b", "a"])
    classes, protos = M.class_prototypes(emb, labels, classes=["a", "b"])  # "x" is ignored
    assert classes == ["a", "b"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for c, p in zip(classes, protos):
        m = unit[labels == c].mean(0)
        np.testing.assert_allclose(p, m / np.linalg.norm(m))
    assert list(M.class_prototypes(emb, labels)[0]) == ["b", "a", "x"]  # first appearance
    with pytest.raises(UserError, match="'contempt' has no text"):
        M.class_prototypes(emb, labels, classes=["a", "contempt"])


def test_zero_shot_scores_are_cosines():
    im = np.array([[2.0, 0.0], [1.0, 1.0]])
    pr = np.array([[0.0, 3.0], [1.0, 0.0]])
    np.testing.assert_allclose(M.zero_shot_scores(im, pr), [[0, 1], [2 ** -0.5, 2 ** -0.5]])
    with pytest.raises(UserError, match="same D"):
        M.zero_shot_scores(im, np.ones((2, 3)))


def test_prior_adjusted_by_hand():
    scores = np.array([[0.5, 0.4], [0.1, 0.3]])
    adj = M.prior_adjusted(scores, 10.0, [4, 1])                      # prior normalised to [0.8, 0.2]
    np.testing.assert_allclose(adj, [[5 + np.log(0.8), 4 + np.log(0.2)], [1 + np.log(0.8), 3 + np.log(0.2)]])
    assert adj.argmax(1).tolist() == [0, 1]
    assert M.prior_adjusted(scores, 10.0, [1, 99]).argmax(1).tolist() == [1, 1]   # a strong prior flips row 0
    for bad in ([1, 0], [1, 2, 3]):
        with pytest.raises(UserError, match="one positive value per class"):
            M.prior_adjusted(scores, 10.0, bad)


def test_random_embeddings_are_at_chance():
    rng = np.random.default_rng(123)
    n, c, d = 20000, 7, 32
    scores = M.zero_shot_scores(rng.normal(size=(n, d)), rng.normal(size=(c, d)))
    y = rng.integers(0, c, size=n)
    assert abs(M.topk_accuracy(scores, y, 1) - 1 / c) < 0.015  # sd ~ 0.0025
    assert abs(M.topk_accuracy(scores, y, 5) - 5 / c) < 0.015
    assert abs(M.uar(M.confusion_matrix(y, scores.argmax(1), c)) - 1 / c) < 0.02


def test_retrieval_report_perfect_and_random():
    protos = np.eye(4)  # 4 orthogonal class prototypes
    labels = np.array([0, 0, 1, 1, 1, 2])  # class 3 has no image
    rep = M.retrieval_report(protos[labels] + 0.01, labels, protos, ks=(1, 2, 10))
    json.dumps(rep, allow_nan=False)
    assert rep["t2i_precision@1"] == 1.0 and rep["t2i_mAP"] == 1.0
    assert rep["t2i_precision@1_per_class"] == [1.0, 1.0, 1.0, None]
    # P@10 clipped to 6 images: class sizes 2, 3, 1 over 6 -> mean (2/6 + 3/6 + 1/6)/3 = 1/3
    assert rep["t2i_precision@10"] == pytest.approx(1 / 3)
    assert rep["t2i_AP_per_class"] == [1.0, 1.0, 1.0, None]
    assert rep["i2t_recall@1"] == 1.0 and rep["i2t_median_rank"] == 1.0 and rep["classes_present"] == 3

    rng = np.random.default_rng(7)
    n, c = 4000, 7
    rep = M.retrieval_report(rng.normal(size=(n, 16)), rng.integers(0, c, n), rng.normal(size=(c, 16)))
    assert abs(rep["i2t_recall@1"] - 1 / c) < 0.03
    assert abs(rep["i2t_recall@5"] - 5 / c) < 0.03
    assert abs(rep["i2t_median_rank"] - 4) <= 1  # rank uniform over 1..7 -> median 4
    assert abs(rep["t2i_mAP"] - 1 / c) < 0.03  # AP of a random ranking ~ class prevalence
    with pytest.raises(UserError, match="image_labels"):
        M.retrieval_report(rng.normal(size=(3, 16)), [0, 1, 9], rng.normal(size=(c, 16)))


# ---------------------------------------------------------------- output helpers

@pytest.mark.parametrize("normalize", [True, False])
def test_save_confusion_png_writes_valid_image(tmp_path, normalize):
    out = tmp_path / "sub" / "cm.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the empty row (absent class) must not divide by zero
        M.save_confusion_png(np.array(CM), ["neutral", "happiness", "sadness", "contempt"], out, normalize)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()
    with Image.open(out) as im:
        assert np.asarray(im.convert("L")).std() > 10  # not a blank canvas


def test_format_table_aligns_columns():
    rows = [{"model": "ours", "top1": 0.61234, "n": 3589},
            {"model": "open_clip-B/32", "top1": float("nan"), "n": 7},
            {"model": "x", "n": 12}]
    lines = M.format_table(rows, ["model", "top1", "n"]).splitlines()
    assert lines[0].split() == ["model", "top1", "n"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["ours", "0.6123", "3589"]
    assert lines[3].split() == ["open_clip-B/32", "-", "7"]
    assert lines[4].split() == ["x", "12"]  # missing key -> blank cell
    # fixed width: the numeric column ends at the same position on every row
    assert len({ln.rstrip().__len__() for ln in lines[2:5]}) == 1
    assert lines[0].index("top1") + 4 == lines[2].index("0.6123") + 6
