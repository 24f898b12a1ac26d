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
            left_out = set(main_rankers()) - set(rrf_rankers())  # main rankers left to learned fusion
            return rrf({n: s for n, s in pool.ranker_scores.items() if n not in left_out}, self.rrf_k)
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
            d["rankers"] = list(rrf_rankers())
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


def shipped_weights_for(fingerprint: str, text_only: bool = False) -> FusionWeights | None:
    """The shipped weights learned for these exact models, if any (read once per process). ``text_only``: for a
    caption-only index or a prompt-only query, weights over text features only are preferred; otherwise they
    are the last resort."""
    mine = sorted((w for w in _shipped() if w.models.get("fingerprint") == fingerprint),
                  key=lambda w: w.text_only != text_only)
    return mine[0] if mine else None


def resolve_fusion(weights: Any, fingerprint: str, where: str, rrf_k: int = 60, text_only: bool = False,
                   calibration: FusionWeights | None = None, warnings: Sequence[str] = ()) -> Fusion:
    """``"auto"``: the index's own calibration (``calibration``, when learned for these models), else the shipped
    weights learned for these models, else RRF; ``"rrf"``/None: RRF; a path or :class:`FusionWeights`: those
    weights (refused if learned for other models). ``text_only`` (a caption-only index or a prompt-only query)
    prefers weights over text features only, the calibration's first, then shipped ones; weights over image
    features too are then the last resort. ``warnings`` (about the calibration) are carried along."""
    if weights is None or (isinstance(weights, str) and weights == "rrf"):
        return Fusion(None, rrf_k, f"reciprocal rank fusion (k={rrf_k}) of {', '.join(rrf_rankers())}")
    if isinstance(weights, str) and weights == "auto":
        notes = list(warnings)
        cal = None
        if calibration is not None:
            theirs = calibration.models.get("fingerprint")
            if theirs == fingerprint:
                cal = calibration
            else:
                notes.append(f"the index's calibration ({calibration.name}) was learned for models {theirs}, but "
                             f"{where} uses models {fingerprint}: it is not used; run `attrib calibrate` on the "
                             "index again")
        shipped = shipped_weights_for(fingerprint, text_only)
        if cal is not None and not (text_only and not cal.text_only and shipped is not None and shipped.text_only):
            how = learned_how(cal)
            return Fusion(cal, rrf_k, f"weights calibrated on this index ({cal.name}, learned by "
                                      f"{how['learned_by']} {how['learned_at']}), not plain RRF", notes)
        w = shipped
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
