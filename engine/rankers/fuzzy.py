"""Fuzzy text similarity: character trigrams shared by the prompt and the caption (typos, inflections, joined
words), with a first stage that also finds captions for misspelled prompt words."""
from __future__ import annotations

import math

import numpy as np

from ..text import trigram_similarity
from ._base import Candidates, CaptionReranker, Feature, QueryInput, Ranking, RowFilter, prompt_text
from ._registry import register_ranker

MIN_FUZZY_LEN = 4  # shorter unknown terms are not matched fuzzily (too many neighbours within one edit)
MAX_FUZZY_TERMS = 8  # unknown terms matched fuzzily per prompt at most (each is a dictionary walk)


@register_ranker
class FuzzyRanker(CaptionReranker):
    """Overlap of the distinct character trigrams of the prompt and of each caption (lower-cased, accents folded,
    everything but letters and digits removed, so "fire place" = "fireplace"): their Dice overlap, and the share
    of the prompt's trigrams the caption has (``engine.text.trigram_similarity``). Its first stage is a
    BM25 query in which the prompt's terms that no caption has (typos, mostly) also match any indexed term
    within one edit, each such match worth as much as a rare term; it adds candidates to the fused pool only
    for prompts with such terms (otherwise BM25's own candidates are the same)."""

    name = "fuzzy"
    label = "fuzzy"
    features = (
        Feature("fuzzy", "cosine", "fuzzy", "Dice overlap of prompt and caption character trigrams", evidence="text"),
        Feature("fuzzy_cover", "cosine", "fuzzy cover", "share of the prompt's character trigrams in the caption",
                evidence="text"),
    )
    main = True
    rrf = False
    components = ("text", "serving")
    encodings = ("terms", "prompt_text")
    background = True  # numpy on text, overlapping the image features of the calling thread
    style = "tab:pink"
    order = 44

    def available(self, q: QueryInput) -> bool:
        return bool(q.get("terms")) and len(prompt_text(q).trigrams()[0]) > 0

    def _unknown(self, terms: list[str]) -> dict[str, float]:
        """Prompt terms no caption has -> the boost of their fuzzy matches (the IDF of a term in one caption)."""
        store = self.reader.text
        boost = math.log(1.0 + (store.num_docs - 0.5) / 1.5) if store.num_docs else 1.0
        out = {}
        for t in terms:
            if len(t) >= MIN_FUZZY_LEN and not t.isdigit() and store.doc_freq(t) == 0:
                out[t] = boost
                if len(out) >= MAX_FUZZY_TERMS:
                    break
        return out

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        """Pool first stage: captions matching unknown prompt terms within one edit (none without such terms)."""
        terms = q.get("terms") or []
        fuzzy = self._unknown(terms)
        return self.reader.text.search(terms, n, fuzzy)[0] if fuzzy else np.zeros(0, np.int64)

    def search(self, q: QueryInput, k: int, exclude: RowFilter | None = None) -> Ranking:
        """Alone: BM25 with fuzzy matches of unknown terms, re-ranked by trigram similarity."""
        if k <= 0 or not self.available(q):
            return Ranking.empty(self.name)
        terms = q.get("terms")
        n = self.first_stage_depth(k)
        rows = self.reader.text.search(terms, n if exclude is None else exclude.overfetch(n), self._unknown(terms))[0]
        if exclude is not None:
            rows = rows[exclude.keep(rows)][:n]
        if len(rows) == 0:
            return Ranking.empty(self.name)
        return Ranking.from_scores(self.name, rows, self.score(self.featurize(q, Candidates(self.reader, rows))), k)

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        if not self.available(q):
            nan = np.full(len(cands), np.nan, np.float32)
            return {"fuzzy": nan, "fuzzy_cover": nan.copy()}
        dice, cover = trigram_similarity(prompt_text(q), cands.caption_text())
        return {"fuzzy": dice, "fuzzy_cover": cover}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        s = feats["fuzzy"].copy()
        s[s <= 0] = np.nan  # no shared trigram: not a match
        return s
