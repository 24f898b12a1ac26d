"""BM25 over the training captions (tantivy), queried with the generating prompt."""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from .._stores import TextSink, TextStore
from ._base import Candidates, Feature, QueryInput, Ranker, Ranking, RowFilter
from ._registry import register_ranker


@register_ranker
class Bm25Ranker(Ranker):
    """The prompt is analysed into terms (never parsed as query syntax). An empty prompt ranks nothing."""

    name = "bm25"
    label = "bm25"
    features = (Feature("bm25", "score", "bm25", "BM25 of the prompt's terms against the record's caption",
                        evidence="text"),)
    main = True
    components = ("text",)
    encodings = ("terms",)
    background = True  # tantivy releases the GIL
    style = "tab:orange"
    order = 40

    def available(self, q: QueryInput) -> bool:
        return bool(q.get("terms"))

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        rows, _ = self.reader.text.search(q.get("terms"), n)
        return rows

    def search(self, q: QueryInput, k: int, exclude: RowFilter | None = None) -> Ranking:
        """Tantivy's own ranking: its scores are the feature values, so no second (rescoring) query is needed."""
        if k <= 0 or not self.available(q):
            return Ranking.empty(self.name)
        rows, scores = self.reader.text.search(q.get("terms"), k if exclude is None else exclude.overfetch(k))
        if exclude is not None:
            keep = exclude.keep(rows)
            rows, scores = rows[keep], scores[keep]
        return Ranking.from_scores(self.name, rows, self.score({"bm25": scores}), k)

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        if not q.get("terms"):
            return {"bm25": np.full(len(cands), np.nan, np.float32)}
        return {"bm25": self.reader.text.score_rows(q.get("terms"), cands.rows)}

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        s = feats["bm25"].copy()
        s[s <= 0] = np.nan  # a caption sharing no term with the prompt is not a BM25 match
        return s


def caption_bm25(captions: Sequence[str], chain: str | None = None) -> TextStore:
    """A throw-away BM25 index of ``captions`` (row = position) with an analysis chain (``engine.text.CHAINS``;
    default: the chain new indexes use), searched exactly as an index's captions are: for comparing chains and
    finding where BM25 loses without building a whole index. Its files are deleted with the returned store."""
    folder = Path(tempfile.mkdtemp(prefix="attrib-bm25-"))
    try:
        sink = TextSink(folder, heap_bytes=15_000_000, chain=chain)
        for i, c in enumerate(captions):
            sink.add(i, c or "")
        sink.close()
        store = TextStore(folder, chain)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(store, shutil.rmtree, folder, True)
    return store
