"""The index's own fusion weights: ``INDEX/calibration.json``, written by self-calibration (``attrib calibrate``,
``engine.calibrate``) and preferred by every query that asks for ``"auto"`` weights.

The file is a fusion weights file (format ``attrib-fusion-weights`` v1, so ``--weights INDEX/calibration.json``
works too) whose provenance names the index it was learned on (creation time and counts). It is replaced
atomically, so an interrupted calibration leaves the previous weights in place. Reading and writing it lives
here only.
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
    """What identifies the index a calibration was learned on: its creation time and counts."""
    c = manifest["counts"]
    return {"created": manifest.get("created"), "records": int(c["records"]), "images": int(c["images"])}


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
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
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
            learned = (w.provenance.get("index") or {})
            now = index_identity(manifest)
            if learned and any(learned.get(k) != now[k] for k in now):
                warnings.append(
                    f"the index's calibration was learned when it held {learned.get('records')} records "
                    f"(created {learned.get('created')}); it now holds {now['records']} (created {now['created']}): "
                    "run `attrib calibrate` on the index again"
                )
        self._key, self._state = key, (w, warnings)
        return self._state
