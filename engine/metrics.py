"""Retrieval metrics for attribution benchmarks, bootstrap intervals and "no source" detection rates.

One implementation, shared by benchmarks (``eval``, which re-exports it as ``eval.metrics``), the fusion
learner (``engine.fusion.learn``) and self-calibration (``engine.calibrate``).

Conventions
-----------
* A *ranking* is a list of record ids (``str``), best first. A *relevant set* is a set of ids
  (binary relevance: an id is either a source of the query image or not).
* Rankings are taken as given. The engine produces them with one tie rule everywhere (score descending,
  then record row ascending, i.e. source order: ``engine.ranking_order``).
* Duplicated ids in a ranking count only at their first position: later copies are removed before
  a metric is computed, so they neither score nor take up a rank (``[a, a, b]`` is read as
  ``[a, b]``).
* A query with an empty ranking scores 0.0 on every metric. A query with an empty relevant set (a
  *novel* query, one with no source in the training set) raises ``ValueError`` in every per-query
  metric, even when its ranking is empty too: callers exclude such queries from ranking metrics and
  score them with the detection functions instead.
* ``k`` (the cut-off) must be a positive ``int``; a cut-off larger than the ranking is allowed.
* ``average_precision`` is trec_eval style: the sum of precision@i over relevant ids at ranks
  ``i <= k``, divided by ``|relevant|`` (not ``min(|relevant|, k)``), so relevant ids that are
  missing from the top k lower the score.
* ``ndcg_at`` uses binary gains and the ``log2(i + 1)`` discount; the ideal DCG places
  ``min(|relevant|, k)`` relevant ids at the top.
* Metric names (:data:`METRICS`, :func:`parse_metric`) are ``recall@K``, ``success@K``, ``ndcg@K``,
  ``map@K``, ``mrr@K`` and ``mrr`` (= ``mrr@100``), with ``K`` a positive decimal integer.
  Names are matched after stripping surrounding whitespace and lower-casing.
* :func:`bootstrap_ci` is a percentile bootstrap of the mean over queries, deterministic for a
  given seed. With 0 queries it returns NaNs; with 1 query both bounds equal the value.
* Detection ("is there a source at all?") works on each query's top fused score: a query counts as
  *attributed* when its top score is ``>= threshold``. A NaN top score means the query returned
  nothing and is never attributed, but it still counts in the denominator of every rate. Rates over
  0 queries are NaN.
* :func:`calibrate_threshold` returns the smallest threshold whose false attribution rate on the
  novel queries is ``<= target_far``. It is ``np.nextafter(v, +inf)`` for the largest novel score
  ``v`` that has to be excluded, so ``>=`` comparisons against it are exact. When no novel score
  has to be excluded (no novel queries at all, only NaN scores, or a ``target_far`` loose enough)
  it returns ``-inf``, meaning every query with a (non-NaN) top score is attributed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "METRICS",
    "MetricFn",
    "average_precision",
    "bootstrap_ci",
    "calibrate_threshold",
    "correct_detection_rate",
    "detection_rate",
    "false_attribution_rate",
    "ndcg_at",
    "parse_metric",
    "per_query",
    "recall_at",
    "recall_curve",
    "reciprocal_rank",
    "success_at",
]

MetricFn = Callable[[Sequence[str], Collection[str]], float]


# --------------------------------------------------------------------------------------------
# rankings


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _check_relevant(relevant: Collection[str]) -> set[str]:
    rel = relevant if isinstance(relevant, (set, frozenset)) else set(relevant)
    if not rel:
        raise ValueError(
            "relevant set is empty (a novel query): exclude it from ranking metrics and "
            "score it with the detection functions"
        )
    return rel


def _top_k(ranked: Iterable[str], k: int) -> list[str]:
    """The first ``k`` distinct ids of ``ranked`` (later duplicates removed)."""
    seen: set[str] = set()
    out: list[str] = []
    for rid in ranked:
        if rid in seen:
            continue
        seen.add(rid)
        out.append(rid)
        if len(out) == k:
            break
    return out


# --------------------------------------------------------------------------------------------
# per-query metrics


def recall_at(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """|relevant ∩ top-k| / |relevant|."""
    k = _check_k(k)
    rel = _check_relevant(relevant)
    hits = sum(1 for rid in _top_k(ranked, k) if rid in rel)
    return hits / len(rel)


def success_at(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 if any relevant id is in the top k, else 0.0."""
    k = _check_k(k)
    rel = _check_relevant(relevant)
    return 1.0 if any(rid in rel for rid in _top_k(ranked, k)) else 0.0


def average_precision(ranked: Sequence[str], relevant: Collection[str], k: int = 100) -> float:
    """Average precision at cut-off k, trec_eval style (divided by |relevant|)."""
    k = _check_k(k)
    rel = _check_relevant(relevant)
    hits = 0
    total = 0.0
    for i, rid in enumerate(_top_k(ranked, k), start=1):
        if rid in rel:
            hits += 1
            total += hits / i
    return total / len(rel)


def reciprocal_rank(ranked: Sequence[str], relevant: Collection[str], k: int = 100) -> float:
    """1 / rank of the first relevant id within the top k, else 0.0."""
    k = _check_k(k)
    rel = _check_relevant(relevant)
    for i, rid in enumerate(_top_k(ranked, k), start=1):
        if rid in rel:
            return 1.0 / i
    return 0.0


def ndcg_at(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Binary-gain nDCG at cut-off k; the ideal ranking has min(|relevant|, k) relevant ids on top."""
    k = _check_k(k)
    rel = _check_relevant(relevant)
    dcg = sum(1.0 / math.log2(i + 1) for i, rid in enumerate(_top_k(ranked, k), start=1) if rid in rel)
    idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(rel), k) + 1))
    return dcg / idcg


# --------------------------------------------------------------------------------------------
# metric names

_FAMILIES: dict[str, Callable[[Sequence[str], Collection[str], int], float]] = {
    "recall": recall_at,
    "success": success_at,
    "ndcg": ndcg_at,
    "map": average_precision,
    "mrr": reciprocal_rank,
}
_NAME_RE = re.compile(r"(recall|success|ndcg|map|mrr)@([0-9]+)")
_VALID_FORMS = "recall@K, success@K, ndcg@K, map@K, mrr@K, mrr (= mrr@100), with K a positive integer"


def _make_metric(family: str, k: int, name: str) -> MetricFn:
    fn = _FAMILIES[family]

    def metric(ranked: Sequence[str], relevant: Collection[str]) -> float:
        return fn(ranked, relevant, k)

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = f"{name}: {fn.__name__}(ranked, relevant, k={k})."
    return metric


METRICS: dict[str, MetricFn] = {
    "recall@1": _make_metric("recall", 1, "recall@1"),
    "recall@5": _make_metric("recall", 5, "recall@5"),
    "recall@10": _make_metric("recall", 10, "recall@10"),
    "map@100": _make_metric("map", 100, "map@100"),
    "mrr": _make_metric("mrr", 100, "mrr"),
    "ndcg@10": _make_metric("ndcg", 10, "ndcg@10"),
    "success@1": _make_metric("success", 1, "success@1"),
    "success@10": _make_metric("success", 10, "success@10"),
}
"""The standard metrics, in report order: name -> ``f(ranked, relevant) -> float``."""


def parse_metric(name: str) -> MetricFn:
    """The metric callable ``f(ranked, relevant)`` for a name such as ``"map@50"`` or ``"mrr"``."""
    if not isinstance(name, str):
        raise ValueError(f"metric name must be a string, got {name!r}; valid forms: {_VALID_FORMS}")
    key = name.strip().lower()
    if key in METRICS:
        return METRICS[key]
    m = _NAME_RE.fullmatch(key)
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"unknown metric {name!r}; valid forms: {_VALID_FORMS}")
    family, k = m.group(1), int(m.group(2))
    return _make_metric(family, k, f"{family}@{k}")


# --------------------------------------------------------------------------------------------
# aggregation


def per_query(
    runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Collection[str]],
    metrics: Sequence[str],
) -> tuple[list[str], np.ndarray]:
    """Evaluate every query of ``qrels`` with a non-empty relevant set (sorted ids).

    A query missing from ``runs`` counts as an empty ranking; runs for queries not in ``qrels``
    are ignored. Returns the query ids and a ``(n_queries, n_metrics)`` float array.
    """
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a list of metric names, got the string {metrics!r}")
    fns = [parse_metric(m) for m in metrics]
    qids = sorted(q for q, rel in qrels.items() if len(rel) > 0)
    out = np.zeros((len(qids), len(fns)), dtype=np.float64)
    for row, q in enumerate(qids):
        ranked = runs.get(q, [])
        rel = set(qrels[q])
        for col, fn in enumerate(fns):
            out[row, col] = fn(ranked, rel)
    return qids, out


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> np.ndarray:
    """Percentile bootstrap CI of the per-metric mean over queries; returns ``(n_metrics, 2)``."""
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 2:
        raise ValueError(f"values must be a (n_queries, n_metrics) array, got shape {vals.shape}")
    n_boot = _check_k(n_boot, "n_boot")
    if not (isinstance(alpha, (int, float, np.floating)) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    n, m = vals.shape
    if n == 0:
        return np.full((m, 2), np.nan)
    if n == 1:
        return np.repeat(vals[0][:, None], 2, axis=1)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, m), dtype=np.float64)
    chunk = max(1, 1_000_000 // n)  # bound memory to ~1e6 resampled indices at a time
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = vals[idx].mean(axis=1)
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    return np.percentile(means, q, axis=0).T.copy()


def recall_curve(
    runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Collection[str]],
    max_k: int = 100,
) -> np.ndarray:
    """Mean recall@K for K = 1..max_k over queries with a non-empty relevant set (NaN if none)."""
    max_k = _check_k(max_k, "max_k")
    qids = [q for q, rel in qrels.items() if len(rel) > 0]
    if not qids:
        return np.full(max_k, np.nan)
    total = np.zeros(max_k, dtype=np.float64)
    for q in qids:
        rel = set(qrels[q])
        hits = np.zeros(max_k, dtype=np.float64)
        for i, rid in enumerate(_top_k(runs.get(q, []), max_k)):
            if rid in rel:
                hits[i] = 1.0
        total += np.cumsum(hits) / len(rel)
    return total / len(qids)


# --------------------------------------------------------------------------------------------
# "no source" detection


def _scores(arr: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of top scores, got shape {a.shape}")
    return a


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if math.isnan(t):
        raise ValueError(f"threshold must not be NaN, got {threshold!r}")
    return t


def _rate(scores: np.ndarray, mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / scores.size if scores.size else math.nan


def calibrate_threshold(novel_top: np.ndarray, target_far: float = 0.05) -> float:
    """Smallest threshold whose false attribution rate on ``novel_top`` is ``<= target_far``.

    Returns ``np.nextafter(v, inf)`` for the largest novel score ``v`` that must be excluded, or
    ``-inf`` when none must be (including when there are no novel scores).
    """
    s = _scores(novel_top, "novel_top")
    far = float(target_far)
    if not 0.0 <= far <= 1.0:  # also rejects NaN
        raise ValueError(f"target_far must be in [0, 1], got {target_far!r}")
    n = s.size
    finite = s[~np.isnan(s)]
    if np.any(finite == np.inf):
        raise ValueError("novel_top contains +inf: no threshold can exclude it")
    if n == 0 or finite.size / n <= far:
        return -math.inf
    # distinct values, high to low; counts[j] = #(scores >= values[j])
    values, counts = np.unique(finite, return_counts=True)
    values, counts = values[::-1], np.cumsum(counts[::-1])
    # first value (from the top) whose inclusion pushes the rate above target_far; it must be
    # excluded, and a threshold just above it keeps exactly the scores strictly greater than it
    j = int(np.argmax(counts / n > far))
    return float(np.nextafter(values[j], np.inf))


def false_attribution_rate(novel_top: np.ndarray, threshold: float) -> float:
    """Fraction of novel queries whose top score is ``>= threshold`` (NaN never counts)."""
    s = _scores(novel_top, "novel_top")
    t = _check_threshold(threshold)
    return _rate(s, s >= t)


def detection_rate(sourced_top: np.ndarray, threshold: float) -> float:
    """Fraction of queries with a source whose top score is ``>= threshold`` (NaN never counts)."""
    s = _scores(sourced_top, "sourced_top")
    t = _check_threshold(threshold)
    return _rate(s, s >= t)


def correct_detection_rate(sourced_top: np.ndarray, top_is_relevant: np.ndarray, threshold: float) -> float:
    """Fraction of queries with a source whose top score is ``>= threshold`` and whose top hit is relevant."""
    s = _scores(sourced_top, "sourced_top")
    t = _check_threshold(threshold)
    rel = np.asarray(top_is_relevant)
    if rel.shape != s.shape:
        raise ValueError(f"top_is_relevant has shape {rel.shape}, sourced_top has shape {s.shape}")
    if rel.dtype != np.bool_:
        if rel.size and not (np.issubdtype(rel.dtype, np.integer) and np.isin(rel, (0, 1)).all()):
            raise ValueError(f"top_is_relevant must be a boolean array, got dtype {rel.dtype}")
        rel = rel.astype(bool)
    return _rate(s, (s >= t) & rel)
