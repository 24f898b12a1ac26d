"""Training-set scale: build, search latency, recall, bytes and memory at 100k, 1M and 10M records.

Usage: python benchmarks/bench_scale.py [--sizes 100000,1000000,10000000] [--queries 100] [--work DIR]
       python benchmarks/bench_scale.py --measure DIR/idx-10000000   (an index kept with --work, measured again)
       python benchmarks/bench_scale.py --reopen DIR/idx-10000000    (a served index moving on, on a linked copy)

Vectors are written through the library's writer (``IndexWriter.add_projected``: no image decoding) on clustered
synthetic embeddings: a mixture of 2,000 anisotropic Gaussian clusters (each cluster stretched along its own
random directions), 512-d CLIP-like and 768-d DINO-like vectors, plus 8x8 patch cells of 64 dims that share their
record's cluster, generated LAION-like captions for BM25, and 512-d CLIP-text-like caption embeddings drawn from a
mixture of their own (text embeddings lie apart from image embeddings in CLIP space) in the record's cluster.
Ground truth is exact brute force over float32.

Two data models (``--data``): ``cone`` (default) puts the clusters in a cone around a common direction, as CLIP
embeddings are (random pairs at cosine ~0.4, near neighbours at ~0.8); ``isotropic`` spreads each cluster so
widely that the 100th neighbour of a query is at cosine ~0.13 against ~0 for a random record: nearly no structure
at the scale of 100 neighbours, the worst case for any inverted-list index. The neighbour profile of the data
(mean cosine of the 1st, 10th and 100th neighbour, and the median) is measured and saved with the results.
Queries are fresh draws from the same mixture (not records of the index), as an attribution query is an image
near, not in, the training set.

Per size it reports ``records``, ``build_seconds``, ``search_ms_p50/p95`` (one query at a time, everything a query
does except the encoders: ``Index.search`` on an encoded query - pool, every feature, fusion, metadata),
``recall_at_100`` of each dense first stage against exact, ``patch_top100_overlap`` (the top 100 of a candidate
set ranked by the patch score from stored codes, against the same ranking from float16 cells),
``caption_top100_overlap`` and ``caption_cosine_error`` (the same candidate sets ranked by the cosine between the
prompt's text embedding and the stored caption embeddings, against float32; the mean absolute error of those
cosines), bytes per record on
disk and resident in RAM (measured: the growth of the process's resident set while opening the index and
answering the queries, per record), the peak RSS, and the time the first search of an opened index takes to pack
the fast-scan lists in memory (``first_search_pack_seconds``, not in the latencies). After its compactions, a
served index is reopened as ``attrib serve`` does after an append and a deletion of 1,000 records each
(``reopen_after_append_seconds``, ``reopen_after_delete_seconds``: the reopen and what the first search packs, beside
``reopen_baseline_pack_seconds``, the packing of the whole index). The 10M size measures the dense first stage
alone (no patches, no captions). Results go to benchmarks/results/bench_scale.json.
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import pct, save, table

CLUSTERS = 2000
DC, DG, CELLS, DP = 512, 768, 64, 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_parts() -> dict[str, int]:
    """Resident bytes by kind: ``anon`` (memory the process allocated) and ``file`` (pages of mapped files, here
    the index's memory-mapped components that queries touched: page cache the kernel can drop and re-read)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, val = line.split(":")
                out[key[3:].lower()] = int(val.split()[0]) * 1024
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM: reset by exec, unlike getrusage's ru_maxrss, which a child
    started with subprocess inherits from the parent's peak at fork)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


DATA = "cone"  # the data model (--data): "cone" or "isotropic" (see the module docstring)


class Clusters:
    """Anisotropic Gaussian clusters: centre + noise stretched along a few cluster-specific directions."""

    def __init__(self, dim: int, seed: int, kind: str | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.kind = dim, kind or DATA
        self.centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        if self.kind == "isotropic":
            self.axes = rng.standard_normal((CLUSTERS, 4, dim)).astype(np.float32) / np.sqrt(dim)
            self.spread = rng.uniform(0.2, 0.5, CLUSTERS).astype(np.float32)
        else:
            self.mean = rng.standard_normal(dim).astype(np.float32)
            self.mean /= np.linalg.norm(self.mean)
            self.axes = rng.standard_normal((CLUSTERS, 8, dim)).astype(np.float32)
            self.axes /= np.linalg.norm(self.axes, axis=2, keepdims=True)
            self.spread = rng.uniform(0.25, 0.75, CLUSTERS).astype(np.float32)

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Unit vectors drawn from the clusters ``labels``. The random draws are made for all rows at once (the
        values do not depend on any block size); the vectors are assembled in blocks, because gathering every
        row's cluster axes at once takes 8 x n x dim floats (5 GB for the patch cells of 40,000 records)."""
        n = len(labels)
        if self.kind == "isotropic":
            iso = rng.standard_normal((n, self.dim), dtype=np.float32) * (0.15 / np.sqrt(self.dim))
            coef = rng.standard_normal((n, 4), dtype=np.float32) * 1.5
        else:  # common direction + cluster centre + noise mostly along the cluster's own 8 directions
            coef = rng.standard_normal((n, 8), dtype=np.float32) * 0.4
            iso = rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        out = np.empty((n, self.dim), np.float32)
        for a in range(0, n, 65536):
            b = slice(a, a + 65536)
            lab = labels[b]
            stretch = np.einsum("nk,nkd->nd", coef[b], self.axes[lab])
            if self.kind == "isotropic":
                x = self.centres[lab] + self.spread[lab, None] * (stretch + iso[b] * np.sqrt(self.dim))
            else:
                x = self.mean + self.centres[lab] + self.spread[lab, None] * (stretch + iso[b])
            out[b] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def neighbour_profile(x: np.ndarray, q: np.ndarray) -> dict:
    """Mean cosine of each query's 1st, 10th and 100th nearest record, and the median cosine of all pairs."""
    s = np.sort(q @ x.T, axis=1)
    return {"top1": round(float(s[:, -1].mean()), 3), "top10": round(float(s[:, -10].mean()), 3),
            "top100": round(float(s[:, -100].mean()), 3), "median": round(float(np.median(s)), 3)}


def fresh_queries(n_queries: int) -> dict[str, np.ndarray]:
    """Queries drawn from the same mixture as the records, with their own randomness (none is in the index)."""
    rng = np.random.default_rng(777)
    labels = rng.integers(0, CLUSTERS, n_queries)
    out = {"clip": Clusters(DC, 1).sample(labels, rng), "dino": Clusters(DG, 2).sample(labels, rng)}
    cells = (labels[:, None] * 7 + rng.integers(0, 12, (n_queries, CELLS))) % CLUSTERS
    out["cells"] = Clusters(DP, 3).sample(cells.reshape(-1), rng).reshape(n_queries, CELLS, DP)
    out["text"] = Clusters(DC, 4).sample(labels, rng)  # the prompt's CLIP text embedding
    return out


def generate(n: int, with_patches: bool, with_captions: bool, seed: int = 0):
    """Chunks of (ids, captions, clip, dino, cells, labels, caption embeddings or None), deterministic for a
    seed (the caption embeddings come from a generator of their own: the other values do not depend on them)."""
    from engine.scenes import caption_of, random_scene

    clip_c, dino_c, cell_c = Clusters(DC, seed + 1), Clusters(DG, seed + 2), Clusters(DP, seed + 3)
    text_c = Clusters(DC, seed + 4) if with_captions else None
    chunk = 50_000
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        rng = np.random.default_rng([seed, s])
        labels = rng.integers(0, CLUSTERS, m)
        clip = clip_c.sample(labels, rng)
        dino = dino_c.sample(labels, rng)
        if with_patches:
            cl = (labels[:, None] * 7 + rng.integers(0, 12, (m, CELLS))) % CLUSTERS
            cells = cell_c.sample(cl.reshape(-1), rng).reshape(m, CELLS, DP)
        else:
            cells = np.zeros((m, 1, 8), np.float32)
        caps = ([caption_of(random_scene(np.random.default_rng([3, s + i])), np.random.default_rng([4, s + i]))
                 for i in range(m)] if with_captions else [""] * m)
        text = text_c.sample(labels, np.random.default_rng([seed, s, 4])) if with_captions else None
        yield [f"r{s + i}" for i in range(m)], caps, clip, dino, cells, labels, text


def synthetic_identity() -> dict:
    """The model identity written into synthetic indexes (vectors come from the generator, not from models)."""
    from engine import model_fingerprint

    identity = {"profile": "offline", "pretrained": False,
                "clip": {"arch": "ViT-B-32", "weights_tag": None, "weights_sha256": "synthetic", "dim": DC,
                         "input": {}},
                "dino": {"arch": "vit_small_patch14_dinov2", "weights_tag": None, "weights_sha256": "synthetic",
                         "dim": DG // 2, "patch_grid": [16, 16], "input": {}, "kwargs": {}}}
    identity["fingerprint"] = model_fingerprint(identity)
    return identity


def writer_settings(chunk: int, full: bool):
    """The writer settings of this script's indexes: 8x8 patch cells of DP dims with the full pipeline, else one
    cell of 8 (the dense first stage alone)."""
    import engine

    return engine.IndexSettings(chunk=chunk, codec="auto", ann="auto", patch_grid=8 if full else 1,
                                patch_dims=DP if full else 8)


def build(out: Path, n: int, identity: dict, full: bool) -> tuple[dict[str, np.ndarray], float]:
    import engine

    w = engine.IndexWriter(out, identity, writer_settings(min(n, 100_000), full), expected_images=n)
    sample = {"clip": [], "dino": [], "cells": []}
    for ids, caps, clip, dino, cells, _, text in generate(n, full, full):
        w.add_projected(ids, [None] * len(ids), caps, [{}] * len(ids), clip, dino, cells, caption_clip=text)
        if sum(len(x) for x in sample["clip"]) < 2000:
            sample["clip"].append(clip[:200].copy())  # copies: a view would keep the whole chunk alive
            sample["dino"].append(dino[:200].copy())
            sample["cells"].append(cells[:200].copy())
    w.finalize({"path": "synthetic", "kind": "bench_scale"})
    if len(engine.index_info(out)["manifest"]["segments"]) > 1:
        engine.compact(out, progress=False, measure_search=False)  # served from one segment, as a build is
    t = time.perf_counter()
    engine.tune_search(out)  # as a finished build does: nprobe and refine measured for recall@100 >= 0.95
    return {k: np.concatenate(v) for k, v in sample.items()}, round(time.perf_counter() - t, 1)


def exact_top(n: int, queries: dict[str, np.ndarray], k: int, full: bool) -> dict[str, np.ndarray]:
    """Brute-force top-k rows of each store for the queries, streaming the generated vectors."""
    best = {name: (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
            for name, q in queries.items()}
    start = 0
    for _, _, clip, dino, _, _, _ in generate(n, False, False):
        for name, x in (("clip", clip), ("dino", dino)):
            s = queries[name] @ x.T
            scores, rows = best[name]
            allv = np.concatenate([scores, s], axis=1)
            allr = np.concatenate([rows, np.broadcast_to(np.arange(start, start + len(x)), s.shape)], axis=1)
            top = np.argpartition(-allv, k - 1, axis=1)[:, :k]
            best[name] = (np.take_along_axis(allv, top, 1), np.take_along_axis(allr, top, 1))
        start += len(clip)
    return {name: rows for name, (_, rows) in best.items()}


def patch_overlap(reader, q_cells: np.ndarray, rows: np.ndarray, cells_f16: np.ndarray, grid: int) -> float:
    """Top-100 of ``rows`` by the chamfer patch score from stored codes vs from float16 cells."""
    from engine import patch_scores

    _, stored = reader.patch_cells(rows)
    a, _ = patch_scores(q_cells, stored, grid)
    b, _ = patch_scores(q_cells, cells_f16.astype(np.float32), grid)
    ta, tb = set(rows[np.argsort(-a)[:100]].tolist()), set(rows[np.argsort(-b)[:100]].tolist())
    return len(ta & tb) / 100


def caption_fidelity(reader, q_text: np.ndarray, rows: np.ndarray, text_f32: np.ndarray) -> tuple[float, float]:
    """Cosines of the prompt's text embedding with the stored caption embeddings of ``rows`` against float32: the
    mean absolute error, and the overlap of the two top-100 rankings of ``rows``."""
    a = reader.captions.cosines(rows, q_text)
    b = text_f32 @ q_text
    ta, tb = set(rows[np.argsort(-a)[:100]].tolist()), set(rows[np.argsort(-b)[:100]].tolist())
    return float(np.abs(a - b).mean()), len(ta & tb) / 100


def run_size(work: Path, n: int, n_queries: int, identity: dict, full: bool) -> dict:
    """Build in this process; measure the queries in a fresh one (its memory is the query's alone)."""
    import subprocess
    import sys

    import engine

    out = work / f"idx-{n}"
    t0 = time.perf_counter()
    sample, tune_seconds = build(out, n, identity, full)
    build_s = time.perf_counter() - t0
    build_peak = peak_rss_bytes()
    pick = np.random.default_rng(123).choice(len(sample["clip"]), n_queries, replace=False)  # their prompts
    fresh = fresh_queries(n_queries)
    qs = {"clip": fresh["clip"], "dino": fresh["dino"]}
    q_cells = fresh["cells"]
    truth = exact_top(n, qs, 100, full)
    first = next(generate(min(n, 50_000), False, False))
    profile = {"clip": neighbour_profile(first[2], qs["clip"]), "dino": neighbour_profile(first[3], qs["dino"]),
               "over_records": min(n, 50_000)}
    np.savez(work / "queries.npz", clip=qs["clip"], dino=qs["dino"], cells=q_cells, text=fresh["text"], pick=pick,
             truth_clip=truth["clip"], truth_dino=truth["dino"])
    del sample, truth, first
    gc.collect()
    proc = subprocess.run([sys.executable, __file__, "--query-phase", str(out), "--work", str(work),
                           "--records", str(n), "--data", DATA] + (["--full"] if full else []),
                          capture_output=True, text=True, timeout=7200)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(records=n, build_seconds=round(build_s, 1), build_peak_rss_bytes=build_peak, full_pipeline=full,
                  data=DATA, neighbour_profile=profile, search_tune_seconds=tune_seconds)
    # `attrib compact` after deleting 1,000 records: the merge, the physical removal and the search measurement
    t = time.perf_counter()
    engine.delete_records(out, ids=[f"r{i}" for i in range(0, min(n, 1000))])
    s = engine.compact(out, progress=False)
    result["compact_seconds"] = round(time.perf_counter() - t, 1)
    result["compact_search_measure_seconds"] = (s.search or {}).get("seconds")
    # `attrib compact --retrain`: new first-stage codebooks fitted on a sample, every record written again (the
    # finest codes copied), without the search measurement that follows it
    t = time.perf_counter()
    engine.compact(out, retrain=True, progress=False, measure_search=False)
    result["compact_retrain_seconds"] = round(time.perf_counter() - t, 1)
    result.update(reopen_seconds(out, n, identity, full))
    shutil.rmtree(out, ignore_errors=True)
    return result


def reopen_seconds(out: Path, n: int, identity: dict, full: bool) -> dict:
    """A running service moves to the newest generation (``Index.reopen_if_changed``, then what its first search
    packs): after appending 1,000 records, then after deleting 1,000, beside the packing of the whole index when
    it was opened (the baseline)."""
    import engine

    served = engine.open_index(out)
    result = {"reopen_baseline_pack_seconds": pack_seconds(served.reader)}
    ids, caps, clip, dino, cells, _, text = next(generate(1000, full, full, seed=7))
    w = engine.IndexWriter(out, identity, writer_settings(1000, full))
    w.add_projected([f"a{i}" for i in range(len(ids))], [None] * len(ids), caps, [{}] * len(ids), clip, dino, cells,
                    caption_clip=text)
    w.finalize({"path": "synthetic", "kind": "bench_scale append"})

    def move_on(step: str) -> None:
        nonlocal served
        t = time.perf_counter()
        fresh = served.reopen_if_changed()
        fresh.reader.warm()
        result[f"reopen_after_{step}_seconds"] = round(time.perf_counter() - t, 2)
        assert fresh is not served
        served.close()
        served = fresh

    move_on("append")
    engine.delete_records(out, ids=[f"r{i}" for i in range(min(n, 1000), min(n, 2000))])
    move_on("delete")
    served.close()
    return result


def linked_copy(src: Path, dst: Path) -> None:
    """Into folder ``dst``: a copy of index ``src`` whose segments and codebooks (immutable, nearly all of its
    bytes) are hard links, the rest copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in ("segments", "codebooks"):
            shutil.copytree(item, dst / item.name, copy_function=os.link)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
        elif not item.name.startswith("."):
            shutil.copy2(item, dst / item.name)


def reopen_copy(src: Path) -> dict:
    """``reopen_seconds`` on a copy of an index this script built, beside it: segments and codebooks (immutable,
    nearly all of its bytes) as hard links, the rest copied. The copy is removed afterwards."""
    import json

    m = json.loads((src / "manifest.json").read_text())
    copy = Path(tempfile.mkdtemp(prefix=".reopen-", dir=src.parent))
    try:
        linked_copy(src, copy)
        n = int(m["counts"]["records"])
        return {"records": n, "segments": len(m["segments"]),
                **reopen_seconds(copy, n, synthetic_identity(), full=int(m["dims"]["patch_grid"]) > 1)}
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def pack_seconds(reader) -> float:
    """What the first search of an opened index does first (fast-scan stores are packed in memory), timed on its
    own so that it stays out of the latencies."""
    t = time.perf_counter()
    reader.warm()
    return round(time.perf_counter() - t, 2)


def dense_stage(reader, qs: dict[str, np.ndarray], n_queries: int) -> dict:
    """The dense first stage alone, one query at a time (clip and dino top 100): the packing time, p50 and p95."""
    out = {"first_search_pack_seconds": pack_seconds(reader)}
    times = []
    for i in range(n_queries):
        t = time.perf_counter()
        reader.search("clip", qs["clip"][i], 100)
        reader.search("dino", qs["dino"][i], 100)
        times.append((time.perf_counter() - t) * 1e3)
    return {**out, "ann_ms_p50": round(pct(times, 50), 2), "ann_ms_p95": round(pct(times, 95), 2)}


def encoded_queries(idx, clip, dino, cells, text, pick) -> list:
    """Query inputs of encoded queries (no encoder runs): query i's vectors, and the prompt of generated scene
    ``pick[i]``, analysed into terms by the index."""
    from engine.rankers import QueryInput
    from engine.scenes import caption_of, random_scene

    out = []
    for i, p in enumerate(pick):
        prompt = caption_of(random_scene(np.random.default_rng([3, int(p)])), np.random.default_rng([4, int(p)]))
        out.append(idx.with_terms(QueryInput(f"q{i}", None, prompt, {
            "clip_image": clip[i], "clip_text": text[i], "dino_global": dino[i], "dino_cells": cells[i]})))
    return out


def timed_searches(idx, encoded: list) -> tuple[list[float], dict[str, list[float]]]:
    """``Index.search`` of each query once, one at a time (RRF fusion, top 10), after one untimed warm-up search:
    the milliseconds of each, and of each stage."""
    fus = idx.resolve_fusion("rrf")
    idx.search(encoded[0], k=10, fusion=fus)
    times, parts = [], {k: [] for k in ("candidates", "features", "fusion", "metadata")}
    for q in encoded:
        t = time.perf_counter()
        res = idx.search(q, k=10, fusion=fus)
        times.append((time.perf_counter() - t) * 1e3)
        for k in parts:
            parts[k].append(res.timings_ms.get(k, 0.0))
    return times, parts


def query_phase(out: Path, work: Path, n: int, full: bool) -> dict:
    """Open the index in this fresh process, run the queries, measure latency, recall and memory."""
    import engine

    z = np.load(work / "queries.npz")
    qs = {"clip": z["clip"], "dino": z["dino"]}
    q_cells, pick = z["cells"], z["pick"]
    truth = {"clip": z["truth_clip"], "dino": z["truth_dino"]}
    n_queries = len(pick)
    rss0, parts0 = rss_bytes(), rss_parts()
    result: dict = {}
    if full:
        idx = engine.open_index(out)
        reader = idx.reader
        result["first_search_pack_seconds"] = pack_seconds(reader)
        times, parts = timed_searches(idx, encoded_queries(idx, qs["clip"], qs["dino"], q_cells, z["text"], pick))
        result.update(search_ms_p50=round(pct(times, 50), 2), search_ms_p95=round(pct(times, 95), 2),
                      stage_ms_p50={k: round(pct(v, 50), 2) for k, v in parts.items()},
                      pool_depth=idx.settings.depth)
    else:
        reader = engine.open_index(out).reader  # models are not loaded: the dense stage alone
        result.update(dense_stage(reader, qs, n_queries))
    recalls = {}
    for name in ("clip", "dino"):
        found = reader.search(name, qs[name], 100)
        recalls[name] = round(float(np.mean([len(set(f[0].tolist()) & set(t.tolist())) / 100
                                             for f, t in zip(found, truth[name])])), 4)
    result["recall_at_100"] = recalls
    parts1 = rss_parts()
    result["ram_bytes_per_record"] = round((parts1.get("anon", 0) - parts0.get("anon", 0)) / n, 1)
    result["ram_mapped_bytes_per_record"] = round((parts1.get("file", 0) - parts0.get("file", 0)) / n, 1)
    result["rss_growth_bytes_per_record"] = round((rss_bytes() - rss0) / n, 1)
    result["search_settings"] = {name: {"nprobe": reader.nprobe[name], "refine": reader.refine[name],
                                        "measured": name in reader.search_settings} for name in ("clip", "dino")}
    result["peak_rss_bytes"] = peak_rss_bytes()
    if full:  # stored codes against float16 cells and float32 caption embeddings, on rows of the first chunk
        _, _, _, _, cells, _, text = next(generate(min(n, 50_000), True, True))
        overlaps, cap_overlaps, cap_errors = [], [], []
        for i in range(min(20, n_queries)):
            rows = np.unique(np.concatenate([truth["clip"][i], truth["dino"][i],
                                             np.random.default_rng(i).integers(0, len(cells), 300)]))
            rows = rows[rows < len(cells)]
            overlaps.append(patch_overlap(reader, q_cells[i], rows, cells[rows].astype(np.float16), 8))
            err, overlap = caption_fidelity(reader, z["text"][i], rows, text[rows])
            cap_errors.append(err)
            cap_overlaps.append(overlap)
        result["patch_top100_overlap"] = round(float(np.mean(overlaps)), 4)
        result["caption_top100_overlap"] = round(float(np.mean(cap_overlaps)), 4)
        result["caption_cosine_error"] = round(float(np.mean(cap_errors)), 5)
        result["caption_codec"] = reader.codebooks.caption_codec
    info = engine.index_info(out)
    result["disk_bytes_per_record"] = info["disk_bytes_per_record"]
    result["codebooks"] = info["codebooks"]
    return result


def measure_index(path: Path, n_queries: int) -> dict:
    """The dense first stage of an existing (ANN-only) bench_scale index, without regenerating its data: in this
    process, the time the first search takes to pack the lists, then ``n_queries`` fresh queries one at a time
    (clip and dino top 100, as the ANN-only size does), recall@100 against an exhaustive scan of the *stored*
    (8-bit re-scoring) vectors, allocated and mapped memory per record, and the peak RSS while searching."""
    from engine import open_index

    q = fresh_queries(n_queries)  # before the baseline: the generator's memory is not the index's
    p0 = rss_parts()
    reader = open_index(path).reader
    out: dict = {"records": reader.n_records, "segments": len(reader.segments), **dense_stage(reader, q, n_queries)}
    p1 = rss_parts()
    out.update(ram_bytes_per_record=round((p1.get("anon", 0) - p0.get("anon", 0)) / reader.n_records, 1),
               ram_mapped_bytes_per_record=round((p1.get("file", 0) - p0.get("file", 0)) / reader.n_records, 1),
               peak_rss_bytes_searching=peak_rss_bytes(),
               search_settings={n: {"nprobe": reader.nprobe[n], "refine": reader.refine[n]} for n in ("clip", "dino")})
    recall = {}
    for name in ("clip", "dino"):  # exhaustive scan of the stored vectors, a block of records at a time
        best_s = np.full((n_queries, 100), -np.inf, np.float32)
        best_r = np.full((n_queries, 100), -1, np.int64)
        for seg in reader.segments:
            for a in range(0, seg.n_images, 65_536):
                local = np.arange(a, min(a + 65_536, seg.n_images))
                rows = np.asarray(seg.image_rows[local], np.int64)
                live = reader.live.keep(rows)
                s = q[name] @ seg.vectors(name, local[live]).T
                both_s = np.concatenate([best_s, s], axis=1)
                both_r = np.concatenate([best_r, np.broadcast_to(rows[live], s.shape)], axis=1)
                top = np.argpartition(-both_s, 99, axis=1)[:, :100]
                best_s, best_r = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_r, top, 1)
        kth = best_s.min(axis=1)
        hits = []
        for i, (rows, _) in enumerate(reader.search(name, q[name], 100)):
            _, sc = reader.scores(name, rows, q[name][i])
            hits.append(min(int(np.count_nonzero(sc >= kth[i] - 1e-5)), 100) / 100)  # ties count as found
        recall[name] = round(float(np.mean(hits)), 4)
    out["recall_at_100_vs_stored"] = recall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--ann-only-from", type=int, default=5_000_000, help="sizes from here on: dense stage alone")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--query-phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--measure", default=None, metavar="INDEX",
                    help="measure the dense first stage of an index this script built (kept with --work), without "
                         "regenerating its data: recall against its stored vectors (results: bench_scale_measure.json)")
    ap.add_argument("--reopen", default=None, metavar="INDEX",
                    help="time how a served index this script built moves on after an append and a deletion, on a "
                         "copy of it whose immutable files are hard links (results: bench_scale_reopen.json)")
    ap.add_argument("--records", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", choices=("cone", "isotropic"), default="cone",
                    help="data model: clusters in a cone like CLIP embeddings, or nearly structureless (worst case)")
    args = ap.parse_args()
    global DATA
    DATA = args.data
    if args.query_phase:
        import json

        result = query_phase(Path(args.query_phase), Path(args.work), args.records, args.full)
        # kept in the work folder too: the compaction measured after it takes minutes at 10M records
        (Path(args.work) / f"query_phase-{args.records}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return
    if args.measure:
        r = measure_index(Path(args.measure), args.queries)
        print(r)
        print(f"saved {save('bench_scale_measure', {'index': str(args.measure), **r})}")
        return
    if args.reopen:
        r = reopen_copy(Path(args.reopen))
        print(r)
        print(f"saved {save('bench_scale_reopen', {'index': str(args.reopen), **r})}")
        return
    identity = synthetic_identity()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = []
    try:
        for n in [int(x) for x in args.sizes.split(",")]:
            r = run_size(work, n, args.queries, identity, full=n < args.ann_only_from)
            sizes.append(r)
            print(r, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for r in sizes:
        n = f"{r['records']:,}"
        if r["full_pipeline"]:
            rows.append((f"search-only p50 / p95 at {n}", f"{r['search_ms_p50']} / {r['search_ms_p95']} ms",
                         "<= 5 ms (100k), <= 10 ms (1M)"))
            rows.append((f"patch top-100 overlap at {n}", f"{r['patch_top100_overlap']}", ">= 0.95"))
            rows.append((f"caption embeddings ({r['caption_codec']}): top-100 overlap / cosine error at {n}",
                         f"{r['caption_top100_overlap']} / {r['caption_cosine_error']}", ""))
        else:
            rows.append((f"dense first stage p50 at {n}", f"{r['ann_ms_p50']} ms", ""))
        st = r["search_settings"]
        rows.append((f"recall@100 clip / dino at {n}", f"{r['recall_at_100']['clip']} / {r['recall_at_100']['dino']} "
                     f"(nprobe {st['clip']['nprobe']} / {st['dino']['nprobe']}, refine {st['clip']['refine']}x / "
                     f"{st['dino']['refine']}x)", ">= 0.95"))
        rows.append((f"disk / RAM bytes per record at {n}",
                     f"{r['disk_bytes_per_record']['total']:.0f} / {r['ram_bytes_per_record']:.0f} (+ "
                     f"{r['ram_mapped_bytes_per_record']:.0f} of mapped files touched)", "<= 2500 / <= 1024"))
        rows.append((f"build s / query peak RSS at {n}",
                     f"{r['build_seconds']} s / {r['peak_rss_bytes'] / 2**30:.2f} GiB", "peak <= 4 GiB"))
        rows.append((f"first search packs the lists, at {n}", f"{r.get('first_search_pack_seconds')} s", ""))
        rows.append((f"compact after deleting 1,000, at {n}", f"{r['compact_seconds']} s", ""))
        if "compact_retrain_seconds" in r:
            rows.append((f"compact --retrain, at {n}", f"{r['compact_retrain_seconds']} s", ""))
        if "reopen_after_append_seconds" in r:
            rows.append((f"a service moves on after appending / deleting 1,000, at {n}",
                         f"{r['reopen_after_append_seconds']} / {r['reopen_after_delete_seconds']} s (packing all: "
                         f"{r['reopen_baseline_pack_seconds']} s)", ""))
    prof = sizes[0]["neighbour_profile"]["clip"] if sizes else {}
    table(f"bench_scale (synthetic {DATA} data: clip neighbours at cosine {prof.get('top1')} / {prof.get('top10')} / "
          f"{prof.get('top100')} (1st / 10th / 100th), median pair {prof.get('median')})", rows)
    path = save("bench_scale", {"sizes": sizes})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
