"""Per-record caption signals stored at index time (issue 9), kept apart from the other stores so that they can be
ported to another index format as they are:

* ``caption_clip``: the CLIP text embedding of each record's caption, L2-normalised, float16, one row per record
  (all zeros for an empty caption); written only when the writer has a text encoder.
* ``caption_dups``: for each record, how many records (itself included) have a caption with the same words
  (``engine.text.caption_key``), uint32 ``.npy``.

:class:`CaptionSignalsSink` writes both as records are added (embeddings stream to disk in batches; the 8-byte
caption keys are counted when the writer closes); :class:`CaptionSignals` memory-maps them for queries.
"""
from __future__ import annotations

from array import array
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._layout import path_of
from .text import caption_key

EMBEDDINGS, DUPLICATES = "caption_clip", "caption_dups"
BATCH = 256  # captions per encoder call
SCAN_CHUNK = 65536  # records per block when every caption embedding is scanned


class CaptionSignalsSink:
    """Streams caption embeddings to ``caption_clip.f16`` (when ``encode`` is given) and collects caption keys;
    :meth:`close` writes ``caption_dups.npy``. ``encode``: list of captions -> (n, dim) L2-normalised float32."""

    def __init__(self, folder: Path, encode: Callable[[list[str]], np.ndarray] | None, dim: int) -> None:
        self.folder, self.encode, self.dim = folder, encode, dim
        self._keys = array("Q")
        self._pending: list[str] = []
        self._f = open(folder / path_of(EMBEDDINGS), "wb") if encode is not None else None

    def add(self, caption: str | None) -> None:
        self._keys.append(caption_key(caption))
        if self._f is not None:
            self._pending.append(caption or "")
            if len(self._pending) >= BATCH:
                self._flush()

    def _flush(self) -> None:
        if not self._pending or self._f is None:
            return
        caps, self._pending = self._pending, []
        vecs = np.zeros((len(caps), self.dim), np.float32)
        some = [i for i, c in enumerate(caps) if c.strip()]
        if some:
            emb = np.asarray(self.encode([caps[i] for i in some]), np.float32)
            if emb.shape != (len(some), self.dim):
                raise ValueError(f"the caption encoder returned shape {emb.shape}, expected ({len(some)}, {self.dim})")
            vecs[some] = emb
        self._f.write(vecs.astype(np.float16).tobytes())

    def close(self) -> dict:
        """Write what is pending and the duplicate counts; returns the manifest's "caption_signals" entry."""
        self._flush()
        if self._f is not None:
            self._f.close()
        keys = np.frombuffer(self._keys, np.uint64) if len(self._keys) else np.zeros(0, np.uint64)
        counts = np.ones(len(keys), np.uint32)
        if len(keys):
            _, inverse, n = np.unique(keys, return_inverse=True, return_counts=True)
            counts = n[inverse].astype(np.uint32)
            counts[keys == 0] = 1  # a caption without words duplicates nothing
        np.save(self.folder / path_of(DUPLICATES), counts)
        return {"embeddings": self._f is not None, "dim": self.dim if self._f is not None else None,
                "duplicate_key": "same words, ignoring case, accents, punctuation, repeats and order"}

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()


class CaptionSignals:
    """The caption signals of an index folder, memory-mapped; each is None when the index lacks it (built before
    issue 9, or without a text encoder)."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        comps = manifest.get("components", {})
        n = int(manifest["counts"]["records"])
        self.vectors: np.ndarray | None = None
        self.dups: np.ndarray | None = None
        if EMBEDDINGS in comps and n:
            dim = int(manifest["dims"]["clip"])
            self.vectors = np.memmap(folder / path_of(EMBEDDINGS), dtype=np.float16, mode="r", shape=(n, dim))
        if DUPLICATES in comps:
            self.dups = np.load(folder / path_of(DUPLICATES), mmap_mode="r")

    def cosines(self, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
        """Cosine between ``vec`` (L2-normalised) and each row's caption embedding; NaN for empty captions."""
        assert self.vectors is not None  # callers check availability first
        emb = np.asarray(self.vectors[np.asarray(rows, np.int64)], np.float32)
        out = emb @ np.asarray(vec, np.float32)
        out[~emb.any(axis=1)] = np.nan
        return out.astype(np.float32)

    def top(self, vec: np.ndarray, n: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The ``n`` rows whose caption embedding is closest to ``vec`` by an exact scan of every record (or of
        ``rows``), best first. For rankings of this signal alone: the fused pool reads embeddings by row only."""
        assert self.vectors is not None
        v = np.asarray(vec, np.float32)
        cand = np.arange(len(self.vectors)) if rows is None else np.asarray(rows, np.int64)
        best_r, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for s in range(0, len(cand), SCAN_CHUNK):
            r = cand[s:s + SCAN_CHUNK]
            sc = np.asarray(self.vectors[r] if rows is not None else self.vectors[s:s + len(r)], np.float32) @ v
            keep = sc != 0  # empty captions (all-zero rows) are not ranked
            best_r, best_s = np.concatenate([best_r, r[keep]]), np.concatenate([best_s, sc[keep]])
            if len(best_r) > n:
                part = np.argpartition(-best_s, n)[:n]
                best_r, best_s = best_r[part], best_s[part]
        order = np.lexsort((best_r, -best_s))[:n]
        return best_r[order]

    def duplicates(self, rows: np.ndarray) -> np.ndarray:
        """How many *other* records share each row's caption words (0: a unique caption)."""
        assert self.dups is not None
        return np.asarray(self.dups[np.asarray(rows, np.int64)], np.float32) - 1.0
