"""engine.rankers: every registered ranker through the same contract, and each built-in ranker's own behaviour
(hostile prompts never reach a query parser; image rankers need an image, BM25 a prompt)."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import world
from world import source_image

import engine
from engine.rankers import RANKING_COLUMNS, QueryInput


@pytest.mark.parametrize("name", engine.rankers.ranker_names())
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
    assert set(str(e.value).split(": ")[1].split(", ")) == {"clip", "clip_text", "dino", "bm25", "phrase", "fuzzy",
                                                             "caption_clip", "caption_dups"}


def test_bm25_without_prompt_is_empty_and_image_rankers_without_image_take_no_part(idx):
    q = idx.encode_query(None, "   ")
    assert len(idx.rank("bm25", q, 5)) == 0 and len(idx.rank("dino", q, 5)) == 0
    q = idx.encode_query(None, "purple circle")
    assert len(idx.rank("dino", q, 5)) == 0 and len(idx.rank("bm25", q, 5)) > 0
    res = idx.search(q, 5)
    assert all(r.evidence["dino"] is None and r.evidence["clip"] is None for r in res.results)
    assert all(r.evidence["clip_text"] is not None for r in res.results)


def test_prompt_only_query_finds_the_caption(idx, tiny_index):
    cap = world.records(tiny_index)["caption"][12]
    res = idx.query(prompt=cap, k=40)
    # RRF also listens to the (untrained, noisy) CLIP text ranker, so the caption match need not be first
    hit = [r for r in res.results if r.caption == cap]
    assert hit and hit[0].ranks["bm25"] == 1
    assert idx.reader.records(idx.rank("bm25", idx.encode_query(None, cap), 1).rows)["caption"][0] == cap


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
    assert syntax.get("terms") == plain.get("terms") == ["caption", "red", "and", "circl", "5"]
    a, b = idx.rank("bm25", plain, 10), idx.rank("bm25", syntax, 10)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert idx.encode_query(None, "row:3").get("terms") == ["row", "3"]
    assert len(idx.encode_query(None, "word " * 10_000).get("terms")) == 1


def test_bm25_ranking_scores_equal_the_pool_rescoring(idx):
    q = idx.encode_query(None, "a red circle on a blue background")
    r = idx.rank("bm25", q, 10)
    assert len(r) == 10
    np.testing.assert_allclose(idx.reader.text.score_rows(q.get("terms"), r.rows), r.scores, rtol=1e-6)


def test_every_built_in_feature_says_which_side_of_the_query_its_evidence_comes_from():
    """'caption match only' sums the parts of the score by evidence kind: a built-in feature left as 'other'
    would be counted on neither side."""
    from engine.rankers import EVIDENCE, features

    kinds = {f.name: f.evidence for f in features()}
    assert set(kinds.values()) <= {"image", "text"} and set(EVIDENCE) >= {"image", "text", "other"}
    assert {n for n, k in kinds.items() if k == "image"} == {"clip", "dino", "dino_patch", "dino_layout"}
