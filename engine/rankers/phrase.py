"""Phrase overlap: word bigrams shared by the prompt and the caption (order-aware text evidence)."""
from __future__ import annotations

import numpy as np

from ..text import phrase_similarity
from ._base import Candidates, CaptionReranker, Feature, QueryInput, prompt_text
from ._registry import register_ranker


@register_ranker
class PhraseRanker(CaptionReranker):
    """Overlap of the content-word bigrams of the prompt and of each caption (``engine.text.phrase_similarity``:
    stop words skipped, words light-stemmed so that most inflections match): their Dice overlap, and the share
    of the prompt's bigrams the caption has in the same order with a few words between. BM25 ignores word order;
    these features do not: the same words in another order share no bigram. They need two content words in the
    prompt. It adds no candidates to the fused pool; alone it re-ranks BM25's best ``rerank_depth`` by Dice."""

    name = "phrase"
    label = "phrase"
    features = (
        Feature("phrase", "cosine", "phrase", "Dice overlap of prompt and caption word bigrams (order-aware)",
                evidence="text"),
        Feature("phrase_order", "cosine", "phrase order", "share of the prompt's word pairs in the caption in order, "
                                                          "up to 3 words apart", evidence="text"),
    )
    main = True
    rrf = False
    first_stage = False
    components = ("text", "serving")
    encodings = ("terms", "prompt_text")
    background = True  # numpy on text, overlapping the image features of the calling thread
    style = "tab:brown"
    order = 42

    def available(self, q: QueryInput) -> bool:
        return bool(q.get("terms")) and len(prompt_text(q).content_stems()[0]) >= 2

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        if not self.available(q):
            nan = np.full(len(cands), np.nan, np.float32)
            return {"phrase": nan, "phrase_order": nan.copy()}
        dice, order = phrase_similarity(prompt_text(q), cands.caption_text())
        return {"phrase": dice, "phrase_order": order}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        s = feats["phrase"].copy()
        s[s <= 0] = np.nan  # no shared bigram: not a phrase match
        return s
