"""The ranker registry drives the engine: a toy ranker defined here, and registered nowhere else, shows up in
the candidate pool, the features, the fusion weights file format, the JSON evidence and the reports."""
from __future__ import annotations

import json

import numpy as np
import pytest

import engine
from engine.fusion import FusionWeights, parse_feature
from engine.rankers import RANKERS, Candidates, Feature, QueryInput, Ranker, register_ranker


class CaptionLengthRanker(Ranker):
    """Toy: prefers long captions. Its first stage is the records with the longest captions."""

    name = "toy_len"
    label = "toy length"
    features = (Feature("toy_len", "score", "caption length", "caption length in characters / 100"),)
    components = ("serving",)
    encodings = ()
    style = "tab:purple"

    def available(self, q: QueryInput) -> bool:
        return self.reader.n_records > 0

    def _lengths(self) -> np.ndarray:
        caps = self.reader.records(np.arange(self.reader.n_records))["caption"].to_list()
        return np.array([len(c or "") / 100 for c in caps], np.float32)

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        lengths = self._lengths()
        return np.argsort(-lengths, kind="stable")[:n].astype(np.int64)

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        return {"toy_len": self._lengths()[cands.rows]}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats["toy_len"]


@pytest.fixture
def toy():
    register_ranker(CaptionLengthRanker)
    try:
        yield CaptionLengthRanker
    finally:
        RANKERS.unregister("toy_len")


@pytest.fixture
def long_caption_index(tmp_path, tiny):
    import world

    src = tmp_path / "src"
    world.image_folder(src, 12, nested=False)
    (src / "img0004.txt").write_text("a very long caption " * 10, encoding="utf-8")
    engine.build_index(src, tmp_path / "idx", encoders=tiny, progress=False,
                       settings=engine.IndexSettings(pca_sample=8))
    return tmp_path / "idx"


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already computed by ranker 'clip'"):
        register_ranker(type("Dup", (CaptionLengthRanker,),
                             {"name": "dup", "features": (Feature("clip", "cosine", "x"),)}))
    with pytest.raises(ValueError, match="unknown kind 'angle'"):
        register_ranker(type("Bad", (CaptionLengthRanker,), {"name": "bad", "features": (Feature("b", "angle", "x"),)}))
    with pytest.raises(ValueError, match="already registered"):
        register_ranker(type("Clip2", (CaptionLengthRanker,),
                             {"name": "clip", "features": (Feature("c2", "score", "x"),)}))
    with pytest.raises(ValueError, match=r"unknown index components \['captions'\]"):
        register_ranker(type("Comp", (CaptionLengthRanker,), {"name": "comp", "components": ("captions",),
                                                               "features": (Feature("c3", "score", "x"),)}))
    assert "dup" not in RANKERS and "bad" not in RANKERS and "comp" not in RANKERS


def test_text_features_follow_the_components_their_rankers_read():
    """A feature is a text feature when its ranker reads no per-image component: what a caption-only index
    (text-only fusion) can use."""
    from engine.fusion.weighted import text_feature

    text = {f.name for f in engine.features() if text_feature(f.name)}
    assert text == {"bm25", "phrase", "phrase_order", "fuzzy", "fuzzy_cover", "caption_clip", "caption_dups"}


def test_builtin_lists_come_from_the_registry():
    assert engine.main_rankers() == ("clip", "dino", "bm25", "phrase", "fuzzy", "caption_clip")
    assert engine.rankers.rrf_rankers() == ("clip", "dino", "bm25")  # the text signals are left to learned fusion
    assert engine.pool_rankers() == ("clip", "clip_text", "dino", "bm25", "fuzzy")
    assert engine.feature_names() == ("clip", "clip_text", "dino", "dino_patch", "dino_layout", "bm25", "phrase",
                                      "phrase_order", "fuzzy", "fuzzy_cover", "caption_clip", "caption_dups")
    assert len(engine.feature_specs()) == 10 * 5 + 2 * 3  # ten cosines with nd/ndz, two scores


def test_a_toy_ranker_reaches_every_part_of_the_engine(toy, long_caption_index, tiny, tmp_path, capsys):
    assert "toy_len" in engine.feature_names() and "toy_len" in engine.pool_rankers()
    assert "toy_len" not in engine.main_rankers()
    assert {"toy_len", "toy_len:z", "toy_len:rr"} <= set(engine.feature_specs())
    assert parse_feature("toy_len:z") == ("toy_len", "z")
    with pytest.raises(engine.FusionWeightsError, match="does not apply to score features"):
        parse_feature("toy_len:nd")

    idx = engine.open_index(long_caption_index)
    idx.use_encoders(tiny)
    long_row = int(idx.reader.rows_of(["img0004.png"])[0])
    # the pool: the toy's first stage brings the long-caption record in, and every candidate has its feature
    q = idx.encode_query(None, "zebra")  # no caption mentions zebra: BM25 finds nothing
    pool = idx.pool(q, depth=2)
    assert long_row in pool.rows
    assert np.isfinite(pool.feats["toy_len"]).all() and pool.feats["toy_len"].max() == pytest.approx(1.99)
    # the weights file format: learned weights over the toy feature load, rank and say so
    w = FusionWeights(features=["toy_len", "toy_len:z"], weights=[1.0, 1.0], bias=0.0, mean=[0.5, 0.0],
                      std=[0.2, 1.0], models={"fingerprint": idx.fingerprint, "profile": "tiny"}, threshold=5.0)
    w.save(tmp_path / "w.json")
    back = FusionWeights.load(tmp_path / "w.json")
    res = idx.query(image=None, prompt="zebra", k=3, weights=back)
    assert res.results[0].id == "img0004.png"
    assert res.verdict.likely_source is True and res.results[0].share == 1.0
    # the JSON evidence and the reports
    d = res.to_dict()
    assert d["results"][0]["evidence"]["toy_len"] == pytest.approx(1.99)
    json.dumps(d)
    from engine.report.text import print_attribution

    print_attribution(res)
    err = capsys.readouterr().err
    assert "caption length" in err and "1.990" in err
    page = idx.write_report(res, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<span>caption length</span>" in page
    idx.close()


def test_without_the_toy_its_weights_are_refused(long_caption_index, tmp_path):
    w = FusionWeights(features=["toy_len"], weights=[1.0], bias=0.0, mean=[0.0], std=[1.0], models={})
    w.save(tmp_path / "w.json")
    with pytest.raises(engine.FusionWeightsError, match="unknown fusion feature 'toy_len'"):
        FusionWeights.load(tmp_path / "w.json")
