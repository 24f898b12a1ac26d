"""Caption frequency: how many other records share a candidate's caption words (index-time counts)."""
from __future__ import annotations

import numpy as np

from ._base import Candidates, CaptionReranker, Feature, QueryInput
from ._registry import register_ranker


@register_ranker
class CaptionDupsRanker(CaptionReranker):
    """The number of other records whose caption has the same words (case, accents, punctuation, repeats and
    order ignored). Heavily duplicated captions are the ones text-to-image models memorize, so it is evidence
    about the record, whatever the prompt: shown with every prompt query and left to learned fusion. It adds no
    candidates; alone it orders the captions BM25 finds for the prompt, most duplicated first."""

    name = "caption_dups"
    label = "duplicates"
    # text evidence: it is only computed for a prompt (with terms), and only matters beside a caption match
    features = (Feature("caption_dups", "score", "duplicates", "other records whose caption has the same words",
                        evidence="text"),)
    first_stage = False
    components = ("caption_keys",)
    encodings = ("terms",)
    style = "tab:purple"
    order = 48

    def available(self, q: QueryInput) -> bool:
        return bool(q.get("terms")) and self.reader.captions.has_dups

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        if not self.available(q):
            return {"caption_dups": np.full(len(cands), np.nan, np.float32)}
        return {"caption_dups": self.reader.captions.duplicates(cands.rows)}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats["caption_dups"]
