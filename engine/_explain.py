"""Patch correspondences between a query and indexed records: the evidence behind the report's heatmaps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ._reader import IndexReader
from ._stores import cell_similarities
from ._threads import single_threaded_blas
from .rankers import QueryInput


@dataclass
class Correspondence:
    """Where one indexed record matches the query, on the pooled DINOv2 patch grid (row-major cells).

    ``query_heat[i]`` is how much better this record explains query cell i than the other candidates do
    (best cosine to any of its cells minus the median best cosine over the baseline candidates, floored at
    0); ``source_heat[j]`` is the same evidence seen from the record's cell j. A copied object or texture
    lights up where it sits in both images; shared plain backgrounds do not (every candidate has them).
    """

    row: int
    grid: int
    query_heat: np.ndarray  # (grid, grid)
    source_heat: np.ndarray  # (grid, grid)
    matches: list[tuple[int, int, float]]  # (query cell, record cell, heat) for the strongest mutual matches


def correspondences(reader: IndexReader, q: QueryInput, rows: Sequence[int], baseline_rows: Sequence[int],
                    n_matches: int = 12) -> list[Correspondence | None]:
    """Patch correspondences between the query and each record of ``rows`` (None for records without an
    image, or when the query has no image). ``baseline_rows`` say what "ordinary" similarity is, so that only
    evidence specific to a record lights up."""
    cells = q.get("dino_cells")
    if cells is None:
        return [None] * len(rows)
    grid = reader.grid
    with single_threaded_blas():
        base_rows = np.asarray(list(baseline_rows), np.int64)
        has, base_cells = reader.patch_cells(base_rows)
        base_rows = base_rows[has]
        qc = np.asarray(cells, np.float32)
        if len(base_rows):
            base_best = cell_similarities(qc, base_cells).max(axis=1)
        else:
            base_best = np.zeros((0, qc.shape[0]), np.float32)
        rows = np.asarray(list(rows), np.int64)
        has_r, their_cells = reader.patch_cells(rows)
        pos = np.cumsum(has_r) - 1
        out: list[Correspondence | None] = []
        for i, row in enumerate(rows):
            if not has_r[i]:
                out.append(None)
                continue
            sims = qc @ their_cells[pos[i]].T  # (Cq, Cs)
            others = base_best[base_rows != row]
            baseline = np.median(others, axis=0) if len(others) else np.zeros(qc.shape[0], np.float32)
            excess = sims - baseline[:, None]
            q_heat = np.clip(excess.max(axis=1), 0, None)
            s_heat = np.clip(excess.max(axis=0), 0, None)
            qi = np.arange(sims.shape[0])
            sj = excess.argmax(axis=1)
            mutual = excess.argmax(axis=0)[sj] == qi
            cand = [(int(i), int(sj[i]), float(excess[i, sj[i]])) for i in qi[mutual] if excess[i, sj[i]] > 0]
            cand.sort(key=lambda t: -t[2])
            out.append(Correspondence(int(row), grid, q_heat.reshape(grid, grid), s_heat.reshape(grid, grid),
                                      cand[:n_matches]))
    return out
