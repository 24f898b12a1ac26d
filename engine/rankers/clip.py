"""CLIP rankers: image-to-image cosine, and the prompt's text embedding against the image embeddings."""
from __future__ import annotations

import numpy as np

from ._base import QueryInput, Ranker, cosine_to, cosines_to


class ClipRanker(Ranker):
    """Cosine of CLIP image embeddings; with no query image it falls back to the prompt's text embedding."""

    name = "clip"
    features = ("clip", "clip_text")

    def available(self, q: QueryInput) -> bool:
        return (q.clip_image is not None or q.clip_text is not None) and self.reader.n_images > 0

    def dense_query(self, q: QueryInput):
        vec = q.clip_image if q.clip_image is not None else q.clip_text
        return None if vec is None else ("clip", vec)

    def featurize(self, q: QueryInput, rows: np.ndarray) -> dict[str, np.ndarray]:
        img, txt = cosines_to(self.reader.clip, self.reader, [q.clip_image, q.clip_text], rows)
        return {"clip": img, "clip_text": txt}

    def combine(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        img = feats["clip"]
        return img if not np.all(np.isnan(img)) else feats["clip_text"]


class ClipTextRanker(Ranker):
    """The prompt's CLIP text embedding against the indexed image embeddings."""

    name = "clip_text"
    features = ("clip_text",)

    def available(self, q: QueryInput) -> bool:
        return q.clip_text is not None and self.reader.n_images > 0

    def dense_query(self, q: QueryInput):
        return None if q.clip_text is None else ("clip", q.clip_text)

    def featurize(self, q: QueryInput, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {"clip_text": cosine_to(self.reader.clip, self.reader, q.clip_text, rows)}

    def combine(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return feats["clip_text"]
