"""Hand-checked tests for eval.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from eval.metrics import (
    METRICS,
    average_precision,
    bootstrap_ci,
    calibrate_threshold,
    correct_detection_rate,
    detection_rate,
    false_attribution_rate,
    ndcg_at,
    parse_metric,
    per_query,
    recall_at,
    recall_curve,
    reciprocal_rank,
    success_at,
)

RANKING = ["a", "b", "c", "d", "e"]
REL3 = {"a", "c", "e"}  # relevant at ranks 1, 3, 5

L2, L3, L6 = math.log2(2), math.log2(3), math.log2(6)


# ---------------------------------------------------------------------------------- recall / success


def test_recall_at_several_relevant():
    assert recall_at(RANKING, REL3, 1) == pytest.approx(1 / 3)  # {a} of {a,c,e}
    assert recall_at(RANKING, REL3, 2) == pytest.approx(1 / 3)  # b is not relevant
    assert recall_at(RANKING, REL3, 3) == pytest.approx(2 / 3)  # {a,c}
    assert recall_at(RANKING, REL3, 5) == pytest.approx(1.0)  # {a,c,e}
    assert recall_at(RANKING, REL3, 50) == pytest.approx(1.0)  # k beyond the ranking


def test_recall_with_relevant_absent_from_ranking():
    # relevant {b, z}: only b (rank 2) is retrieved -> 1/2 whatever k >= 2
    assert recall_at(["a", "b"], {"b", "z"}, 1) == pytest.approx(0.0)
    assert recall_at(["a", "b"], {"b", "z"}, 10) == pytest.approx(0.5)


def test_success_at():
    assert success_at(RANKING, REL3, 1) == 1.0  # a at rank 1
    assert success_at(RANKING, {"c"}, 2) == 0.0  # c is at rank 3
    assert success_at(RANKING, {"c"}, 3) == 1.0
    assert success_at(RANKING, {"z"}, 10) == 0.0  # never retrieved


# ---------------------------------------------------------------------------------- AP / RR / nDCG


def test_average_precision_several_relevant():
    # relevant at ranks 1, 3, 5: precisions 1/1, 2/3, 3/5; divided by |relevant| = 3
    assert average_precision(RANKING, REL3) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(RANKING, REL3) == pytest.approx(34 / 45)  # (15 + 10 + 9) / 15 / 3


def test_average_precision_cutoff_keeps_full_denominator():
    # k=3: only ranks 1 and 3 count -> (1/1 + 2/3) / 3 (trec_eval: divide by |relevant|, not min(R, k))
    assert average_precision(RANKING, REL3, k=3) == pytest.approx((1 + 2 / 3) / 3)
    # k=1: (1/1) / 3
    assert average_precision(RANKING, REL3, k=1) == pytest.approx(1 / 3)


def test_average_precision_relevant_absent():
    # relevant {b, z}: b at rank 2 -> precision 1/2; z missing contributes 0; /2
    assert average_precision(["a", "b"], {"b", "z"}) == pytest.approx((1 / 2) / 2)


def test_reciprocal_rank():
    assert reciprocal_rank(RANKING, REL3) == pytest.approx(1.0)  # a at rank 1
    assert reciprocal_rank(["b", "d", "c"], {"c"}) == pytest.approx(1 / 3)  # c at rank 3
    assert reciprocal_rank(["b", "d", "c"], {"c"}, k=2) == 0.0  # rank 3 beyond k=2
    assert reciprocal_rank(["b", "d", "c"], {"z"}) == 0.0


def test_reciprocal_rank_default_cutoff_is_100():
    ranking = [f"x{i:03d}" for i in range(150)]
    assert reciprocal_rank(ranking, {"x099"}) == pytest.approx(1 / 100)  # rank 100 is inside
    assert reciprocal_rank(ranking, {"x100"}) == 0.0  # rank 101 is outside


def test_ndcg_several_relevant():
    # DCG@5 = 1/log2(2) + 1/log2(4) + 1/log2(6) (ranks 1, 3, 5)
    # IDCG@5 = 1/log2(2) + 1/log2(3) + 1/log2(4) (three relevant ids on top)
    dcg = 1 / L2 + 1 / 2 + 1 / L6
    idcg = 1 / L2 + 1 / L3 + 1 / 2
    assert ndcg_at(RANKING, REL3, 5) == pytest.approx(dcg / idcg)
    assert ndcg_at(RANKING, REL3, 5) == pytest.approx(0.8854598815714874)


def test_ndcg_cutoff_uses_min_relevant_k_in_ideal():
    # k=2: DCG = 1/log2(2) = 1 (b at rank 2 not relevant); IDCG = 1 + 1/log2(3) (min(3, 2) = 2 ones)
    assert ndcg_at(RANKING, REL3, 2) == pytest.approx(1 / (1 + 1 / L3))
    # k=1: DCG = 1, IDCG = 1
    assert ndcg_at(RANKING, REL3, 1) == pytest.approx(1.0)


def test_ndcg_relevant_absent():
    # relevant {b, z}: DCG = 1/log2(3) (b at rank 2), IDCG = 1 + 1/log2(3)
    assert ndcg_at(["a", "b"], {"b", "z"}, 10) == pytest.approx((1 / L3) / (1 + 1 / L3))


# ---------------------------------------------------------------------------------- edge cases


ALL_METRICS_WITH_K = [
    lambda r, rel: recall_at(r, rel, 5),
    lambda r, rel: success_at(r, rel, 5),
    lambda r, rel: average_precision(r, rel),
    lambda r, rel: reciprocal_rank(r, rel),
    lambda r, rel: ndcg_at(r, rel, 5),
]


@pytest.mark.parametrize("fn", ALL_METRICS_WITH_K)
def test_empty_ranking_scores_zero(fn):
    assert fn([], {"a"}) == 0.0
    assert fn([], {"a", "b"}) == 0.0


@pytest.mark.parametrize("fn", ALL_METRICS_WITH_K)
def test_empty_relevant_raises(fn):
    with pytest.raises(ValueError, match="relevant set is empty"):
        fn(["a"], set())
    with pytest.raises(ValueError, match="relevant set is empty"):
        fn([], set())  # even with an empty ranking


@pytest.mark.parametrize("bad_k", [0, -1, 1.5, True, "5"])
def test_bad_k_raises(bad_k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        recall_at(RANKING, REL3, bad_k)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        average_precision(RANKING, REL3, k=bad_k)


def test_duplicated_ids_count_once():
    dup = ["b", "b", "a"]  # read as [b, a]
    rel = {"a", "b"}
    # AP: b at rank 1 (1/1), a at rank 2 (2/2) -> (1 + 1) / 2 = 1; counting b twice would exceed 1
    assert average_precision(dup, rel) == pytest.approx(1.0)
    # recall@2 on [b, a] = 2/2
    assert recall_at(dup, rel, 2) == pytest.approx(1.0)
    # recall@1 on [b] = 1/2
    assert recall_at(dup, rel, 1) == pytest.approx(0.5)
    # nDCG@2: DCG = 1 + 1/log2(3) = IDCG -> 1
    assert ndcg_at(dup, rel, 2) == pytest.approx(1.0)
    # a duplicate does not take up a rank: [x, x, a] -> [x, a], a at rank 2
    assert reciprocal_rank(["x", "x", "a"], {"a"}) == pytest.approx(1 / 2)
    # and only counts once toward recall: [a, a] with relevant {a, b} -> 1/2
    assert recall_at(["a", "a"], {"a", "b"}, 2) == pytest.approx(0.5)


def test_relevant_may_be_any_collection():
    assert recall_at(RANKING, ["a", "c", "e"], 3) == pytest.approx(2 / 3)
    assert recall_at(RANKING, frozenset(REL3), 3) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------- names


def test_metrics_names_and_order():
    assert list(METRICS) == [
        "recall@1",
        "recall@5",
        "recall@10",
        "map@100",
        "mrr",
        "ndcg@10",
        "success@1",
        "success@10",
    ]


def test_metrics_values_on_fixed_ranking():
    got = {name: fn(RANKING, REL3) for name, fn in METRICS.items()}
    assert got == pytest.approx(
        {
            "recall@1": 1 / 3,  # a
            "recall@5": 1.0,  # a, c, e
            "recall@10": 1.0,
            "map@100": (1 + 2 / 3 + 3 / 5) / 3,
            "mrr": 1.0,  # a at rank 1
            "ndcg@10": (1 + 1 / 2 + 1 / L6) / (1 + 1 / L3 + 1 / 2),  # IDCG with min(3, 10) = 3 ones
            "success@1": 1.0,
            "success@10": 1.0,
        }
    )


def test_parse_metric_known_names_return_table_entries():
    for name in METRICS:
        assert parse_metric(name) is METRICS[name]


def test_parse_metric_unusual_k():
    ranking = [f"x{i:02d}" for i in range(60)]
    rel = {"x39", "x59"}  # ranks 40 and 60
    # map@50: only rank 40 counts -> (1/40) / 2
    assert parse_metric("map@50")(ranking, rel) == pytest.approx((1 / 40) / 2)
    # map@100: (1/40 + 2/60) / 2
    assert parse_metric("map@100")(ranking, rel) == pytest.approx((1 / 40 + 2 / 60) / 2)
    # mrr@39: first relevant at rank 40 -> 0; mrr@40 -> 1/40
    assert parse_metric("mrr@39")(ranking, rel) == 0.0
    assert parse_metric("mrr@40")(ranking, rel) == pytest.approx(1 / 40)
    # recall@59: one of two; recall@60: both
    assert parse_metric("recall@59")(ranking, rel) == pytest.approx(0.5)
    assert parse_metric("recall@60")(ranking, rel) == pytest.approx(1.0)
    # success@40 -> 1, success@3 -> 0
    assert parse_metric("success@40")(ranking, rel) == 1.0
    assert parse_metric("success@3")(ranking, rel) == 0.0
    # ndcg@40: DCG = 1/log2(41); IDCG = 1 + 1/log2(3)
    assert parse_metric("ndcg@40")(ranking, rel) == pytest.approx((1 / math.log2(41)) / (1 + 1 / L3))
    # leading zeros, case and surrounding whitespace: "Recall@007 " == recall@7
    assert parse_metric(" Recall@007 ")(RANKING, REL3) == pytest.approx(1.0)
    # mrr@100 agrees with mrr
    assert parse_metric("mrr@100")(["b", "d", "c"], {"c"}) == pytest.approx(1 / 3)
    assert parse_metric("map@50").__name__ == "map@50"


@pytest.mark.parametrize(
    "bad",
    ["", "map", "recall", "recall@", "recall@0", "recall@-1", "recall@1.5", "precision@5", "recall@k", "mrr@",
     "ndcg10"],
)
def test_parse_metric_bad_names(bad):
    with pytest.raises(ValueError, match="recall@K") as info:
        parse_metric(bad)
    assert repr(bad) in str(info.value)


def test_parse_metric_non_string():
    with pytest.raises(ValueError, match="must be a string"):
        parse_metric(5)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- per_query


def test_per_query_sorted_ids_missing_run_and_novel_excluded():
    qrels = {"q2": {"a"}, "q1": {"b", "c"}, "q3": set(), "q4": {"z"}}
    runs = {"q1": ["c", "a", "b"], "q2": ["a"], "q3": ["a"], "q9": ["a"]}  # q4 missing, q9 extra
    qids, vals = per_query(runs, qrels, ["recall@1", "mrr", "map@100"])
    assert qids == ["q1", "q2", "q4"]  # sorted; q3 (novel) excluded
    assert vals.shape == (3, 3)
    assert vals.dtype == np.float64
    expected = np.array(
        [
            [1 / 2, 1.0, (1 / 1 + 2 / 3) / 2],  # q1: c@1 of {b,c}; RR 1; AP (1/1 + 2/3)/2 with b at rank 3
            [1.0, 1.0, 1.0],  # q2: a at rank 1, only relevant
            [0.0, 0.0, 0.0],  # q4: no run -> empty ranking
        ]
    )
    np.testing.assert_allclose(vals, expected)


def test_per_query_no_queries_and_bad_metric():
    qids, vals = per_query({"q": ["a"]}, {"q": set()}, ["mrr", "ndcg@10"])
    assert qids == []
    assert vals.shape == (0, 2)
    with pytest.raises(ValueError, match="unknown metric"):
        per_query({}, {"q": {"a"}}, ["precision@5"])
    with pytest.raises(ValueError, match="list of metric names"):
        per_query({}, {"q": {"a"}}, "mrr")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- bootstrap


def _values() -> np.ndarray:
    rng = np.random.default_rng(123)
    v = rng.random((30, 3))
    v[:, 2] = 1.0  # a constant column
    return v


def test_bootstrap_deterministic_and_brackets_mean():
    v = _values()
    a = bootstrap_ci(v, n_boot=500, seed=7)
    b = bootstrap_ci(v, n_boot=500, seed=7)
    c = bootstrap_ci(v, n_boot=500, seed=8)
    assert a.shape == (3, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    means = v.mean(axis=0)
    assert np.all(a[:, 0] <= means) and np.all(means <= a[:, 1])
    assert np.all(a[:2, 0] < a[:2, 1])  # non-degenerate columns
    assert a[2].tolist() == [1.0, 1.0]  # constant column: every resampled mean is 1


def test_bootstrap_two_values_hand_checked():
    # values {0, 1}: resampled means are 0 (p=1/4), 0.5 (1/2), 1 (1/4);
    # so the 2.5th percentile is 0 and the 97.5th is 1
    ci = bootstrap_ci(np.array([[0.0], [1.0]]), n_boot=2000, seed=0)
    np.testing.assert_array_equal(ci, [[0.0, 1.0]])


def test_bootstrap_one_and_zero_queries():
    one = bootstrap_ci(np.array([[0.25, 0.7, 0.1]]), n_boot=100, seed=3)
    np.testing.assert_array_equal(one, [[0.25, 0.25], [0.7, 0.7], [0.1, 0.1]])
    zero = bootstrap_ci(np.zeros((0, 4)))
    assert zero.shape == (4, 2)
    assert np.isnan(zero).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": np.zeros(5)}, "n_queries, n_metrics"),
        ({"values": np.zeros((3, 2)), "alpha": 0.0}, "alpha"),
        ({"values": np.zeros((3, 2)), "alpha": 1.0}, "alpha"),
        ({"values": np.zeros((3, 2)), "n_boot": 0}, "n_boot"),
    ],
)
def test_bootstrap_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)


# ---------------------------------------------------------------------------------- recall curve


def test_recall_curve_hand_checked_and_monotone():
    qrels = {"q1": {"b", "d"}, "q2": {"y"}, "q3": set(), "q4": {"z"}}
    runs = {"q1": ["a", "b", "c", "d"], "q2": ["x"], "q3": ["a"]}  # q4 missing
    curve = recall_curve(runs, qrels, max_k=5)
    # q1: [0, 1/2, 1/2, 1, 1]; q2 and q4: zeros; q3 (novel) excluded -> mean over 3 queries
    np.testing.assert_allclose(curve, [0.0, 1 / 6, 1 / 6, 1 / 3, 1 / 3])
    assert np.all(np.diff(curve) >= 0)
    # agrees with per_query's recall@K
    for k in range(1, 6):
        _, vals = per_query(runs, qrels, [f"recall@{k}"])
        assert curve[k - 1] == pytest.approx(vals.mean())


def test_recall_curve_default_length_and_monotone_on_random_runs():
    rng = np.random.default_rng(0)
    pool = [f"r{i}" for i in range(300)]
    qrels = {f"q{j}": set(rng.choice(pool, size=3, replace=False).tolist()) for j in range(10)}
    runs = {f"q{j}": rng.permutation(pool)[:150].tolist() for j in range(10)}
    curve = recall_curve(runs, qrels)
    assert curve.shape == (100,)
    assert np.all(np.diff(curve) >= 0)
    assert 0.0 <= curve[0] and curve[-1] <= 1.0
    _, vals = per_query(runs, qrels, ["recall@100"])
    assert curve[-1] == pytest.approx(vals.mean())


def test_recall_curve_no_queries_and_bad_max_k():
    curve = recall_curve({}, {"q": set()}, max_k=3)
    assert curve.shape == (3,) and np.isnan(curve).all()
    with pytest.raises(ValueError, match="max_k"):
        recall_curve({}, {"q": {"a"}}, max_k=0)


# ---------------------------------------------------------------------------------- detection


NOVEL = np.array([0.1, 0.2, 0.3, 0.4, np.nan])  # 5 novel queries, one returned nothing


def test_calibrate_threshold_basic():
    # target 0.2 of 5 -> at most 1 attributed: keep 0.4, exclude 0.3 -> just above 0.3
    t = calibrate_threshold(NOVEL, 0.2)
    assert t == np.nextafter(0.3, np.inf)
    assert false_attribution_rate(NOVEL, t) == pytest.approx(1 / 5)  # only 0.4
    assert false_attribution_rate(NOVEL, 0.3) == pytest.approx(2 / 5)  # t is the smallest that works
    # target 0 -> exclude everything: just above the max 0.4
    t0 = calibrate_threshold(NOVEL, 0.0)
    assert t0 == np.nextafter(0.4, np.inf)
    assert false_attribution_rate(NOVEL, t0) == 0.0


def test_calibrate_threshold_loose_target_returns_minus_inf():
    # 4 non-NaN scores of 5 -> rate at -inf is 4/5 = 0.8 <= 0.8
    assert calibrate_threshold(NOVEL, 0.8) == -math.inf
    assert false_attribution_rate(NOVEL, -math.inf) == pytest.approx(4 / 5)  # NaN never counts
    assert calibrate_threshold(NOVEL, 1.0) == -math.inf
    # 0.79 < 0.8 -> must exclude the lowest score 0.1
    assert calibrate_threshold(NOVEL, 0.79) == np.nextafter(0.1, np.inf)


def test_calibrate_threshold_no_scores():
    assert calibrate_threshold(np.array([]), 0.05) == -math.inf
    assert calibrate_threshold(np.array([np.nan, np.nan]), 0.0) == -math.inf  # nothing attributed


def test_calibrate_threshold_ties():
    # 4 queries, target 0.25 -> at most 1 attributed; the two 0.5s tie, so both must go -> FAR 0
    novel = np.array([0.5, 0.5, 0.1, 0.2])
    t = calibrate_threshold(novel, 0.25)
    assert t == np.nextafter(0.5, np.inf)
    assert false_attribution_rate(novel, t) == 0.0
    # target 0.5 -> the tied pair (2/4 = 0.5) is allowed; 0.2 must go
    t2 = calibrate_threshold(novel, 0.5)
    assert t2 == np.nextafter(0.2, np.inf)
    assert false_attribution_rate(novel, t2) == pytest.approx(0.5)


def test_calibrate_threshold_negative_scores():
    novel = np.array([-3.0, -2.0, -1.0])
    # target 1/3 -> keep -1 (1/3), exclude -2
    t = calibrate_threshold(novel, 1 / 3)
    assert t == np.nextafter(-2.0, np.inf)
    assert -2.0 < t < -1.0
    assert false_attribution_rate(novel, t) == pytest.approx(1 / 3)


def test_calibrate_threshold_no_floor_rounding():
    # 100 scores 0..99, target 0.29 -> 29 may stay (71..99): 0.29 * 100 is 28.999... in floats
    novel = np.arange(100, dtype=float)
    t = calibrate_threshold(novel, 0.29)
    assert t == np.nextafter(70.0, np.inf)
    assert false_attribution_rate(novel, t) == pytest.approx(0.29)


@pytest.mark.parametrize("far", [-0.1, 1.5, float("nan")])
def test_calibrate_threshold_bad_target(far):
    with pytest.raises(ValueError, match="target_far"):
        calibrate_threshold(NOVEL, far)


def test_calibrate_threshold_rejects_bad_scores():
    with pytest.raises(ValueError, match=r"\+inf"):
        calibrate_threshold(np.array([0.1, np.inf]), 0.0)
    with pytest.raises(ValueError, match="1-D"):
        calibrate_threshold(np.zeros((2, 2)), 0.1)


def test_false_attribution_rate_ties_and_nan():
    novel = np.array([0.1, 0.5, np.nan, 0.5])
    assert false_attribution_rate(novel, 0.5) == pytest.approx(2 / 4)  # both 0.5s tie at >=; NaN never
    assert false_attribution_rate(novel, np.nextafter(0.5, np.inf)) == 0.0
    assert false_attribution_rate(novel, -math.inf) == pytest.approx(3 / 4)
    assert math.isnan(false_attribution_rate(np.array([]), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        false_attribution_rate(novel, float("nan"))


def test_detection_rate():
    sourced = np.array([0.9, 0.2, np.nan, 0.6])
    assert detection_rate(sourced, 0.6) == pytest.approx(2 / 4)  # 0.9 and 0.6 (tie counts)
    assert detection_rate(sourced, 0.95) == 0.0
    assert detection_rate(sourced, -math.inf) == pytest.approx(3 / 4)  # NaN never counts
    assert math.isnan(detection_rate(np.array([]), 0.0))


def test_correct_detection_rate():
    sourced = np.array([0.9, 0.2, np.nan, 0.6, 0.7])
    top_ok = np.array([True, True, True, False, True])
    # >= 0.6: 0.9 (ok), 0.6 (wrong top), 0.7 (ok) -> 2 of 5; NaN row never counts even if "relevant"
    assert correct_detection_rate(sourced, top_ok, 0.6) == pytest.approx(2 / 5)
    # -inf: all non-NaN rows with a relevant top: 0.9, 0.2, 0.7 -> 3 of 5
    assert correct_detection_rate(sourced, top_ok, -math.inf) == pytest.approx(3 / 5)
    # 0/1 integers are accepted as booleans
    assert correct_detection_rate(sourced, top_ok.astype(int), 0.6) == pytest.approx(2 / 5)
    assert math.isnan(correct_detection_rate(np.array([]), np.array([], dtype=bool), 0.5))


def test_correct_detection_rate_bad_input():
    with pytest.raises(ValueError, match="shape"):
        correct_detection_rate(np.array([0.5, 0.6]), np.array([True]), 0.5)
    with pytest.raises(ValueError, match="boolean"):
        correct_detection_rate(np.array([0.5, 0.6]), np.array([0.3, 1.0]), 0.5)
    with pytest.raises(ValueError, match="boolean"):
        correct_detection_rate(np.array([0.5, 0.6]), np.array([2, 1]), 0.5)


def test_calibrated_threshold_roundtrip():
    rng = np.random.default_rng(5)
    novel = np.round(rng.normal(size=200), 2)  # rounding creates many ties
    novel[::17] = np.nan
    for far in (0.0, 0.01, 0.05, 0.1, 0.5):
        t = calibrate_threshold(novel, far)
        assert false_attribution_rate(novel, t) <= far
        # t is the smallest: the largest excluded score, if included, breaks the target
        below = np.nextafter(t, -np.inf)
        assert false_attribution_rate(novel, below) > far


# ---------------------------------------------------------------------------------- independent cross-check
def test_metrics_agree_with_trec_eval_on_random_runs():
    """Our metrics against trec_eval (pytrec_eval) on 300 random queries: rankings of 1-60 ids, 1-8 relevant."""
    import pytrec_eval  # a dev dependency: the check must not be skipped
    rng = np.random.default_rng(2026)
    runs, qrels = {}, {}
    for qi in range(300):
        pool = [f"d{j}" for j in rng.permutation(80)]
        ranking = pool[: int(rng.integers(1, 61))]
        relevant = set(rng.choice(pool, size=int(rng.integers(1, 9)), replace=False).tolist())
        q = f"q{qi}"
        runs[q] = {d: float(len(ranking) - i) for i, d in enumerate(ranking)}  # distinct scores: our order
        qrels[q] = {d: 1 for d in relevant}
    measures = {"recall.1", "recall.5", "recall.10", "map_cut.100", "recip_rank", "ndcg_cut.10", "success.1",
                "success.10"}
    theirs = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(runs)
    ours = {"recall@1": "recall_1", "recall@5": "recall_5", "recall@10": "recall_10", "map@100": "map_cut_100",
            "mrr": "recip_rank", "ndcg@10": "ndcg_cut_10", "success@1": "success_1", "success@10": "success_10"}
    for q in runs:
        ranking = sorted(runs[q], key=lambda d: -runs[q][d])
        for name, key in ours.items():
            assert parse_metric(name)(ranking, set(qrels[q])) == pytest.approx(theirs[q][key], abs=1e-9), (q, name)
