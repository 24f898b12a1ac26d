"""Text evidence on reworded prompts (issue 9): analysis chains for BM25, and fused text signals against BM25.

Usage:
  attrib bench import-memorized MEM.csv --unmemorized UNMEM.csv --out rw-s1 --reword 8 --seed 1 --split-seed 0
  attrib bench import-memorized MEM.csv --unmemorized UNMEM.csv --out rw-s2 --reword 8 --seed 2 --split-seed 0
  attrib tune rw-s1 --models offline --out text-weights.json
  python benchmarks/bench_text.py --tune-bench rw-s1 --test-bench rw-s2 --weights text-weights.json

(a) chains: BM25 recall@1 per rewording rule for every analysis chain (``engine.text.CHAINS``) on the tune split
    of the tune benchmark (where the chain is chosen) and the test split of the test benchmark, plus tantivy's
    default: its ``en_stem`` tokenizer with a lenient query parse (``Index.parse_query_lenient``), as a new user
    would try it.
(b) fused: on the test split of the test benchmark (rewordings drawn with a seed the weights never saw, captions
    the tuning never saw), recall@1 per rule of the learned fusion of every text signal, of each signal alone,
    of BM25 with the engine's chain, with the chain before issue 9 (attrib_en) and of en_stem + lenient parse.
Prints tables and saves JSON (benchmarks/results/bench_text.json). The CLIP signals come from the models of the
index: with untrained weights (profile offline) the caption embedding signal is noise, and the output says so.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import time
from pathlib import Path

from _common import save, table

ALL = "ALL"


def _recall_by_rule(rank1: dict[str, bool], kinds: dict[str, str]) -> dict[str, float]:
    hit, tot = collections.Counter(), collections.Counter()
    for q, ok in rank1.items():
        for k in (kinds[q], ALL):
            tot[k] += 1
            hit[k] += ok
    return {k: round(hit[k] / tot[k], 4) for k in tot}


def _queries(bench, split: str):
    import polars as pl

    q = bench.split(split).filter(pl.col("relevant").list.len() > 0)
    return q["query_id"].to_list(), q["prompt"].to_list(), [set(r) for r in q["relevant"].to_list()], \
        dict(zip(q["query_id"].to_list(), q["kind"].to_list()))


def chain_rank1(bench, split: str, chain: str) -> dict[str, bool]:
    """query -> whether BM25 with ``chain`` puts a source first (the engine's term query, never a parse)."""
    from engine.rankers.bm25 import caption_bm25

    ids = bench.corpus["id"].to_list()
    store = caption_bm25(bench.corpus["caption"].to_list(), chain)
    out = {}
    for qid, prompt, rel, in zip(*_queries(bench, split)[:3]):
        rows, _ = store.search(store.terms(prompt), 1)
        out[qid] = bool(len(rows)) and ids[int(rows[0])] in rel
    return out


def en_stem_lenient_rank1(bench, split: str) -> dict[str, bool]:
    """query -> whether tantivy's default (en_stem tokenizer, lenient query parse) puts a source first."""
    import tantivy

    folder = Path(tempfile.mkdtemp(prefix="bench-text-"))
    try:
        sb = tantivy.SchemaBuilder()
        sb.add_integer_field("row", stored=True, indexed=True, fast=True)
        sb.add_text_field("caption", stored=False, tokenizer_name="en_stem")
        index = tantivy.Index(sb.build(), path=str(folder))
        w = index.writer(heap_size=15_000_000, num_threads=1)
        for i, c in enumerate(bench.corpus["caption"].to_list()):
            w.add_document(tantivy.Document(row=i, caption=c or ""))
        w.commit()
        w.wait_merging_threads()
        index.reload()
        searcher = index.searcher()
        ids = bench.corpus["id"].to_list()
        out = {}
        for qid, prompt, rel in zip(*_queries(bench, split)[:3]):
            query, _errors = index.parse_query_lenient(prompt, ["caption"])
            hits = searcher.search(query, limit=1).hits
            row = searcher.doc(hits[0][1])["row"][0] if hits else None
            out[qid] = row is not None and ids[int(row)] in rel
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ambiguous(bench, split: str) -> dict[str, bool]:
    """query -> whether another caption has at least as many of the prompt's content words (light stems, as the
    phrase signal reads them) as the source: word evidence alone cannot single the source out (a hint of the
    ceiling of any text-only method on rules that destroy words)."""
    from engine.text import TextBatch

    captions = TextBatch(bench.corpus["caption"].to_list())
    stems, seg = captions.content_stems()
    words: list[set] = [set() for _ in range(captions.n)]
    for h, i in zip(stems.tolist(), seg.tolist()):
        words[i].add(h)
    row = {x: i for i, x in enumerate(bench.corpus["id"].to_list())}
    out = {}
    for qid, prompt, rel in zip(*_queries(bench, split)[:3]):
        p = set(TextBatch([prompt]).content_stems()[0].tolist())
        src = max(len(p & words[row[r]]) for r in rel)
        out[qid] = sum(len(p & w) >= src for w in words) > len(rel)
    return out


def fused_rank1(bench, models: str, weights: str) -> tuple[dict[str, dict[str, bool]], dict]:
    """ranker -> query -> source first, for every ranker alone and the learned fusion, on the test split."""
    from eval.run import ensure_index, evaluate

    idx = ensure_index(bench, None, models, progress=False)
    ev = evaluate(bench, idx, "test", weights=weights, progress=False)
    out = {}
    for name, rankings in ev.rankings.items():
        if name in ev.result.get("not_applicable", {}):
            continue
        out[name] = {r.query_id: bool(rankings[r.query_id]) and rankings[r.query_id][0] in r.relevant
                     for r in ev.runs if r.relevant}
    return out, ev.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-bench", required=True, help="reworded benchmark the weights and the chain were chosen on")
    ap.add_argument("--test-bench", required=True, help="the same captions reworded with another seed")
    ap.add_argument("--weights", default=None, help="text fusion weights learned on --tune-bench (attrib tune)")
    ap.add_argument("--models", default="offline")
    args = ap.parse_args()

    import engine
    from engine.text import CHAINS, DEFAULT_CHAIN
    from eval.bench import load_benchmark
    from eval.reword import RULES

    t0 = time.perf_counter()
    tune_b, test_b = load_benchmark(args.tune_bench), load_benchmark(args.test_bench)
    kinds_tune, kinds_test = _queries(tune_b, "tune")[3], _queries(test_b, "test")[3]
    rules = [r for r in RULES if r in set(kinds_test.values())]
    cols = [ALL] + rules

    chains = {}
    for name in CHAINS.names():
        chains[name] = {"tune": _recall_by_rule(chain_rank1(tune_b, "tune", name), kinds_tune),
                        "test": _recall_by_rule(chain_rank1(test_b, "test", name), kinds_test)}
    chains["en_stem+lenient parse"] = {"tune": _recall_by_rule(en_stem_lenient_rank1(tune_b, "tune"), kinds_tune),
                                       "test": _recall_by_rule(en_stem_lenient_rank1(test_b, "test"), kinds_test)}
    rows = [(f"{n}{' (default)' if n == DEFAULT_CHAIN else ''}", f"{d['tune'][ALL]:.3f} / {d['test'][ALL]:.3f}",
             " ".join(f"{d['tune'].get(r, float('nan')):.2f}" for r in rules)) for n, d in chains.items()]
    table(f"(a) BM25 recall@1 by analysis chain: all tune / all test; per rule on tune ({', '.join(rules)})", rows)

    result = {"tune_bench": str(tune_b.path), "test_bench": str(test_b.path), "default_chain": DEFAULT_CHAIN,
              "rules": rules, "chains": chains}
    if args.weights:
        fused, ev = fused_rank1(test_b, args.models, args.weights)
        per = {n: _recall_by_rule(v, kinds_test) for n, v in fused.items()}
        per["bm25 attrib_en (before)"] = chains["attrib_en"]["test"]
        per["en_stem + lenient parse"] = chains["en_stem+lenient parse"]["test"]
        per["ambiguous share (not recall)"] = _recall_by_rule(ambiguous(test_b, "test"), kinds_test)
        order = ["fused", "bm25", "bm25 attrib_en (before)", "en_stem + lenient parse"] + \
            [n for n in per if n not in ("fused", "bm25", "bm25 attrib_en (before)", "en_stem + lenient parse")]
        untrained = not ev["models"]["pretrained"]
        table(f"(b) recall@1 on the test split of {test_b.name} (weights {Path(args.weights).name}; models "
              f"{args.models}{', UNTRAINED: caption_clip is noise' if untrained else ''})",
              [(n, " ".join(f"{per[n].get(c, float('nan')):.3f}" for c in cols), "") for n in order if n in per]
              + [("columns", " ".join(cols), "")])
        result.update({"weights": str(args.weights), "models": args.models, "untrained": untrained,
                       "test_recall_at_1": {n: per[n] for n in order if n in per},
                       "fused_over_bm25": {c: round(per["fused"][c] / per["bm25"][c], 4) for c in cols
                                           if per["bm25"].get(c)},
                       "fused_over_en_stem_lenient": {c: round(per["fused"][c] / per["en_stem + lenient parse"][c], 4)
                                                      for c in cols if per["en_stem + lenient parse"].get(c)},
                       "fusion": ev["fusion"]["fused"]})
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["engine_version"] = engine.__version__
    print(f"saved {save('bench_text', result)}")


if __name__ == "__main__":
    main()
