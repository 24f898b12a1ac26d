"""`attrib bench ...` and `attrib tune`: thin commands over the eval package."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from engine import PROFILES, AttribError, main_rankers
from engine.cli import MAX_K, Parser, float_in, int_in, print_json, report_failed
from engine.files import refuse_clobbering
from engine.report import fmt_number
from engine.report.text import untrained_panel
from engine.ui import stderr_console

from .bench import CORPUS, QUERIES
from .run import DEFAULT_TARGET_FAR, REPORT_METRICS, ranker_order


def _fmt(v) -> str:
    return fmt_number(v, "{:.3f}")


def print_evaluation(result: dict) -> None:
    c = stderr_console()
    if result["models"].get("warning"):
        c.print(untrained_panel(result["models"]["warning"]))
    c.print(f"[dim]fused = {escape(result['fusion']['fused']['note'])}[/dim]")
    fz = result["fusion"]["fused"]
    if fz.get("learned_by"):
        c.print(f"[dim]weights {escape(str(fz.get('weights')))} learned by {escape(str(fz['learned_by']))} "
                f"{escape(str(fz.get('learned_at') or ''))} on {escape(str(fz.get('learned_on')))}[/dim]")
    t = Table(title=f"{escape(result['benchmark'])} [{result['split']}]: {result['n_queries_with_source']} queries "
                    f"with a source, {result['novel']['n_novel']} without (± = half the bootstrap 95% interval)")
    t.add_column("ranker")
    for m in REPORT_METRICS:
        t.add_column(m, justify="right")
    for n in ranker_order():
        row = [f"[bold]{n}[/bold]" if n == "fused" else n]
        for m in REPORT_METRICS:
            v, ci = result["metrics"][n][m], result["ci95"][n][m]
            half = (ci[1] - ci[0]) / 2 if ci[0] is not None and ci[1] is not None else None
            row.append(f"{_fmt(v)}[dim]±{half:.2f}[/dim]" if v is not None and half is not None else _fmt(v))
        t.add_row(*row)
    c.print(t)
    k = Table(title="by kind: recall@1 / map@100 (false-attribution rate for novel)")
    k.add_column("kind")
    for n in ranker_order():
        k.add_column(n, justify="right")
    for kind, d in result["by_kind"].items():
        if "map@100" in d["fused"]:
            k.add_row(escape(kind), *[f"{_fmt(d[n]['recall@1'])} / {_fmt(d[n]['map@100'])}" for n in ranker_order()])
        else:
            k.add_row(escape(kind), *[_fmt(d[n]["false_attribution_rate"]) for n in ranker_order()])
    c.print(k)
    nv = result["novel"]
    d = Table(title=f"'no source' detection (thresholds calibrated on tune at FAR {nv['target_far']})")
    for col in ("ranker", "threshold", "false attribution (novel)", "detection (with source)",
                "correct top-1 + detected"):
        d.add_column(col, justify="right" if col != "ranker" else "left")
    for n in ranker_order():
        x = nv["rankers"][n]
        d.add_row(n, _fmt(x["threshold"]), _fmt(x["false_attribution_rate"]), _fmt(x["detection_rate"]),
                  _fmt(x["correct_detection_rate"]))
    c.print(d)
    if nv.get("note"):
        c.print(f"[dim]{escape(nv['note'])}[/dim]")
    lso = result.get("leave_source_out")
    if lso:
        far = lso["false_attribution_rate"]
        c.print(f"[bold]leave-source-out[/bold]: {lso['masked_queries']} queries with their sources masked; "
                "false-attribution rate " + ", ".join(f"{n} {_fmt(far[n])}" for n in ranker_order()))
        c.print(f"[dim]{escape(lso['note'])}[/dim]")


def print_tune(weights, evals: dict, metric: str) -> None:
    from .tune import metric_by_kind, metric_by_ranker

    c = stderr_console()
    if evals["test"].result["models"].get("warning"):
        c.print(untrained_panel(evals["test"].result["models"]["warning"]))
    scores = {s: metric_by_ranker(evals[s], metric) for s in ("tune", "test")}
    t = Table(title=f"{metric}: learned on tune, held-out test")
    for col in ("ranker", "tune", "test"):
        t.add_column(col, justify="right" if col != "ranker" else "left")
    for n in ranker_order():
        t.add_row(f"[bold]{n}[/bold]" if n == "fused" else n, _fmt(scores["tune"][n]), _fmt(scores["test"][n]))
    c.print(t)
    best = max(main_rankers(), key=lambda n: scores["test"][n] or -1)
    b, f, r = scores["test"][best], scores["test"]["fused"], scores["test"]["rrf"]
    if b and f is not None:
        c.print(f"test: fused / best single ({best}) = {f / b:.3f}; fused / rrf = {f / r:.3f}" if r else "")
    k = Table(title=f"{metric} by kind, tune | test (false-attribution rate for kinds without a source)")
    k.add_column("kind")
    for n in ranker_order():
        k.add_column(n, justify="right")
    kinds = sorted(set(evals["tune"].result["by_kind"]) | set(evals["test"].result["by_kind"]))
    kind_scores = {s: metric_by_kind(evals[s], metric) for s in ("tune", "test")}
    for kind in kinds:
        cells = []
        for n in ranker_order():
            vals = []
            for s in ("tune", "test"):
                vals.append(_fmt(kind_scores[s].get(kind, {}).get(n)))
            cells.append(" | ".join(vals))
        k.add_row(escape(kind), *cells)
    c.print(k)
    where = f"written to [bold]{escape(weights.name)}[/bold]" if weights.name else "[red]not written[/red]"
    c.print(f"weights: {len(weights.features)} features, threshold {_fmt(weights.threshold)} "
            f"({escape(weights.threshold_rule)}); {where}")
    na = weights.provenance.get("not_applicable") or []
    if na:
        c.print(f"[dim]not applicable (no tune candidate has them, so no weight): {escape(', '.join(na))}[/dim]")
    if weights.text_only:
        c.print("[dim]text-only weights: use them with --weights for caption-only indexes and prompt-only "
                "queries[/dim]")


# --------------------------------------------------------------------------------------------- commands
def cmd_synth(a: argparse.Namespace) -> int:
    from .synth import generate

    summary = generate(a.out, train=a.train, queries=a.queries, seed=a.seed, image_size=a.size,
                       progress=not a.no_progress, overwrite=a.overwrite)
    if a.json:
        print_json(summary)
    else:
        c = summary["counts"]
        kinds = ", ".join(f"{n} {k}" for k, n in c["kind"].items())
        prompts = ", ".join(f"{n} {k}" for k, n in c["prompt_kind"].items())
        stderr_console().print(
            f"wrote a synthetic benchmark to [bold]{escape(a.out)}[/bold]: {c['corpus']['records']} training images "
            f"in {c['corpus']['groups']} groups ({c['corpus']['duplicate_records']} records in "
            f"{c['corpus']['duplicate_groups']} duplicate groups); {c['queries']} queries ({kinds}); prompts: "
            f"{prompts}; split {c['split']['tune']} tune / {c['split']['test']} test by source group")
    return 0


def _open(a: argparse.Namespace):
    from .bench import load_benchmark
    from .run import ensure_index

    bench = load_benchmark(a.bench)
    idx = ensure_index(bench, a.index, a.models, a.device, progress=not a.no_progress)
    return bench, idx


def cmd_run(a: argparse.Namespace) -> int:
    from .run import evaluate, write_report

    if a.report:
        # before the slow part; each file is checked again (links, special files) when written
        refuse_clobbering(a.report, inputs=[a.weights, a.index], folder=True)
    bench, idx = _open(a)
    ev = evaluate(bench, idx, a.split, weights=a.weights or "auto", target_far=a.target_far, progress=not a.no_progress,
                  leave_source_out=a.leave_source_out)
    failed = None
    if a.report:
        try:
            paths = write_report(ev, idx, a.report)
            stderr_console().print("report: " + ", ".join(escape(str(p)) for p in paths.values()))
        except AttribError as e:  # the result is still printed below
            failed = e
    if a.json:
        print_json(ev.result)
    else:
        print_evaluation(ev.result)
    return report_failed(failed) if failed is not None else 0


def cmd_tune(a: argparse.Namespace) -> int:
    from .tune import metric_by_ranker, tune

    # before the slow part; checked again (links, special files) when written
    refuse_clobbering(a.out, inputs=[Path(a.bench) / CORPUS, Path(a.bench) / QUERIES], kind="weights")
    bench, idx = _open(a)
    w, evals = tune(bench, idx, None, metric=a.metric, target_far=a.target_far, progress=not a.no_progress)
    failed = None
    try:
        w.save(a.out)
        w.name = str(a.out)
    except AttribError as e:  # the learned weights and scores are still printed below
        failed = e
    if a.json:
        print_json({"weights": w.to_dict(), "metric": a.metric, "written": failed is None,
                     "scores": {s: metric_by_ranker(evals[s], a.metric) for s in evals},
                     "tune": evals["tune"].result, "test": evals["test"].result})
    else:
        print_tune(w, evals, a.metric)
    return report_failed(failed) if failed is not None else 0


def cmd_import(a: argparse.Namespace) -> int:
    from .importer import import_memorized

    summary = import_memorized(a.csv, a.out, unmemorized=a.unmemorized, fetch=a.fetch, timeout=a.timeout,
                               overwrite=a.overwrite, seed=a.seed, reword=a.reword, split_seed=a.split_seed)
    if a.json:
        print_json(summary)
    else:
        stderr_console().print(f"wrote a text-only benchmark to [bold]{escape(a.out)}[/bold]")
        stderr_console().print_json(json.dumps(summary))
        if summary.get("bm25_by_rule"):
            print_bm25_losses(a.out)
    return 0


def print_bm25_losses(folder: str) -> None:
    """Per rewording rule: BM25's recall@1 (the engine's analysis chain) and one missed query next to its caption."""
    from pathlib import Path

    from .reword import RULE_HELP

    losses = json.loads((Path(folder) / "bm25_losses.json").read_text(encoding="utf-8"))
    t = Table(title="where BM25 loses, per rewording rule (all splits; examples in bm25_losses.json)")
    for col in ("rule", "queries", "recall@1", "not in top 100", "example miss: prompt -> caption (rank)"):
        t.add_column(col, justify="right" if col in ("queries", "recall@1", "not in top 100") else "left",
                     overflow="fold")
    for rule, d in losses.items():
        m = d["misses"][0] if d["misses"] else None
        ex = (f"{m['prompt']!r} -> {m['expected']!r} ({m['rank'] or '>100'})" if m else "-")
        t.add_row(f"{escape(rule)}\n[dim]{escape(RULE_HELP.get(rule, ''))}[/dim]", str(d["queries"]),
                  _fmt(d["recall@1"]), str(d["not_found"]), escape(ex))
    stderr_console().print(t)


def _metric(text: str) -> str:
    from .metrics import parse_metric

    try:
        parse_metric(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    k = text.strip().lower().partition("@")[2]
    if k and int(k) > MAX_K:
        raise argparse.ArgumentTypeError(f"{text!r}: K = {int(k)} is out of range; valid: 1..{MAX_K}")
    return text.strip().lower()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("bench", help="benchmark folder (corpus.parquet, queries.parquet, images)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index", default=None, help="an index of the benchmark corpus (default: build one, cached)")
    g.add_argument("--models", default=None, choices=PROFILES.names(),
                   help="profile to build the corpus index with (default: 'default')")
    p.add_argument("--device", default=None)
    p.add_argument("--target-far", type=float_in(0.0, 1.0), default=DEFAULT_TARGET_FAR,
                   help="false-attribution rate the 'no source' threshold is calibrated to on tune (default 0.05)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_commands(sub) -> None:
    """The eval package's command group (found by `attrib` through the ``attrib.commands`` entry point)."""
    b = sub.add_parser("bench", help="benchmarks: generate, import, run")
    bs = b.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", parser_class=Parser)
    bs.required = True

    s = bs.add_parser("synth", help="generate the synthetic memorization benchmark")
    s.add_argument("out")
    s.add_argument("--train", type=int_in(10, 10_000_000), default=2000,
                   help="training records (default 2000, at least 10)")
    s.add_argument("--queries", type=int_in(6, 10_000_000), default=1000,
                   help="queries (default 1000, at least 6: one per kind)")
    s.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    s.add_argument("--size", type=int_in(32, 4096), default=256, help="image side in pixels (default 256)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = bs.add_parser("run", help="score every ranker alone and fused on a benchmark")
    _common(s)
    s.add_argument("--split", choices=("test", "tune", "all"), default="test")
    s.add_argument("--weights", default=None,
                   help="fusion weights file (default: the index's own calibration, else shipped weights for "
                        "these models, else RRF); 'rrf' for plain RRF")
    s.add_argument("--report", default=None, metavar="DIR",
                   help="write bench.json, recall_at_k.png and hard_cases.html")
    s.add_argument("--leave-source-out", action="store_true",
                   help="mask each query's relevant records so every query is novel; report the false-attribution "
                        "rate overall and per kind (a check of the 'no source' verdict on real queries)")
    s.set_defaults(func=cmd_run)

    s = bs.add_parser("import-memorized",
                      help="benchmark from a memorized-prompt CSV (LAION caption, URL, VM/TM, index)")
    s.add_argument("csv", help="memorized prompts CSV (columns Caption;URL;type;...;Index)")
    s.add_argument("--out", required=True)
    s.add_argument("--unmemorized", default=None,
                   help="CSV of non-memorized captions: half become corpus distractors, half novel queries")
    s.add_argument("--fetch", action="store_true", help="try to download the images by URL (short timeouts)")
    s.add_argument("--timeout", type=float_in(0.1, 600.0), default=5.0,
                   help="seconds per URL when fetching (default 5)")
    s.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0,
                   help="seeds the tune/test split, the distractor halves and the rewordings (default 0)")
    s.add_argument("--reword", type=int_in(0, 64), default=0, metavar="N",
                   help="N reworded prompts per caption instead of the verbatim caption, each by one rule "
                        "(substitute, drop, insert, reorder, punct_case, misspell, inflect, mixed; the rule is the "
                        "query's kind); also reports where BM25 loses per rule (default 0: verbatim)")
    s.add_argument("--split-seed", type=int_in(0, 2**63 - 1), default=None,
                   help="seed of the split and distractors only (default: --seed), to reword with a new seed "
                        "while keeping the corpus and splits")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_import)

    t = sub.add_parser("tune", help="learn fusion weights on a benchmark's tune split; report tune and test")
    _common(t)
    t.add_argument("--out", required=True, metavar="WEIGHTS", help="weights file to write")
    t.add_argument("--metric", type=_metric, default="map@100",
                   help="metric that selects the regularisation (default map@100): "
                        "recall@K, success@K, ndcg@K, map@K, mrr")
    t.set_defaults(func=cmd_tune)
