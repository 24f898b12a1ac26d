"""Which fusion a query uses: learned weights (a file, or the weights shipped for the index's models) or
plain RRF, and the one function that scores a candidate pool with it."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._errors import FusionWeightsError
from ..rankers import main_rankers
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
    warnings: list[str] = field(default_factory=list)  # e.g. the index's calibration could not be used

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
            return rrf(pool.ranker_scores, self.rrf_k)
        return self.weights.score(pool.feats)

    def describe(self) -> dict[str, Any]:
        """The ``fusion`` object of the query JSON."""
        from ..results import clean_number

        d: dict[str, Any] = {"method": self.method, "threshold": clean_number(self.threshold), "note": self.note}
        if self.weights is not None:
            d["weights"] = self.weights.name
            d.update(learned_how(self.weights))
        else:
            d["rrf_k"] = self.rrf_k
            d["rankers"] = list(main_rankers())
        return d


def learned_how(w: FusionWeights) -> dict[str, Any]:
    """How weights were learned, for outputs: ``learned_by`` (the command), ``learned_on`` (what from) and
    ``learned_at`` (when)."""
    p = w.provenance
    gen = p.get("benchmark_generator")
    if p.get("learned_on"):
        on = p["learned_on"]
    elif gen:
        on = (f"{gen['generator']} v{gen['version']} (train {gen['train']}, queries {gen['queries']}, "
              f"seed {gen['seed']})")
    else:
        on = p.get("benchmark")
    by = p.get("learned_by") or ("attrib tune" if p.get("benchmark") else None)
    return {"learned_by": by, "learned_on": on, "learned_at": p.get("created")}


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


def shipped_weights_for(fingerprint: str) -> FusionWeights | None:
    """The shipped weights learned for these exact models, if any (read once per process)."""
    return next((w for w in _shipped() if w.models.get("fingerprint") == fingerprint), None)


def resolve_fusion(weights: Any, fingerprint: str, where: str, rrf_k: int = 60,
                   calibration: FusionWeights | None = None, warnings: Sequence[str] = ()) -> Fusion:
    """``"auto"``: the index's own calibration (``calibration``, when learned for these models), else the shipped
    weights learned for these models, else RRF; ``"rrf"``/None: RRF; a path or :class:`FusionWeights`: those
    weights (refused if learned for other models). ``warnings`` (about the calibration) are carried along."""
    if weights is None or (isinstance(weights, str) and weights == "rrf"):
        return Fusion(None, rrf_k, f"reciprocal rank fusion (k={rrf_k}) of {', '.join(main_rankers())}")
    if isinstance(weights, str) and weights == "auto":
        notes = list(warnings)
        if calibration is not None:
            theirs = calibration.models.get("fingerprint")
            if theirs == fingerprint:
                how = learned_how(calibration)
                return Fusion(calibration, rrf_k, f"weights calibrated on this index ({calibration.name}, learned by "
                                                  f"{how['learned_by']} {how['learned_at']}), not plain RRF", notes)
            notes.append(f"the index's calibration ({calibration.name}) was learned for models {theirs}, but {where} "
                         f"uses models {fingerprint}: it is not used; run `attrib calibrate` on the index again")
        w = shipped_weights_for(fingerprint)
        if w is None:
            return Fusion(None, rrf_k, f"no learned weights match these models: reciprocal rank fusion (k={rrf_k})",
                          notes)
        return Fusion(w, rrf_k, f"learned weights shipped with attrib ({w.name}), not plain RRF", notes)
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
