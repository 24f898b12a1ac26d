"""Rankers behind one interface, registered by name. Importing this package registers the built-in ones.

What the pool, fusion, reports and benchmarks do per ranker is derived from the registry: see
``engine/rankers/README.md``."""
from __future__ import annotations

from .._reader import IndexReader
from .._settings import QuerySettings

# the built-in rankers register themselves (display order: Ranker.order)
from . import bm25, caption_clip, caption_dups, clip, dino, fuzzy, phrase  # noqa: F401
from ._base import (
    EVIDENCE,
    KINDS,
    RANKING_COLUMNS,
    Candidates,
    Feature,
    QueryInput,
    Ranker,
    Ranking,
    RowFilter,
    dense_candidates,
    nan_array,
    ranking_order,
)
from ._registry import (
    RANKERS,
    evidence_of,
    feature_names,
    feature_specs,
    features,
    get_feature,
    main_rankers,
    pool_rankers,
    ranker_names,
    register_ranker,
    rrf_rankers,
)


def create_ranker(name: str, reader: IndexReader, settings: QuerySettings | None = None) -> Ranker:
    return RANKERS.get(name)(reader, settings)


__all__ = ["RANKERS", "KINDS", "EVIDENCE", "evidence_of", "Feature", "QueryInput", "Ranker", "Ranking", "Candidates",
           "RowFilter",
           "RANKING_COLUMNS",
           "create_ranker", "register_ranker", "main_rankers", "rrf_rankers", "pool_rankers", "features",
           "feature_names", "feature_specs", "get_feature", "ranker_names", "ranking_order", "dense_candidates",
           "nan_array"]
