"""Learning fusion weights, the "no source" threshold and the evidence levels from labelled candidate pools.

One implementation for both ways weights are learned: ``attrib tune`` (the pools of a labelled benchmark's tune
queries, ``eval.tune``) and ``attrib calibrate`` (the pools of queries an index makes from its own records,
``engine.calibrate``).

Method: L2-regularised logistic regression (``logistic.fit_logistic``) over every candidate of every query, a
candidate labelled 1 when it is a source. The regularisation strength is chosen by k-fold cross-validation
over queries (queries of one group stay in one fold) on a ranking metric (``engine.metrics``). The score is
the log-odds that a candidate is a source, so one number ranks candidates and, through a threshold on the top
score set at a target false-attribution rate on the novel queries (no source), also says "no likely source".
The *evidence levels* say how much of the score each kind of evidence (``engine.rankers.EVIDENCE``) gives the
strongest unrelated record of a query (a high quantile over the queries): a result whose image part does not
exceed it is carried by its prompt alone ("caption match only").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from .._errors import AttribError
from .._threads import single_threaded_blas
from ..metrics import calibrate_threshold, parse_metric
from ..rankers import feature_specs, ranking_order
from .logistic import fit_logistic, standardization, standardize
from .weighted import FusionWeights, feature_matrix, parse_feature

L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # regularisation strengths tried by cross-validation
L2_RULES = ("best", "1se")  # how cross-validation picks the strength (see learn_fusion)
LEVEL_QUANTILE = 0.95  # evidence levels: this quantile over queries of the best unrelated candidate's part
DEPTH = 100  # ranking depth of the metric (the engine's default pool depth)


class LabelledPool(Protocol):
    """One query's candidate pool with its labels (``eval.run.QueryRun`` and ``engine.calibrate`` provide it)."""

    query_id: str
    pool: object  # engine.Pool: rows and every feature of every candidate
    pool_ids: np.ndarray  # each candidate's identity (record id or row), comparable with ``relevant``
    relevant: frozenset  # identities of every source of the query; empty = novel (no source in the index)

    @property
    def labels(self) -> np.ndarray: ...  # bool per candidate: a source

    @property
    def novel(self) -> bool: ...


@dataclass
class Learned:
    weights: FusionWeights  # the model, its threshold and evidence levels (models/provenance set by the caller)
    cv: dict[float, float]  # l2 -> mean cross-validated metric
    l2: float  # the strength chosen
    cv_se: dict[float, float] | None = None  # l2 -> standard error of the CV metric (over held-out queries)
    not_applicable: list[str] = field(default_factory=list)  # features no candidate had: left out of the model


def applicable(queries: Sequence[LabelledPool], specs: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the specs whose feature some candidate of ``queries`` has, the features none has). A feature that is
    missing everywhere (image evidence on a caption-only benchmark, caption embeddings an index does not store)
    cannot be learned: it is left out of the model rather than given a meaningless weight, so weights learned
    on a text-only benchmark are over text features only."""
    present = {f for q in queries if q.pool is not None
               for f, v in q.pool.feats.items() if len(v) and np.isfinite(v).any()}
    bases = {s: parse_feature(s)[0] for s in specs}
    missing = sorted({b for b in bases.values() if b not in present}, key=list(bases.values()).index)
    return tuple(s for s in specs if bases[s] in present), missing


def design(queries: Sequence[LabelledPool], specs: Sequence[str], rrf_k: int) -> tuple[np.ndarray, ...]:
    """Stacked feature rows, labels and the query index of each row."""
    Xs, ys, qs = [], [], []
    for i, r in enumerate(queries):
        if len(r.pool_ids) == 0:
            continue
        Xs.append(feature_matrix(r.pool.feats, list(specs), rrf_k))
        ys.append(r.labels.astype(np.float64))
        qs.append(np.full(len(r.pool_ids), i))
    if not Xs:
        raise AttribError("no query produced any candidate: nothing to learn fusion weights from")
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(qs)


def ranked(q: LabelledPool, weights: FusionWeights, k: int = DEPTH) -> tuple[list, float]:
    """The fused ranking of one pool (identities, best first) and its top score (NaN when empty)."""
    if len(q.pool_ids) == 0:
        return [], math.nan
    s = weights.score(q.pool.feats)
    order = ranking_order(q.pool.rows, s, k)
    return [q.pool_ids[i] for i in order], float(s[order[0]])


def metric_values(queries: Sequence[LabelledPool], weights: FusionWeights, metric: str) -> list[float]:
    """``metric`` of the fused ranking of each query with a source."""
    fn = parse_metric(metric)
    return [fn(ranked(q, weights)[0], q.relevant) for q in queries if not q.novel]


def metric_of(queries: Sequence[LabelledPool], weights: FusionWeights, metric: str) -> float:
    """Mean ``metric`` of the fused rankings over the queries with a source (NaN when none has one)."""
    vals = metric_values(queries, weights, metric)
    return float(np.mean(vals)) if vals else math.nan


def _folds(queries: Sequence[LabelledPool], folds: int, seed: int) -> np.ndarray:
    """Fold of each query; queries of one ``group`` (default: the query itself) share a fold."""
    keys = [getattr(q, "group", None) or q.query_id for q in queries]
    groups = list(dict.fromkeys(keys))
    perm = np.random.default_rng(seed).permutation(len(groups))
    fold_of_group = np.empty(len(groups), int)
    fold_of_group[perm] = np.arange(len(groups)) % folds
    gi = {g: i for i, g in enumerate(groups)}
    return np.array([fold_of_group[gi[k]] for k in keys], int)


def _weights(w, b, mu, sd, specs, models: dict, rrf_k: int) -> FusionWeights:
    return FusionWeights(features=list(specs), weights=[float(x) for x in w], bias=float(b),
                         mean=[float(x) for x in mu], std=[float(x) for x in sd], models=dict(models), rrf_k=rrf_k)


def evidence_levels(queries: Sequence[LabelledPool], weights: FusionWeights,
                    quantile: float = LEVEL_QUANTILE) -> dict[str, float]:
    """Per evidence kind: the ``quantile`` over queries of the largest part of the score that kind gives any
    non-source candidate of the query (queries where that evidence is absent do not count)."""
    best: dict[str, list[float]] = {}
    for q in queries:
        if len(q.pool_ids) == 0:
            continue
        neg = ~q.labels
        if not neg.any():
            continue
        for kind, part in weights.parts(q.pool.feats).items():
            p = part[neg]
            if np.any(p != 0.0):  # the evidence took part in this query
                best.setdefault(kind, []).append(float(p.max()))
    return {k: round(float(np.quantile(v, quantile)), 6) for k, v in best.items()}


def set_threshold(weights: FusionWeights, queries: Sequence[LabelledPool], target_far: float, what: str) -> np.ndarray:
    """Calibrate ``weights.threshold`` on the novel ``queries`` at ``target_far``; returns their top scores."""
    novel_top = np.array([ranked(q, weights, 1)[1] for q in queries if q.novel], np.float64)
    thr = calibrate_threshold(novel_top, target_far) if len(novel_top) else None
    weights.threshold = None if thr is None or not math.isfinite(thr) else float(thr)
    weights.threshold_rule = (f"smallest top-score threshold with false-attribution rate <= {target_far} on the "
                              f"{len(novel_top)} novel {what} queries" if len(novel_top)
                              else f"no novel {what} queries")
    return novel_top


def learn_fusion(queries: Sequence[LabelledPool], models: dict, *, metric: str = "map@100", target_far: float = 0.05,
                 specs: Sequence[str] | None = None, folds: int = 3, seed: int = 0, rrf_k: int = 60,
                 l2_grid: Sequence[float] = L2_GRID, what: str = "tune", l2_rule: str = "best") -> Learned:
    """Fit weights, threshold and evidence levels on ``queries`` (nothing else is read).

    Args:
        queries: labelled pools (see :class:`LabelledPool`); novel ones set the threshold.
        models: the identity of the index models (``profile``, ``pretrained``, ``fingerprint``).
        metric: the ranking metric cross-validation maximises (``engine.metrics.parse_metric`` names).
        target_far: the false-attribution rate the threshold is set at on the novel queries.
        specs: feature specs (default ``engine.feature_specs()``: every registered feature, standard transforms);
            those whose feature no candidate has are left out (``Learned.not_applicable``).
        folds, seed: cross-validation folds over query groups, and their shuffle.
        rrf_k: the k of the ``:rr`` transform.
        what: how the queries are named in the threshold rule ("tune", "self-made", ...).
        l2_rule: ``"best"``: the strength with the best CV metric (the queries are drawn like the ones the
            weights will serve, e.g. a benchmark's tune split); ``"1se"``: the strongest one within one standard
            error of the best (the one-standard-error rule; the error is that of the mean over every held-out
            query of the folds), for queries that only resemble the ones served
            (self-made ones): on copydetect-dev, weights self-calibrated on its index reach recall@1 0.82 with
            l2 100 where the best CV strength (1) gives 0.76.
    Raises:
        AttribError: no candidate at all, or no candidate is a source.
    """
    parse_metric(metric)
    if not 0.0 <= float(target_far) <= 1.0:
        raise AttribError(f"target false-attribution rate {target_far!r} must be in [0, 1]")
    if l2_rule not in L2_RULES:
        raise AttribError(f"unknown l2 rule {l2_rule!r}; valid choices: {', '.join(L2_RULES)}")
    specs, missing = applicable(queries, tuple(specs) if specs is not None else feature_specs())
    if not specs:
        raise AttribError(f"no feature applies to any {what} query: nothing to learn fusion weights from")
    with single_threaded_blas():  # small products: a BLAS thread pool only spins (40x slower on 2 busy cores)
        learned = _learn(list(queries), models, metric, target_far, specs, folds, seed, rrf_k, l2_grid, what,
                         l2_rule)
    learned.not_applicable = missing
    return learned


def _learn(queries, models, metric, target_far, specs, folds, seed, rrf_k, l2_grid, what, l2_rule) -> Learned:
    X, y, qi = design(queries, specs, rrf_k)
    if y.sum() == 0:
        raise AttribError(f"no candidate of the {what} queries is a source: the rankers found nothing to learn from")
    fold_of = _folds(queries, folds, seed)
    cv: dict[float, float] = {}
    se: dict[float, float] = {}
    for l2 in l2_grid:
        scores, every = [], []
        for f in range(folds):
            tr = fold_of[qi] != f
            if not tr.any() or y[tr].sum() == 0:
                continue
            mu, sd = standardization(X[tr])
            w, b = fit_logistic(standardize(X[tr], mu, sd), y[tr], l2)
            held = [r for i, r in enumerate(queries) if fold_of[i] == f]
            vals = metric_values(held, _weights(w, b, mu, sd, specs, models, rrf_k), metric)
            scores.append(float(np.mean(vals)) if vals else math.nan)
            every += vals
        ok = np.asarray([x for x in scores if math.isfinite(x)])
        cv[l2] = float(ok.mean()) if len(ok) else math.nan
        se[l2] = float(np.std(every, ddof=1) / math.sqrt(len(every))) if len(every) > 1 else 0.0
    best = max(l2_grid, key=lambda reg: (np.nan_to_num(cv[reg], nan=-1.0), reg))  # ties: the stronger one
    if l2_rule == "1se" and math.isfinite(cv[best]):
        best = max(reg for reg in l2_grid if math.isfinite(cv[reg]) and cv[reg] >= cv[best] - se[best])
    mu, sd = standardization(X)
    w, b = fit_logistic(standardize(X, mu, sd), y, best)
    weights = _weights(w, b, mu, sd, specs, models, rrf_k)
    set_threshold(weights, queries, target_far, what)
    weights.evidence_levels = evidence_levels(queries, weights)
    return Learned(weights, cv, best, se)
