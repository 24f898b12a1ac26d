"""What ordering caption-search ties by row costs: prompts whose k-th BM25 score is shared by many captions.

Usage: python benchmarks/bench_text_ties.py [--records 100000] [--duplicates 50000] [--k 100] [--repeat 20]
                                            [--work DIR]

Writes an index of ``--records`` records through the library's writer (bench_scale's clustered vectors, dense
stage only, and its generated scene captions), ``--duplicates`` of them (every other record from the start)
with one and the same caption, as LAION holds thousands of copies of a product title. Then it times the caption
search a query runs (``reader.text.search``, k results, one at a time) for:

* ``tied``: the duplicated caption itself as the prompt: tens of thousands of captions share the k-th score,
  and the search fetches the ties at its k-th score to order them by row (at most 4,096 documents);
* ``scene``: prompts made of the generated captions (ties where captions happen to score alike);

and reports each p50, with the ratio of the two (the scene prompts are the baseline, measured in the same run).
Run it from a checkout of the code before (tantivy's own tie order) for the figures before. Results go to
benchmarks/results/bench_text_ties.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import pct, save, table, timed_ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale as bs  # noqa: E402 - the data and writer settings of the scale benchmark

DUPLICATE = "Red leather handbag with gold chain strap, women's fashion accessory"


def build(out: Path, n: int, duplicates: int) -> list[str]:
    """The index, and a sample of the scene captions (prompts)."""
    import engine
    from engine.scenes import caption_of, random_scene

    w = engine.IndexWriter(out, bs.synthetic_identity(), bs.writer_settings(min(n, 100_000), False),
                           expected_images=n)
    scenes = []
    for ids, _, clip, dino, cells, _, _ in bs.generate(n, False, False):
        start = int(ids[0][1:])
        caps = []
        for i in range(len(ids)):
            row = start + i
            if row % 2 == 0 and row // 2 < duplicates:
                caps.append(DUPLICATE)
            else:
                caps.append(caption_of(random_scene(np.random.default_rng([3, row])), np.random.default_rng([4, row])))
                if len(scenes) < 200:
                    scenes.append(caps[-1])
        w.add_projected(ids, [None] * len(ids), caps, [{}] * len(ids), clip, dino, cells)
    w.finalize({"path": "synthetic", "kind": "bench_text_ties"})
    if len(engine.index_info(out)["manifest"]["segments"]) > 1:
        engine.compact(out, progress=False, measure_search=False)
    return scenes


def timed(text, prompts: list[str], k: int, repeat: int) -> list[float]:
    """Milliseconds of each caption search, ``repeat`` times per prompt."""
    return [ms for p in prompts for ms in timed_ms(lambda t=text.terms(p): text.search(t, k), repeat)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--duplicates", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--work", default=None, help="folder for the index (default: a temporary one, removed)")
    a = ap.parse_args()
    import engine

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-text-ties-"))
    out = work / "idx"
    try:
        t = time.perf_counter()
        if out.exists():
            shutil.rmtree(out)
        scenes = build(out, a.records, a.duplicates)
        build_s = time.perf_counter() - t
        idx = engine.open_index(out)
        text = idx.reader.text
        got, _ = text.search(text.terms(DUPLICATE), a.k)
        tied = timed(text, [DUPLICATE], a.k, a.repeat * 10)
        scene = timed(text, scenes[:50], a.k, a.repeat)
        res = {"records": a.records, "duplicates": a.duplicates, "k": a.k, "build_seconds": round(build_s, 1),
               "tied_ms_p50": round(pct(tied, 50), 3), "tied_ms_p95": round(pct(tied, 95), 3),
               "scene_ms_p50": round(pct(scene, 50), 3), "scene_ms_p95": round(pct(scene, 95), 3),
               "tied_over_scene_p50": round(pct(tied, 50) / pct(scene, 50), 2),
               "tied_rows_are_the_lowest": got.tolist() == list(range(0, 2 * a.k, 2))}
        idx.close()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    table(f"caption search, {a.records:,} records, {a.duplicates:,} with one caption, k={a.k}", [
        ("tied prompt p50 / p95 (ms)", f"{res['tied_ms_p50']} / {res['tied_ms_p95']}", ""),
        ("scene prompts p50 / p95 (ms)", f"{res['scene_ms_p50']} / {res['scene_ms_p95']}", "baseline"),
        ("tied / scene p50", f"{res['tied_over_scene_p50']}x", ""),
        ("ties kept are the lowest rows", str(res["tied_rows_are_the_lowest"]), "True"),
    ])
    print(save("bench_text_ties", res))


if __name__ == "__main__":
    main()
