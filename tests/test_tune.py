"""eval.tune: learning fusion weights on the tune split only, weights files with provenance."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

import engine
from engine.cli import main
from eval.bench import load_benchmark
from eval.run import evaluate, run_queries
from eval.tune import learn, tune


def _copy(bench: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bench, tmp_path / "b"))


def test_tuning_never_reads_the_test_split(bench, bidx, tmp_path, tiny):
    b, idx = bidx
    w1, evals = tune(b, idx, tmp_path / "w1.json", progress=False)
    # corrupt every test query: other prompts, other images, other (valid) relevant ids
    bad = _copy(bench, tmp_path)
    q = pl.read_parquet(bad / "queries.parquet")
    test = q["split"] == "test"
    ids = pl.read_parquet(bad / "corpus.parquet")["id"].to_list()
    q = q.with_columns(
        pl.when(test).then(pl.lit("utterly different words")).otherwise(pl.col("prompt")).alias("prompt"),
        pl.when(test).then(pl.lit(pl.read_parquet(bad / "corpus.parquet")["image"][0]))
        .otherwise(pl.col("image")).alias("image"),
        pl.when(test).then(pl.lit([ids[-1]])).otherwise(pl.col("relevant")).alias("relevant"),
    )
    q.write_parquet(bad / "queries.parquet")
    b2 = load_benchmark(bad)
    idx2 = engine.open_index(idx.path)
    idx2.use_encoders(tiny)
    w2, evals2 = tune(b2, idx2, tmp_path / "w2.json", progress=False)
    assert w1.features == w2.features and w1.weights == w2.weights and w1.bias == w2.bias
    assert w1.threshold == w2.threshold and w1.mean == w2.mean and w1.std == w2.std
    assert evals["tune"].result["metrics"] == evals2["tune"].result["metrics"]
    assert evals["test"].result["metrics"] != evals2["test"].result["metrics"]  # the test split did change
    # learn() refuses test queries outright
    runs = run_queries(b, idx, b.split("test"), progress=False)
    with pytest.raises(engine.AttribError, match="outside the tune split"):
        learn(runs, {"fingerprint": idx.fingerprint})


def test_weights_file_records_provenance_and_round_trips(bench, bidx, tmp_path, capsys):
    b, idx = bidx
    assert main(["tune", str(bench), "--models", "tiny", "--out", str(tmp_path / "w.json"), "--no-progress",
                 "--metric", "map@50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    w = engine.FusionWeights.load(tmp_path / "w.json")
    assert w.features == list(engine.feature_specs()) and w.models["fingerprint"] == idx.fingerprint
    p = w.provenance
    assert p["benchmark"] == str(bench) and p["metric"] == "map@50" and p["benchmark_sha256"] == b.content_hash
    assert set(p["scores"]) == {"tune", "test"} and set(p["scores"]["test"]) == {*engine.main_rankers(), "rrf", "fused"}
    assert p["created"][:4].isdigit() and w.threshold is not None
    assert out["scores"]["test"]["fused"] == p["scores"]["test"]["fused"]
    # bench run and query use it; fused then differs from rrf
    assert main(["bench", "run", str(bench), "--models", "tiny", "--weights", str(tmp_path / "w.json"),
                 "--json", "--no-progress"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["fusion"]["fused"]["method"] == "weighted"
    assert run["novel"]["rankers"]["fused"]["threshold"] == pytest.approx(w.threshold, abs=1e-5)
    # weights for other models are refused
    d = json.loads((tmp_path / "w.json").read_text())
    d["models"]["fingerprint"] = "ffffffffffffffff"
    (tmp_path / "other.json").write_text(json.dumps(d))
    assert main(["bench", "run", str(bench), "--models", "tiny", "--weights", str(tmp_path / "other.json"),
                 "--no-progress"]) == 2
    assert "learned for models ffffffffffffffff" in capsys.readouterr().err


def test_learned_fusion_beats_rrf_on_the_tune_split(bidx):
    b, idx = bidx
    runs = run_queries(b, idx, b.split("tune"), progress=False)
    res = learn(runs, {"fingerprint": idx.fingerprint})
    ev = evaluate(b, idx, "tune", weights=res.weights, progress=False, runs_by_split={"tune": runs})
    assert ev.result["metrics"]["fused"]["map@100"] >= ev.result["metrics"]["rrf"]["map@100"]


def test_tuning_on_a_caption_only_benchmark_learns_text_weights(tmp_path, cache, capsys):
    """A reworded caption-only benchmark (no images anywhere): the weights use text features only, say so, and
    a caption-only index fuses with them instead of RRF over one ranker."""
    from test_importer import _product_csv, _unmem_csv

    from eval.importer import import_memorized

    mem, unmem = _product_csv(tmp_path / "m.csv", 24), _unmem_csv(tmp_path / "u.csv", 12)
    import_memorized(mem, tmp_path / "rw", unmemorized=unmem, reword=3, seed=4)
    assert main(["tune", str(tmp_path / "rw"), "--models", "tiny", "--out", str(tmp_path / "w.json"), "--json",
                 "--no-progress"]) == 0
    capsys.readouterr()
    w = engine.FusionWeights.load(tmp_path / "w.json")
    assert w.text_only and w.provenance["modality"] == "text"
    assert {"clip", "dino", "dino_patch"} <= set(w.provenance["not_applicable"])
    assert main(["bench", "run", str(tmp_path / "rw"), "--models", "tiny", "--weights", str(tmp_path / "w.json"),
                 "--json", "--no-progress"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["fusion"]["fused"]["method"] == "weighted"
    assert run["metrics"]["clip"]["recall@1"] is None and run["metrics"]["fused"]["recall@1"] is not None


def test_the_learner_is_shared_and_the_one_se_rule_prefers_simpler_models(bidx):
    """eval.tune.learn is engine.fusion.learn.learn_fusion on the tune split; the 1-SE rule picks the strongest
    regularisation within one standard error of the best cross-validated metric."""
    from engine.fusion.learn import learn_fusion

    b, idx = bidx
    runs = run_queries(b, idx, b.split("tune"), progress=False)
    models = {"fingerprint": idx.fingerprint}
    mine = learn(runs, models)
    engine_best = learn_fusion(runs, models)
    assert mine.weights.weights == engine_best.weights.weights and mine.l2 == engine_best.l2
    one_se = learn_fusion(runs, models, l2_rule="1se")
    assert one_se.l2 >= engine_best.l2
    assert one_se.cv[one_se.l2] >= engine_best.cv[engine_best.l2] - one_se.cv_se[engine_best.l2]
    assert set(engine_best.weights.evidence_levels) == {"image", "text"}
    with pytest.raises(engine.AttribError, match="unknown l2 rule"):
        learn_fusion(runs, models, l2_rule="median")
