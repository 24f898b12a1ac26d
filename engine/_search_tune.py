"""Search settings measured on the index itself (``INDEX/search.json``): for each dense first stage with IVF
lists, how many lists a search probes (``nprobe``) and how many product-quantized candidates it re-scores with
the finer codes (``refine``, a multiple of k). They are chosen as the setting with the least work (bytes read)
whose recall@100 reaches a target (default 0.95) against an exhaustive scan of the same stored vectors, with
queries made from the index's own records (a sample of its images, each query's own record left out of both
rankings). When no setting reaches it, the most exact one tried is used and the outputs say so.

Which setting suffices depends on how the vectors are spread, which no formula knows: a build measures it when
it finishes and ``attrib compact`` again after it rewrites the lists. The file names the codebook generation it
was measured on; a reader ignores it for other codebooks (``attrib compact --retrain``). ``--nprobe`` overrides
it; ``attrib info`` shows it with the recall measured."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ._codebooks import IVF, PQ
from ._reader import SEARCH_FORMAT, IndexReader, search_path
from .files import write_text_atomic

TARGET_RECALL = 0.95
TUNE_QUERIES = 100  # own records queried (recall@100 averages 100 neighbours each: its standard error is ~0.005)
TUNE_K = 100
REFINES = (4, 8, 16, 32)  # refine factors tried, cheapest first (32: 4-bit codes on spread-out data)
RANDOM_READ_COST = 4  # a byte read at a random place costs this many read in sequence (the cost model)
SCAN_BLOCK = 65_536  # stored vectors decoded per block of the exhaustive scan
TIE_TOLERANCE = 1e-5  # scores this close to the k-th best count as tied with it (float rounding of two products)


def _ladder(nlist: int, start: int) -> list[int]:
    out, p = [], max(1, min(start, nlist))
    while p < nlist:
        out.append(p)
        p *= 2
    return out + [nlist]


def _exact_kth(reader, store: str, q: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's k-th best score over every live stored (refine) vector, by an exhaustive scan, own row
    excluded (-inf when fewer than k rows)."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_r = np.full((len(q), k), -1, np.int64)
    for seg in reader.segments:
        for a in range(0, seg.n_images, SCAN_BLOCK):
            local = np.arange(a, min(a + SCAN_BLOCK, seg.n_images))
            rows = np.asarray(seg.image_rows[local], np.int64)
            live = reader.live.keep(rows)
            if not live.any():
                continue
            v = seg.vectors(store, local[live])
            rows = rows[live]
            s = q @ v.T
            s[rows[None, :] == self_rows[:, None]] = -np.inf
            both_s = np.concatenate([best_s, s], axis=1)
            both_r = np.concatenate([best_r, np.broadcast_to(rows, s.shape)], axis=1)
            top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
            best_s, best_r = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_r, top, 1)
    return best_s.min(axis=1)


def _work(spec, n_images: int, nprobe: int, refine: int, k: int) -> int:
    """The cost model that orders settings: bytes of the probed lists' codes (lists of average length, read in
    sequence) plus the finer codes of the re-scored candidates, each read at a random place (a page of its own
    when the index is not in the page cache), counted ``RANDOM_READ_COST`` times."""
    code = spec.code_bytes
    rescored = k * refine * spec.dim * RANDOM_READ_COST if spec.codec == PQ else 0
    return int(nprobe * n_images / max(spec.nlist, 1) * code + rescored)


def _recall(reader, store: str, q: np.ndarray, found: list[tuple[np.ndarray, np.ndarray]], kth: np.ndarray,
            self_rows: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top k that the search found, counted so that ties do not matter: a found
    row counts when its exact score reaches the k-th best exact score (duplicates of one image score alike, and
    any k of them are a right answer)."""
    got = []
    for i, ((rows, _), own) in enumerate(zip(found, self_rows)):
        mine = np.asarray([r for r in rows.tolist() if r != own][:k], np.int64)
        if len(mine) == 0:
            got.append(0.0)
            continue
        _, s = reader.scores(store, mine, q[i])  # the stored codes the exhaustive scan scored
        hits = int(np.count_nonzero(s >= kth[i] - TIE_TOLERANCE))
        got.append(min(hits, k) / k)
    return float(np.mean(got)) if got else 1.0


def measure_after_write(index_dir: Path) -> dict | None:
    """:func:`tune_search` after a build or compaction, summarised for its output: the chosen setting and recall
    per store, or why nothing was measured. A failure here never fails the command (the defaults then apply)."""
    try:
        out = tune_search(index_dir)
    except Exception as e:  # noqa: BLE001 - the index is complete; only the measurement is missing
        return {"error": f"{e.__class__.__name__}: {e}"}
    if out is None:
        return None
    return {"seconds": out["seconds"], "target_recall_at_100": out["target_recall_at_100"],
            "stores": {n: {k: s[k] for k in ("nprobe", "refine", "nlist", "recall_at_100", "reached_target")}
                       for n, s in out["stores"].items()}}


def tune_search(index_dir: Path, target: float = TARGET_RECALL, n_queries: int = TUNE_QUERIES, k: int = TUNE_K,
                seed: int = 0) -> dict | None:
    """Measure and write ``search.json`` for the index's IVF stores (None when it has none: flat stores are
    exact). Deterministic for a seed; reads the index only (the file is written atomically)."""
    from ._threads import single_threaded_blas

    t0 = time.perf_counter()
    reader = IndexReader(index_dir, hash_files=False)  # codes read here are checked against their checksums
    try:
        stores = {n: s for n, s in reader.codebooks.stores.items() if s.ann == IVF}
        if not stores or reader.n_images <= k:
            return None
        image_rows = np.concatenate([np.asarray(s.image_rows, np.int64) for s in reader.segments])
        image_rows = image_rows[reader.live.keep(image_rows)]
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(image_rows), min(n_queries, len(image_rows)), replace=False))
        own = image_rows[pick]
        reader.warm()  # fast-scan stores are packed now, not inside the first timed search
        out = {"format": SEARCH_FORMAT, "codebooks": int(reader.manifest["codebooks"]["generation"]),
               "target_recall_at_100": target, "queries": int(len(own)), "k": k, "stores": {}}
        for name, spec in stores.items():
            _, q = reader.vectors(name, own)
            with single_threaded_blas():
                kth = _exact_kth(reader, name, q, own, k)
            tried = []
            # each re-scoring depth (pq codes only), from the fewest lists up until the target is reached
            for refine in (REFINES if spec.codec == PQ else REFINES[:1]):
                for nprobe in _ladder(spec.nlist, spec.nprobe):
                    reader.set_search(name, nprobe, refine)
                    with single_threaded_blas():
                        t = time.perf_counter()
                        found = reader.search(name, q, k + 1)
                        ms = (time.perf_counter() - t) * 1e3 / len(q)
                    rec = _recall(reader, name, q, found, kth, own, k)
                    tried.append({"nprobe": nprobe, "refine": refine, "recall_at_100": round(rec, 4),
                                  "ms_per_query": round(ms, 3),
                                  "work": _work(spec, reader.n_images, nprobe, refine, k)})
                    if tried[-1]["recall_at_100"] >= target:
                        break  # more lists at this depth only cost more
            good = [t for t in tried if t["recall_at_100"] >= target]
            # the least work that reaches the target (by the cost model: measured times are too noisy to make a
            # build deterministic); else the most exact setting tried
            chosen = (min(good, key=lambda t: (t["work"], t["nprobe"], t["refine"])) if good
                      else max(tried, key=lambda t: (t["recall_at_100"], -t["work"])))
            out["stores"][name] = {**chosen, "nlist": spec.nlist, "default_nprobe": spec.nprobe,
                                   "reached_target": chosen["recall_at_100"] >= target, "tried": tried}
        out["seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        reader.close()
    write_text_atomic(search_path(index_dir), json.dumps(out, indent=2) + "\n", fsync=True)
    return out
