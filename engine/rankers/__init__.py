"""Rankers behind one interface, created by name from a registry."""
from __future__ import annotations

from .._reader import IndexReader
from .._registry import Registry
from .._settings import QuerySettings
from ._base import RANKING_COLUMNS, QueryInput, Ranker, Ranking
from .bm25 import Bm25Ranker
from .clip import ClipRanker, ClipTextRanker
from .dino import DinoRanker

RANKERS: Registry[type[Ranker]] = Registry("ranker")
for _cls in (ClipRanker, ClipTextRanker, DinoRanker, Bm25Ranker):
    RANKERS.register(_cls.name, _cls)

#: The three rankers fused by RRF and reported on their own by benchmarks.
MAIN_RANKERS = ("clip", "dino", "bm25")
#: Rankers whose first-stage candidates form the fused pool.
POOL_RANKERS = ("clip", "clip_text", "dino", "bm25")
#: Every evidence feature, in display order.
FEATURES = ("clip", "clip_text", "dino", "dino_patch", "dino_layout", "bm25")


def create_ranker(name: str, reader: IndexReader, settings: QuerySettings | None = None) -> Ranker:
    return RANKERS.get(name)(reader, settings)


__all__ = ["RANKERS", "MAIN_RANKERS", "POOL_RANKERS", "FEATURES", "QueryInput", "Ranker", "Ranking",
           "RANKING_COLUMNS", "create_ranker"]
