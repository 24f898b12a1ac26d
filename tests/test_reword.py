"""eval.reword: each rewording rule does what it says, deterministically, and the BM25 loss report."""
from __future__ import annotations

import re

import numpy as np
import pytest

from eval import reword as R

CAPTIONS = [
    "Shaw Floors Caress By Shaw Quiet Comfort Classic III Atlantic 00523_CCB98",
    "Mothers influence on her young hippo",
    "<i>Breaking Bad</i> Fans Get a Chance to Call Saul with Albuquerque Billboard",
    "Red Mums - Throw Pillow",
    "Full body U-Zip main opening on front of bag for easy unloading when you get to camp",
]


def _rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng([5, i])


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@pytest.mark.parametrize("rule", R.RULES)
def test_every_rule_changes_the_caption_deterministically(rule):
    for i, cap in enumerate(CAPTIONS):
        a, b = R.reword(cap, rule, _rng(i)), R.reword(cap, rule, _rng(i))
        assert a == b and a != cap and a.strip() == a and "  " not in a
    # a one-word caption still gets a rewording that differs from it
    assert R.reword("Hippo", rule, _rng()) != "Hippo"


def test_drop_keeps_the_order_and_leaves_words_out():
    for i, cap in enumerate(CAPTIONS):
        out = R.drop(cap, _rng(i)).split()
        toks = cap.split()
        assert 0 < len(out) < len(toks)
        it = iter(toks)
        assert all(any(t == x for x in it) for t in out)  # a subsequence of the caption


def test_drop_leaves_out_codes_first():
    cap = "blue area rug by mills 00523_CCB98 5x8 12-inch ref 9911"
    dropped = {w: 0 for w in cap.split()}
    for i in range(200):
        out = set(R.drop(cap, _rng(i)).split())
        for w in dropped:
            dropped[w] += w not in out
    coded = np.mean([n for w, n in dropped.items() if any(c.isdigit() for c in w)])
    plain = np.mean([n for w, n in dropped.items() if not any(c.isdigit() for c in w)])
    assert coded > 1.5 * plain


def test_reorder_is_a_permutation_and_punct_case_keeps_the_words():
    for i, cap in enumerate(CAPTIONS):
        assert sorted(R.reorder(cap, _rng(i)).split()) == sorted(cap.split())
        plain = re.sub(r"</?i>", "", cap)
        assert "".join(_words(R.punct_case(cap, _rng(i)))) == "".join(_words(plain))


def test_substitute_uses_synonyms_and_insert_adds_prompt_words():
    out = R.substitute("a big photo of a woman", _rng())
    words = out.lower().split()
    assert words != "a big photo of a woman".split()
    changed = [w for w in words if w not in ("a", "big", "photo", "of", "woman")]
    assert changed and all(any(w in R.SYNONYMS[k] for k in ("big", "photo", "woman")) for w in changed)
    out = R.insert("Red Mums - Throw Pillow", _rng())
    assert len(out.split()) >= len("Red Mums - Throw Pillow".split()) + R.INSERT_WORDS[0]
    assert all(w in out for w in ("Red", "Mums", "Throw", "Pillow"))


def test_misspell_and_inflect_change_letters_of_some_words():
    for i, cap in enumerate(CAPTIONS):
        a, b = _words(cap), _words(R.misspell(cap, _rng(i)))
        assert a != b
        assert len(set(a) & set(b)) >= 1  # typos in some words, not every word gone
    assert R.inflect("the mothers of young hippos", _rng()).lower() != "the mothers of young hippos"
    assert R._inflect_word("hippos", _rng()) == "hippo" and R._inflect_word("berries", _rng()) == "berry"
    assert R._inflect_word("pony", _rng()) == "ponies" and R._inflect_word("boxes", _rng()) == "box"


def test_rules_rotate_over_captions():
    assert [R.rule_for(0, j) for j in range(len(R.RULES))] == list(R.RULES)
    assert R.rule_for(3, 0) == R.RULES[3] and R.rule_for(len(R.RULES), 1) == R.RULES[1]
    assert set(R.RULE_HELP) == set(R.RULES) == set(R.RULE_FUNCTIONS)


def test_bm25_losses_per_rule():
    captions = ["red mums throw pillow", "tiger wisdom throw pillow", "young hippo with mother", "a lonely lighthouse"]
    ids = ["a", "b", "c", "d"]
    queries = [
        {"query_id": "q1", "prompt": "red mums pillow", "relevant": ["a"], "kind": "drop", "split": "tune"},
        {"query_id": "q2", "prompt": "throw pillow", "relevant": ["b"], "kind": "drop", "split": "test"},
        {"query_id": "q3", "prompt": "hipoo mothr", "relevant": ["c"], "kind": "misspell", "split": "tune"},
        {"query_id": "q4", "prompt": "lighthouse", "relevant": [], "kind": "novel", "split": "tune"},
    ]
    out = R.bm25_losses(captions, ids, queries)
    assert list(out) == ["drop", "misspell"]  # rule order; queries without a source are not scored
    assert out["drop"]["queries"] == 2 and out["drop"]["hits_at_1"] == 1 and out["drop"]["recall@1"] == 0.5
    miss = out["drop"]["misses"][0]
    # "throw pillow" ties between a and b: the tie goes to the first row, so b (the source) is second
    assert miss["query_id"] == "q2" and miss["expected"] == captions[1] and miss["rank"] == 2
    assert miss["returned"] == captions[0]
    assert out["misspell"] == {"queries": 1, "hits_at_1": 0, "not_found": 1, "recall@1": 0.0, "misses": [
        {"query_id": "q3", "split": "tune", "prompt": "hipoo mothr", "expected": captions[2], "returned": None,
         "rank": None}]}
