"""Small array helpers of the query path, where numpy's general-purpose functions cost more than the work they
serve (``np.unique`` on numpy 2.4 hashes before it sorts: 0.3 ms for 3,200 equal values, called several times per
query)."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def distinct(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``a`` (``np.unique`` without its overhead: a sort and one comparison)."""
    a = np.sort(a)
    return a[np.concatenate([[True], a[1:] != a[:-1]])] if len(a) else a


def by_segment(seg: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(segment, positions in ``seg``) for each segment index present in ``seg``, ascending; negative entries
    (rows outside the snapshot) belong to none. One segment, the usual case, costs one comparison."""
    seg = np.asarray(seg)
    if len(seg) == 0:
        return
    first = int(seg[0])
    if first >= 0 and bool((seg == first).all()):
        yield first, np.arange(len(seg))
        return
    for s in np.flatnonzero(np.bincount(seg[seg >= 0])):
        yield int(s), np.flatnonzero(seg == s)
