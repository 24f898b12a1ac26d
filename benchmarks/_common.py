"""Shared helpers for benchmark scripts: machine facts, percentiles, a printed table and a saved JSON."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    from engine import library_versions

    try:
        import torch

        threads = torch.get_num_threads()
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        threads, gpu = None, None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": threads, "gpu": gpu, "versions": library_versions(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def timed_ms(fn, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls of ``fn``, after one call to warm up."""
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, np.float64), q))


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def table(title: str, rows: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
