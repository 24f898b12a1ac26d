"""Reciprocal rank fusion (Cormack et al. 2009): score(d) = sum over rankers of 1 / (k + rank_r(d))."""
from __future__ import annotations

import numpy as np

from ._normalize import normalize


def rrf(scores: dict[str, np.ndarray], k: int = 60) -> np.ndarray:
    """Fuse rankers' scores over one candidate pool. Each ranker ranks the pool by its own score (ties by
    pool position); a candidate a ranker cannot score (NaN) gets nothing from it."""
    arrays = list(scores.values())
    if not arrays:
        return np.zeros(0, np.float64)
    out = np.zeros(len(arrays[0]), np.float64)
    for s in arrays:
        out += normalize(s, "rr", k)
    return out
