"""Fusion against arithmetic worked out by hand, and the weights file format."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import engine
from engine.fusion import FusionWeights, feature_matrix, fit_logistic, normalize, ordinal_ranks, rrf

NAN = float("nan")


def test_ordinal_ranks_break_ties_by_position_and_skip_missing():
    # values 0.2, 0.9, 0.2, nan, 0.5 -> order 0.9 (pos 1), 0.5 (pos 4), 0.2 (pos 0), 0.2 (pos 2)
    assert ordinal_ranks(np.array([0.2, 0.9, 0.2, NAN, 0.5])).tolist() == [3, 1, 4, 0, 2]


def test_rrf_matches_hand_computation():
    # pool of 4 candidates; ranker a ranks them 2,1,3,- ; ranker b ranks them 1,-,2,3 (k = 60)
    a = np.array([0.8, 0.9, 0.1, NAN])
    b = np.array([5.0, NAN, 3.0, 1.0])
    got = rrf({"a": a, "b": b}, k=60)
    want = [1 / 62 + 1 / 61, 1 / 61, 1 / 63 + 1 / 62, 1 / 63]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the order: candidate 0 (0.032522), 2 (0.032002), 1 (0.016393), 3 (0.015873)
    assert np.argsort(-got).tolist() == [0, 2, 1, 3]
    np.testing.assert_allclose(rrf({"a": a}, k=1), [1 / 3, 1 / 2, 1 / 4, 0.0])


def test_normalisations_by_hand():
    x = np.array([1.0, 2.0, 3.0, NAN])
    # mean 2, population std sqrt(2/3) = 0.8165
    np.testing.assert_allclose(normalize(x, "z"), [-1.224745, 0.0, 1.224745, 0.0], atol=1e-6)
    np.testing.assert_allclose(normalize(x, "mm"), [0.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(normalize(x, "rr", 60), [1 / 63, 1 / 62, 1 / 61, 0.0])
    raw = normalize(x, "raw")
    assert raw[:3].tolist() == [1.0, 2.0, 3.0] and math.isnan(raw[3])
    assert normalize(np.array([NAN, NAN]), "z").tolist() == [0.0, 0.0]
    assert normalize(np.array([4.0, 4.0]), "z").tolist() == [0.0, 0.0]  # constant: no information
    with pytest.raises(ValueError, match="unknown normalisation 'log'"):
        normalize(x, "log")


@pytest.mark.parametrize("how", ["raw", "z", "mm", "rr", "nd", "ndz"])
def test_columns_are_normalised_together_as_one_by_one(how):
    """feature_matrix normalises all columns of a transform at once; each column equals normalize() on its own,
    including missing values, constant and all-missing columns, exact copies (cosine 1) and empty pools."""
    from engine.fusion._normalize import normalize_columns

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 7, 40):
        X = rng.uniform(-1, 1, (n, 5))
        X[rng.random((n, 5)) < 0.3] = NAN
        X[:, 1], X[:, 2], X[:, 3] = 0.25, NAN, 1.0
        got = normalize_columns(X, how, 60)
        want = np.stack([normalize(X[:, j], how, 60) for j in range(5)], axis=1) if n else np.zeros((0, 5))
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert np.array_equal(np.isnan(got), np.isnan(want))


def test_weighted_fusion_matches_hand_computation():
    feats = {"clip": np.array([0.9, 0.5, NAN]), "bm25": np.array([0.0, 10.0, 5.0])}
    w = FusionWeights(features=["clip", "bm25:rr"], weights=[2.0, 30.0], bias=-1.0, mean=[0.5, 0.0],
                      std=[0.25, 1.0], models={"fingerprint": "x"})
    # candidate 0: clip (0.9-0.5)/0.25 = 1.6 -> 3.2 ; bm25 rank 3 -> 1/63 -> 30/63 = 0.476190 ; -1 -> 2.676190
    # candidate 1: clip 0 -> 0 ; bm25 rank 1 -> 30/61 = 0.491803 ; -1 -> -0.508197
    # candidate 2: clip missing -> mean -> 0 ; bm25 rank 2 -> 30/62 = 0.483871 ; -1 -> -0.516129
    np.testing.assert_allclose(w.score(feats), [2.676190, -0.508197, -0.516129], atol=1e-6)
    X = feature_matrix(feats, ["clip", "bm25:rr"])
    assert X.shape == (3, 2) and math.isnan(X[2, 0])


def test_weights_file_round_trip_and_validation(tmp_path):
    w = FusionWeights(features=["clip", "dino_patch:z", "bm25:rr"], weights=[1.5, -0.25, 3.0], bias=0.1,
                      mean=[0.1, 0.0, 0.01], std=[0.2, 1.0, 0.005], models={"fingerprint": "abc", "profile": "tiny"},
                      threshold=0.7, threshold_rule="target FAR 0.05 on tune",
                      provenance={"benchmark": "b", "metric": "map@100"})
    w.save(tmp_path / "w.json")
    d = json.loads((tmp_path / "w.json").read_text())
    assert d["format"] == "attrib-fusion-weights" and d["version"] == 1
    back = FusionWeights.load(tmp_path / "w.json")
    assert back.to_dict() == w.to_dict()
    for mutate, msg in [
        (lambda d: d.update(version=2), "version 2"),
        (lambda d: d.update(format="other"), "not an attrib fusion weights file"),
        (lambda d: d.update(weights=[1.0]), "differ in length"),
        (lambda d: d.update(features=["clip", "dino_patch:z", "sift"]), "unknown fusion feature 'sift'"),
        (lambda d: d.update(std=[0.2, 0.0, 1.0]), "std is not positive"),
        (lambda d: d.pop("bias"), "damaged"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(engine.FusionWeightsError, match=msg):
            FusionWeights.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(engine.FusionWeightsError, match="cannot be read"):
        FusionWeights.load(tmp_path / "junk.json")
    with pytest.raises(engine.FusionWeightsError, match="does not exist"):
        FusionWeights.load(tmp_path / "none.json")
    with pytest.raises(engine.ModelMismatchError, match="learned for models abc"):
        back.check_models("def")


def test_one_tie_rule_everywhere_score_then_row():
    """Ties are broken by record row ascending (source order) by every ranking of the engine."""
    from engine import Ranking, ranking_order
    from engine.fusion import Fusion

    rows = np.array([30, 10, 20, 40], np.int64)
    scores = np.array([0.5, 0.5, 0.9, NAN])
    assert ranking_order(rows, np.where(np.isfinite(scores), scores, -np.inf)).tolist() == [2, 1, 0, 3]
    r = Ranking.from_scores("x", rows, scores, k=10)
    assert r.rows.tolist() == [20, 10, 30]  # NaN dropped; 10 before 30 at equal scores
    # within a pool (rows ascending) the per-ranker ranks and RRF follow the same rule
    pool_rows = np.sort(rows)
    assert ordinal_ranks(np.array([0.5, 0.9, 0.5, NAN])).tolist() == [2, 1, 3, 0]
    pool = engine.Pool(pool_rows, {}, {"a": np.array([0.5, 0.5, 0.5, 0.5])})
    fused = Fusion(None, 60).scores(pool)
    assert ranking_order(pool.rows, fused).tolist() == [0, 1, 2, 3]  # strictly decreasing RRF by row


def test_logistic_fit_is_sane_on_separable_and_collinear_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 1))
    Z = np.hstack([x, x, -x])  # perfectly collinear copies
    y = (x[:, 0] > 0).astype(float)  # separable
    w, b = fit_logistic(Z, y, l2=1.0)
    assert np.all(np.isfinite(w)) and abs(b) < 1.0 and np.abs(w).max() < 20
    s = Z @ w + b
    assert ((s > 0) == (y > 0)).mean() == 1.0


def test_score_parts_by_evidence_kind_add_up_to_the_score():
    """Worked by hand: clip (image) and bm25 (text); each kind's part is its w * standardised value."""
    import numpy as np

    from engine import FusionWeights, feature_names

    w = FusionWeights(features=["clip", "clip:z", "bm25"], weights=[2.0, 1.0, 0.5], bias=-1.0, mean=[0.5, 0.0, 2.0],
                      std=[0.25, 1.0, 2.0], models={})
    feats = {f: np.full(2, np.nan) for f in feature_names()}
    feats["clip"] = np.array([1.0, 0.5])  # z over the pool: +1, -1
    feats["bm25"] = np.array([6.0, np.nan])  # missing -> the mean -> part 0
    parts = w.parts(feats)
    assert set(parts) == {"image", "text"}
    assert parts["image"].tolist() == [2.0 * 2.0 + 1.0, 0.0 - 1.0]
    assert parts["text"].tolist() == [0.5 * 2.0, 0.0]
    assert (w.bias + parts["image"] + parts["text"]).tolist() == w.score(feats).tolist()


def test_auto_prefers_the_calibration_and_text_only_weights_for_prompt_only_queries(monkeypatch):
    """'auto': the index's calibration first; for a prompt-only query or a caption-only index (text_only),
    weights over text features only are preferred when some exist for the models, else the calibration;
    a calibration for other models is not used, and the answer says so."""
    import engine.fusion.resolve as R
    from engine.fusion import resolve_fusion

    fp = "f" * 16

    def weights(features, name):
        n = len(features)
        w = FusionWeights(features=features, weights=[1.0] * n, bias=0.0, mean=[0.0] * n, std=[1.0] * n,
                          models={"fingerprint": fp, "profile": "p"}, threshold=0.5)
        w.name = name
        return w

    cal = weights(["clip", "bm25"], "index:calibration.json")
    text = weights(["bm25", "phrase"], "shipped:text.json")
    full = weights(["clip", "dino"], "shipped:full.json")
    assert text.text_only and not cal.text_only
    monkeypatch.setattr(R, "_shipped", lambda: (full,))
    assert resolve_fusion("auto", fp, "here", calibration=cal).weights is cal
    assert resolve_fusion("auto", fp, "here", text_only=True, calibration=cal).weights is cal  # no text-only ones
    assert resolve_fusion("auto", fp, "here", text_only=True).weights is full
    monkeypatch.setattr(R, "_shipped", lambda: (full, text))
    assert resolve_fusion("auto", fp, "here", text_only=True, calibration=cal).weights is text
    assert resolve_fusion("auto", fp, "here", text_only=False, calibration=cal).weights is cal
    other = weights(["clip"], "index:calibration.json")
    other.models = {"fingerprint": "0" * 16, "profile": "q"}
    f = resolve_fusion("auto", fp, "here", calibration=other, warnings=["stale"])
    assert f.weights is full and f.warnings[0] == "stale" and "not used" in f.warnings[1]
    assert resolve_fusion("rrf", fp, "here", calibration=cal).weights is None


def test_evidence_levels_are_validated(tmp_path):
    w = FusionWeights(features=["clip"], weights=[1.0], bias=0.0, mean=[0.0], std=[1.0],
                      models={"fingerprint": "f" * 16, "profile": "p"}, evidence_levels={"image": 0.5})
    p = tmp_path / "w.json"
    w.save(p)
    assert FusionWeights.load(p).evidence_levels == {"image": 0.5}
    for bad, what in (({"sound": 1.0}, "evidence_levels has kind 'sound'"),
                      ({"image": "x"}, "evidence_levels.image is 'x', not a number")):
        d = json.loads(p.read_text())
        d["evidence_levels"] = bad
        p.write_text(json.dumps(d))
        with pytest.raises(engine.FusionWeightsError, match=what):
            FusionWeights.load(p)
