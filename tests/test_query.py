"""Issue 3: rankers behind one interface, the fused query, hostile prompts, refusals and the JSON schema."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import world

import engine
from engine.cli import main
from engine.rankers import RANKING_COLUMNS, QueryInput

RANKER_NAMES = ["clip", "clip_text", "dino", "bm25"]


@pytest.fixture(scope="module")
def idx(tiny_index, tiny):
    i = engine.open_index(tiny_index)
    i.use_encoders(tiny)
    return i


def source_image(tiny_index, n: int) -> str:
    df = pl.read_parquet(tiny_index / "records.parquet")
    return df.filter(pl.col("id").str.contains(f"img{n:04d}"))["image"][0]


# ------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", RANKER_NAMES)
def test_ranker_contract(idx, tiny_index, name):
    q = idx.encode_query(source_image(tiny_index, 3), "a red circle on a blue background", query_id="q7")
    r = idx.rank(name, q, 5)
    df = r.to_frame("q7", idx.reader.records(r.rows)["id"].to_list())
    assert tuple(df.columns) == RANKING_COLUMNS
    assert df.schema["score"] == pl.Float64 and df.schema["rank"] == pl.Int64
    assert 0 < df.height <= 5 and df["rank"].to_list() == list(range(1, df.height + 1))
    assert set(df["ranker"]) == {name} and set(df["query_id"]) == {"q7"}
    assert all(np.diff(df["score"].to_numpy()) <= 1e-9)  # best first
    assert len(idx.rank(name, q, 2)) <= 2 and len(idx.rank(name, q, 0)) == 0
    # deterministic, also after reopening the index (save/load round trip)
    again = engine.open_index(tiny_index)
    again.use_encoders(idx.encoders)
    r2 = again.rank(name, again.encode_query(source_image(tiny_index, 3), "a red circle on a blue background"), 5)
    np.testing.assert_array_equal(r.rows, r2.rows)
    np.testing.assert_allclose(r.scores, r2.scores, rtol=1e-5)
    # empty input: a query with nothing gives an empty ranking, not an error
    assert len(idx.rank(name, QueryInput(), 5)) == 0


def test_unknown_ranker_lists_valid_names(idx):
    with pytest.raises(engine.UnknownNameError, match="unknown ranker 'sift'; valid choices: ") as e:
        idx.rank("sift", QueryInput(), 5)
    assert set(str(e.value).split(": ")[1].split(", ")) == {"clip", "clip_text", "dino", "bm25"}


def test_bm25_without_prompt_is_empty_and_image_rankers_without_image_take_no_part(idx):
    q = idx.encode_query(None, "   ")
    assert len(idx.rank("bm25", q, 5)) == 0 and len(idx.rank("dino", q, 5)) == 0
    q = idx.encode_query(None, "purple circle")
    assert len(idx.rank("dino", q, 5)) == 0 and len(idx.rank("bm25", q, 5)) > 0
    res = idx.search(q, 5)
    assert all(r.evidence["dino"] is None and r.evidence["clip"] is None for r in res.results)
    assert all(r.evidence["clip_text"] is not None for r in res.results)


# ------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("weights", ["rrf", "auto"])
def test_exact_copy_comes_back_first(idx, tiny_index, weights):
    for n in (0, 7, 21, 33):
        res = idx.query(image=source_image(tiny_index, n), prompt=None, k=3, weights=weights)
        assert res.results[0].id.endswith(f"img{n:04d}.{'jpg' if n % 2 else 'png'}")
        assert res.results[0].evidence["clip"] == pytest.approx(1.0, abs=1e-3)
        for name in ("clip", "dino"):
            r = idx.rank(name, idx.encode_query(source_image(tiny_index, n)), 1)
            assert idx.reader.records(r.rows)["id"][0] == res.results[0].id


def test_prompt_only_query_finds_the_caption(idx, tiny_index):
    cap = pl.read_parquet(tiny_index / "records.parquet")["caption"][12]
    res = idx.query(prompt=cap, k=40)
    # RRF also listens to the (untrained, noisy) CLIP text ranker, so the caption match need not be first
    hit = [r for r in res.results if r.caption == cap]
    assert hit and hit[0].ranks["bm25"] == 1
    assert idx.reader.records(idx.rank("bm25", idx.encode_query(None, cap), 1).rows)["caption"][0] == cap


def test_pool_has_every_feature_for_every_candidate(idx, tiny_index):
    q = idx.encode_query(source_image(tiny_index, 5), "yellow square")
    pool = idx.pool(q, depth=4)
    assert len(pool) >= 4
    for f in engine.feature_names():
        assert pool.feats[f].shape == (len(pool),)
        assert np.isfinite(pool.feats[f]).all(), f  # computed even for rows another ranker brought in


# ------------------------------------------------------------------------------------------- hostile prompts
HOSTILE = [
    '"(title: AND ~^',
    'caption:red OR caption:blue AND NOT "green',
    "row:1 OR row:[0 TO 100]",
    "*:* ~2 ^10 \\ / { } [ ] ! - + && ||",
    "a red circle " * 1000,
    ("(" * 5000) + ")" * 5000,
    "🎨🖼️ 🔥🔥 a 🍕 on a ☀️ background",
    "赤い円 青い背景 — красный круг на синем фоне — دائرة حمراء",
    "\x00\x01\x1b[31m control \u202e characters",
    "'; DROP TABLE captions; --",
]


@pytest.mark.parametrize("prompt", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_prompts_return_results_without_exceptions(idx, tiny_index, prompt):
    res = idx.query(image=source_image(tiny_index, 2), prompt=prompt, k=5)
    assert len(res.results) == 5
    json.dumps(res.to_dict())


def test_query_syntax_cannot_change_the_meaning(idx):
    # operators and field names are plain words: the same as typing the words without the punctuation
    plain = idx.encode_query(None, "caption red and circle 5")
    syntax = idx.encode_query(None, 'caption:"red" AND circle^5~')
    assert syntax.get("terms") == plain.get("terms") == ["caption", "red", "circl", "5"]
    a, b = idx.rank("bm25", plain, 10), idx.rank("bm25", syntax, 10)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert idx.encode_query(None, "row:3").get("terms") == ["row", "3"]
    assert len(idx.encode_query(None, "word " * 10_000).get("terms")) == 1


# ------------------------------------------------------------------------------------------- refusals
def test_mismatched_models_are_refused(tiny_index, tiny, capsys):
    with pytest.raises(engine.ModelMismatchError, match="built with models 'tiny'"):
        engine.open_index(tiny_index, models="offline")
    other = engine.load_encoders(dataclasses.replace(engine.get_profile("tiny"), seed=1), device="cpu")
    i = engine.open_index(tiny_index)
    with pytest.raises(engine.ModelMismatchError, match="weights_sha256"):
        i.use_encoders(other)
    assert main(["query", str(tiny_index), "--prompt", "x", "--models", "offline"]) == 2
    assert "built with models 'tiny'" in capsys.readouterr().err


def test_bad_query_images_and_damaged_index_are_refused(idx, tmp_path, tiny_index, capsys):
    with pytest.raises(engine.QueryInputError, match="does not exist"):
        idx.query(image=tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(engine.QueryInputError, match="bad.jpg cannot be used: corrupt or truncated"):
        idx.query(image=tmp_path / "bad.jpg")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(engine.QueryInputError, match="not an image"):
        idx.query(image=tmp_path / "text.png")
    with pytest.raises(engine.QueryInputError, match="needs an image, a prompt"):
        idx.query(image=None, prompt="  ")
    assert main(["query", str(tmp_path), "--prompt", "x"]) == 2
    assert "not an attrib index" in capsys.readouterr().err
    assert main(["query", str(tiny_index), "--image", str(tmp_path / "bad.jpg")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_weights_file_for_other_models_is_refused(idx, tmp_path):
    w = engine.FusionWeights(features=["clip", "bm25:rr"], weights=[1.0, 2.0], bias=0.0, mean=[0, 0], std=[1, 1],
                             models={"fingerprint": "0000000000000000", "profile": "offline"}, threshold=0.5)
    w.save(tmp_path / "w.json")
    with pytest.raises(engine.ModelMismatchError, match="learned for models 0000000000000000"):
        idx.query(prompt="red", weights=tmp_path / "w.json")
    w.models = {"fingerprint": idx.fingerprint, "profile": "tiny"}
    w.save(tmp_path / "ok.json")
    res = idx.query(prompt="red circle", weights=tmp_path / "ok.json", k=3)
    assert res.fusion["method"] == "weighted" and res.verdict.threshold == 0.5
    d = json.loads((tmp_path / "ok.json").read_text())
    d["features"] = ["clip", "sift:z"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(engine.FusionWeightsError, match="unknown fusion feature 'sift:z'"):
        idx.query(prompt="red", weights=tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- JSON schema
RESULT_KEYS = {"rank", "row", "id", "image", "caption", "score", "above_threshold", "evidence", "ranks"}
EVIDENCE_KEYS = {"clip", "clip_text", "dino", "dino_patch", "dino_layout", "bm25"}


def test_cli_json_schema_is_stable(tiny_index, capsys):
    img = source_image(tiny_index, 4)
    assert main(["query", str(tiny_index), "--image", img, "--prompt", "a green triangle", "-k", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"schema_version", "query", "models", "fusion", "verdict", "results", "timings_ms", "warnings"}
    assert out["schema_version"] == 1
    assert out["query"] == {"image": img, "prompt": "a green triangle"}
    assert {"profile", "pretrained", "fingerprint"} <= set(out["models"]) and out["models"]["pretrained"] is False
    assert "UNTRAINED" in out["models"]["warning"] and any("UNTRAINED" in w for w in out["warnings"])
    assert {"method", "threshold", "note"} <= set(out["fusion"])
    assert {"likely_source", "threshold", "n_above", "label"} <= set(out["verdict"])
    assert len(out["results"]) == 4
    for i, r in enumerate(out["results"]):
        assert RESULT_KEYS <= set(r) <= RESULT_KEYS | {"share"}
        assert r["rank"] == i + 1 and isinstance(r["id"], str) and isinstance(r["score"], float)
        assert set(r["evidence"]) == EVIDENCE_KEYS
        assert all(v is None or isinstance(v, float) for v in r["evidence"].values())
        assert set(r["ranks"]) == {"clip", "dino", "bm25"}
    assert {"encode_clip_image", "encode_clip_text", "encode_dino", "candidates", "features", "fusion",
            "total"} <= set(out["timings_ms"])
    # the table view prints the same results for people
    assert main(["query", str(tiny_index), "--image", img, "--prompt", "a green triangle", "-k", "2"]) == 0
    err = capsys.readouterr().err
    assert out["results"][0]["id"] in err and "UNTRAINED" in err


# ------------------------------------------------------------------------------------------- demo
def test_demo_runs_end_to_end_and_reuses_its_cache(tmp_path, capsys):
    assert main(["demo", "--models", "tiny", "--cache", str(tmp_path / "demo"), "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert len(out["results"]) == 5 and out["models"]["profile"] == "tiny"
    assert "indexing the demo training set" in cap.err
    assert (tmp_path / "demo" / "index-tiny" / "manifest.json").exists()
    assert main(["demo", "--models", "tiny", "--cache", str(tmp_path / "demo")]) == 0
    err = capsys.readouterr().err
    assert "reusing the cached index" in err and "attribution for" in err


def test_query_images_are_prepared_exactly_like_indexed_images(tmp_path, tiny):
    """A big JPEG (decoded at reduced scale) and a transparent PNG give the same encoder inputs on both sides,
    whether the query is a path or an in-memory image."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    big, _ = world.scene(3, size=900)
    big.save(src / "big.jpg", quality=92)
    rgba = Image.new("RGBA", (120, 90), (0, 0, 0, 0))
    rgba.paste(world.scene(4, size=60)[0], (30, 15))
    rgba.save(src / "alpha.png")
    for i in range(6):
        world.scene(10 + i)[0].save(src / f"other{i}.png")
    engine.build_index(src, tmp_path / "idx", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=4))
    idx = engine.open_index(tmp_path / "idx")
    idx.use_encoders(tiny)
    for name in ("big.jpg", "alpha.png"):
        for query in (src / name, Image.open(src / name)):
            top = idx.query(image=query, k=1, weights="rrf").results[0]
            assert top.id == name
            assert top.evidence["clip"] == pytest.approx(1.0, abs=2e-3)
            assert top.evidence["dino_patch"] == pytest.approx(1.0, abs=2e-3)
    # the path query is pixel-identical to what was indexed: cosine 1 up to fp16 storage
    assert (idx.query(image=src / "big.jpg", k=1, weights="rrf").results[0].evidence["dino"]
            == pytest.approx(1.0, abs=1e-3))


def test_bm25_ranking_scores_equal_the_pool_rescoring(idx):
    q = idx.encode_query(None, "a red circle on a blue background")
    r = idx.rank("bm25", q, 10)
    assert len(r) == 10
    np.testing.assert_allclose(idx.reader.text.score_rows(q.get("terms"), r.rows), r.scores, rtol=1e-6)
