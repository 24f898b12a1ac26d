"""The prompt's CLIP text embedding against the CLIP text embedding of each caption (stored at index time)."""
from __future__ import annotations

import numpy as np

from ._base import Candidates, Feature, QueryInput, Ranker
from ._registry import register_ranker


@register_ranker
class CaptionClipRanker(Ranker):
    """Cosine between the prompt's and the caption's CLIP text embeddings: with pretrained CLIP the signal that
    survives paraphrases (different words, same meaning); with untrained weights it is noise, and learned fusion
    gives it no weight. It adds no candidates to the fused pool (the embeddings are read by row, not searched);
    alone it ranks every caption by an exact scan."""

    name = "caption_clip"
    label = "caption clip"
    features = (Feature("caption_clip", "cosine", "caption clip", "CLIP cosine between the prompt and the caption",
                        evidence="text"),)
    main = True
    rrf = False
    first_stage = False
    components = ("caption_clip",)
    encodings = ("clip_text", "terms")
    background = True  # numpy on caption embeddings, overlapping the image features of the calling thread
    style = "tab:olive"
    order = 46

    def available(self, q: QueryInput) -> bool:
        return q.get("clip_text") is not None and bool(q.get("terms")) and self.reader.captions.has_vectors

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        return self.reader.captions.top(q.get("clip_text"), n)

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        if not self.available(q) or len(cands) == 0:
            return {"caption_clip": np.full(len(cands), np.nan, np.float32)}
        return {"caption_clip": self.reader.captions.cosines(cands.rows, q.get("clip_text"))}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats["caption_clip"]
