"""Per-record caption signals stored at index time (issue 9), read across the segments of one generation:

* caption embeddings: the CLIP text embedding of each record's caption (segment component ``caption_clip``,
  coded by the codebooks: float16; with the pq codec, 8-bit product codes or per-record-scaled int8; all zeros
  for an empty caption),
  written when the writer has a text encoder (``attrib index`` always has one);
* caption keys: a 64-bit key of each caption's words (``engine.text.caption_key``, segment component
  ``caption_keys``). How many *live* records share a key is counted when first asked (one ``np.unique`` over the
  keys of the snapshot), so appends, deletions and compactions never leave stale counts behind.

A segment written without either signal (an index built before issue 9, or vectors added without captions
encoded) simply has none: its records get NaN cosines and the signals are not applicable where no segment has
them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ._rows import by_segment

SCAN_CHUNK = 65536  # records per block when every caption embedding is scanned


class CaptionSignals:
    """The caption signals of one reader's snapshot (see the module docstring)."""

    def __init__(self, reader) -> None:
        self.reader = reader  # the engine._reader.IndexReader that owns these signals (no import: it imports us)
        self.has_vectors = any(s.caption_codes is not None for s in reader.segments)
        self.has_dups = bool(reader.segments) and all(s.caption_keys is not None for s in reader.segments)
        self._counts: list[np.ndarray] | None = None

    def cosines(self, rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
        """Cosine between ``vec`` (L2-normalised) and each row's caption embedding; NaN for empty captions,
        rows without a stored embedding and rows not in the snapshot."""
        rows = np.asarray(rows, np.int64)
        out = np.full(len(rows), np.nan, np.float32)
        seg, local = self.reader._locate(rows)
        v = np.asarray(vec, np.float32)
        for s, sel in by_segment(seg):
            segment = self.reader.segments[s]
            if segment.caption_codes is None:
                continue
            emb = segment.caption_vectors(local[sel])
            sc = emb @ v
            sc[~emb.any(axis=1)] = np.nan
            out[sel] = sc
        return out

    def top(self, vec: np.ndarray, n: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The ``n`` live rows whose caption embedding is closest to ``vec`` by an exact scan of every record (or
        of ``rows``), best first (ties: lower row). For rankings of this signal alone: the fused pool reads
        embeddings by row only."""
        v = np.asarray(vec, np.float32)
        if rows is not None:
            cand = np.asarray(rows, np.int64)
            sc = self.cosines(cand, v)
            ok = np.isfinite(sc) & (sc != 0)
            return _best(cand[ok], sc[ok], n)
        best_r, best_s = np.zeros(0, np.int64), np.zeros(0, np.float32)
        for segment in self.reader.segments:
            if segment.caption_codes is None:
                continue
            for a in range(0, segment.n_records, SCAN_CHUNK):
                local = np.arange(a, min(a + SCAN_CHUNK, segment.n_records))
                r = np.asarray(segment.rows[local])
                emb = segment.caption_vectors(local)
                sc = emb @ v
                keep = self.reader.live.keep(r) & emb.any(axis=1)  # empty captions are not ranked
                best_r, best_s = np.concatenate([best_r, r[keep]]), np.concatenate([best_s, sc[keep]])
                if len(best_r) > n:
                    part = np.argpartition(-best_s, n)[:n]
                    best_r, best_s = best_r[part], best_s[part]
        return _best(best_r, best_s, n)

    def _segment_counts(self) -> list[np.ndarray]:
        """For each segment, per record: how many live records (itself included) share its caption key."""
        if self._counts is None:
            segs = self.reader.segments
            keys = [np.asarray(s.caption_keys) for s in segs]
            live = [self.reader.live.keep(np.asarray(s.rows)) for s in segs]
            flat = np.concatenate([k[m] for k, m in zip(keys, live)]) if keys else np.zeros(0, np.uint64)
            uniq, counts = np.unique(flat, return_counts=True)
            out = []
            for k in keys:
                c = np.ones(len(k), np.uint32)  # a deleted record's own count does not matter (never asked)
                if len(uniq):
                    pos = np.minimum(np.searchsorted(uniq, k), len(uniq) - 1)
                    hit = uniq[pos] == k
                    c[hit] = counts[pos[hit]]
                c[k == 0] = 1  # a caption without words duplicates nothing
                out.append(c)
            self._counts = out
        return self._counts

    def duplicates(self, rows: np.ndarray) -> np.ndarray:
        """How many *other* live records share each row's caption words (0: a unique caption; NaN: a row not in
        the snapshot)."""
        rows = np.asarray(rows, np.int64)
        out = np.full(len(rows), np.nan, np.float32)
        counts = self._segment_counts()
        seg, local = self.reader._locate(rows)
        for s, sel in by_segment(seg):
            out[sel] = counts[s][local[sel]].astype(np.float32) - 1.0
        return out


def _best(rows: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    order = np.lexsort((rows, -scores))[:n]
    return rows[order]
