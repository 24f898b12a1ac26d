"""Record-id lookups on an existing index: what ``attrib delete --id/--ids`` and the service's record lookup pay.

Usage: python benchmarks/bench_lookup.py INDEX [--lookups 100000]

In a fresh process: the first ``rows_of`` (it builds the id table: a sorted 64-bit hash per live record), its wall
time and the growth of the process's resident memory; then ``--lookups`` ids of live records (every k-th, plus as
many unknown ids) looked up at once. Any index works; bench_scale's (``--work DIR``, ids ``r0``, ``r1``, ...) is the
large one at hand: ``python benchmarks/bench_lookup.py DIR/idx-10000000``. Results go to
benchmarks/results/bench_lookup.json.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from _common import save, table


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index")
    ap.add_argument("--lookups", type=int, default=100_000)
    args = ap.parse_args()
    import engine

    reader = engine.open_index(args.index).reader
    first_row = int(reader.segments[0].rows[0])
    first_id = str(reader.records([first_row])["id"][0])  # not through the id table: it is timed below
    base = rss()
    t = time.perf_counter()
    found = reader.rows_of([first_id])
    build_s = time.perf_counter() - t
    grown = rss() - base
    assert found.tolist() == [first_row], (first_id, found)
    step = max(1, reader.next_row // max(args.lookups // 2, 1))
    rows = np.arange(0, reader.next_row, step)[: args.lookups // 2]
    rows = rows[reader.live.keep(rows)]
    ids = reader.ids_of(rows).tolist()
    queries = ids + [f"{i}-not-an-id" for i in ids]
    t = time.perf_counter()
    got = reader.rows_of(queries)
    lookup_s = time.perf_counter() - t
    assert got[: len(ids)].tolist() == rows.tolist() and (got[len(ids):] == -1).all()
    r = {"index": str(args.index), "records": reader.n_records, "first_lookup_seconds": round(build_s, 2),
         "first_lookup_rss_growth_bytes": grown, "lookups": len(queries), "lookup_seconds": round(lookup_s, 2)}
    table(f"bench_lookup: {reader.n_records:,} records", [
        ("first lookup (builds the id table)", f"{build_s:.2f} s, +{grown / 2**20:.0f} MiB resident", ""),
        (f"{len(queries):,} lookups (half unknown ids)", f"{lookup_s:.2f} s", ""),
    ])
    print(f"saved {save('bench_lookup', r)}")


if __name__ == "__main__":
    main()
