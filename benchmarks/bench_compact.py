"""Memory and time of `attrib compact` on a many-segment index: it must not hold the index in memory.

Usage: python benchmarks/bench_compact.py [--records 100000] [--segments 10] [--retrain] [--work DIR]

Writes ``--records`` records of bench_scale's synthetic data (CLIP-like and DINO-like vectors, 8x8 patch cells,
LAION-like captions; no image decoding) through the library's writer in ``--segments`` segments, deletes 1% of
them, then compacts (no --retrain, no search measurement) in a fresh process that samples its own allocated
resident memory (RssAnon) every 20 ms. Reports the peak growth of allocated memory during the compaction, as bytes
per record and as a share of the index's size on disk (the ratio is the figure to compare across machines: a
compaction that holds the whole index in memory scores above 1), the compaction's wall time, and the merged
segment's size. Memory-mapped pages of the old segments that the compaction reads are page cache, counted apart
(RssFile). With ``--retrain`` the compaction refits the codebooks (``attrib compact --retrain``: two streamed
passes). Results go to benchmarks/results/bench_compact.json (bench_compact_retrain.json).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import save, table
from bench_scale import DP, generate, rss_parts, synthetic_identity


def compact_phase(folder: Path, retrain: bool = False) -> dict:
    """Compact ``folder`` in this process, sampling allocated and file-backed resident memory."""
    import engine

    base = rss_parts()
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in rss_parts().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    s = engine.compact(folder, retrain=retrain, progress=False, measure_search=False)
    seconds = time.perf_counter() - t
    done.set()
    th.join()
    return {"seconds": round(seconds, 2), "segments_before": s.segments_before, "records_after": s.records,
            "purged": s.purged, "peak_alloc_growth_bytes": peak["anon"] - base["anon"],
            "peak_file_pages_bytes": peak["file"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--segments", type=int, default=10)
    ap.add_argument("--retrain", action="store_true", help="compact with --retrain (new codebooks)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--compact-phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compact_phase:
        print(json.dumps(compact_phase(Path(args.compact_phase), args.retrain)))
        return
    import engine

    n, per = args.records, max(1, args.records // args.segments)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-compact-"))
    folder = work / f"idx-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        t = time.perf_counter()
        settings = engine.IndexSettings(chunk=per, codec="auto", ann="auto", patch_grid=8, patch_dims=DP)
        w = engine.IndexWriter(folder, synthetic_identity(), settings, expected_images=n)
        for ids, caps, clip, dino, cells, _, _ in generate(n, True, True):
            for a in range(0, len(ids), per):  # the writer commits a segment every `per` images
                b = slice(a, a + per)
                w.add_projected(ids[b], [None] * len(ids[b]), caps[b], [{}] * len(ids[b]), clip[b], dino[b], cells[b])
        w.finalize({"path": "synthetic", "kind": "bench_compact"})
        build_s = time.perf_counter() - t
        engine.delete_records(folder, ids=[f"r{i}" for i in range(0, n, 100)])
        disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        proc = subprocess.run([sys.executable, __file__, "--compact-phase", str(folder)]
                              + (["--retrain"] if args.retrain else []), capture_output=True, text=True, timeout=7200)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        merged = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    r.update(records=n, build_seconds=round(build_s, 1), index_bytes_before=disk, index_bytes_after=merged,
             peak_alloc_bytes_per_record=round(r["peak_alloc_growth_bytes"] / n, 1),
             peak_alloc_over_index_bytes=round(r["peak_alloc_growth_bytes"] / disk, 3))
    r["retrain"] = args.retrain
    table(f"bench_compact{' --retrain' if args.retrain else ''}: {n:,} records in {r['segments_before']} segments, "
          "1% deleted", [
        ("peak allocated memory growth", f"{r['peak_alloc_growth_bytes'] / 2**20:.0f} MiB "
         f"({r['peak_alloc_bytes_per_record']} B/record)", ""),
        ("... as a share of the index on disk", f"{r['peak_alloc_over_index_bytes']}",
         "well below 1" if not args.retrain else "the sample and one block: below 1 from about 1M records"),
        ("mapped index pages resident at the peak", f"{r['peak_file_pages_bytes'] / 2**20:.0f} MiB (page cache)", ""),
        ("compaction wall time", f"{r['seconds']} s", ""),
        ("index on disk before / after", f"{disk / 2**20:.0f} / {merged / 2**20:.0f} MiB", ""),
    ])
    path = save("bench_compact_retrain" if args.retrain else "bench_compact", {"result": r})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
