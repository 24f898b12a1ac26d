"""The ranker interface. Every ranker returns the same columns: query_id, id, score, rank, ranker."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .._reader import IndexReader
from .._settings import QuerySettings

RANKING_COLUMNS = ("query_id", "id", "score", "rank", "ranker")


@dataclass
class QueryInput:
    """An encoded query. Any side may be missing: its rankers then take no part."""

    query_id: str = "q"
    image: str | None = None  # where the image came from (display only)
    prompt: str = ""
    clip_image: np.ndarray | None = None  # (Dc,) L2-normalised
    clip_text: np.ndarray | None = None  # (Dc,) L2-normalised
    dino_global: np.ndarray | None = None  # (2D,) descriptor, L2-normalised
    dino_cells: np.ndarray | None = None  # (C, Dp) projected, L2-normalised cells
    terms: list[str] = field(default_factory=list)  # analysed prompt terms (BM25)

    @property
    def has_image(self) -> bool:
        return self.clip_image is not None

    @property
    def has_prompt(self) -> bool:
        return bool(self.terms) or self.clip_text is not None


@dataclass
class Ranking:
    """A ranked list of record rows, best first (ties broken by row, so results are deterministic)."""

    ranker: str
    rows: np.ndarray  # int64 record rows
    scores: np.ndarray  # float32, non-increasing

    @classmethod
    def empty(cls, ranker: str) -> "Ranking":
        return cls(ranker, np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def from_scores(cls, ranker: str, rows: np.ndarray, scores: np.ndarray, k: int) -> "Ranking":
        """Keep the k best finite scores; order by score desc, then row asc."""
        rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
        ok = np.isfinite(scores)
        rows, scores = rows[ok], scores[ok]
        order = np.lexsort((rows, -scores))[: max(0, k)]
        return cls(ranker, rows[order], scores[order])

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self, query_id: str, ids: np.ndarray | list) -> pl.DataFrame:
        """The shared result table; ``ids`` are the record ids of ``rows``."""
        n = len(self.rows)
        return pl.DataFrame(
            {
                "query_id": [query_id] * n,
                "id": [str(i) for i in ids],
                "score": self.scores.astype(np.float64),
                "rank": np.arange(1, n + 1, dtype=np.int64),
                "ranker": [self.ranker] * n,
            },
            schema={"query_id": pl.String, "id": pl.String, "score": pl.Float64, "rank": pl.Int64, "ranker": pl.String},
        )


class Ranker(ABC):
    """One retrieval signal. ``candidates`` is the cheap first stage; ``features`` scores any rows (so the
    fused pool gets every feature for every candidate); ``combine`` turns features into this ranker's score."""

    name: str = ""
    features: tuple[str, ...] = ()

    def __init__(self, reader: IndexReader, settings: QuerySettings | None = None) -> None:
        self.reader = reader
        self.settings = settings or QuerySettings()

    @abstractmethod
    def available(self, q: QueryInput) -> bool:
        """Whether this ranker can take part for this query (e.g. BM25 needs a prompt)."""

    def dense_query(self, q: QueryInput) -> tuple[str, np.ndarray] | None:
        """(store name, vector) when the first stage is a nearest-neighbour search in a vector store; the fused
        pool batches such searches per store (one faiss call for the image and the text embedding)."""
        return None

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        """Up to n record rows from the first stage, best first."""
        dq = self.dense_query(q)
        if dq is None:
            return np.zeros(0, np.int64)
        return dense_candidates(getattr(self.reader, dq[0]), self.reader, dq[1], n)

    @abstractmethod
    def featurize(self, q: QueryInput, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Each feature of ``self.features`` for each row (NaN where it does not apply)."""

    @abstractmethod
    def combine(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """This ranker's own score from its features."""

    def first_stage(self, k: int) -> int:
        return k

    def search(self, q: QueryInput, k: int) -> Ranking:
        if k <= 0 or not self.available(q):
            return Ranking.empty(self.name)
        rows = self.candidates(q, self.first_stage(k))
        if len(rows) == 0:
            return Ranking.empty(self.name)
        return Ranking.from_scores(self.name, rows, self.combine(self.featurize(q, rows)), k)


def nan_array(n: int) -> np.ndarray:
    return np.full(n, np.nan, np.float32)


def dense_candidates(store, reader: IndexReader, vec: np.ndarray | None, n: int) -> np.ndarray:
    """Top-n record rows of a faiss store for one query vector."""
    if vec is None or store.ntotal == 0 or n <= 0:
        return np.zeros(0, np.int64)
    _, slots = store.search(vec[None, :], n)
    slots = slots[0]
    return reader.slots_to_rows(slots[slots >= 0])


def cosines_to(store, reader: IndexReader, vecs: list[np.ndarray | None], rows: np.ndarray) -> list[np.ndarray]:
    """Cosine between each query vector and the stored vectors of ``rows`` (NaN for rows without an image,
    and for a missing query vector). The stored vectors are read once for all query vectors."""
    outs = [nan_array(len(rows)) for _ in vecs]
    if len(rows) == 0 or all(v is None for v in vecs):
        return outs
    slots = reader.rows_to_slots(rows)
    has = slots >= 0
    if has.any():
        stored = store.vectors(slots[has])
        for out, v in zip(outs, vecs):
            if v is not None:
                out[has] = stored @ v.astype(np.float32)
    return outs


def cosine_to(store, reader: IndexReader, vec: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
    """Cosine between ``vec`` and the stored vectors of ``rows`` (NaN for rows without an image)."""
    return cosines_to(store, reader, [vec], rows)[0]
