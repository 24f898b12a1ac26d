"""Small helpers shared by the eval modules."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


def counts(values: Iterable[str], keys: Sequence[str]) -> dict[str, int]:
    """How often each of ``keys`` occurs in ``values`` (keys in the given order, zeros included)."""
    vals = list(values)
    return {k: sum(1 for v in vals if v == k) for k in keys}


def foreign_entries(folder: Path, ours: Iterable[str]) -> list[str]:
    """Names in ``folder`` (top level) that a benchmark writer does not write itself: files a user put there
    (weights from ``attrib tune --out``, notes) that replacing the folder would delete."""
    keep = set(ours)
    try:
        return sorted(p.name for p in folder.iterdir() if p.name not in keep)
    except OSError:
        return []
