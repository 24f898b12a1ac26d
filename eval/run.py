"""Running a benchmark: index the corpus (cached), encode the queries (cached), rank every query with each
ranker alone and fused, and compute metrics with bootstrap intervals, per kind, and "no source" detection."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from engine import (
    ARRAY_ENCODINGS,
    INDEX_FORMAT_VERSION,
    RANKERS,
    AttribError,
    Fusion,
    Index,
    IndexSettings,
    OutputError,
    Pool,
    QuerySettings,
    build_index,
    cache_root,
    main_rankers,
    open_index,
    ranking_order,
)
from engine.files import check_output_folder, write_bytes_atomic, write_text_atomic
from engine.rankers import QueryInput
from engine.results import clean_number as _num
from engine.ui import progress_bar, stderr_console

from . import metrics as M
from .bench import Benchmark

DEPTH = QuerySettings().depth  # candidates per ranker: the engine's own pool depth
REPORT_METRICS = ("recall@1", "recall@5", "recall@10", "map@100", "mrr", "ndcg@10")
EXTRA_METRICS = ("success@1", "success@10")
FUSIONS = ("rrf", "fused")
FUSION_STYLES = {"rrf": ("tab:gray", "--"), "fused": ("tab:red", "-")}
DEFAULT_TARGET_FAR = 0.05


def ranker_order() -> tuple[str, ...]:
    """The rankers every table and plot shows: each main ranker alone, then RRF and the learned fusion."""
    return (*main_rankers(), *FUSIONS)


@dataclass
class QueryRun:
    """Everything one query produced: each single ranker's list and the fused candidate pool."""

    query_id: str
    kind: str
    split: str
    relevant: frozenset[str]
    rankings: dict[str, list[str]]  # single rankers: ids, best first
    tops: dict[str, float]  # single rankers: top score (NaN when empty)
    pool: Pool  # the fused candidate pool: rows, every feature, each main ranker's own scores
    pool_ids: np.ndarray  # object array of the pool's record ids
    meta: dict = field(default_factory=dict)  # image path and prompt (reports)
    took_part: dict[str, bool] = field(default_factory=dict)  # whether each single ranker could run

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((i in self.relevant for i in self.pool_ids), bool, len(self.pool_ids))

    @property
    def novel(self) -> bool:
        return not self.relevant


# --------------------------------------------------------------------------------------------- index
def _index_settings_key(settings: IndexSettings) -> str:
    """Settings, engine version and index format: a cached index is reused only when all three match."""
    from engine import __version__

    blob = json.dumps([settings.to_dict(), __version__, INDEX_FORMAT_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def ensure_index(bench: Benchmark, index: str | os.PathLike | None, models: str | None, device: str | None = None,
                 progress: bool = True) -> Index:
    """Open the given index, or build (once, cached by corpus content and models) an index of the corpus."""
    if index is not None:
        idx = open_index(index, models=models, device=device)
    else:
        models = models or "default"
        settings = IndexSettings()
        key = f"{bench.name}-{models}-{bench.corpus_hash[:12]}-{_index_settings_key(settings)}"
        folder = cache_root() / "bench-index" / key
        try:
            idx = open_index(folder, device=device)
            _ = idx.encoders  # a cached index built with other weights (e.g. another torch) is rebuilt
        except AttribError:
            stderr_console().print(f"indexing the benchmark corpus ({bench.corpus.height} records) with models "
                                   f"{models!r} into the cache {folder}")
            build_index(bench.path / "corpus.parquet", folder, models=models, device=device, settings=settings,
                        overwrite=folder.exists(), progress=progress, calibrate=False)
            idx = open_index(folder, device=device)
    ids = set(idx.reader.all_ids()[1].tolist())
    missing = sorted({r for rel in bench.queries["relevant"].to_list() for r in rel} - ids)
    if missing:
        raise AttribError(
            f"index {idx.path} lacks {len(missing)} corpus records that queries of {bench.path} point to (e.g. "
            f"{', '.join(missing[:5])}); it was built from another corpus, "
            "or they were rejected (see its rejects.jsonl)"
        )
    return idx


# --------------------------------------------------------------------------------------------- encoding
def _encoding_cache(bench: Benchmark, idx: Index, qids: Sequence[str]) -> Path:
    m = idx.manifest
    key = hashlib.sha256(json.dumps([bench.content_hash, m["models"]["fingerprint"], m["created"], str(idx.path),
                                     list(qids)]).encode()).hexdigest()[:20]
    return cache_root() / "bench-queries" / f"{key}.npz"


def encode_queries(bench: Benchmark, idx: Index, qdf: pl.DataFrame, progress: bool = True) -> list[QueryInput]:
    """Encode the queries in batches; cached on disk per (benchmark content, index)."""
    qids = qdf["query_id"].to_list()
    prompts = qdf["prompt"].to_list()
    images = [bench.image_path(x) for x in qdf["image"].to_list()]
    cache = _encoding_cache(bench, idx, qids)
    if cache.exists():
        try:
            return _load_encoded(cache, qids, images, prompts, idx)
        except Exception:  # noqa: BLE001 - a damaged cache is just recomputed
            cache.unlink(missing_ok=True)
    out: list[QueryInput] = []
    bs = 32
    with progress_bar("encoding queries", len(qids), enabled=progress) as advance:
        for s in range(0, len(qids), bs):
            out += idx.encode_queries(images[s:s + bs], prompts[s:s + bs], qids[s:s + bs])
            advance(len(qids[s:s + bs]))
    _save_encoded(cache, out)
    return out


def _save_encoded(path: Path, qs: list[QueryInput]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for f in ARRAY_ENCODINGS:
        have = [q for q in qs if q.get(f) is not None]
        arrays[f"has_{f}"] = np.array([q.get(f) is not None for q in qs])
        if have:
            arrays[f] = np.stack([q.get(f) for q in have]).astype(np.float32)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_encoded(path: Path, qids, images, prompts, idx: Index) -> list[QueryInput]:
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    qs = [QueryInput(query_id=q, image=im, prompt=p or "") for q, im, p in zip(qids, images, prompts)]
    for f in ARRAY_ENCODINGS:
        has = data[f"has_{f}"]
        if len(has) != len(qs):
            raise ValueError("cache does not match the queries")
        j = 0
        for q, h in zip(qs, has):
            if h:
                q.encodings[f] = data[f][j]
                j += 1
    return [idx.with_terms(q) for q in qs]


# --------------------------------------------------------------------------------------------- running
def run_queries(bench: Benchmark, idx: Index, qdf: pl.DataFrame, progress: bool = True,
                leave_source_out: bool = False) -> list[QueryRun]:
    """Single-ranker lists and fused candidate pools for every query of ``qdf`` (no fusion applied yet).

    ``leave_source_out``: each query's relevant records are masked from every ranker and the pool
    (``exclude``), so every query becomes a novel one (its sources are kept in ``meta["masked"]``)."""
    encoded = encode_queries(bench, idx, qdf, progress)
    ids_of = idx.reader.ids_of
    runs: list[QueryRun] = []
    rows = qdf.select("query_id", "kind", "split", "relevant", "image", "prompt").to_dicts()
    with progress_bar("ranking queries", len(rows), enabled=progress) as advance:
        for q, r in zip(encoded, rows):
            relevant = frozenset(r["relevant"] or [])
            exclude = None
            if leave_source_out:  # relevant ids that are not live records (deleted, rejected) need no mask
                masked = idx.reader.rows_of(sorted(relevant))
                exclude = masked[masked >= 0]
            rankings, tops = {}, {}
            took_part = {name: idx.rankers[name].available(q) for name in main_rankers()}
            for name in main_rankers():
                rk = idx.rank(name, q, DEPTH, exclude=exclude)
                rankings[name] = [str(x) for x in ids_of(rk.rows)]
                tops[name] = float(rk.scores[0]) if len(rk) else math.nan
            pool = idx.pool(q, DEPTH, exclude=exclude)
            meta = {"image": bench.image_path(r["image"]), "prompt": r["prompt"]}
            if leave_source_out:
                meta["masked"] = sorted(relevant)
                relevant = frozenset()
            runs.append(QueryRun(
                r["query_id"], r["kind"], r["split"], relevant, rankings, tops, pool, ids_of(pool.rows), meta,
                took_part,
            ))
            advance(1)
    return runs


def fused_ranking(run: QueryRun, fusion: Fusion, k: int = DEPTH) -> tuple[list[str], float]:
    """The fused ranking of one query's pool (ids, best first) and its top score (NaN when empty)."""
    scores = fusion.scores(run.pool)
    if len(scores) == 0:
        return [], math.nan
    order = ranking_order(run.pool.rows, scores, k)
    return [str(run.pool_ids[i]) for i in order], float(scores[order[0]])


def all_rankings(
    runs: list[QueryRun], fusions: dict[str, Fusion]
) -> tuple[dict[str, dict[str, list[str]]], dict[str, dict[str, float]]]:
    """ranker -> query -> ids, and ranker -> query -> top score, for single rankers and each fusion."""
    rankings: dict[str, dict[str, list[str]]] = {n: {} for n in (*main_rankers(), *fusions)}
    tops: dict[str, dict[str, float]] = {n: {} for n in rankings}
    for r in runs:
        for n in main_rankers():
            rankings[n][r.query_id] = r.rankings[n]
            tops[n][r.query_id] = r.tops[n]
        for n, fus in fusions.items():
            rankings[n][r.query_id], tops[n][r.query_id] = fused_ranking(r, fus)
    return rankings, tops


# --------------------------------------------------------------------------------------------- metrics
def _qrels(runs: list[QueryRun]) -> dict[str, set[str]]:
    return {r.query_id: set(r.relevant) for r in runs if r.relevant}


def metric_table(runs: list[QueryRun], rankings: dict[str, dict[str, list[str]]], names: Sequence[str],
                 with_ci: bool = False) -> tuple[dict, dict]:
    qrels = _qrels(runs)
    values, cis = {}, {}
    for ranker, run in rankings.items():
        qids, mat = M.per_query(run, qrels, list(names))
        values[ranker] = {m: (float(mat[:, j].mean()) if len(qids) else None) for j, m in enumerate(names)}
        if with_ci:
            ci = M.bootstrap_ci(mat) if len(qids) else np.full((len(names), 2), np.nan)
            cis[ranker] = {m: [_num(ci[j, 0]), _num(ci[j, 1])] for j, m in enumerate(names)}
    return values, cis


def thresholds_from_tune(tune_runs: list[QueryRun], tops_tune: dict[str, dict[str, float]],
                         target_far: float) -> dict[str, float | None]:
    novel = [r.query_id for r in tune_runs if r.novel]
    if not novel:
        return {n: None for n in tops_tune}
    return {n: float(M.calibrate_threshold(np.array([t[q] for q in novel]), target_far)) for n, t in tops_tune.items()}


def detection(runs: list[QueryRun], rankings, tops, thresholds: dict[str, float | None]) -> dict:
    novel = [r for r in runs if r.novel]
    sourced = [r for r in runs if not r.novel]
    out = {}
    for n in tops:
        thr = thresholds.get(n)
        if thr is None:
            out[n] = {"threshold": None, "false_attribution_rate": None, "detection_rate": None,
                      "correct_detection_rate": None}
            continue
        nt = np.array([tops[n][r.query_id] for r in novel], np.float64)
        st = np.array([tops[n][r.query_id] for r in sourced], np.float64)
        ok = np.array([bool(rankings[n][r.query_id]) and rankings[n][r.query_id][0] in r.relevant for r in sourced],
                      bool)
        out[n] = {
            "threshold": _num(thr) if math.isfinite(thr) else None,
            "false_attribution_rate": _num(M.false_attribution_rate(nt, thr)) if len(nt) else None,
            "detection_rate": _num(M.detection_rate(st, thr)) if len(st) else None,
            "correct_detection_rate": _num(M.correct_detection_rate(st, ok, thr)) if len(st) else None,
        }
    return out


@dataclass
class Evaluation:
    result: dict  # the --json payload
    runs: list[QueryRun]  # the evaluated split
    rankings: dict[str, dict[str, list[str]]]
    tops: dict[str, dict[str, float]]
    thresholds: dict[str, float | None]
    fusions: dict[str, Fusion]


def evaluate(bench: Benchmark, idx: Index, split: str = "test", weights: Any = "auto",
             target_far: float = DEFAULT_TARGET_FAR, progress: bool = True,
             runs_by_split: dict[str, list[QueryRun]] | None = None, leave_source_out: bool = False) -> Evaluation:
    """Metrics for every single ranker, RRF and the fused ranker on one split (``all`` = both).

    Thresholds for "no source" come from the weights file when it has one (fused); every other ranker's
    threshold is calibrated on the ``tune`` split's novel queries at ``target_far``. ``leave_source_out``
    masks each query's sources (every query becomes novel) and reports the false-attribution rate overall
    and per kind under ``leave_source_out``."""
    fusion = idx.resolve_fusion(weights)
    rrf_fusion = idx.resolve_fusion("rrf")
    fusions = {"rrf": rrf_fusion, "fused": fusion}
    runs_by_split = dict(runs_by_split or {})
    needed = ["tune", "test"] if split == "all" else [split]
    if "tune" not in needed and bench.split("tune").filter(pl.col("relevant").list.len() == 0).height:
        needed.append("tune")  # thresholds are calibrated on tune
    if leave_source_out and "tune" not in needed:
        needed.append("tune")  # thresholds are calibrated on tune, whose queries are all novel now
    for s in needed:
        if s not in runs_by_split:
            runs_by_split[s] = run_queries(bench, idx, bench.split(s), progress, leave_source_out)
    runs = runs_by_split["tune"] + runs_by_split["test"] if split == "all" else runs_by_split[split]
    rankings, tops = all_rankings(runs, fusions)
    if "tune" in runs_by_split:
        _, tops_tune = all_rankings(runs_by_split["tune"], fusions)
        thresholds = thresholds_from_tune(runs_by_split["tune"], tops_tune, target_far)
    else:
        thresholds = {n: None for n in tops}
    if fusion.weights is not None and fusion.threshold is not None:
        thresholds["fused"] = fusion.threshold
    names = (*REPORT_METRICS, *EXTRA_METRICS)
    values, cis = metric_table(runs, rankings, names, with_ci=True)
    by_kind: dict[str, dict] = {}
    for kind in sorted({r.kind for r in runs}):
        kr = [r for r in runs if r.kind == kind]
        if any(not r.novel for r in kr):
            by_kind[kind], _ = metric_table(
                kr, {n: {r.query_id: v[r.query_id] for r in kr} for n, v in rankings.items()}, names)
        else:
            det = detection(kr, {n: {r.query_id: v[r.query_id] for r in kr} for n, v in rankings.items()},
                            {n: {r.query_id: v[r.query_id] for r in kr} for n, v in tops.items()}, thresholds)
            by_kind[kind] = {n: {"false_attribution_rate": d["false_attribution_rate"]} for n, d in det.items()}
    det = detection(runs, rankings, tops, thresholds)
    m = idx.models_info
    result = {
        "benchmark": str(bench.path),
        "split": split,
        "metrics": {n: {k: _num(v) for k, v in values[n].items()} for n in ranker_order()},
        "ci95": {n: cis[n] for n in ranker_order()},
        "by_kind": {k: {n: {mm: _num(v) for mm, v in d[n].items()} for n in ranker_order()}
                    for k, d in by_kind.items()},
        "novel": {
            "target_far": target_far,
            "calibrated_on": "tune",
            "n_novel": sum(r.novel for r in runs),
            "n_sourced": sum(not r.novel for r in runs),
            "rankers": {n: det[n] for n in ranker_order()},
        },
        "n_queries": len(runs),
        "n_queries_with_source": sum(not r.novel for r in runs),
        "models": {"profile": m.profile, "pretrained": m.pretrained, "fingerprint": m.fingerprint,
                   **({"warning": m.warning} if m.warning else {})},
        "fusion": {"rrf": rrf_fusion.describe(), "fused": fusion.describe()},
        "index": str(idx.path),
    }
    if split in ("tune", "all"):
        result["novel"]["note"] = "thresholds calibrated on the tune split are also evaluated on it: optimistic"
    if leave_source_out:
        masked = [r for r in runs if r.meta.get("masked")]
        result["leave_source_out"] = {
            "masked_queries": len(masked),
            "false_attribution_rate": {n: det[n]["false_attribution_rate"] for n in ranker_order()},
            "threshold": {n: det[n]["threshold"] for n in ranker_order()},
            "by_kind": {k: {n: d[n]["false_attribution_rate"] for n in ranker_order()} for k, d in by_kind.items()},
            "note": ("each query's relevant records are masked from every ranker: every query is novel. The fused "
                     "threshold comes from the weights; the other rankers' are calibrated on the tune split's "
                     f"(masked) queries at {target_far}"),
        }
    idle = [n for n in main_rankers() if not any(r.took_part.get(n, True) for r in runs)]
    if idle:  # e.g. a text-only corpus (no image ranker), or no query with a prompt (no BM25)
        _not_applicable(result, idle, "took part in no query of this split (no images in the index, or no "
                                      "query input of its kind)")
    return Evaluation(result, runs, rankings, tops, thresholds, fusions)


def _not_applicable(result: dict, rankers: Sequence[str], why: str) -> None:
    for n in rankers:
        result["metrics"][n] = {m: None for m in result["metrics"][n]}
        result["ci95"][n] = {m: [None, None] for m in result["ci95"][n]}
        for d in result["by_kind"].values():
            d[n] = {m: None for m in d[n]}
        result["novel"]["rankers"][n] = {m: None for m in result["novel"]["rankers"][n]}
    result["not_applicable"] = {n: why for n in rankers}


# --------------------------------------------------------------------------------------------- reports
def recall_curves(ev: Evaluation, max_k: int = 100) -> dict[str, np.ndarray]:
    qrels = _qrels(ev.runs)
    return {n: M.recall_curve(ev.rankings[n], qrels, max_k) for n in ranker_order()}


def plot_recall(ev: Evaluation, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = recall_curves(ev)
    ks = np.arange(1, 101)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    styles = {n: (RANKERS.get(n).style, "-") for n in main_rankers()} | FUSION_STYLES
    idle = ev.result.get("not_applicable", {})
    for n, c in curves.items():
        if n in idle:  # took part in no query: no curve, a note in the legend
            ax.plot([], [], color=styles[n][0], linestyle=":", label=f"{n} (took no part)")
            continue
        col, ls = styles[n]
        ax.plot(ks, c, label=f"{n} (R@1 {c[0]:.2f}, R@10 {c[9]:.2f})", color=col, linestyle=ls,
                linewidth=2.4 if n == "fused" else 1.6)
    ax.set_xscale("log")
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("mean recall@K")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    r = ev.result
    title = f"{Path(r['benchmark']).name} [{r['split']}], {r['n_queries_with_source']} queries with a source"
    if not r["models"]["pretrained"]:
        title += "\nUNTRAINED weights (profile %s): not meaningful attributions" % r["models"]["profile"]
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def hard_cases(ev: Evaluation, idx: Index, per_kind: int = 4) -> list[dict]:
    """Per kind: the worst misses of the fused ranker, and novel queries it falsely attributed."""
    thr = ev.thresholds.get("fused")
    shown: set[str] = set()

    def rec(i: str) -> dict:
        shown.add(i)
        return {"id": i}

    cases = []
    for kind in sorted({r.kind for r in ev.runs}):
        kr = [r for r in ev.runs if r.kind == kind]
        scored = []
        for r in kr:
            ranking = ev.rankings["fused"][r.query_id]
            top = ev.tops["fused"][r.query_id]
            if r.novel:
                if thr is not None and math.isfinite(top) and top >= thr:
                    scored.append((-top, r, "false attribution", None))
            else:
                first = next((i + 1 for i, x in enumerate(ranking) if x in r.relevant), None)
                if first != 1:
                    scored.append((-(first or 10_000), r, "miss", first))
        scored.sort(key=lambda t: t[0])
        for _, r, reason, first in scored[:per_kind]:
            ranking = ev.rankings["fused"][r.query_id][:5]
            sc = ev.fusions["fused"].scores(r.pool)
            score_of = {str(i): float(v) for i, v in zip(r.pool_ids, sc)}
            cases.append({
                "kind": kind, "query_id": r.query_id, "reason": reason, "image": r.meta.get("image"),
                "prompt": r.meta.get("prompt", ""), "expected": [rec(i) for i in sorted(r.relevant)][:4],
                "returned": [dict(rec(i), relevant=i in r.relevant, score=_num(score_of.get(i))) for i in ranking],
                "first_relevant_rank": first, "top_score": _num(ev.tops["fused"][r.query_id]),
                "threshold": None if thr is None or not math.isfinite(thr) else thr,
            })
    # fill in images and captions for every record shown
    ids = sorted(shown)
    if ids:
        meta = idx.reader.records(idx.reader.rows_of(ids))
        info = {i: {"image": im, "caption": cap} for i, im, cap in zip(meta["id"], meta["image"], meta["caption"])}
        for c in cases:
            for item in c["expected"] + c["returned"]:
                item.update(info.get(item["id"], {"image": None, "caption": ""}))
    return cases


def write_report(ev: Evaluation, idx: Index, folder: str | os.PathLike) -> dict[str, Path]:
    """Write bench.json, recall_at_k.png and hard_cases.html into ``folder`` (each atomically; an output path
    that cannot be written raises OutputError, see ``engine.files``)."""
    out = check_output_folder(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the report folder {out}: {e.strerror or e}") from None
    paths = {"json": out / "bench.json", "plot": out / "recall_at_k.png", "html": out / "hard_cases.html"}
    write_text_atomic(paths["json"], json.dumps(ev.result, indent=2) + "\n")
    plot_recall(ev, paths["plot"])
    from engine.report.html import write_hard_cases_report

    notes = [f"Fusion: {ev.result['fusion']['fused']['note']}",
             f"Split {ev.result['split']}: {ev.result['n_queries']} queries "
             f"({ev.result['novel']['n_novel']} without a source)."]
    write_hard_cases_report(hard_cases(ev, idx), paths["html"], f"Hardest cases: {Path(ev.result['benchmark']).name}",
                            idx.models_info.to_dict(), notes)
    return paths
