"""Issue 4: benchmark validation, `bench run` schema, tuning that never reads the test split, weights files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import engine
from engine.cli import main
from engine.fusion import fit_logistic
from eval.bench import BenchmarkError, load_benchmark
from eval.run import ensure_index, evaluate, run_queries
from eval.synth import generate
from eval.tune import learn, tune


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("attrib-cache")
    monkeypatch_module.setenv("ATTRIB_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("bench") / "synth"
    generate(out, train=80, queries=60, seed=3, image_size=96, progress=False)
    return out


@pytest.fixture(scope="module")
def bidx(bench, tiny):
    b = load_benchmark(bench)
    idx = ensure_index(b, None, "tiny", progress=False)
    idx.use_encoders(tiny)
    return b, idx


# ------------------------------------------------------------------------------------------- validation
def _copy(bench: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bench, tmp_path / "b"))


@pytest.mark.parametrize("mutate,msg", [
    (lambda c, q: (c, q.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit(["nope"]))
                                     .otherwise(pl.col("relevant")).alias("relevant"))),
     r"relevant ids are not in corpus.parquet, e.g. .* -> nope"),
    (lambda c, q: (pl.concat([c, c.head(1)]), q), "duplicate ids: t000000"),
    (lambda c, q: (c, q.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("dev"))
                                     .otherwise(pl.col("split")).alias("split"))),
     r"split values \['dev'\]"),
    (lambda c, q: (c.drop("caption"), q), "no column 'caption'"),
    (lambda c, q: (c, pl.concat([q, q.head(1)])), "duplicate query ids"),
])
def test_benchmark_validation_errors(bench, tmp_path, mutate, msg):
    b = _copy(bench, tmp_path)
    c, q = pl.read_parquet(b / "corpus.parquet"), pl.read_parquet(b / "queries.parquet")
    c, q = mutate(c, q)
    c.write_parquet(b / "corpus.parquet")
    q.write_parquet(b / "queries.parquet")
    with pytest.raises(BenchmarkError, match=msg):
        load_benchmark(b)


def test_missing_images_and_folders_are_reported(bench, tmp_path):
    b = _copy(bench, tmp_path)
    first = pl.read_parquet(b / "corpus.parquet")["image"][0]
    (b / first).unlink()
    with pytest.raises(BenchmarkError, match=f"1 images of .* are missing, e.g. corpus.parquet: {first}"):
        load_benchmark(b)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_benchmark(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "corpus.parquet").write_bytes(b"")
    with pytest.raises(BenchmarkError, match="queries.parquet is missing"):
        load_benchmark(tmp_path / "half")


# ------------------------------------------------------------------------------------------- bench run
def test_bench_run_json_schema_and_report(bench, cache, tmp_path, capsys):
    rc = main(["bench", "run", str(bench), "--models", "tiny", "--split", "test", "--json", "--no-progress",
               "--report", str(tmp_path / "rep")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rankers = {"clip", "dino", "bm25", "rrf", "fused"}
    metrics = {"recall@1", "recall@5", "recall@10", "map@100", "mrr", "ndcg@10"}
    assert {"metrics", "ci95", "by_kind", "novel", "n_queries", "models"} <= set(out)
    assert set(out["metrics"]) == rankers and set(out["ci95"]) == rankers
    for r in rankers:
        assert metrics <= set(out["metrics"][r])
        for m in metrics:
            v, (lo, hi) = out["metrics"][r][m], out["ci95"][r][m]
            assert 0.0 <= lo <= v + 1e-9 and v <= hi + 1e-9 <= 1.0 + 1e-9
    assert set(out["by_kind"]) == {"verbatim", "template", "crop", "composite", "texture", "novel"}
    assert set(out["by_kind"]["crop"]) == rankers and "map@100" in out["by_kind"]["crop"]["fused"]
    assert "false_attribution_rate" in out["by_kind"]["novel"]["fused"]
    q = pl.read_parquet(bench / "queries.parquet").filter(pl.col("split") == "test")
    assert out["n_queries"] == q.height
    assert out["novel"]["n_novel"] == q.filter(pl.col("relevant").list.len() == 0).height
    assert set(out["novel"]["rankers"]["fused"]) == {"threshold", "false_attribution_rate", "detection_rate",
                                                     "correct_detection_rate"}
    assert out["models"]["profile"] == "tiny" and out["models"]["pretrained"] is False
    # without weights for these models, fused is RRF, and it says so
    assert (out["metrics"]["fused"] == out["metrics"]["rrf"]
            and "reciprocal rank fusion" in out["fusion"]["fused"]["note"])
    rep = tmp_path / "rep"
    assert json.loads((rep / "bench.json").read_text()) == out
    assert (rep / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (rep / "hard_cases.html").read_text()
    assert "UNTRAINED" in html and "Hardest cases" in html
    # the rich table for people
    assert main(["bench", "run", str(bench), "--models", "tiny", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "map@100" in err and "no source" in err and "UNTRAINED" in err


def test_bench_run_refuses_an_index_of_another_corpus(bench, tiny_index, capsys):
    assert main(["bench", "run", str(bench), "--index", str(tiny_index), "--no-progress"]) == 2
    assert "built from another corpus" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- tuning
def test_logistic_fit_is_sane_on_separable_and_collinear_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 1))
    Z = np.hstack([x, x, -x])  # perfectly collinear copies
    y = (x[:, 0] > 0).astype(float)  # separable
    w, b = fit_logistic(Z, y, l2=1.0)
    assert np.all(np.isfinite(w)) and abs(b) < 1.0 and np.abs(w).max() < 20
    s = Z @ w + b
    assert ((s > 0) == (y > 0)).mean() == 1.0


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
    assert set(p["scores"]) == {"tune", "test"} and set(p["scores"]["test"]) == {"clip", "dino", "bm25", "rrf", "fused"}
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
