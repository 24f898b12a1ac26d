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

The learner itself is the engine's (``engine.fusion.learn``), shared with ``attrib calibrate``, which learns
the same model from queries an index makes from its own records, without labels. The test split is read
only after the weights and threshold are fixed, to report held-out scores.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Sequence

import engine
from engine import FusionWeights, Index, QuerySettings, now_iso
from engine.files import check_output_file
from engine.fusion.learn import L2_GRID, learn_fusion

from . import metrics as M
from .bench import Benchmark
from .run import DEFAULT_TARGET_FAR, QueryRun, metric_table, run_queries

RRF_K = QuerySettings().rrf_k  # the :rr transform uses the engine's RRF k

__all__ = ["L2_GRID", "TuneResult", "learn", "tune", "metric_of", "metric_by_kind", "metric_by_ranker"]


def metric_of(runs: Sequence[QueryRun], rankings: dict[str, list[str]], metric: str) -> float:
    """Mean ``metric`` of one ranking over the queries that have a source (NaN when none has)."""
    v = metric_table(list(runs), {"r": rankings}, [metric])[0]["r"][metric]
    return float("nan") if v is None else v


@dataclass
class TuneResult:
    weights: FusionWeights
    cv: dict[float, float]  # l2 -> mean CV metric
    l2: float  # the strength chosen by cross-validation
    tune_runs: list[QueryRun]
    not_applicable: list[str]  # features no tune candidate had (e.g. image features on a text-only benchmark)


def learn(tune_runs: list[QueryRun], models: dict, metric: str = "map@100", target_far: float = DEFAULT_TARGET_FAR,
          specs: Sequence[str] | None = None, folds: int = 3, seed: int = 0) -> TuneResult:
    """Fit the weights and the threshold on tune runs only (nothing else is passed in), with the engine's one
    learner (``engine.fusion.learn``). ``specs`` defaults to every registered feature with its standard
    transforms (``engine.feature_specs()``)."""
    M.parse_metric(metric)
    if any(r.split != "tune" for r in tune_runs):
        raise engine.AttribError("learn() was given queries outside the tune split")
    res = learn_fusion(tune_runs, models, metric=metric, target_far=target_far, specs=specs, folds=folds, seed=seed,
                       rrf_k=RRF_K, what="tune")
    return TuneResult(res.weights, res.cv, res.l2, tune_runs, res.not_applicable)


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
        "learned_by": "attrib tune",
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

