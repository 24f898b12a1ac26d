"""The "no likely source" verdict, the attribution shares of the results above the threshold, and which kinds
of evidence (``engine.rankers.EVIDENCE``) carried each result."""
from __future__ import annotations

import numpy as np

from .fusion import Fusion
from .results import SHARE_NOTE, Candidate, Verdict, clean_number

CAPTION_ONLY_LABEL = "Caption match only: the prompt matches, the image matches nothing better than unrelated records"


def evidence_support(fusion: Fusion, feats: dict[str, np.ndarray], positions: np.ndarray) -> list[dict] | None:
    """For each candidate at ``positions`` of a pool: ``support`` (evidence kind -> its part of the fused score
    minus the part the strongest unrelated record of a query reaches, in log-odds) and ``carried_by`` (the kinds
    whose support is positive, strongest first). None for fusions that are not learned weights."""
    w = fusion.weights
    if w is None or len(positions) == 0:
        return None
    parts = w.parts(feats)
    levels = w.evidence_levels or {}
    out = []
    for i in positions:
        support = {k: clean_number(float(p[i]) - float(levels.get(k, 0.0))) for k, p in parts.items()}
        carried = sorted((k for k, v in support.items() if v is not None and v > 0), key=lambda k: -support[k])
        out.append({"support": support, "carried_by": carried})
    return out


def mark_caption_only(results: list[Candidate]) -> None:
    """A result above the threshold without image support (its image evidence is at the level of unrelated
    records, or it has none) is a caption match only; one above it carried by nothing on its own is credited
    to its strongest kind."""
    for r in results:
        if r.support is None or r.above_threshold is None:
            continue
        if r.above_threshold and not r.carried_by and r.support:
            r.carried_by = [max(r.support, key=lambda k: r.support[k] if r.support[k] is not None else -np.inf)]
        r.caption_match_only = bool(r.above_threshold and "image" not in (r.carried_by or []))


def verdict(results: list[Candidate], fusion: Fusion) -> Verdict:
    """The verdict for ranked results; sets ``share`` on the results above the threshold. With logistic
    weights a share is the candidate's probability normalised over those results; otherwise they share equally.
    When every result above the threshold is a caption match only, the verdict says so."""
    thr = fusion.threshold
    if thr is None:
        return Verdict(None, None, None, "No calibrated threshold: ranked candidates only")
    mark_caption_only(results)
    above = [r for r in results if r.above_threshold]
    if above and fusion.weights is not None and fusion.weights.method == "logistic":
        p = 1.0 / (1.0 + np.exp(-np.asarray([r.score for r in above], np.float64)))
        shares = p / p.sum()
    else:
        shares = np.full(len(above), 1.0 / max(1, len(above)))
    for r, s in zip(above, shares):
        r.share = round(float(s), 4)
    caption_only = bool(above) and all(r.caption_match_only for r in above)
    label = CAPTION_ONLY_LABEL if caption_only else ("Likely sources found" if above else
                                                     "No likely source in this index")
    return Verdict(bool(above), clean_number(thr), len(above), label, SHARE_NOTE,
                   caption_match_only=caption_only if above else False)
