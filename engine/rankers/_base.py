"""The ranker interface: what every ranker declares about itself, and the objects it works on.

A ranker is one retrieval signal. It declares (as class attributes, read by the registry):

* ``name``, ``label`` and ``style``: its registry name, its display label and its plot colour;
* ``features``: the evidence values it computes for any candidate, each with a *kind* (see :data:`KINDS`)
  that says how fusion may transform it and how reports draw it;
* ``first_stage``: whether it contributes candidates to the fused pool (a cheap search of the whole index);
* ``main``: whether benchmarks report it on its own and RRF fuses it (unless ``rrf`` is False);
* ``components``: the index components it reads; ``encodings``: the query encodings it uses.

and implements ``available`` (can it take part for this query?), a first stage (``dense_query`` for a
nearest-neighbour search in a vector store, or ``candidates``), ``featurize`` (its features for any rows)
and ``score`` (its own ranking score from the features).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import polars as pl

from .._reader import IndexReader
from .._settings import QuerySettings
from ..text import TextBatch

RANKING_COLUMNS = ("query_id", "id", "score", "rank", "ranker")

#: Feature kinds: the per-query transforms fusion may apply to each (see ``engine.fusion``) and how a
#: report draws the value ("unit": on a 0..1 bar as is; "relative": against the largest value shown).
KINDS: dict[str, dict[str, Any]] = {
    "cosine": {"transforms": ("raw", "z", "mm", "rr", "nd", "ndz"), "bar": "unit"},
    "score": {"transforms": ("raw", "z", "mm", "rr"), "bar": "relative"},
}

#: Evidence kinds: which side of the query a feature's evidence comes from. Results say which kinds carried
#: each candidate, and a candidate carried by the prompt alone is reported as a "caption match only".
EVIDENCE: dict[str, str] = {
    "image": "the query image against the record's image",
    "text": "the prompt against the record (its caption, or its image through CLIP text)",
    "other": "anything else (e.g. record metadata)",
}


@dataclass(frozen=True)
class Feature:
    name: str  # unique across rankers: the key in evidence, pools and weights files
    kind: str  # one of KINDS: "cosine" (similarity in [-1, 1]) or "score" (unbounded, larger is better)
    label: str  # short label for tables and report bars
    description: str = ""  # one line for documentation
    evidence: str = "other"  # one of EVIDENCE: the query side the evidence comes from ("image" or "text")

    @property
    def transforms(self) -> tuple[str, ...]:
        return KINDS[self.kind]["transforms"]


@dataclass
class QueryInput:
    """An encoded query: its identity plus named encodings (see ``engine._encode.ENCODINGS``). Any encoding
    may be missing (no image, no prompt): rankers that need it then take no part."""

    query_id: str = "q"
    image: str | None = None  # where the image came from (display only)
    prompt: str = ""
    encodings: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str) -> Any:
        """The encoding ``name`` (``None`` when the query has none)."""
        return self.encodings.get(name)


def prompt_text(q: QueryInput) -> TextBatch:
    """The prompt folded and tokenized for the text signals, made once per query (the ``prompt_text`` encoding)."""
    tb = q.encodings.get("prompt_text")
    if tb is None:
        tb = q.encodings["prompt_text"] = TextBatch([q.prompt])
    return tb


def ranking_order(rows: np.ndarray, scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Positions of the best ``k`` entries: score descending, ties broken by record row ascending (the row
    is the record's position in the index, i.e. source order). The one tie rule of every ranking."""
    order = np.lexsort((np.asarray(rows, np.int64), -np.asarray(scores, np.float64)))
    return order if k is None else order[: max(0, k)]


@dataclass
class Ranking:
    """A ranked list of record rows, best first (see :func:`ranking_order` for ties)."""

    ranker: str
    rows: np.ndarray  # int64 record rows
    scores: np.ndarray  # float32, non-increasing

    @classmethod
    def empty(cls, ranker: str) -> "Ranking":
        return cls(ranker, np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def from_scores(cls, ranker: str, rows: np.ndarray, scores: np.ndarray, k: int) -> "Ranking":
        """Keep the k best finite scores."""
        rows, scores = np.asarray(rows, np.int64), np.asarray(scores, np.float32)
        ok = np.isfinite(scores)
        rows, scores = rows[ok], scores[ok]
        order = ranking_order(rows, scores, k)
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


def nan_array(n: int) -> np.ndarray:
    return np.full(n, np.nan, np.float32)


#: How many extra first-stage results a ranker without an in-engine filter (BM25) fetches at most to make up
#: for excluded rows it has to drop afterwards.
MAX_EXCLUDED_OVERFETCH = 10_000


class RowFilter:
    """Record rows that must not come back from any ranker or the pool (masked for calibration, or deleted).
    Vector searches skip them inside faiss; other first stages fetch more and drop them."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.unique(np.asarray(rows, np.int64))

    @classmethod
    def of(cls, reader: IndexReader, rows) -> "RowFilter | None":
        """A filter for ``rows`` (None when there is nothing to exclude)."""
        if rows is None or isinstance(rows, RowFilter):
            return rows
        rows = np.asarray(rows, np.int64).ravel()
        if len(rows) and (rows.min() < 0 or rows.max() >= reader.next_row):
            from .._errors import QueryInputError

            raise QueryInputError(f"rows to exclude must be record rows of this index (0..{reader.next_row - 1})")
        return cls(rows) if len(rows) else None

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, rows: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``rows`` are not excluded."""
        rows = np.asarray(rows, np.int64)
        if not len(self.rows) or not len(rows):
            return np.ones(len(rows), bool)
        pos = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)
        return self.rows[pos] != rows

    def overfetch(self, n: int) -> int:
        return n + min(len(self.rows), MAX_EXCLUDED_OVERFETCH)


class Candidates:
    """A set of candidate rows and what rankers read about them, gathered once and shared by every ranker
    that featurizes them (which rows have an image, stored vectors, patch cells). Safe to use from the helper
    thread that runs background rankers."""

    def __init__(self, reader: IndexReader, rows: np.ndarray) -> None:
        self.reader = reader
        self.rows = np.asarray(rows, np.int64)
        self._cache: dict[Any, Any] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.rows)

    def _get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    @property
    def has_image(self) -> np.ndarray:
        """Whether each row has an image (caption-only records do not)."""
        return self._get("has_image", lambda: self.reader.has_image(self.rows))

    def vectors(self, store: str) -> np.ndarray:
        """Stored vectors of the rows that have an image (in row order), from vector store ``store``."""
        return self._get(("vectors", store), lambda: self.reader.vectors(store, self.rows)[1])

    def cosines(self, store: str, vec: np.ndarray | None) -> np.ndarray:
        """Cosine between ``vec`` and each row's stored vector (NaN without an image or without ``vec``)."""
        out = nan_array(len(self.rows))
        if vec is None or not self.has_image.any():
            return out
        out[self.has_image] = self.vectors(store) @ np.asarray(vec, np.float32)
        return out

    def patches(self) -> np.ndarray:
        """Patch cells (n_with_image, cells, dims) float32 of the rows that have an image."""
        return self._get("patches", lambda: self.reader.patch_cells(self.rows)[1])

    def captions(self) -> list[str]:
        """The rows' captions ("" when none), read once for every text ranker."""
        return self._get("captions", lambda: [c or "" for c in self.reader.caption_texts(self.rows)])

    def caption_text(self) -> TextBatch:
        """The captions folded and tokenized once (``engine.text.TextBatch``) for every text signal."""
        return self._get("caption_text", lambda: TextBatch(self.captions()))


class Ranker(ABC):
    """One retrieval signal (see the module docstring for what a ranker declares)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    features: ClassVar[tuple[Feature, ...]] = ()
    first_stage: ClassVar[bool] = True  # contributes candidates to the fused pool
    main: ClassVar[bool] = False  # reported on its own by benchmarks and fused by RRF
    rrf: ClassVar[bool] = True  # a main ranker that RRF fuses (False: reported on its own, left to learned fusion)
    components: ClassVar[tuple[str, ...]] = ()  # index components it reads (see engine._layout)
    encodings: ClassVar[tuple[str, ...]] = ()  # query encodings it uses (see engine._encode.ENCODINGS)
    background: ClassVar[bool] = False  # its work releases the GIL: the pool runs it on a helper thread
    style: ClassVar[str] = "tab:gray"  # matplotlib colour of its curves
    order: ClassVar[int] = 100  # display order of rankers and their features (then registration order)

    def __init__(self, reader: IndexReader, settings: QuerySettings | None = None) -> None:
        self.reader = reader
        self.settings = settings or QuerySettings()

    @classmethod
    def feature_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in cls.features)

    @abstractmethod
    def available(self, q: QueryInput) -> bool:
        """Whether this ranker can take part for this query (e.g. BM25 needs a prompt)."""

    def dense_query(self, q: QueryInput) -> tuple[str, np.ndarray] | None:
        """(vector store, query vector) when the first stage is a nearest-neighbour search; the pool batches
        such searches per store (one faiss call for every vector searched in the same store)."""
        return None

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        """Up to n record rows from a first stage that is not a vector search (e.g. BM25), best first."""
        return np.zeros(0, np.int64)

    def first_stage_depth(self, depth: int) -> int:
        """How many first-stage candidates this ranker reranks to keep its best ``depth`` (default: no rerank)."""
        return depth

    @abstractmethod
    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        """Each of its features for each candidate (NaN where it does not apply). It may also return other
        rankers' features that its own score reads (the pool keeps only the features a ranker declares)."""

    @abstractmethod
    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """This ranker's own score from the features (NaN = not ranked)."""

    def first_stage_rows(self, q: QueryInput, n: int, exclude: RowFilter | None = None) -> np.ndarray:
        """Up to ``n`` first-stage rows, best first, none of them excluded."""
        dq = self.dense_query(q)
        if dq is not None:
            return dense_candidates(self.reader, dq[0], dq[1], n, exclude)
        if exclude is None:
            return self.candidates(q, n)
        rows = self.candidates(q, exclude.overfetch(n))
        return rows[exclude.keep(rows)][:n]

    def search(self, q: QueryInput, k: int, exclude: RowFilter | None = None) -> Ranking:
        """This ranker alone: its first stage, reranked by its own score."""
        if k <= 0 or not self.available(q):
            return Ranking.empty(self.name)
        rows = self.first_stage_rows(q, self.first_stage_depth(k), exclude)
        if len(rows) == 0:
            return Ranking.empty(self.name)
        return Ranking.from_scores(self.name, rows, self.score(self.featurize(q, Candidates(self.reader, rows))), k)


def dense_candidates(reader: IndexReader, store: str, vec: np.ndarray | None, n: int,
                     exclude: RowFilter | None = None) -> np.ndarray:
    """Top-n record rows of a vector store for one query vector."""
    if vec is None or n <= 0:
        return np.zeros(0, np.int64)
    return reader.search(store, vec, n, None if exclude is None else exclude.rows)[0][0]


class CaptionReranker(Ranker):
    """A text ranker whose standalone ranking re-orders the captions BM25 finds for the prompt (its best
    ``rerank_depth``) by the ranker's own score: its first stage is the BM25 term query."""

    rerank_depth: ClassVar[int] = 200  # BM25 candidates its own ranking re-orders

    def first_stage_depth(self, depth: int) -> int:
        return max(depth, self.rerank_depth)

    def candidates(self, q: QueryInput, n: int) -> np.ndarray:
        return self.reader.text.search(q.get("terms") or [], n)[0]
