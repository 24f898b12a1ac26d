"""`attrib info`: what an index folder holds."""
from __future__ import annotations

import os

from ._manifest import UNTRAINED_BANNER
from ._reader import IndexReader


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
    return info
