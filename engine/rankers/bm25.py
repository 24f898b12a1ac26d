"""BM25 over the training captions (tantivy), queried with the generating prompt."""
from __future__ import annotations

import numpy as np

from ._base import QueryInput, Ranker, Ranking


class Bm25Ranker(Ranker):
    """The prompt is analysed into terms (never parsed as query syntax). An empty prompt ranks nothing."""

    name = "bm25"
    features = ("bm25",)

    def available(self, q: QueryInput) -> bool:
        return bool(q.terms)

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        rows, _ = self.reader.text.search(q.terms, n)
        return rows

    def search(self, q: QueryInput, k: int) -> Ranking:
        """Tantivy's own ranking: its scores are the feature values, so no second (rescoring) query is needed."""
        if k <= 0 or not self.available(q):
            return Ranking.empty(self.name)
        rows, scores = self.reader.text.search(q.terms, k)
        return Ranking.from_scores(self.name, rows, self.combine({"bm25": scores}), k)

    def featurize(self, q: QueryInput, rows: np.ndarray) -> dict[str, np.ndarray]:
        if not q.terms:
            return {"bm25": np.full(len(rows), np.nan, np.float32)}
        return {"bm25": self.reader.text.score_rows(q.terms, rows)}

    def combine(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        s = feats["bm25"].copy()
        s[s <= 0] = np.nan  # a caption sharing no term with the prompt is not a BM25 match
        return s
