"""`attrib info`: what an index folder holds."""
from __future__ import annotations

import os

from ._calibration import IndexCalibration
from ._layout import component
from ._manifest import UNTRAINED_BANNER
from ._reader import IndexReader
from .fusion import learned_how, resolve_fusion


def index_info(path: str | os.PathLike) -> dict:
    """The manifest, the live and deleted counts, and the size on disk of each component in total, per record
    and per image (see the layout table for what each size grows with)."""
    r = IndexReader(path, hash_files=False)
    sizes = r.component_sizes()
    total = sum(sizes.values())
    m = r.manifest
    n_rec, n_img = max(1, r.n_records), max(1, r.n_images)
    info = {
        "path": str(r.path),
        "manifest": m,
        "records": r.n_records,
        "images": r.n_images,
        "live": r.n_records,
        "deleted": int(m["counts"].get("deleted", 0)),
        "segments": len(m["segments"]),
        "generation": int(m["generation"]),
        "complete": bool(m["build"].get("complete")),
        "codebooks": r.codebooks.describe(),
        "sizes": sizes,
        "total_bytes": total,
        "disk_bytes_per_record": {k: round(v / n_rec, 1) for k, v in sizes.items()}
        | {"total": round(total / n_rec, 1)},
        "bytes_per_image": {k: round(v / n_img, 1) for k, v in sizes.items()} | {"total": round(total / n_img, 1)},
        "ram_bytes_per_record": ram_bytes_per_record(r),
        "grows_with": {k: component(k).grows_with if k != "codebooks" else "index" for k in sizes},
    }
    if r.untrained:
        info["warning"] = UNTRAINED_BANNER.format(profile=m["models"]["profile"])
    cal, notes = IndexCalibration(r.path).load(m)
    fusion = resolve_fusion("auto", r.fingerprint, f"index {r.path}", text_only=r.n_images == 0, calibration=cal,
                            warnings=notes)
    info["fusion"] = fusion.describe() | {"warnings": fusion.warnings}
    if fusion.weights is not None:
        how = learned_how(fusion.weights)
        info["fusion"]["learned"] = f"learned by {how['learned_by']} {how['learned_at'] or ''} on {how['learned_on']}"
    info["search"] = {n: {"nprobe": r.nprobe[n], "refine": r.refine[n], "nlist": r.codebooks.stores[n].nlist,
                          "measured": n in r.search_settings}
                      | {k: v for k, v in r.search_settings.get(n, {}).items() if k not in ("nprobe", "refine")}
                      for n in ("clip", "dino")}
    if cal is not None:
        info["calibration"] = {"path": str(r.path / "calibration.json"), "used": fusion.weights is cal,
                               "threshold": cal.threshold, "scores": cal.provenance.get("scores"),
                               "counts": cal.provenance.get("counts"),
                               "seconds": cal.provenance.get("seconds", {}).get("total"),
                               "index": cal.provenance.get("index")}
    r.close()
    return info


def ram_bytes_per_record(r: IndexReader) -> dict:
    """What a query process keeps resident per record (the rest is memory-mapped and read on demand): the
    coarse quantizers, the deleted-row list with its bitmap of live rows and the segment row tables, plus the
    first-stage lists: all of them for fast-scan stores (packed in memory at their first search), else the share
    of the memory-mapped lists that a search touches. Lists hold the images of deleted records until a compaction."""
    n = max(1, r.n_records)
    stored = sum(s.n_images for s in r.segments)  # deleted images included
    out = {}
    for name in ("clip", "dino"):
        spec = r.codebooks.stores[name]
        code = spec.code_bytes
        centroids = spec.nlist * spec.dim * 4
        share = 1.0 if spec.fast_scan else min(1.0, r.nprobe[name] / max(spec.nlist, 1))
        scanned = (code + 8) * stored * share
        out[name] = round((centroids + scanned) / n, 1)
    out["row_tables"] = 8.0 * len(r.segments) / n + 8.0 * r.n_images / n  # first rows; image rows touched
    deleted = int(r.manifest["counts"].get("deleted", 0))
    out["deleted"] = round((8.0 * deleted + (r.next_row / 8 if deleted else 0)) / n, 1)
    out["total"] = round(sum(out.values()), 1)
    return out

