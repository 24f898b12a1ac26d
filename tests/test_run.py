"""eval.run: `attrib bench run` (every ranker alone, RRF and fused; JSON schema; reports; refusals)."""
from __future__ import annotations

import json

import polars as pl

from engine.cli import main
from engine.rankers import main_rankers


def test_bench_run_json_schema_and_report(bench, cache, tmp_path, capsys):
    rc = main(["bench", "run", str(bench), "--models", "tiny", "--split", "test", "--json", "--no-progress",
               "--report", str(tmp_path / "rep")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rankers = {*main_rankers(), "rrf", "fused"}  # every registered main ranker, alone, and both fusions
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
