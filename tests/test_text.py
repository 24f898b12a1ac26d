"""engine.text and the text rankers (phrase, fuzzy, caption_clip, caption_dups): analysis chains, each signal on
hand-checked pairs, the caption signals stored at index time, prompts that are never parsed, prompts without
content, and the text evidence of results."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import world

import engine
from engine._manifest import read_manifest, write_manifest
from engine.text import (
    CHAINS,
    DEFAULT_CHAIN,
    Analyzer,
    TextBatch,
    caption_key,
    get_chain,
    phrase_similarity,
    shared_text,
    trigram_similarity,
)

CAPTIONS = {
    "pillow-mums": "Red Mums - Throw Pillow",
    "pillow-mums-2": "Throw Pillow - Red Mums",  # the same words in another order: a duplicate, another phrase
    "pillow-tiger": "Tiger Wisdom - Throw Pillow",
    "mandolin": "a mandolin recital poster",
    "hippo": "young hippo with her mother",
    "fireplace": "the fireplace in a stone cottage",
    "horses": "running horses on the beach",
    "empty": "",
    "lighthouse": "a lonely lighthouse at dusk, oil painting",
    "bag": "Full body U-Zip main opening on front of bag",
}
ROW = {k: i for i, k in enumerate(CAPTIONS)}


@pytest.fixture(scope="module")
def text_index(tmp_path_factory, tiny):
    """A caption-only index of CAPTIONS built with the tiny encoders (caption embeddings and duplicates)."""
    root = tmp_path_factory.mktemp("text-world")
    pl.DataFrame({"id": list(CAPTIONS), "image": [None] * len(CAPTIONS), "caption": list(CAPTIONS.values())},
                 schema={"id": pl.String, "image": pl.String, "caption": pl.String}).write_parquet(root / "t.parquet")
    world.build(root / "t.parquet", root / "idx", tiny)
    return root / "idx"


@pytest.fixture(scope="module")
def tidx(text_index, tiny):
    return world.opened(text_index, tiny)


def _evidence(idx, prompt: str, k: int = 10) -> dict[str, dict]:
    res = idx.query(prompt=prompt, k=k)
    return {r.id: r for r in res.results}


# --------------------------------------------------------------------------------------------- chains
def test_chains_resolve_by_name_and_by_legacy_description():
    assert get_chain().name == DEFAULT_CHAIN == "en_stem_fold"
    legacy = "simple tokenizer | remove_long(40) | lowercase | ascii_fold | english stopwords | english stemmer"
    assert get_chain(legacy).name == "attrib_en" and get_chain("attrib_en").description == legacy
    assert get_chain("attrib_en").registered_as == "attrib_en"  # what indexes built before issue 9 refer to
    assert get_chain("en_stem").description == "simple tokenizer | remove_long(40) | lowercase | english stemmer"
    with pytest.raises(engine.UnknownNameError, match="unknown text analysis chain 'porter'; valid choices: attrib_en"):
        get_chain("porter")
    a = Analyzer()
    assert a.terms("The No Limits Business Woman Podcast") == ["the", "no", "limit", "busi", "woman", "podcast"]
    assert Analyzer("attrib_en").terms("The No Limits Business Woman Podcast") == ["limit", "busi", "woman", "podcast"]
    assert Analyzer("en_stem").terms("Café") == ["café"] and a.terms("Café") == ["cafe"]
    assert Analyzer("trigram").terms("hippo") == ["hip", "ipp", "ppo"]


def test_prompts_without_content_have_no_terms():
    for chain in CHAINS.names():
        a = Analyzer(chain)
        for prompt in ("", "   ", "the of and", "To be, or not to be: that is the...", None):
            assert a.terms(prompt) == [], (chain, prompt)
        assert a.terms("to be a hippo")


def test_words_of_many_matches_one_by_one():
    a = Analyzer()
    texts = ["Red Mums - Throw Pillow", "", "running horses", f"odd {Analyzer.SENTINEL} text", "the end"]
    assert a.words_of_many(texts) == [a.words(t) for t in texts]
    assert a.words_of_many(texts[:3]) == [["red", "mum", "throw", "pillow"], [], ["run", "hors"]]
    words = ["Pillows", "running", "Pillows", "the"]
    assert a.analyze_words(words) == a.analyze_words(words) == [["pillow"], ["run"], ["pillow"], ["the"]]


# --------------------------------------------------------------------------------------------- signals by hand
def _phrase(prompt: str, captions: list[str], which: int = 0) -> np.ndarray:
    return phrase_similarity(TextBatch([prompt]), TextBatch(captions))[which]


def _trigram(prompt: str, captions: list[str], which: int = 0) -> np.ndarray:
    return trigram_similarity(TextBatch([prompt]), TextBatch(captions))[which]


def test_phrase_similarity_on_a_reordered_phrase():
    # prompt bigrams (red,mums) (mums,throw) (throw,pillow); the swapped caption has (throw,pillow) (pillow,red)
    # (red,mums): 2 shared of 3 and 3, Dice 4/6
    got = _phrase("red mums throw pillow", ["Red Mums - Throw Pillow", "Throw Pillow - Red Mums", "Tiger Wisdom", ""])
    np.testing.assert_allclose(got, [1.0, 2 * 2 / 6, 0.0, 0.0], rtol=1e-6)
    # stop words are skipped: "man in the hat" and "a man with hat" share their one bigram (man, hat)
    assert _phrase("man in the hat", ["a man with hat"])[0] == 1.0
    # inflections: light stems (pillows -> pillow, running -> run, horses -> hors) still make the same bigram
    np.testing.assert_allclose(_phrase("throw pillows", ["Throw Pillow", "running horses"]), [1.0, 0.0])
    assert _phrase("horse running", ["horses run"])[0] == 1.0
    assert np.isnan(_phrase("pillow", ["Throw Pillow"])).all()  # one content word: no bigram, no evidence
    assert np.isnan(_phrase("the of and", ["Throw Pillow"])).all()
    # order: the share of the prompt's bigrams found in order, up to 3 words apart (a prompt that drops words)
    got = _phrase("gray blue rug", ["Melrose Gray/Blue Area Rug", "Blue/Gray Area Rug", "gray b c d e blue"], 1)
    np.testing.assert_allclose(got, [1.0, 0.5, 0.0])  # (gray,blue) (blue,rug); blue..rug is 2 words apart


def test_trigram_similarity_on_a_misspelling_an_inflection_and_joined_words():
    # "younghippo": you oun ung ngh ghi hip ipp ppo (8); "younghipo": you oun ung ngh ghi hip ipo (7); 6 shared
    np.testing.assert_allclose(_trigram("young hippo", ["Young Hipo", "red mums"]), [12 / 15, 0.0])
    assert _trigram("fire place", ["fireplace"])[0] == 1.0  # spaces do not matter
    assert _trigram("Café crème", ["cafe creme"])[0] == 1.0  # nor accents and case
    # horses (hor ors rse ses) vs horse (hor ors rse): 3 shared -> 6/7
    np.testing.assert_allclose(_trigram("horses", ["horse"]), [6 / 7])
    # cover: the share of the prompt's trigrams in the caption: 6 of 8 for the typo, all for a longer caption
    np.testing.assert_allclose(_trigram("young hippo", ["Young Hipo", "a young hippo with mother"], 1), [6 / 8, 1.0])
    assert np.isnan(_trigram("ok", ["ok computer"])).all()  # no trigram in the prompt
    codes, seg = TextBatch(["ab", "abc", "", "abcd"]).trigrams()
    assert seg.tolist() == [1, 3, 3]  # trigrams never span two texts
    assert _trigram("abc", []).shape == (0,)
    big = "x" * 5000
    assert TextBatch([big]).bytes.size == 1000  # each text is read up to MAX_TEXT_CHARS


def _reference_trigrams(text: str) -> list[bytes]:
    """Character trigrams as documented, by plain Python: folded UTF-8 bytes, letters and digits (and any byte of
    a non-ASCII character) kept, everything else removed; read up to MAX_TEXT_CHARS characters."""
    import unicodedata

    from engine.text import MAX_TEXT_CHARS

    folded = "".join(c for c in unicodedata.normalize("NFKD", text[:MAX_TEXT_CHARS].lower())
                     if not 0x300 <= ord(c) <= 0x36F).encode("utf-8")
    kept = bytes(b for b in folded if b >= 0x80 or chr(b).isdigit() or "a" <= chr(b) <= "z")
    return [kept[i:i + 3] for i in range(len(kept) - 2)]


@pytest.mark.parametrize("dense", [True, False])  # both ways of counting shared trigrams
def test_trigram_similarity_equals_a_plain_python_reference(dense, monkeypatch):
    import engine.text

    if not dense:
        monkeypatch.setattr(engine.text, "DENSE_TRIGRAM_CELLS", 0)
    n_captions = 400
    rng = np.random.default_rng(3)
    vocab = "fire place fireplace Café crème naïve horse horses running the a of 42 x über Straße 日本 ZZZ -/".split()
    captions = [" ".join(rng.choice(vocab, rng.integers(0, 9))) for _ in range(n_captions)]
    prompt = " ".join(vocab)
    dice, cover = trigram_similarity(TextBatch([prompt]), TextBatch(captions))
    q = set(_reference_trigrams(prompt))
    for i in list(range(40)) + [n_captions - 1]:
        c = _reference_trigrams(captions[i])
        shared = len(q & set(c))
        assert dice[i] == pytest.approx(2 * shared / (len(q) + len(c)), abs=1e-6), captions[i]
        assert cover[i] == pytest.approx(shared / len(q), abs=1e-6), captions[i]


def test_caption_keys_ignore_case_punctuation_and_order():
    assert caption_key("Red Mums - Throw Pillow") == caption_key("throw pillow, RED mums!") != 0
    assert caption_key("Red Mums - Throw Pillow") != caption_key("Red Mums Pillow")
    assert caption_key("Café") == caption_key("cafe")
    assert caption_key("") == caption_key(" - ") == 0


def test_shared_text_finds_words_and_phrases():
    a = Analyzer()
    got = shared_text("throw pillows with red mums", ["Red Mums - Throw Pillow", "Tiger Wisdom", None], a)
    assert got[0]["words"] == ["Red", "Mums", "Throw", "Pillow"]  # pillows ~ Pillow: the chain stems both
    assert got[0]["phrases"] == ["Red Mums", "Throw Pillow"]
    assert got[0]["spans"] == [[0, 8, "phrase"], [0, 3, "word"], [4, 8, "word"], [11, 23, "phrase"],
                               [11, 16, "word"], [17, 23, "word"]]
    assert got[1] == got[2] == {"words": [], "phrases": [], "spans": []}
    assert shared_text("the of", ["the cat"], a) == [{"words": [], "phrases": [], "spans": []}]


# --------------------------------------------------------------------------------------------- in an index
def test_index_stores_caption_signals_and_its_chain(tidx, text_index, tiny):
    m = tidx.manifest
    assert m["text"]["analyzer"] == DEFAULT_CHAIN
    n, dim = len(CAPTIONS), tiny.clip_dim
    (seg,) = m["segments"]
    assert seg["files"]["caption_clip.bin"]["bytes"] == n * dim * 2  # fp16: 2 bytes per dim per record
    assert seg["files"]["caption_keys.npy"]["bytes"] == 128 + 8 * n
    assert seg["files"]["caption_sums.npy"]["bytes"] == 128 + 8 * n
    sizes = engine.index_info(text_index)["sizes"]
    assert sizes["caption_clip"] == n * dim * 2
    dups = tidx.reader.captions.duplicates(np.arange(n))
    assert dups.tolist() == [1, 1] + [0] * (n - 2)


def test_caption_signals_follow_appends_deletions_and_compaction(text_index, tiny, tmp_path):
    """Duplicate counts are of live records: an appended copy counts, a deleted one stops counting; compaction
    keeps every caption embedding (to the bit, fp16) and every count."""
    idx = tmp_path / "idx"
    shutil.copytree(text_index, idx)
    before = engine.open_index(idx).reader
    emb = before.segments[0].caption_vectors(np.arange(len(CAPTIONS)))
    src = tmp_path / "more.parquet"
    pl.DataFrame({"id": ["pillow-mums-3"], "image": [None], "caption": ["pillow, throw: red MUMS"]},
                 schema={"id": pl.String, "image": pl.String, "caption": pl.String}).write_parquet(src)
    world.build(src, idx, tiny, append=True)
    r = engine.open_index(idx).reader
    assert len(r.segments) == 2
    assert r.captions.duplicates(np.array([0, 1, 2, len(CAPTIONS)])).tolist() == [2, 2, 0, 2]
    engine.delete_records(idx, ids=["pillow-mums-2"])
    r = engine.open_index(idx).reader
    assert r.captions.duplicates(np.array([0, len(CAPTIONS)])).tolist() == [1, 1]
    assert np.isnan(r.captions.duplicates(np.array([1]))).all()  # deleted: not in the snapshot
    p = tiny.encode_texts(["red mums throw pillow"])[0]
    top = r.captions.top(p, 3)
    assert 1 not in top.tolist() and ROW["empty"] not in r.captions.top(p, len(CAPTIONS) + 1).tolist()
    engine.compact(idx, progress=False)
    c = engine.open_index(idx).reader
    assert len(c.segments) == 1
    assert c.captions.duplicates(np.array([0, len(CAPTIONS)])).tolist() == [1, 1]
    keep = np.array([i for i in range(len(CAPTIONS)) if i != 1])
    np.testing.assert_array_equal(c.segments[0].caption_vectors(np.arange(len(keep))), emb[keep])
    assert c.captions.top(p, 3).tolist() == top.tolist()
    assert engine.verify(idx, progress=False).ok


def test_compressed_caption_embeddings_keep_cosines(text_index, tiny, tmp_path):
    """The pq codec stores caption embeddings as int8 with a per-record scale: cosines within 2e-3."""
    idx = tmp_path / "idx"
    shutil.copytree(text_index, idx)
    exact = engine.open_index(idx).reader
    p = tiny.encode_texts(["red mums throw pillow"])[0]
    want = exact.captions.cosines(np.arange(len(CAPTIONS)), p)
    emb = exact.segments[0].caption_vectors(np.arange(len(CAPTIONS)))
    cb = exact.codebooks
    cb.stores["clip"].codec = "pq"  # the int8 coding alone, on the same vectors
    codes = cb.encode_captions(emb)
    assert codes.shape == (len(CAPTIONS), tiny.clip_dim + 4) and codes.dtype == np.uint8
    got = cb.decode_captions(codes) @ p
    ok = np.isfinite(want)
    np.testing.assert_allclose(got[ok], want[ok], atol=2e-3)
    assert not cb.decode_captions(codes)[ROW["empty"]].any()


def test_each_text_signal_in_query_evidence(tidx, tiny):
    ev = _evidence(tidx, "red mums throw pillow")
    a, b, c = ev["pillow-mums"].evidence, ev["pillow-mums-2"].evidence, ev["pillow-tiger"].evidence
    assert a["bm25"] == pytest.approx(b["bm25"])  # BM25 cannot tell the order ...
    assert a["phrase"] == pytest.approx(1.0) and b["phrase"] == pytest.approx(2 / 3)  # ... the phrase signal can
    assert c["phrase"] == pytest.approx(2 * 1 / (3 + 3))  # shares (throw, pillow)
    assert a["phrase_order"] == 1.0 and b["phrase_order"] == pytest.approx(2 / 3) and c["fuzzy_cover"] < 1.0
    assert a["caption_dups"] == b["caption_dups"] == 1 and c["caption_dups"] == 0
    assert a["fuzzy"] == pytest.approx(float(_trigram("red mums throw pillow", [CAPTIONS["pillow-mums"]])[0]))
    # the stored caption embedding against the prompt's: the encoders' cosine, up to fp16 rounding
    p = tiny.encode_texts(["red mums throw pillow"])[0]
    for key in ("pillow-mums", "pillow-tiger"):
        want = float(tiny.encode_texts([CAPTIONS[key]])[0] @ p)
        assert ev[key].evidence["caption_clip"] == pytest.approx(want, abs=2e-3)
    # the same evidence from each ranker alone
    for name in ("phrase", "fuzzy", "caption_clip"):
        r = tidx.rank(name, tidx.encode_query(None, "red mums throw pillow"), 3)
        assert len(r) and r.scores[0] >= r.scores[-1]
    assert tidx.rank("phrase", tidx.encode_query(None, "red mums throw pillow"), 1).rows.tolist() == [0]


def test_a_misspelled_word_is_found_by_the_fuzzy_first_stage(tidx):
    q = tidx.encode_query(None, "mandolim")  # no caption has the term: BM25 finds nothing
    assert q.get("terms") == ["mandolim"] and len(tidx.rank("bm25", q, 5)) == 0
    assert tidx.rank("fuzzy", q, 1).rows.tolist() == [ROW["mandolin"]]
    res = tidx.search(q, k=3)
    assert res.results[0].id == "mandolin" and res.results[0].evidence["bm25"] == 0.0  # shares no term
    # "mandolim": man and ndo dol oli lim (6); the caption has 20 trigrams, 5 of them shared: Dice 10/26
    assert res.results[0].evidence["fuzzy"] == pytest.approx(10 / 26, abs=1e-6)
    # an inflection: the stemmer and the trigrams both forgive it
    ev = _evidence(tidx, "horse runs on beaches")
    assert next(iter(ev)) == "horses"
    assert ev["horses"].evidence["fuzzy"] == max(r.evidence["fuzzy"] or 0 for r in ev.values()) > 0.4


def test_empty_captions_have_no_caption_evidence(tidx):
    q = tidx.encode_query(None, "lighthouse")
    feats = tidx.pool(q).feats
    rows = tidx.pool(q).rows
    assert ROW["empty"] not in rows.tolist() or np.isnan(feats["caption_clip"][rows.tolist().index(ROW["empty"])])
    assert np.isnan(tidx.reader.captions.cosines(np.array([ROW["empty"]]), q.get("clip_text"))).all()


def test_queries_use_the_chain_the_index_was_built_with(text_index, tiny, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(text_index, legacy)
    m = read_manifest(legacy)
    m["text"]["analyzer"] = get_chain("attrib_en").description  # what indexes before issue 9 wrote
    write_manifest(legacy, m)
    old = engine.open_index(legacy)
    old.use_encoders(tiny)
    assert old.reader.text.analysis.chain.name == "attrib_en"
    assert old.encode_query(None, "no lonely lighthouse").get("terms") == ["lone", "lighthous"]
    new = engine.open_index(text_index)
    new.use_encoders(tiny)
    assert new.encode_query(None, "no lonely lighthouse").get("terms") == ["no", "lone", "lighthous"]
    # a stop word most captions have is not searched for: "the" is in over 10% of the captions
    assert new.encode_query(None, "the lonely lighthouse").get("terms") == ["lone", "lighthous"]
    m["text"]["analyzer"] = "porter"
    write_manifest(legacy, m)
    with pytest.raises(engine.IndexFormatError, match="unknown text analysis chain 'porter'"):
        engine.open_index(legacy)


# --------------------------------------------------------------------------------------------- hostile prompts
HOSTILE = [
    '"(title: AND ~^', 'caption:red OR caption:blue AND NOT "green', "row:1 OR row:[0 TO 100]",
    "*:* ~2 ^10 \\ / { } [ ] ! - + && ||", ("(" * 5000) + ")" * 5000, "pillow " * 2000,
    "赤い円 青い背景 — красный круг", "\x00\x01\x1b[31m control \u202e characters", "'; DROP TABLE captions; --",
    f"mums {Analyzer.SENTINEL} pillow",
]


def test_engine_never_parses_prompts():
    """No query parser is called anywhere in the engine: prompts are analysed into terms, never parsed."""
    root = Path(engine.__file__).parent
    calls = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"parse_query|QueryParser", line)]
    assert calls == []


@pytest.mark.parametrize("prompt", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_prompts_give_text_evidence_without_errors(tidx, prompt):
    res = tidx.query(prompt=prompt, k=5)
    d = res.to_dict()
    json.dumps(d)
    for r in res.results:
        for f in ("phrase", "fuzzy"):
            v = r.evidence[f]
            assert v is None or 0.0 <= v <= 1.0
        for s, e, _ in (r.text or {}).get("spans", []):
            assert 0 <= s < e <= len(r.caption)


def test_query_syntax_is_plain_text_for_every_text_signal(tidx):
    plain = tidx.pool(tidx.encode_query(None, "caption red AND mums 5"))
    syntax = tidx.pool(tidx.encode_query(None, 'caption:"red" AND mums^5~'))
    np.testing.assert_array_equal(plain.rows, syntax.rows)
    for f in ("bm25", "phrase", "fuzzy", "caption_dups"):
        np.testing.assert_allclose(plain.feats[f], syntax.feats[f], rtol=1e-6)


# --------------------------------------------------------------------------------------------- no content
@pytest.mark.parametrize("prompt", ["the of and", "To be, or not to be", "  !!  "])
def test_a_prompt_without_content_gives_no_text_evidence(tidx, idx, tiny_index, prompt):
    res = tidx.query(prompt=prompt, k=5)  # caption-only index: nothing can take part, and that is no error
    assert res.results == []
    res = idx.query(image=world.source_image(tiny_index, 2), prompt=prompt, k=5)
    assert len(res.results) == 5
    for r in res.results:
        assert all(r.evidence[f] is None for f in ("bm25", "phrase", "fuzzy", "caption_clip", "caption_dups"))
        assert r.text is None and "text" not in r.to_dict()
        assert r.evidence["dino"] is not None


def test_results_carry_the_text_evidence(tidx):
    res = tidx.query(prompt="throw pillows, red mums", k=3)
    top = res.results[0]
    assert top.id == "pillow-mums"
    d = top.to_dict()["text"]
    assert d["phrases"] == ["Red Mums", "Throw Pillow"] and d["duplicates"] == 1
    assert d["words"] == ["Red", "Mums", "Throw", "Pillow"]
    tiger = next(r for r in res.results if r.id == "pillow-tiger")
    assert tiger.text["duplicates"] == 0 and tiger.text["phrases"] == ["Throw Pillow"]
