"""Query cost of an index grown by an append: its segments as the append wrote them, merged, and compacted.

Usage: python benchmarks/bench_append.py [--records 100000] [--append 50000] [--chunk 1000] [--queries 100]
                                         [--rounds 2] [--work DIR]

An append writes one segment per ``--chunk`` of images, and a query reads every segment on its own. This script
builds bench_scale's index of ``--records`` records (its clustered synthetic vectors, patch cells and captions,
written through the library's writer and compacted into one segment, as a build is), appends ``--append`` more
records in segments of ``--chunk`` (what an append has committed before its end), and measures ``Index.search``
(everything a query does except the encoders, one query at a time, bench_scale's fresh queries) on three
hard-linked copies of the same records:

* ``as_appended``: the base segment and the append's segments;
* ``merged``: after ``merge_appended``, what the end of ``attrib index --append`` does (its segments into one);
* ``compacted``: after ``attrib compact`` (one segment): the baseline each p50 is divided by, measured in the same
  rounds (the copies are queried in turn, ``--rounds`` times), since times on a shared machine drift.

Results go to benchmarks/results/bench_append.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import pct, save, table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale as bs  # noqa: E402 - the data, writer settings and queries of the scale benchmark


def append_in_chunks(folder: Path, n: int, chunk: int) -> float:
    """Append n records (ids a0..), a segment committed every ``chunk`` images; returns the seconds it took."""
    import engine

    t = time.perf_counter()
    w = engine.IndexWriter(folder, bs.synthetic_identity(), bs.writer_settings(chunk, True))
    for ids, caps, clip, dino, cells, _, text in bs.generate(n, True, True, seed=7):
        for a in range(0, len(ids), chunk):
            b = slice(a, a + chunk)
            k = len(ids[b])
            w.add_projected([f"a{i}" for i in ids[b]], [None] * k, caps[b], [{}] * k, clip[b], dino[b], cells[b],
                            caption_clip=text[b])
            w.commit()
    w.finalize({"path": "synthetic", "kind": "bench_append"})
    return time.perf_counter() - t


def measure(folder: Path, n_queries: int) -> dict:
    """One round: open, pack, then bench_scale's timed searches of its fresh queries."""
    import engine

    idx = engine.open_index(folder)
    idx.reader.warm()
    z = bs.fresh_queries(n_queries)
    times, parts = bs.timed_searches(idx, bs.encoded_queries(idx, z["clip"], z["dino"], z["cells"], z["text"],
                                                             range(n_queries)))
    segments = len(idx.reader.segments)
    idx.close()
    return {"times": times, "parts": parts, "segments": segments}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--append", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=1000, help="images per appended segment (attrib's --chunk)")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    import engine

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-append-"))
    base = work / f"idx-{args.records}"
    copies = {k: work / f"{k}-{args.records}+{args.append}" for k in ("as_appended", "merged", "compacted")}
    result: dict = {"records": args.records, "appended": args.append, "chunk": args.chunk, "queries": args.queries}
    runs: dict[str, list] = {k: [] for k in copies}
    try:
        if not (base / "manifest.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            t = time.perf_counter()
            bs.build(base, args.records, bs.synthetic_identity(), True)
            result["build_seconds"] = round(time.perf_counter() - t, 1)
        for p in copies.values():
            shutil.rmtree(p, ignore_errors=True)
        bs.linked_copy(base, copies["as_appended"])
        result["append_seconds"] = round(append_in_chunks(copies["as_appended"], args.append, args.chunk), 1)
        bs.linked_copy(copies["as_appended"], copies["merged"])
        s = engine.merge_appended(copies["merged"], args.records, progress=False)
        result["merge_seconds"] = round(s.seconds, 2)
        bs.linked_copy(copies["merged"], copies["compacted"])
        t = time.perf_counter()
        engine.compact(copies["compacted"], progress=False, measure_search=False)
        result["compact_seconds"] = round(time.perf_counter() - t, 2)
        for _ in range(args.rounds):
            for k, p in copies.items():
                runs[k].append(measure(p, args.queries))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for k, rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        result[k] = {"segments": rs[0]["segments"], "search_ms_p50": round(pct(times, 50), 2),
                     "search_ms_p95": round(pct(times, 95), 2),
                     "stage_ms_p50": {s: round(pct([t for r in rs for t in r["parts"][s]], 50), 2)
                                      for s in ("candidates", "features")}}
    for k in ("as_appended", "merged"):
        result[k]["p50_over_compacted"] = round(result[k]["search_ms_p50"] / result["compacted"]["search_ms_p50"], 3)
    path = save("bench_append", result)
    rows = [(f"{k}: {result[k]['segments']} segments", f"{result[k]['search_ms_p50']} / {result[k]['search_ms_p95']} ms"
             + (f" ({result[k]['p50_over_compacted']}x)" if k != "compacted" else " (1x)"), "")
            for k in copies]
    rows += [("append / merge / compact seconds",
              f"{result['append_seconds']} / {result['merge_seconds']} / {result['compact_seconds']}", "")]
    table(f"{args.records:,} records + {args.append:,} appended in chunks of {args.chunk:,}: search p50 / p95", rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
