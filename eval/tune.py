"""Learning fusion weights and the "no source" threshold from a benchmark's ``tune`` split only.

Method: L2-regularised logistic regression over the candidate pools of the tune queries (every candidate of
every tune query is one example, labelled 1 when it is a source). The 28 features are each evidence signal raw
(absolute similarity, which is what separates a real source from the best of unrelated images) and
normalised per query (z-score and reciprocal rank, which is what RRF uses); each cosine also enters as the
near-duplicate log-distance -log(1 - cos) and its z-score, because a linear model cannot otherwise tell a
near-copy (0.999) from a merely similar image (0.95): on the synthetic benchmark this took held-out map@100
from 0.538 to 0.596. The regularisation strength is
chosen by 3-fold cross-validation over tune queries on the requested metric. The model's score is the
log-odds that a candidate is a source, so one number ranks candidates and, through a threshold on the top
score calibrated on the tune split's novel queries, also says "no likely source".

Why this over a grid or coordinate search: 28 features make a grid infeasible and coordinate ascent on a
step metric noisy; logistic regression is convex (a unique, reproducible optimum, found by Newton's method
in a few steps), uses every candidate rather than only the ranks, and gives calibrated scores for the
threshold and the attribution shares. Cross-validating the L2 strength on the metric keeps it honest.

The test split is read only after the weights and threshold are fixed, to report held-out scores.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import engine
from engine import Fusion, FusionWeights, Index, QuerySettings, feature_specs, now_iso
from engine.files import check_output_file
from engine.fusion import feature_matrix, fit_logistic, parse_feature, standardization, standardize

from . import metrics as M
from .bench import Benchmark
from .run import DEFAULT_TARGET_FAR, QueryRun, fused_ranking, metric_table, run_queries

L2_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
RRF_K = QuerySettings().rrf_k  # the :rr transform uses the engine's RRF k


def _design(runs: Sequence[QueryRun], specs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacked feature rows, labels and the query index of each row."""
    Xs, ys, qs = [], [], []
    for i, r in enumerate(runs):
        if len(r.pool_ids) == 0:
            continue
        Xs.append(feature_matrix(r.pool.feats, list(specs), RRF_K))
        ys.append(r.labels.astype(np.float64))
        qs.append(np.full(len(r.pool_ids), i))
    if not Xs:
        raise engine.AttribError("no tune query produced any candidate: nothing to learn from")
    return np.concatenate(Xs), np.concatenate(ys), np.concatenate(qs)


def _score_runs(runs: Sequence[QueryRun], weights: FusionWeights) -> dict[str, tuple[list[str], float]]:
    fusion = Fusion(weights, RRF_K)
    return {r.query_id: fused_ranking(r, fusion) for r in runs}


def metric_of(runs: Sequence[QueryRun], rankings: dict[str, list[str]], metric: str) -> float:
    """Mean ``metric`` of one ranking over the queries that have a source (NaN when none has)."""
    v = metric_table(list(runs), {"r": rankings}, [metric])[0]["r"][metric]
    return float("nan") if v is None else v


def _weights(w: np.ndarray, b: float, mu: np.ndarray, sd: np.ndarray, specs, models: dict) -> FusionWeights:
    return FusionWeights(features=list(specs), weights=[float(x) for x in w], bias=float(b),
                         mean=[float(x) for x in mu], std=[float(x) for x in sd], models=models, rrf_k=RRF_K)


@dataclass
class TuneResult:
    weights: FusionWeights
    cv: dict[float, float]  # l2 -> mean CV metric
    l2: float  # the strength chosen by cross-validation
    tune_runs: list[QueryRun]
    not_applicable: list[str]  # features no tune candidate had (e.g. image features on a text-only benchmark)


def applicable(runs: Sequence[QueryRun], specs: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """(the specs whose feature some candidate of ``runs`` has, the features none has). A feature that is missing
    everywhere (image evidence on a caption-only benchmark) cannot be learned: it is left out of the model rather
    than given a meaningless weight, so weights learned on a text-only benchmark are over text features only."""
    present = {f for r in runs for f, v in r.pool.feats.items() if len(v) and np.isfinite(v).any()}
    bases = {s: parse_feature(s)[0] for s in specs}
    missing = sorted({b for b in bases.values() if b not in present}, key=list(bases.values()).index)
    return tuple(s for s in specs if bases[s] in present), missing


def learn(tune_runs: list[QueryRun], models: dict, metric: str = "map@100", target_far: float = DEFAULT_TARGET_FAR,
          specs: Sequence[str] | None = None, folds: int = 3, seed: int = 0) -> TuneResult:
    """Fit the weights and the threshold on tune runs only (nothing else is passed in). ``specs`` defaults to
    every registered feature with its standard transforms (``engine.feature_specs()``)."""
    M.parse_metric(metric)
    specs = tuple(specs) if specs is not None else feature_specs()
    if any(r.split != "tune" for r in tune_runs):
        raise engine.AttribError("learn() was given queries outside the tune split")
    specs, missing = applicable(tune_runs, specs)
    if not specs:
        raise engine.AttribError("no feature applies to any tune query: nothing to learn from")
    X, y, qi = _design(tune_runs, specs)
    if y.sum() == 0:
        raise engine.AttribError("no tune candidate is a source: the rankers found nothing to learn from")
    n_q = len(tune_runs)
    perm = np.random.default_rng(seed).permutation(n_q)
    fold_of = np.empty(n_q, int)
    fold_of[perm] = np.arange(n_q) % folds
    cv: dict[float, float] = {}
    for l2 in L2_GRID:
        scores = []
        for f in range(folds):
            tr = fold_of[qi] != f
            mu, sd = standardization(X[tr])
            w, b = fit_logistic(standardize(X[tr], mu, sd), y[tr], l2)
            held = [r for i, r in enumerate(tune_runs) if fold_of[i] == f]
            ranks = {q: v[0] for q, v in _score_runs(held, _weights(w, b, mu, sd, specs, models)).items()}
            scores.append(metric_of(held, ranks, metric))
        cv[l2] = float(np.nanmean(scores))
    best = max(L2_GRID, key=lambda reg: (cv[reg], reg))  # ties: the stronger regularisation
    mu, sd = standardization(X)
    w, b = fit_logistic(standardize(X, mu, sd), y, best)
    weights = _weights(w, b, mu, sd, specs, models)
    novel_top = np.array([v[1] for q, v in _score_runs([r for r in tune_runs if r.novel], weights).items()])
    thr = M.calibrate_threshold(novel_top, target_far) if len(novel_top) else None
    weights.threshold = None if thr is None or not math.isfinite(thr) else float(thr)
    weights.threshold_rule = (f"smallest top-score threshold with false-attribution rate <= {target_far} on the "
                              f"{len(novel_top)} novel tune queries" if len(novel_top) else "no novel tune queries")
    return TuneResult(weights, cv, best, tune_runs, missing)


def tune(bench: Benchmark, idx: Index, out: str | os.PathLike | None, metric: str = "map@100",
         target_far: float = DEFAULT_TARGET_FAR, progress: bool = True):
    """Learn on ``tune``, then score tune and held-out ``test``; write the weights file ``out`` (None: do not
    write; the caller saves ``weights``). Returns (weights, {split: Evaluation}). An ``out`` that cannot be
    written is refused before any work (OutputError)."""
    from .run import evaluate

    if out is not None:
        check_output_file(out)

    models = {k: idx.manifest["models"][k] for k in ("profile", "pretrained", "fingerprint")}
    tune_runs = run_queries(bench, idx, bench.split("tune"), progress)  # the only queries learning sees
    res = learn(tune_runs, models, metric, target_far)
    w = res.weights
    w.models, w.name = dict(models), "" if out is None else str(out)
    w.provenance = {
        "benchmark": str(bench.path),
        "benchmark_sha256": bench.content_hash,
        "benchmark_generator": _generator_params(bench),
        "index": str(idx.path),
        "metric": metric,
        "l2": res.l2,
        "cv": {str(k): round(v, 6) for k, v in res.cv.items()},
        "target_far": target_far,
        "n_tune_queries": len(tune_runs),
        "modality": "text" if w.text_only else "image+text",
        "not_applicable": res.not_applicable,
        "created": now_iso(),
        "engine_version": engine.__version__,
    }
    test_runs = run_queries(bench, idx, bench.split("test"), progress)  # read only now that w is fixed
    runs_by_split = {"tune": tune_runs, "test": test_runs}
    evals = {split: evaluate(bench, idx, split, weights=w, target_far=target_far, progress=progress,
                             runs_by_split=runs_by_split) for split in ("tune", "test")}
    w.provenance["scores"] = {s: metric_by_ranker(evals[s], metric) for s in evals}
    if out is not None:
        w.save(out)
    return w, evals


def _generator_params(bench: Benchmark) -> dict | None:
    """The generator's parameters when the benchmark was made by `attrib bench synth` (reproducible origin)."""
    p = bench.path / "synth.json"
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {k: d.get(k) for k in ("generator", "version", "train", "queries", "seed", "image_size")}


def metric_by_kind(ev, metric: str) -> dict[str, dict[str, float | None]]:
    """kind -> ranker -> ``metric`` over that kind's queries (the false-attribution rate for kinds without a
    source)."""
    out: dict[str, dict[str, float | None]] = {}
    idle = ev.result.get("not_applicable", {})
    for kind in sorted({r.kind for r in ev.runs}):
        runs = [r for r in ev.runs if r.kind == kind]
        if all(r.novel for r in runs):
            out[kind] = {n: d.get("false_attribution_rate") for n, d in ev.result["by_kind"][kind].items()}
            continue
        out[kind] = {}
        for n, rankings in ev.rankings.items():
            v = metric_of(runs, rankings, metric)
            out[kind][n] = None if math.isnan(v) or n in idle else round(v, 6)
    return out


def metric_by_ranker(ev, metric: str) -> dict[str, float | None]:
    """``metric`` for every ranker of an evaluation (the tuning metric need not be a reported one); None for a
    ranker that took part in no query (e.g. image rankers on a text-only benchmark)."""
    out = {}
    idle = ev.result.get("not_applicable", {})
    for n, rankings in ev.rankings.items():
        v = metric_of(ev.runs, rankings, metric)
        out[n] = None if math.isnan(v) or n in idle else round(v, 6)
    return out

