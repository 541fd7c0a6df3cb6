"""Tests for trailers12k_feats.training.metrics: hand-computed curves and sklearn cross-checks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import auc, average_precision_score, precision_recall_curve

from trailers12k_feats import GENRES_SHORT
from trailers12k_feats.training.metrics import (
    AP_KEYS,
    METRIC_KEYS,
    average_precision,
    format_metrics,
    metric_columns,
    multilabel_metrics,
    pr_auc,
)

# ---------------------------------------------------------------------------------------
# sklearn references (slow, loop-based, obviously correct)
# ---------------------------------------------------------------------------------------

def sk_pr_auc(y: np.ndarray, s: np.ndarray) -> float:
    """sklearn trapezoid PR-AUC; 0 when there are no positives (paper convention)."""
    if np.sum(y) == 0:
        return 0.0  # sklearn would warn and use recall = 1 everywhere
    precision, recall, _ = precision_recall_curve(y, s)
    return float(auc(recall, precision))


def sk_ap(y: np.ndarray, s: np.ndarray) -> float:
    if np.sum(y) == 0:
        return 0.0
    return float(average_precision_score(y, s))


def ref_multilabel(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    k = y.shape[1]
    per_genre = np.array([sk_pr_auc(y[:, j], p[:, j]) for j in range(k)])
    support = y.sum(axis=0)
    return {
        "uAP": 100 * sk_pr_auc(y.ravel(), p.ravel()),
        "mAP": 100 * per_genre.mean(),
        "wAP": 100 * (np.average(per_genre, weights=support) if support.sum() else 0.0),
        "sAP": 100 * np.mean([sk_pr_auc(y[i], p[i]) for i in range(y.shape[0])]),
        "per_genre": 100 * per_genre,
    }


def random_problem(rng: np.random.Generator, n: int, k: int = 10, decimals: int | None = None):
    # Correlated scores so AP values are not all ~chance, genre prevalences varied.
    prev = rng.uniform(0.05, 0.5, size=k)
    y = (rng.random((n, k)) < prev).astype(int)
    p = np.clip(0.35 * y + rng.random((n, k)) * 0.8, 0, 1)
    if decimals is not None:
        p = np.round(p, decimals)
    return y, p


# ---------------------------------------------------------------------------------------
# Hand-computed curves
# ---------------------------------------------------------------------------------------

def test_hand_computed_no_ties():
    # y=[1,0,1,0], s=[0.9,0.8,0.7,0.1], 2 positives. Points by decreasing threshold:
    #   start (R=0,   P=1)   appended by sklearn
    #   t=0.9 tp=1 fp=0 -> (R=0.5, P=1)
    #   t=0.8 tp=1 fp=1 -> (R=0.5, P=1/2)
    #   t=0.7 tp=2 fp=1 -> (R=1,   P=2/3)
    #   t=0.1 tp=2 fp=2 -> (R=1,   P=1/2)
    # Trapezoids: 0.5*(1+1)/2 + 0 + 0.5*(1/2+2/3)/2 + 0 = 1/2 + 7/24 = 19/24.
    # Step AP: 0.5*1 + 0.5*(2/3) = 5/6.
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    assert pr_auc(y, s) == pytest.approx(19 / 24, abs=1e-15)
    assert average_precision(y, s) == pytest.approx(5 / 6, abs=1e-15)
    assert pr_auc(y, s) == pytest.approx(sk_pr_auc(y, s), abs=1e-12)


def test_hand_computed_tie():
    # y=[1,0,1,0], s=[0.9,0.5,0.5,0.1]: the tied pair is one threshold.
    #   start (R=0, P=1); t=0.9 -> (0.5, 1); t=0.5 tp=2 fp=1 -> (1, 2/3); t=0.1 -> (1, 1/2)
    # Area: 0.5*(1+1)/2 + 0.5*(1+2/3)/2 = 1/2 + 5/12 = 11/12.   Step AP: 1/2 + 1/3 = 5/6.
    y, s = np.array([1, 0, 1, 0]), np.array([0.9, 0.5, 0.5, 0.1])
    assert pr_auc(y, s) == pytest.approx(11 / 12, abs=1e-15)
    assert average_precision(y, s) == pytest.approx(5 / 6, abs=1e-15)
    # Order within the tie group must not matter.
    y2 = np.array([1, 1, 0, 0])
    s2 = np.array([0.9, 0.5, 0.5, 0.1])
    assert pr_auc(y2, s2) == pytest.approx(11 / 12, abs=1e-15)


def test_hand_computed_all_tied():
    # One threshold: (R=1, P=1/2) after the start point (0, 1): area 1*(1+1/2)/2 = 3/4,
    # the trapezoid rule's known optimism over the step AP of 1/2.
    y, s = np.array([1, 0, 0, 1]), np.full(4, 0.5)
    assert pr_auc(y, s) == pytest.approx(0.75, abs=1e-15)
    assert average_precision(y, s) == pytest.approx(0.5, abs=1e-15)


def test_hand_computed_top_negative_and_perfect():
    # y=[0,1], s=[0.9,0.1]: (0,1) -> (R=0,P=0) -> (R=1,P=1/2): area 1*(0+1/2)/2 = 1/4.
    assert pr_auc(np.array([0, 1]), np.array([0.9, 0.1])) == pytest.approx(0.25, abs=1e-15)
    assert average_precision(np.array([0, 1]), np.array([0.9, 0.1])) == pytest.approx(0.5)
    # Perfect ranking: precision 1 until full recall -> area 1.
    y, s = np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1])
    assert pr_auc(y, s) == pytest.approx(1.0, abs=1e-15)
    assert average_precision(y, s) == pytest.approx(1.0, abs=1e-15)


def test_no_positives_is_zero_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pr_auc(np.zeros(5, dtype=int), np.linspace(0, 1, 5)) == 0.0
        assert average_precision(np.zeros(5, dtype=int), np.linspace(0, 1, 5)) == 0.0


# ---------------------------------------------------------------------------------------
# Binary functions against sklearn
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_binary_matches_sklearn_random(decimals):
    rng = np.random.default_rng(1000 + (decimals or 0))
    for _ in range(150):
        n = int(rng.integers(1, 60))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        if y.sum() == 0:
            y[rng.integers(n)] = 1
        s = rng.random(n) + 0.3 * y
        if decimals is not None:
            s = np.round(s, decimals)  # heavy ties
        assert pr_auc(y, s) == pytest.approx(sk_pr_auc(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(sk_ap(y, s), abs=1e-12)


def test_binary_special_vectors_match_sklearn():
    rng = np.random.default_rng(7)
    cases = []
    for n in (1, 2, 5, 30):
        cases.append((np.ones(n, dtype=int), rng.random(n)))  # all positive
        y = np.zeros(n, dtype=int)
        y[rng.integers(n)] = 1
        cases.append((y, rng.random(n)))  # single positive
        cases.append((y, np.full(n, 0.3)))  # single positive, all tied
    cases.append((np.ones(4, dtype=int), np.full(4, 0.2)))  # all positive, all tied
    for y, s in cases:
        assert pr_auc(y, s) == pytest.approx(sk_pr_auc(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(sk_ap(y, s), abs=1e-12)


def test_binary_accepts_bool_and_float32():
    y = np.array([True, False, True, False])
    s = np.array([0.9, 0.8, 0.7, 0.1], dtype=np.float32)
    assert pr_auc(y, s) == pytest.approx(sk_pr_auc(y.astype(int), s), abs=1e-12)


# ---------------------------------------------------------------------------------------
# Multi-label metrics
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,n,decimals", [(0, 40, None), (1, 200, None), (2, 120, 1), (3, 7, 1), (4, 300, 2)])
def test_multilabel_matches_reference(seed, n, decimals):
    rng = np.random.default_rng(seed)
    y, p = random_problem(rng, n, decimals=decimals)
    m = multilabel_metrics(y, p)
    ref = ref_multilabel(y, p)
    for key in METRIC_KEYS:
        assert m[key] == pytest.approx(ref[key], abs=1e-10), key
    for name, v in zip(GENRES_SHORT, ref["per_genre"]):
        assert m[name] == pytest.approx(v, abs=1e-10), name


def test_multilabel_step_ap_matches_sklearn():
    rng = np.random.default_rng(11)
    for decimals in (None, 1):
        y, p = random_problem(rng, 150, decimals=decimals)
        y[np.arange(150), rng.integers(10, size=150)] = 1  # every trailer has a genre
        m = multilabel_metrics(y, p)
        for key, avg in zip(AP_KEYS, ("micro", "macro", "weighted", "samples")):
            assert m[key] == pytest.approx(100 * average_precision_score(y, p, average=avg), abs=1e-10), key


def test_no_positive_genre_counts_zero_in_macro_and_is_ignored_by_weighted():
    rng = np.random.default_rng(5)
    y, p = random_problem(rng, 60)
    y[:, 3] = 0  # crime absent from this split
    y[np.arange(60), rng.choice([0, 1, 2, 4], size=60)] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = multilabel_metrics(y, p)
    assert m["cri"] == 0.0
    others = [m[g] for g in GENRES_SHORT if g != "cri"]
    assert m["mAP"] == pytest.approx(sum(others) / 10, abs=1e-10)
    support = np.delete(y.sum(axis=0), 3)
    assert m["wAP"] == pytest.approx(np.average(others, weights=support), abs=1e-10)
    # The weighted value must not change whatever the absent genre's scores are.
    p2 = p.copy()
    p2[:, 3] = rng.random(60)
    assert multilabel_metrics(y, p2)["wAP"] == pytest.approx(m["wAP"], abs=1e-12)


def test_sample_without_positives_counts_zero():
    y = np.array([[1, 0, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.5, 0.4, 0.3]])
    m = multilabel_metrics(y, p)
    # Row 0 is a perfect ranking (1.0), row 1 has no positives (0): mean 0.5.
    assert m["sAP"] == pytest.approx(50.0)
    assert m["ap_samples"] == pytest.approx(50.0)


def test_all_negative_labels_give_zeros():
    m = multilabel_metrics(np.zeros((4, 10), dtype=int), np.random.default_rng(0).random((4, 10)))
    assert all(v == 0.0 for v in m.values())


def test_perfect_scores_give_100():
    rng = np.random.default_rng(9)
    y, _ = random_problem(rng, 50)
    y[:, 0] = 1
    m = multilabel_metrics(y, y * 0.8 + 0.1)
    for key in METRIC_KEYS + tuple(GENRES_SHORT):
        assert m[key] == pytest.approx(100.0), key


def test_keys_for_10_and_other_k():
    rng = np.random.default_rng(3)
    y, p = random_problem(rng, 30)
    m = multilabel_metrics(y, p)
    assert list(m) == list(METRIC_KEYS) + list(GENRES_SHORT) + list(AP_KEYS)
    y3, p3 = random_problem(rng, 30, k=3)
    m3 = multilabel_metrics(y3, p3)
    assert list(m3) == list(METRIC_KEYS) + ["g0", "g1", "g2"] + list(AP_KEYS)
    ref = ref_multilabel(y3, p3)
    assert m3["sAP"] == pytest.approx(ref["sAP"], abs=1e-10)
    assert all(isinstance(v, float) for v in m.values())


def test_accepts_float_labels_bool_and_float32_scores():
    rng = np.random.default_rng(4)
    y, p = random_problem(rng, 40)
    base = multilabel_metrics(y, p)
    alt = multilabel_metrics(y.astype(bool), p.astype(np.float32).astype(np.float64))
    assert multilabel_metrics(y.astype(np.float32), p) == base
    f32 = multilabel_metrics(y, p.astype(np.float32))
    assert f32 == alt


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "y,p,msg",
    [
        (np.zeros((4, 10)), np.zeros((4, 9)), "same shape"),
        (np.zeros(10), np.zeros(10), "2-D"),
        (np.zeros((2, 5, 2)), np.zeros((2, 5, 2)), "2-D"),
        (np.zeros((0, 10)), np.zeros((0, 10)), "at least one trailer"),
        (np.full((3, 10), 2), np.zeros((3, 10)), "only 0 and 1"),
        (np.full((3, 10), 0.5), np.zeros((3, 10)), "only 0 and 1"),
        (np.zeros((3, 10)), np.full((3, 10), np.nan), "NaN or Inf"),
        (np.zeros((3, 10)), np.full((3, 10), np.inf), "NaN or Inf"),
        (np.zeros((3, 10)), np.full((3, 10), "a"), "numeric"),
    ],
)
def test_multilabel_bad_inputs(y, p, msg):
    with pytest.raises(ValueError, match=msg):
        multilabel_metrics(y, p)


def test_binary_bad_inputs():
    with pytest.raises(ValueError, match="equal length"):
        pr_auc(np.array([1, 0]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        average_precision(np.array([1, 3]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        pr_auc(np.array([1, 0]), np.array([np.nan, 0.2]))


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

def test_metric_columns_and_format():
    assert metric_columns() == ["uAP", "mAP", "wAP", "sAP", *GENRES_SHORT]
    assert metric_columns(2) == ["uAP", "mAP", "wAP", "sAP", "g0", "g1"]
    m = {"uAP": 71.234, "mAP": 66.01, "wAP": 70.1, "sAP": 76.551, "act": 1.0}
    assert format_metrics(m) == "uAP 71.23 mAP 66.01 wAP 70.10 sAP 76.55"
