"""DINOv2 ranker: a global-descriptor first stage, then a patch-level rerank of the candidates."""
from __future__ import annotations

import numpy as np

from .._stores import patch_scores
from ._base import Candidates, Feature, QueryInput, Ranker, nan_array
from ._registry import register_ranker


@register_ranker
class DinoRanker(Ranker):
    """Its first stage takes ``dino_rerank`` global-descriptor neighbours and keeps the best by its own score,
    the mean of three features: the global descriptor cosine, Chamfer/MaxSim over pooled patch cells (textures
    and copied parts) and cell-by-cell agreement with one cell of tolerance (composition and pose)."""

    name = "dino"
    label = "dino"
    features = (
        Feature("dino", "cosine", "dino", "DINOv2 global descriptor cosine (centred CLS + patch mean)",
                evidence="image"),
        Feature("dino_patch", "cosine", "dino patch", "mean over query cells of the best-matching record cell",
                evidence="image"),
        Feature("dino_layout", "cosine", "dino layout", "mean same-position cell cosine, one cell of tolerance",
                evidence="image"),
    )
    main = True
    components = ("dino", "patches")
    encodings = ("dino_global", "dino_cells")
    style = "tab:green"
    order = 30

    def available(self, q: QueryInput) -> bool:
        return q.get("dino_global") is not None and self.reader.n_images > 0

    def first_stage_depth(self, depth: int) -> int:
        return max(depth, self.settings.dino_rerank)

    def dense_query(self, q: QueryInput):
        return None if q.get("dino_global") is None else ("dino", q.get("dino_global"))

    def featurize(self, q: QueryInput, cands: Candidates) -> dict[str, np.ndarray]:
        n = len(cands)
        out = {"dino": cands.cosines("dino", q.get("dino_global")), "dino_patch": nan_array(n),
               "dino_layout": nan_array(n)}
        cells = q.get("dino_cells")
        if cells is None or n == 0 or not cands.has_image.any():
            return out
        chamfer, layout = patch_scores(cells, cands.patches(), self.reader.grid)
        out["dino_patch"][cands.has_image] = chamfer
        out["dino_layout"][cands.has_image] = layout
        return out

    def score(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        return (feats["dino"] + feats["dino_patch"] + feats["dino_layout"]) / 3.0
