"""The "no likely source" verdict and the attribution shares of the results above the threshold."""
from __future__ import annotations

import numpy as np

from .fusion import Fusion
from .results import SHARE_NOTE, Candidate, Verdict, clean_number


def verdict(results: list[Candidate], fusion: Fusion) -> Verdict:
    """The verdict for ranked results; sets ``share`` on the results above the threshold. With logistic
    weights a share is the candidate's probability normalised over those results; otherwise they share equally."""
    thr = fusion.threshold
    if thr is None:
        return Verdict(None, None, None, "No calibrated threshold: ranked candidates only")
    above = [r for r in results if r.above_threshold]
    if above and fusion.weights is not None and fusion.weights.method == "logistic":
        p = 1.0 / (1.0 + np.exp(-np.asarray([r.score for r in above], np.float64)))
        shares = p / p.sum()
    else:
        shares = np.full(len(above), 1.0 / max(1, len(above)))
    for r, s in zip(above, shares):
        r.share = round(float(s), 4)
    return Verdict(bool(above), clean_number(thr), len(above),
                   "Likely sources found" if above else "No likely source in this index", SHARE_NOTE)
