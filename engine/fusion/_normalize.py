"""Per-query normalisation of one feature over the candidate pool (NaN = the feature does not apply)."""
from __future__ import annotations

import numpy as np

TRANSFORMS = ("raw", "z", "mm", "rr", "nd", "ndz")
_ND_FLOOR = 1e-4  # 1 - cosine is floored here: nd is at most -log(1e-4) = 9.2


def near_duplicate(x: np.ndarray) -> np.ndarray:
    """-log(1 - cosine): a log-distance that grows sharply as a match approaches an exact copy, so that a
    near-duplicate (cosine 0.999 -> 6.9) stands out linearly from a merely similar image (0.95 -> 3.0)."""
    return -np.log(np.clip(1.0 - x, _ND_FLOOR, 2.0))


def ordinal_ranks(x: np.ndarray) -> np.ndarray:
    """1-based rank of each finite value, best (largest) first; ties broken by position. NaN -> 0."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    ranks = np.zeros(len(x), np.int64)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((idx, -x[idx]))]
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def normalize(x: np.ndarray, how: str, rrf_k: int = 60) -> np.ndarray:
    """``z``: z-score over the pool; ``mm``: min-max to [0, 1]; ``rr``: 1/(k + rank); ``raw``: unchanged;
    ``nd``: -log(1 - x) (cosines only); ``ndz``: z-score of nd over the pool.
    Missing values become 0 for z/mm/rr/ndz (average / bottom / unranked) and stay NaN for raw and nd."""
    x = np.asarray(x, np.float64)
    ok = np.isfinite(x)
    if how == "raw":
        return x.copy()
    if how == "nd":
        out = np.full(len(x), np.nan)
        out[ok] = near_duplicate(x[ok])
        return out
    if how == "ndz":
        return normalize(np.where(ok, near_duplicate(np.where(ok, x, 0.0)), np.nan), "z")
    out = np.zeros(len(x), np.float64)
    if not ok.any():
        return out
    v = x[ok]
    if how == "z":
        sd = v.std()
        out[ok] = (v - v.mean()) / sd if sd > 1e-12 else 0.0
    elif how == "mm":
        lo, hi = v.min(), v.max()
        out[ok] = (v - lo) / (hi - lo) if hi - lo > 1e-12 else 1.0
    elif how == "rr":
        r = ordinal_ranks(x)
        out[ok] = 1.0 / (rrf_k + r[ok])
    else:
        raise ValueError(f"unknown normalisation {how!r}; valid choices: {', '.join(TRANSFORMS)}")
    return out


def normalize_columns(X: np.ndarray, how: str, rrf_k: int = 60) -> np.ndarray:
    """:func:`normalize` applied to every column of ``X`` (n_candidates, n_features) at once: the same values (up
    to float rounding), without a Python call per feature (a query normalises some 50 feature columns)."""
    X = np.asarray(X, np.float64)
    if X.ndim != 2:
        raise ValueError("normalize_columns needs a 2-d array")
    ok = np.isfinite(X)
    if how == "raw":
        return X.copy()
    if X.shape[0] == 0:
        return X.copy()
    if how in ("nd", "ndz"):
        with np.errstate(invalid="ignore"):
            nd = np.where(ok, near_duplicate(np.where(ok, X, 0.0)), np.nan)
        return nd if how == "nd" else normalize_columns(nd, "z")
    if how == "rr":
        return np.stack([normalize(X[:, j], "rr", rrf_k) for j in range(X.shape[1])], axis=1) if X.shape[1] else X
    cnt = ok.sum(axis=0)
    have = cnt > 0
    out = np.zeros_like(X)
    if how == "z":
        safe = np.maximum(cnt, 1)
        mean = np.where(ok, X, 0.0).sum(axis=0) / safe
        dev = np.where(ok, X - mean, 0.0)
        sd = np.sqrt((dev * dev).sum(axis=0) / safe)
        flat = sd <= 1e-12
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(ok & ~flat, dev / np.where(flat, 1.0, sd), 0.0)
    elif how == "mm":
        lo = np.where(ok, X, np.inf).min(axis=0)
        hi = np.where(ok, X, -np.inf).max(axis=0)
        span = hi - lo
        flat = ~(span > 1e-12)
        with np.errstate(invalid="ignore"):
            out = np.where(ok, np.where(flat, 1.0, (X - lo) / np.where(flat, 1.0, span)), 0.0)
    else:
        raise ValueError(f"unknown normalisation {how!r}; valid choices: {', '.join(TRANSFORMS)}")
    out[:, ~have] = 0.0
    return out
