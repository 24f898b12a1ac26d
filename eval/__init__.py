"""Benchmarks for attribution: the benchmark folder format, a synthetic memorization benchmark generator,
metrics, evaluation runs, fusion-weight tuning and importers for public memorization lists."""
