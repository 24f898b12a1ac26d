"""The fused candidate pool: the union of every first-stage ranker's candidates, with every feature of every
registered ranker computed for every candidate, and each main ranker's own score."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from ._reader import IndexReader
from ._rows import distinct
from ._threads import single_threaded_blas
from .rankers import Candidates, QueryInput, Ranker, RowFilter, nan_array, ranking_order


@dataclass
class Pool:
    """One query's fused candidate pool: every feature for every candidate."""

    rows: np.ndarray  # int64 record rows, ascending
    feats: dict[str, np.ndarray]  # feature -> values (NaN = does not apply)
    ranker_scores: dict[str, np.ndarray]  # main ranker -> its own score of each candidate (NaN = not ranked)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


class CandidatePool:
    """Builds pools over one index with one set of ranker instances. Rankers whose work releases the GIL
    (``Ranker.background``: BM25) run on a helper thread while the vector searches and patch features run on
    the calling thread: on 2 cores this saves about 30% of a search."""

    def __init__(self, reader: IndexReader, rankers: dict[str, Ranker], worker: ThreadPoolExecutor) -> None:
        self.reader = reader
        self.rankers = rankers
        self.worker = worker

    def build(self, q: QueryInput, depth: int, exclude: RowFilter | None = None) -> Pool:
        """Each first-stage ranker contributes its best ``depth`` candidates. A ranker that reranks a deeper
        first stage (``first_stage_depth``, e.g. dino's patch rerank of its ``dino_rerank`` neighbours) keeps
        its best ``depth`` by its own score, exactly as it does alone. Rows of ``exclude`` never enter."""
        pending: list[Future] = []

        def later(fn, *args) -> Future:
            fut = self.worker.submit(fn, *args)
            pending.append(fut)
            return fut

        t0 = time.perf_counter()
        try:
            with single_threaded_blas():
                firsts = [r for r in self.rankers.values() if r.first_stage and r.available(q)]
                wanted = {r.name: r.first_stage_depth(depth) for r in firsts}
                side = {r.name: later(r.first_stage_rows, q, wanted[r.name], exclude)
                        for r in firsts if r.dense_query(q) is None}
                raw: dict[str, np.ndarray] = self._dense_first_stages(q, [r for r in firsts if r.name not in side],
                                                                      wanted, exclude, later)
                raw.update({n: f.result() for n, f in side.items()})
                union = distinct(np.concatenate(list(raw.values()))) if raw else np.zeros(0, np.int64)
                t1 = time.perf_counter()
                feats = self.features(q, union, later)
                scores = {n: self._score(r, q, feats, len(union)) for n, r in self.rankers.items()
                          if r.main or n in wanted}
                keep = self._kept(raw, union, scores, wanted, depth)
                if keep is not None:
                    union = union[keep]
                    feats = {k: v[keep] for k, v in feats.items()}
                    scores = {k: v[keep] for k, v in scores.items()}
        finally:
            # never leave work of this query queued ahead of the next one (after an error or Ctrl-C above)
            for f in pending:
                f.cancel()
            wait(pending)
        t2 = time.perf_counter()
        main = {n: s for n, s in scores.items() if self.rankers[n].main}
        return Pool(union, feats, main, {"candidates": (t1 - t0) * 1e3, "features": (t2 - t1) * 1e3})

    def _dense_first_stages(
        self, q: QueryInput, rankers: list[Ranker], wanted: dict[str, int], exclude: RowFilter | None,
        later=None,
    ) -> dict[str, np.ndarray]:
        """One batched faiss search per vector store for every ranker searching it (identical query vectors,
        e.g. clip's text fallback and clip_text, are searched once). With ``later`` (the helper thread), every
        store but the costliest is searched there: faiss releases the GIL, so on 2 cores the stores are
        searched side by side (the helper thread's text first stages are queued before them). A search the helper
        has not started by the time this thread is free is taken back."""
        by_store: dict[str, list[tuple[str, np.ndarray]]] = {}
        for r in rankers:
            store, vec = r.dense_query(q)
            by_store.setdefault(store, []).append((r.name, np.asarray(vec, np.float32)))
        plans = []
        for store, items in by_store.items():
            uniq: list[np.ndarray] = []
            which = []
            for _, v in items:
                j = next((i for i, u in enumerate(uniq) if np.array_equal(u, v)), None)
                if j is None:
                    uniq.append(v)
                    j = len(uniq) - 1
                which.append(j)
            n = max(wanted[name] for name, _ in items)
            plans.append((store, items, which, np.stack(uniq), n))
        rows = None if exclude is None else exclude.rows
        plans.sort(key=lambda p: len(p[3]) * p[4] * p[3].shape[1])  # the costliest last: on this thread
        found = [later(self.reader.search, store, vecs, n, rows) if later is not None and i < len(plans) - 1
                 else None for i, (store, _, _, vecs, n) in enumerate(plans)]
        out: dict[str, np.ndarray] = {}
        for (store, items, which, vecs, n), fut in zip(reversed(plans), reversed(found)):
            # a search the helper thread has not started yet (it is still busy with a slow BM25, say) is taken
            # back and done here, so searching side by side is never slower than one store after the other
            steal = fut is None or fut.cancel()
            result = self.reader.search(store, vecs, n, rows) if steal else fut.result()
            for (name, _), j in zip(items, which):
                out[name] = result[j][0][: wanted[name]]
        return out

    def features(self, q: QueryInput, rows: np.ndarray, later=None) -> dict[str, np.ndarray]:
        """Every registered feature for ``rows`` (NaN for rankers that cannot take part in this query)."""
        cands = Candidates(self.reader, rows)
        feats: dict[str, np.ndarray] = {}
        able = [r for r in self.rankers.values() if r.available(q)]
        for r in self.rankers.values():
            if r not in able:
                feats.update({f: nan_array(len(rows)) for f in r.feature_names()})
        # the helper thread's work is queued first, so that it runs while this thread computes the rest; what the
        # helper has not started by the time this thread is free is taken back, the last queued first
        background = [(r, later(r.featurize, q, cands)) for r in able if r.background and later is not None]
        for r in able:
            if not (r.background and later is not None):
                feats.update(_owned(r, r.featurize(q, cands)))
        for r, fut in reversed(background):
            if fut.cancel():
                feats.update(_owned(r, r.featurize(q, cands)))
        for r, fut in background:
            if not fut.cancelled():
                feats.update(_owned(r, fut.result()))
        return {f: feats[f] for r in self.rankers.values() for f in r.feature_names()}  # registry order

    @staticmethod
    def _score(r: Ranker, q: QueryInput, feats: dict[str, np.ndarray], n: int) -> np.ndarray:
        return r.score(feats) if r.available(q) else nan_array(n)

    @staticmethod
    def _kept(raw: dict[str, np.ndarray], union: np.ndarray, scores: dict[str, np.ndarray],
              wanted: dict[str, int], depth: int) -> np.ndarray | None:
        """Positions in ``union`` that stay in the pool after rerankers keep their best ``depth`` (None: all)."""
        rerankers = [n for n, w in wanted.items() if w > depth and len(raw[n]) > depth]
        if not rerankers:
            return None
        keep = np.zeros(len(union), bool)
        for n, rows in raw.items():
            pos = np.searchsorted(union, rows)
            if n in rerankers:
                s = scores[n][pos]
                pos = pos[ranking_order(rows, np.where(np.isfinite(s), s, -np.inf), depth)]
            keep[pos] = True
        return np.flatnonzero(keep)


def _owned(r: Ranker, feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f: feats[f] for f in r.feature_names()}
