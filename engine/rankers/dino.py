"""DINOv2 ranker: a global-descriptor first stage, then a patch-level rerank of the candidates."""
from __future__ import annotations

import numpy as np

from .._stores import patch_scores
from ._base import QueryInput, Ranker, cosine_to, nan_array


class DinoRanker(Ranker):
    """Features: ``dino`` (global descriptor cosine), ``dino_patch`` (Chamfer/MaxSim over pooled patch cells:
    textures and copied parts), ``dino_layout`` (cell-by-cell agreement with one cell of tolerance:
    composition and pose). Its own score is the mean of the three."""

    name = "dino"
    features = ("dino", "dino_patch", "dino_layout")

    def available(self, q: QueryInput) -> bool:
        return q.dino_global is not None and self.reader.n_images > 0

    def first_stage(self, k: int) -> int:
        return max(k, self.settings.dino_rerank)

    def dense_query(self, q: QueryInput):
        return None if q.dino_global is None else ("dino", q.dino_global)

    def featurize(self, q: QueryInput, rows: np.ndarray) -> dict[str, np.ndarray]:
        n = len(rows)
        out = {
            "dino": cosine_to(self.reader.dino, self.reader, q.dino_global, rows),
            "dino_patch": nan_array(n),
            "dino_layout": nan_array(n),
        }
        if q.dino_cells is None or n == 0:
            return out
        slots = self.reader.rows_to_slots(rows)
        has = slots >= 0
        if has.any():
            cells = self.reader.patches.get(slots[has])
            chamfer, layout = patch_scores(q.dino_cells, cells, self.reader.grid)
            out["dino_patch"][has] = chamfer
            out["dino_layout"][has] = layout
        return out

    def combine(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return (feats["dino"] + feats["dino_patch"] + feats["dino_layout"]) / 3.0
