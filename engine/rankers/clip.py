"""CLIP rankers: image-to-image cosine, and the prompt's text embedding against the image embeddings."""
from __future__ import annotations

import numpy as np

from ._base import Candidates, Feature, QueryInput, Ranker
from ._registry import register_ranker


@register_ranker
class ClipRanker(Ranker):
    """Cosine of CLIP image embeddings; with no query image it ranks by the prompt's text embedding."""

    name = "clip"
    label = "clip"
    features = (Feature("clip", "cosine", "clip image", "CLIP image embedding cosine between query and record",
                        evidence="image"),)
    main = True
    components = ("clip",)
    encodings = ("clip_image", "clip_text")
    style = "tab:blue"
    order = 10

    def available(self, q: QueryInput) -> bool:
        return (q.get("clip_image") is not None or q.get("clip_text") is not None) and self.reader.n_images > 0

    def dense_query(self, q: QueryInput):
        vec = q.get("clip_image") if q.get("clip_image") is not None else q.get("clip_text")
        return None if vec is None else ("clip", vec)

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        out = {"clip": cands.cosines("clip", q.get("clip_image"))}
        if q.get("clip_image") is None:  # the text fallback of score()
            out["clip_text"] = cands.cosines("clip", q.get("clip_text"))
        return out

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        img = feats["clip"]
        return img if not np.all(np.isnan(img)) or "clip_text" not in feats else feats["clip_text"]


@register_ranker
class ClipTextRanker(Ranker):
    """The prompt's CLIP text embedding against the indexed image embeddings."""

    name = "clip_text"
    label = "clip text"
    features = (Feature("clip_text", "cosine", "clip text", "CLIP cosine between the prompt and the record's image",
                        evidence="text"),)
    components = ("clip",)
    encodings = ("clip_text",)
    style = "tab:cyan"
    order = 20

    def available(self, q: QueryInput) -> bool:
        return q.get("clip_text") is not None and self.reader.n_images > 0

    def dense_query(self, q: QueryInput):
        return None if q.get("clip_text") is None else ("clip", q.get("clip_text"))

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        return {"clip_text": cands.cosines("clip", q.get("clip_text"))}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats["clip_text"]
