"""Query latency: encoders versus the whole query, and search-only latency at 100,000 records.

Usage: python benchmarks/bench_query.py [--records 10000] [--large 100000] [--runs 100] [--models offline]

The indexes hold synthetic vectors written through the store API (engine.IndexWriter), so no 10,000 images need
encoding; the captions are generated, realistic-length text for BM25. In one run it measures:
(a) encoder time for one query: CLIP image + CLIP text + DINOv2, on pre-decoded tensors;
(b) warm end-to-end `Index.query` latency (decode, encode, candidates, features, fusion, metadata), p50/p95;
the overhead b - a at p50 (target <= 30 ms); and the search-only latency (`Index.search` on an encoded query)
at 10,000 and 100,000 records (target <= 20 ms p50 at 100,000).
(c) the cost of the text rankers of issue 9 (phrase, fuzzy, caption_clip, caption_dups) at 100,000 records: the
same index searched with and without them, alternately, so that machine noise hits both alike (target <= +5 ms
p50). Their caption embeddings are random unit vectors (the cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import pct, save, table, timed_ms

TEXT_RANKERS = ("phrase", "fuzzy", "caption_clip", "caption_dups")  # issue 9's rankers, toggled in (c)


def random_text_encoder(dim: int):
    """Stands in for CLIP's text encoder at index time: a random unit vector per caption."""
    rng = np.random.default_rng(7)

    def encode(captions: list[str]) -> np.ndarray:
        v = rng.standard_normal((len(captions), dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return encode


def synthetic_index(out: Path, n: int, enc, rng: np.random.Generator) -> None:
    """n records with random unit vectors and generated captions, written with the real IndexWriter, told the
    size (so that the codec and IVF are chosen as for a build of n images) and compacted as a build is."""
    import engine
    from engine.scenes import caption_of, random_scene

    settings = engine.IndexSettings()
    w = engine.IndexWriter(out, enc.identity, settings, caption_encoder=random_text_encoder(enc.clip_dim),
                           expected_images=n)
    cells = settings.patch_grid ** 2
    d, dc = enc.dino_dim, enc.clip_dim
    bs = 1000
    for s in range(0, n, bs):
        m = min(bs, n - s)
        caps = [caption_of(random_scene(np.random.default_rng([3, s + i])), np.random.default_rng([4, s + i]))
                for i in range(m)]
        clip = rng.standard_normal((m, dc)).astype(np.float32)
        clip /= np.linalg.norm(clip, axis=1, keepdims=True)
        w.add_images([f"r{s + i}" for i in range(m)], [None] * m, caps, [{}] * m, clip,
                     rng.standard_normal((m, d)).astype(np.float32), rng.standard_normal((m, d)).astype(np.float32),
                     rng.standard_normal((m, cells, d)).astype(np.float32))
    w.finalize({"path": "synthetic", "kind": "synthetic"})
    engine.compact(out, progress=False)  # a finished build is served from one segment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--models", default="offline")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    import engine
    from engine.images import ImageLimits, encoder_inputs, read_bytes
    from engine.scenes import caption_of, random_scene, render

    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    try:
        enc = engine.load_encoders(args.models, device=args.device)
        rng = np.random.default_rng(0)
        queries = []
        for i in range(8):
            r = np.random.default_rng([99, i])
            spec = random_scene(r)
            p = work / f"q{i}.jpg"
            render(spec, 384).save(p, quality=90)
            queries.append((p, caption_of(spec, r)))

        t = time.perf_counter()
        synthetic_index(work / "small", args.records, enc, rng)
        build_small = time.perf_counter() - t
        idx = engine.open_index(work / "small")
        idx.use_encoders(enc)
        grid = idx.reader.grid

        # (a) the three encoder calls for one query, on pre-decoded tensors
        cu8, du8 = encoder_inputs(read_bytes(str(queries[0][0])), ImageLimits(), enc.clip_input, enc.dino_input)
        cu8, du8 = cu8[None], du8[None]
        prompt = queries[0][1]

        def encoders_only() -> None:
            enc.encode_clip_images(cu8)
            enc.encode_texts([prompt])
            enc.encode_dino_images(du8, grid)

        # (b) the whole query, warm; the two are interleaved so that machine noise hits both alike
        def whole_query() -> None:
            p, c = queries[0]
            idx.query(image=p, prompt=c, k=10)

        a_ms, b_ms = [], []
        encoders_only()
        whole_query()
        for _ in range(args.runs):
            a_ms += timed_ms(encoders_only, 1)[0:1]
            b_ms += timed_ms(whole_query, 1)[0:1]
        encoded = idx.encode_queries([p for p, _ in queries], [c for _, c in queries])

        def search_only(index) -> list[float]:
            fus = index.resolve_fusion("auto")
            out = []
            for i in range(args.runs + 1):
                q = encoded[i % len(encoded)]
                t0 = time.perf_counter()
                index.search(q, k=10, fusion=fus)
                out.append((time.perf_counter() - t0) * 1e3)
            return out[1:]

        s_small = search_only(idx)
        t = time.perf_counter()
        synthetic_index(work / "large", args.large, enc, rng)
        build_large = time.perf_counter() - t
        big = engine.open_index(work / "large")
        big.use_encoders(enc)
        s_large = search_only(big)

        # (c) the text rankers of issue 9 on and off, alternately, on the same index and queries
        base = engine.open_index(work / "large")
        base.use_encoders(enc)
        for name in TEXT_RANKERS:
            base.rankers.pop(name)
        fus_on, fus_off = big.resolve_fusion("auto"), base.resolve_fusion("auto")
        on_ms, off_ms = [], []
        for i in range(2 * args.runs + 2):
            q = encoded[(i // 2) % len(encoded)]
            index, fus, out = (big, fus_on, on_ms) if i % 2 == 0 else (base, fus_off, off_ms)
            t0 = time.perf_counter()
            index.search(q, k=10, fusion=fus)
            out.append((time.perf_counter() - t0) * 1e3)
        on_ms, off_ms = on_ms[1:], off_ms[1:]  # the first of each warms up
        pool_sizes = [len(big.pool(q)) for q in encoded]
        parts = {k: [] for k in ("candidates", "features", "fusion", "metadata")}
        fus = big.resolve_fusion("auto")
        for q in encoded:
            r = big.search(q, k=10, fusion=fus)
            for k in parts:
                parts[k].append(r.timings_ms.get(k, 0.0))

        a50, b50 = pct(a_ms, 50), pct(b_ms, 50)
        untrained = not enc.profile.pretrained
        rows = [
            ("(a) encoders, one query (p50 / p95)", f"{a50:.1f} / {pct(a_ms, 95):.1f} ms", ""),
            (f"(b) whole query at {args.records:,} (p50 / p95)", f"{b50:.1f} / {pct(b_ms, 95):.1f} ms", ""),
            ("overhead b - a at p50", f"{b50 - a50:.1f} ms", "<= 30 ms"),
            (f"search-only at {args.records:,} (p50 / p95)", f"{pct(s_small, 50):.1f} / {pct(s_small, 95):.1f} ms", ""),
            (f"search-only at {args.large:,} (p50 / p95)", f"{pct(s_large, 50):.1f} / {pct(s_large, 95):.1f} ms",
             "<= 20 ms p50"),
        ] + [(f"  {k} at {args.large:,} (p50)", f"{pct(v, 50):.1f} ms", "") for k, v in parts.items()] + [
            (f"(c) search-only at {args.large:,} without the text rankers (p50)", f"{pct(off_ms, 50):.1f} ms", ""),
            (f"(c) search-only at {args.large:,} with them (p50)", f"{pct(on_ms, 50):.1f} ms", ""),
            ("(c) text rankers' cost at p50 (with - without)", f"{pct(on_ms, 50) - pct(off_ms, 50):+.1f} ms",
             "<= +5 ms"),
            ("    pool size (candidates per query, mean)", f"{np.mean(pool_sizes):.0f}", ""),
        ]
        table(f"bench_query ({args.models}{', UNTRAINED weights' if untrained else ''}, fusion: {fus.method})", rows)
        path = save("bench_query", {
            "models": args.models, "untrained": untrained, "records": args.records, "large_records": args.large,
            "runs": args.runs, "fusion": fus.method,
            "encoders_ms": {"p50": a50, "p95": pct(a_ms, 95)}, "query_ms": {"p50": b50, "p95": pct(b_ms, 95)},
            "overhead_p50_ms": b50 - a50, "target_overhead_ms": 30,
            "search_only_ms": {"small": {"p50": pct(s_small, 50), "p95": pct(s_small, 95)},
                               "large": {"p50": pct(s_large, 50), "p95": pct(s_large, 95)}},
            "target_search_large_p50_ms": 20,
            "large_stage_p50_ms": {k: pct(v, 50) for k, v in parts.items()},
            "text_rankers": list(TEXT_RANKERS),
            "text_rankers_ms": {"with": {"p50": pct(on_ms, 50), "p95": pct(on_ms, 95)},
                                "without": {"p50": pct(off_ms, 50), "p95": pct(off_ms, 95)},
                                "cost_p50": pct(on_ms, 50) - pct(off_ms, 50)},
            "target_text_rankers_cost_p50_ms": 5, "pool_size_mean": float(np.mean(pool_sizes)),
            "build_seconds": {"small": build_small, "large": build_large},
        })
        print(f"saved {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
