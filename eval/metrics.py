"""Retrieval metrics, bootstrap intervals and "no source" detection rates: the engine's one implementation
(``engine.metrics``, shared with the fusion learner and self-calibration), under its benchmark name."""
from __future__ import annotations

from engine.metrics import (
    METRICS,
    MetricFn,
    average_precision,
    bootstrap_ci,
    calibrate_threshold,
    correct_detection_rate,
    detection_rate,
    false_attribution_rate,
    ndcg_at,
    parse_metric,
    per_query,
    recall_at,
    recall_curve,
    reciprocal_rank,
    success_at,
)

__all__ = [
    "METRICS", "MetricFn", "average_precision", "bootstrap_ci", "calibrate_threshold", "correct_detection_rate",
    "detection_rate", "false_attribution_rate", "ndcg_at", "parse_metric", "per_query", "recall_at", "recall_curve",
    "reciprocal_rank", "success_at",
]
