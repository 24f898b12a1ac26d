"""The index's own fusion weights: ``INDEX/calibration.json``, written by self-calibration (``attrib calibrate``,
``engine.calibrate``) and preferred by every query that asks for ``"auto"`` weights.

The file is a fusion weights file (format ``attrib-fusion-weights`` v1, so ``--weights INDEX/calibration.json``
works too) whose provenance names the index it was learned on (:func:`index_identity`: what changes when its
records change, and only then). It is replaced atomically, so an interrupted calibration leaves the previous
weights in place. An append or a deletion after it makes it stale: it is still used, with a warning to
calibrate again; a compaction (which moves records, but neither adds nor removes one) does not. Reading and
writing it lives here only.
"""
from __future__ import annotations

import os
from pathlib import Path

from ._errors import FusionWeightsError
from ._layout import path_of
from .fusion import FusionWeights

CALIBRATION = path_of("calibration")
DISPLAY_PREFIX = "index:"  # how the weights are named in outputs: index:calibration.json


def calibration_path(index_dir: str | os.PathLike) -> Path:
    return Path(index_dir) / CALIBRATION


def index_identity(manifest: dict) -> dict:
    """What identifies the records a calibration was learned on: the index's creation time (a rebuild or an
    overwrite is another index), its live records and images, the next row (grows with every append) and the
    records removed so far (deleted, or deleted and purged by a compaction). Row ids are stable, so these change
    when records are added or removed and stay the same through a compaction."""
    c = manifest["counts"]
    return {"created": manifest.get("created"), "records": int(c["records"]), "images": int(c["images"]),
            "next_row": int(manifest.get("next_row", 0)),
            "removed": int(c.get("deleted", 0)) + int(c.get("purged", 0))}


def store_codecs(manifest: dict) -> dict:
    """The codec of each stored kind of vector (``attrib compact --retrain --codec`` changes them)."""
    cb = manifest.get("codebooks") or {}
    out = {k: v.get("codec") for k, v in (cb.get("stores") or {}).items() if isinstance(v, dict)}
    if cb.get("patch_codec") is not None:
        out["patches"] = cb.get("patch_codec")
    if cb.get("caption_codec") is not None:  # only product codes are named (older manifests: int8 or fp16)
        out["captions"] = cb.get("caption_codec")
    return out


def staleness(learned: dict, manifest: dict) -> list[str]:
    """Warnings for a calibration whose provenance ``index`` (:func:`index_identity` and codecs when it was
    learned) no longer matches the index."""
    out: list[str] = []
    if not learned:
        return out
    now = index_identity(manifest)
    if any(learned.get(k) != now[k] for k in now):
        if learned.get("created") != now["created"]:
            what = f"on another index built {learned.get('created')} (this one: {now['created']})"
        else:
            added = now["next_row"] - int(learned.get("next_row") or 0)
            removed = now["removed"] - int(learned.get("removed") or 0)
            what = (f"when the index held {learned.get('records')} live records; {max(added, 0)} were added and "
                    f"{max(removed, 0)} removed since (now {now['records']})")
        out.append(f"the index's calibration was learned {what}: run `attrib calibrate` on the index again")
    codecs, then = store_codecs(manifest), learned.get("codecs")
    if then and codecs and then != codecs:
        out.append(f"the index's vectors were re-encoded since its calibration (codecs then {then}, now {codecs}): "
                   "run `attrib calibrate` on the index again")
    return out


def write_calibration(index_dir: str | os.PathLike, weights: FusionWeights) -> Path:
    """Replace the index's calibration atomically (temporary file, fsync, rename)."""
    path = calibration_path(index_dir)
    weights.save(path)
    weights.name = DISPLAY_PREFIX + CALIBRATION
    return path


class IndexCalibration:
    """The calibration of one index folder, re-read when the file changes (a calibration run by another process
    is picked up by the next query)."""

    def __init__(self, index_dir: str | os.PathLike) -> None:
        self.path = calibration_path(index_dir)
        self._key: tuple | None = None
        self._state: tuple[FusionWeights | None, list[str]] = (None, [])

    def load(self, manifest: dict) -> tuple[FusionWeights | None, list[str]]:
        """(weights or None, warnings). A damaged file is not used (a warning says so); a calibration learned
        when the index held other records is used with a warning to calibrate again."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._key, self._state = None, (None, [])
            return self._state
        key = (st.st_mtime_ns, st.st_size, st.st_ino, manifest.get("generation"), manifest.get("created"))
        if key == self._key:
            return self._state
        warnings: list[str] = []
        try:
            w: FusionWeights | None = FusionWeights.load(self.path)
        except FusionWeightsError as e:
            w = None
            warnings.append(f"the index's calibration is not used: {e}; run `attrib calibrate` on the index again")
        if w is not None:
            w.name = DISPLAY_PREFIX + CALIBRATION
            learned = w.provenance.get("index")
            warnings += staleness(learned if isinstance(learned, dict) else {}, manifest)
        self._key, self._state = key, (w, warnings)
        return self._state
