"""Which fusion a query uses: learned weights (a file, or the weights shipped for the index's models) or
plain RRF, and the one function that scores a candidate pool with it."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import FusionWeightsError
from ..rankers import main_rankers, rrf_rankers
from .rrf import rrf
from .weighted import FusionWeights

if TYPE_CHECKING:
    from .._pool import Pool

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


@dataclass
class Fusion:
    """How candidates are fused: ``weights`` (learned) or RRF of the main rankers when ``weights`` is None."""

    weights: FusionWeights | None
    rrf_k: int = 60
    note: str = ""

    @property
    def method(self) -> str:
        return "weighted" if self.weights is not None else "rrf"

    @property
    def threshold(self) -> float | None:
        return self.weights.threshold if self.weights is not None else None

    def scores(self, pool: "Pool") -> np.ndarray:
        """Fused score of each candidate of one pool (the one implementation queries and benchmarks share)."""
        if len(pool) == 0:
            return np.zeros(0)
        if self.weights is None:
            left_out = set(main_rankers()) - set(rrf_rankers())  # main rankers left to learned fusion
            return rrf({n: s for n, s in pool.ranker_scores.items() if n not in left_out}, self.rrf_k)
        return self.weights.score(pool.feats)

    def describe(self) -> dict[str, Any]:
        """The ``fusion`` object of the query JSON."""
        from ..results import clean_number

        d: dict[str, Any] = {"method": self.method, "threshold": clean_number(self.threshold), "note": self.note}
        if self.weights is not None:
            d["weights"] = self.weights.name
            p = self.weights.provenance
            gen = p.get("benchmark_generator")
            d["learned_on"] = (f"{gen['generator']} v{gen['version']} (train {gen['train']}, queries {gen['queries']}, "
                               f"seed {gen['seed']})" if gen else p.get("benchmark"))
        else:
            d["rrf_k"] = self.rrf_k
            d["rankers"] = list(rrf_rankers())
        return d


def shipped_weights_files() -> list[Path]:
    return sorted(DATA_DIR.glob("weights-*.json"))


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[FusionWeights, ...]:
    out = []
    for p in shipped_weights_files():
        w = FusionWeights.load(p)  # a broken shipped file is a packaging bug: say so, do not hide it
        w.name = f"shipped:{p.name}"
        out.append(w)
    return tuple(out)


def shipped_weights_for(fingerprint: str, text_only: bool = False) -> FusionWeights | None:
    """The shipped weights learned for these exact models, if any (read once per process). ``text_only``: for a
    caption-only index or a prompt-only query, weights over text features only are preferred; otherwise they
    are the last resort."""
    mine = sorted((w for w in _shipped() if w.models.get("fingerprint") == fingerprint),
                  key=lambda w: w.text_only != text_only)
    return mine[0] if mine else None


def resolve_fusion(weights: Any, fingerprint: str, where: str, rrf_k: int = 60, text_only: bool = False) -> Fusion:
    """``"auto"``: the shipped weights learned for these models (over text features only when ``text_only``:
    a caption-only index or a prompt-only query, if such weights exist), else RRF; ``"rrf"``/None: RRF; a path
    or :class:`FusionWeights`: those weights (refused if learned for other models)."""
    if weights is None or (isinstance(weights, str) and weights == "rrf"):
        return Fusion(None, rrf_k, f"reciprocal rank fusion (k={rrf_k}) of {', '.join(rrf_rankers())}")
    if isinstance(weights, str) and weights == "auto":
        w = shipped_weights_for(fingerprint, text_only)
        if w is None:
            return Fusion(None, rrf_k, f"no learned weights match these models: reciprocal rank fusion (k={rrf_k})")
        return Fusion(w, rrf_k, f"learned weights shipped with attrib ({w.name}), not plain RRF")
    if isinstance(weights, FusionWeights):
        w = weights
    elif isinstance(weights, (str, os.PathLike)):
        w = FusionWeights.load(weights)
    else:
        raise FusionWeightsError(
            f"weights must be 'auto', 'rrf', a file path or FusionWeights, not {type(weights).__name__}"
        )
    w.check_models(fingerprint, where)
    return Fusion(w, rrf_k, f"learned weights from {w.name}")
