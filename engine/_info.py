"""`attrib info`: what an index folder holds."""
from __future__ import annotations

import os

from ._calibration import IndexCalibration
from ._manifest import UNTRAINED_BANNER
from ._reader import IndexReader
from .fusion import learned_how, resolve_fusion


def index_info(path: str | os.PathLike) -> dict:
    """The manifest, plus the size on disk of each component and per indexed image."""
    r = IndexReader(path)
    sizes = r.component_sizes()
    total = sum(sizes.values())
    n_img = max(1, r.n_images)
    info = {
        "path": str(r.path),
        "manifest": r.manifest,
        "sizes": sizes,
        "total_bytes": total,
        "bytes_per_image": {k: round(v / n_img, 1) for k, v in sizes.items()} | {"total": round(total / n_img, 1)},
    }
    if r.untrained:
        info["warning"] = UNTRAINED_BANNER.format(profile=r.manifest["models"]["profile"])
    cal, notes = IndexCalibration(r.path).load(r.manifest)
    fusion = resolve_fusion("auto", r.fingerprint, f"index {r.path}", calibration=cal, warnings=notes)
    info["fusion"] = fusion.describe() | {"warnings": fusion.warnings}
    if fusion.weights is not None:
        how = learned_how(fusion.weights)
        info["fusion"]["learned"] = f"learned by {how['learned_by']} {how['learned_at'] or ''} on {how['learned_on']}"
        if cal is not None and fusion.weights is cal:
            info["calibration"] = {"path": str(r.path / "calibration.json"), "threshold": cal.threshold,
                                   "scores": cal.provenance.get("scores"), "counts": cal.provenance.get("counts"),
                                   "seconds": cal.provenance.get("seconds", {}).get("total")}
    return info
