"""Small helpers shared by the eval modules."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


def counts(values: Iterable[str], keys: Sequence[str]) -> dict[str, int]:
    """How often each of ``keys`` occurs in ``values`` (keys in the given order, zeros included)."""
    vals = list(values)
    return {k: sum(1 for v in vals if v == k) for k in keys}


def foreign_entries(folder: Path, ours: Iterable[str], command: str) -> str | None:
    """Why ``--overwrite`` of ``command`` must not replace ``folder``, or None: the names in it (top level) that
    the command does not write itself, i.e. files a user put there (weights from ``attrib tune --out``, notes)
    that replacing the folder would delete."""
    keep = set(ours)
    try:
        other = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    except OSError:
        return None
    if not other:
        return None
    return (f"{folder} also holds what `{command}` did not write ({', '.join(other[:5])}); --overwrite would delete "
            "it: move it out first, or choose another output folder")
