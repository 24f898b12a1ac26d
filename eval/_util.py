"""Small helpers shared by the eval modules."""
from __future__ import annotations

from typing import Iterable, Sequence


def counts(values: Iterable[str], keys: Sequence[str]) -> dict[str, int]:
    """How often each of ``keys`` occurs in ``values`` (keys in the given order, zeros included)."""
    vals = list(values)
    return {k: sum(1 for v in vals if v == k) for k in keys}
