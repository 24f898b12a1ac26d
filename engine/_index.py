"""Querying an index: encode the query once, gather candidates from every ranker, compute every feature
for every candidate, fuse, and return the results with their evidence."""
from __future__ import annotations

import functools
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._errors import ModelMismatchError, QueryInputError
from ._images import DEFAULT_MAX_PIXELS, ImageLimits, ImageRejected, encoder_inputs, read_bytes
from ._manifest import UNTRAINED_BANNER
from ._reader import IndexReader
from ._settings import QuerySettings
from ._stores import cell_similarities
from ._threads import blas_single, single_threaded_blas
from .fusion import FusionWeights, ordinal_ranks, rrf
from .rankers import FEATURES, MAIN_RANKERS, POOL_RANKERS, RANKERS, QueryInput, Ranking, create_ranker

#: Rankers whose featurize() together gives every feature of FEATURES.
FEATURE_RANKERS = ("clip", "dino", "bm25")

DATA_DIR = Path(__file__).with_name("data")
JSON_SCHEMA_VERSION = 1


def shipped_weights() -> list[Path]:
    return sorted(DATA_DIR.glob("weights-*.json"))


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[FusionWeights, ...]:
    out = []
    for p in shipped_weights():
        try:
            w = FusionWeights.load(p, FEATURES)
        except Exception:  # noqa: BLE001 - a broken shipped file must not break queries
            continue
        w.name = f"shipped:{p.name}"
        out.append(w)
    return tuple(out)


def default_weights_for(fingerprint: str) -> FusionWeights | None:
    """The shipped weights learned for these exact models, if any (read once per process)."""
    return next((w for w in _shipped() if w.models.get("fingerprint") == fingerprint), None)


@dataclass
class Pool:
    """One query's fused candidate pool: every feature for every candidate."""

    rows: np.ndarray  # int64 record rows
    feats: dict[str, np.ndarray]  # feature -> values (NaN = does not apply)
    ranker_scores: dict[str, np.ndarray]  # ranker -> its own score of each candidate (NaN = not ranked)
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Fusion:
    """How candidates are fused: ``weights`` (learned) or RRF when ``weights`` is None."""

    weights: FusionWeights | None
    rrf_k: int = 60
    note: str = ""

    @property
    def method(self) -> str:
        return "weighted" if self.weights is not None else "rrf"

    @property
    def threshold(self) -> float | None:
        return self.weights.threshold if self.weights is not None else None

    def scores(self, pool: "Pool") -> np.ndarray:
        """Fused score of each candidate of one pool (the one implementation queries and benchmarks share)."""
        if len(pool) == 0:
            return np.zeros(0)
        if self.weights is None:
            return rrf(pool.ranker_scores, self.rrf_k)
        return self.weights.score(pool.feats, FEATURES)

    def describe(self) -> dict:
        d: dict[str, Any] = {"method": self.method, "threshold": _clean(self.threshold), "note": self.note}
        if self.weights is not None:
            d["weights"] = self.weights.name
            p = self.weights.provenance
            gen = p.get("benchmark_generator")
            d["learned_on"] = (f"{gen['generator']} v{gen['version']} (train {gen['train']}, queries {gen['queries']}, "
                               f"seed {gen['seed']})" if gen else p.get("benchmark"))
        else:
            d["rrf_k"] = self.rrf_k
            d["rankers"] = list(MAIN_RANKERS)
        return d


@dataclass
class Attribution:
    """The answer to one query."""

    query: dict
    models: dict
    fusion: dict
    verdict: dict
    results: list[dict]
    timings_ms: dict
    warnings: list[str]
    query_input: QueryInput | None = field(default=None, repr=False)  # the encoded query (reports use it)
    pool_rows: np.ndarray | None = field(default=None, repr=False)  # the candidate pool (report baselines)

    def to_dict(self) -> dict:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "query": self.query,
            "models": self.models,
            "fusion": self.fusion,
            "verdict": self.verdict,
            "results": self.results,
            "timings_ms": self.timings_ms,
            "warnings": self.warnings,
        }


def fused_order(rows: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best candidates: score descending, ties by record row (everywhere the same rule)."""
    if len(rows) == 0:
        return np.zeros(0, np.int64)
    return np.lexsort((rows, -scores))[:k]


def _clean(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 6)


class Index:
    """An opened index. Models load once, on the first query that needs them; then query many times."""

    def __init__(self, path: str | os.PathLike, *, models: str | None = None, device: str | None = None,
                 clip_weights: str | None = None, dino_weights: str | None = None,
                 settings: QuerySettings | None = None) -> None:
        self.settings = settings or QuerySettings()
        self.reader = IndexReader(path, nprobe=self.settings.nprobe)
        self.path = self.reader.path
        self.manifest = self.reader.manifest
        built_with = self.manifest["models"]["profile"]
        if models is not None and models != built_with:
            raise ModelMismatchError(
                f"index {self.path} was built with models {built_with!r}; the query asked for {models!r}. Query with "
                f"--models {built_with} (or leave --models out), or rebuild the index with --models {models}"
            )
        self._device, self._clip_w, self._dino_w = device, clip_weights, dino_weights
        self._encoders = None
        self.rankers = {name: create_ranker(name, self.reader, self.settings) for name in RANKERS}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attrib-query")

    def close(self) -> None:
        """Stop the helper thread and close open files (also done at exit)."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self.reader.patches.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ models
    @property
    def fingerprint(self) -> str:
        return self.reader.fingerprint

    @property
    def untrained(self) -> bool:
        return self.reader.untrained

    @property
    def models_info(self) -> dict:
        m = self.manifest["models"]
        out = {"profile": m["profile"], "pretrained": bool(m.get("pretrained")), "fingerprint": m["fingerprint"],
               "clip": f"{m['clip']['arch']} ({m['clip'].get('weights_tag') or 'random init'})",
               "dino": f"{m['dino']['arch']} ({m['dino'].get('weights_tag') or 'random init'})"}
        if self.untrained:
            out["warning"] = UNTRAINED_BANNER.format(profile=m["profile"])
        return out

    def use_encoders(self, encoders) -> None:
        """Use already-loaded encoders (checked against the index), e.g. to share them between indexes."""
        ident = encoders.identity
        if ident["fingerprint"] != self.fingerprint:
            theirs = self.manifest["models"]
            raise ModelMismatchError(
                f"the query models ({ident['profile']}, fingerprint {ident['fingerprint']}) differ from the models "
                f"index {self.path} was built with ({theirs['profile']}, fingerprint {theirs['fingerprint']}): "
                f"{_identity_diff(ident, theirs)}. Query with the same weights, or rebuild the index."
            )
        self._encoders = encoders

    @property
    def encoders(self):
        if self._encoders is None:
            from ._encoders import Encoders

            enc = Encoders(self.manifest["models"]["profile"], device=self._device,
                           clip_weights=self._clip_w, dino_weights=self._dino_w)
            self.use_encoders(enc)
        return self._encoders

    # ------------------------------------------------------------------------------------------ encoding
    def _query_inputs(self, image) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        """(reference, encoder inputs), prepared exactly as the index prepared its images."""
        from PIL import Image

        limits = ImageLimits(int(self.manifest["settings"].get("max_pixels", DEFAULT_MAX_PIXELS)))
        enc = self._encoders
        if isinstance(image, Image.Image):
            ref, source = "<PIL image>", image
        else:
            ref = os.fspath(image)
            if not os.path.exists(ref):
                raise QueryInputError(f"query image {ref} does not exist")
            source = None
        try:
            if source is None:
                source = read_bytes(ref, limits)
            return ref, encoder_inputs(source, limits, enc.clip_input, enc.dino_input)
        except ImageRejected as e:
            raise QueryInputError(f"query image {ref} cannot be used: {e.reason} ({e.detail})") from None

    def encode_queries(self, images: Sequence[Any | None], prompts: Sequence[str | None],
                       query_ids: Sequence[str] | None = None, timings: dict | None = None) -> list[QueryInput]:
        """Encode several queries in batches (images and prompts may be None)."""
        n = len(images)
        qids = list(query_ids) if query_ids is not None else [f"q{i}" for i in range(n)]
        out = [QueryInput(query_id=qids[i], prompt=(prompts[i] or "")) for i in range(n)]
        timings = timings if timings is not None else {}
        img_idx = [i for i in range(n) if images[i] is not None]
        txt_idx = [i for i in range(n) if out[i].prompt.strip()]
        if (img_idx or txt_idx) and self._encoders is None:
            t = time.perf_counter()
            _ = self.encoders
            timings["load_models"] = timings.get("load_models", 0.0) + (time.perf_counter() - t) * 1e3
        enc = self._encoders
        proj, grid = self.reader.projection, self.reader.grid
        bs = int(self.manifest["settings"].get("batch_size", 32))
        for s in range(0, len(img_idx), bs):
            chunk = img_idx[s:s + bs]
            clip_u8, dino_u8 = [], []
            for i in chunk:
                ref, (cu8, du8) = self._query_inputs(images[i])
                out[i].image = ref
                clip_u8.append(cu8)
                dino_u8.append(du8)
            t = time.perf_counter()
            clip = enc.encode_clip_images(np.stack(clip_u8))
            t1 = time.perf_counter()
            cls, pmean, cells = enc.encode_dino_images(np.stack(dino_u8), grid)
            t2 = time.perf_counter()
            timings["encode_clip_image"] = timings.get("encode_clip_image", 0.0) + (t1 - t) * 1e3
            timings["encode_dino"] = timings.get("encode_dino", 0.0) + (t2 - t1) * 1e3
            with single_threaded_blas():
                g = proj.global_desc(cls, pmean)
                c = proj.project_cells(cells)
            for j, i in enumerate(chunk):
                out[i].clip_image, out[i].dino_global, out[i].dino_cells = clip[j], g[j], c[j]
        for s in range(0, len(txt_idx), bs):
            chunk = txt_idx[s:s + bs]
            t = time.perf_counter()
            emb = enc.encode_texts([out[i].prompt for i in chunk])
            timings["encode_clip_text"] = timings.get("encode_clip_text", 0.0) + (time.perf_counter() - t) * 1e3
            for j, i in enumerate(chunk):
                out[i].clip_text = emb[j]
        for q in out:
            q.terms = self.reader.text.terms(q.prompt)
        return out

    def encode_query(self, image=None, prompt: str | None = None, query_id: str = "q",
                     timings: dict | None = None) -> QueryInput:
        return self.encode_queries([image], [prompt], [query_id], timings)[0]

    # ------------------------------------------------------------------------------------------ ranking
    @blas_single
    def rank(self, ranker: str, q: QueryInput, k: int) -> Ranking:
        """One ranker on its own."""
        if ranker not in self.rankers:
            RANKERS.get(ranker)  # raises with the valid names
        return self.rankers[ranker].search(q, k)

    @blas_single
    def pool(self, q: QueryInput, depth: int | None = None) -> Pool:
        """Union of every available ranker's top ``depth`` candidates, with every feature for every one."""
        depth = depth or self.settings.depth
        t = time.perf_counter()
        parts: list[np.ndarray] = []
        dense: dict[str, list[np.ndarray]] = {}
        pending: list[Future] = []

        def later(fn, *args) -> Future:
            fut = self._worker.submit(fn, *args)
            pending.append(fut)
            return fut

        try:
            # Rankers without a vector first stage (BM25: tantivy releases the GIL) run on a helper thread while
            # the faiss searches and, below, the patch features run here: on 2 cores this saves ~30% of a search.
            side = []
            for name in POOL_RANKERS:
                r = self.rankers[name]
                if not r.available(q):
                    continue
                dq = r.dense_query(q)
                if dq is None:
                    side.append(later(r.candidates, q, depth))
                elif not any(np.array_equal(dq[1], v) for v in dense.get(dq[0], [])):
                    dense.setdefault(dq[0], []).append(dq[1])
            for store_name, vecs in dense.items():
                store = getattr(self.reader, store_name)
                if store.ntotal:
                    _, slots = store.search(np.stack(vecs), depth)  # one batched faiss call per store
                    parts.append(self.reader.slots_to_rows(slots[slots >= 0]))
            parts += [f.result() for f in side]
            rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            t1 = time.perf_counter()
            feats: dict[str, np.ndarray] = {}
            background = [later(self.rankers[n].featurize, q, rows)
                          for n in FEATURE_RANKERS if self.rankers[n].dense_query(q) is None]
            for name in FEATURE_RANKERS:
                if self.rankers[name].dense_query(q) is not None:
                    feats.update(self.rankers[name].featurize(q, rows))
            for f in background:
                feats.update(f.result())
        finally:
            # never leave work of this query queued ahead of the next one (after an error or Ctrl-C above)
            for f in pending:
                f.cancel()
            wait(pending)
        t2 = time.perf_counter()
        scores = {}
        for name in MAIN_RANKERS:
            r = self.rankers[name]
            scores[name] = r.combine(feats) if r.available(q) else np.full(len(rows), np.nan, np.float32)
        return Pool(rows, feats, scores, {"candidates": (t1 - t) * 1e3, "features": (t2 - t1) * 1e3})

    def resolve_fusion(self, weights: Any = "auto") -> Fusion:
        """``"auto"``: the shipped weights learned for this index's models, else RRF; ``"rrf"``/None: RRF;
        a path or :class:`FusionWeights`: those weights (refused if learned for other models)."""
        k = self.settings.rrf_k
        if weights is None or weights == "rrf":
            return Fusion(None, k, "reciprocal rank fusion (k=%d) of clip, dino and bm25" % k)
        if isinstance(weights, str) and weights == "auto":
            w = default_weights_for(self.fingerprint)
            if w is None:
                return Fusion(None, k, "no learned weights match these models: reciprocal rank fusion (k=%d)" % k)
            return Fusion(w, k, f"learned weights shipped with attrib ({w.name}), not plain RRF")
        w = weights if isinstance(weights, FusionWeights) else FusionWeights.load(weights, FEATURES)
        w.check_models(self.fingerprint, f"index {self.path}")
        return Fusion(w, k, f"learned weights from {w.name}")

    # ------------------------------------------------------------------------------------------ answers
    @blas_single
    def search(self, q: QueryInput, k: int = 10, weights: Any = "auto", fusion: Fusion | None = None,
               timings: dict | None = None) -> Attribution:
        """Rank the index for an encoded query (the search-only path; see :meth:`query`)."""
        t0 = time.perf_counter()
        timings = dict(timings or {})
        fusion = fusion or self.resolve_fusion(weights)
        pool = self.pool(q, max(self.settings.depth, k))
        timings.update(pool.timings)
        t = time.perf_counter()
        fused = fusion.scores(pool)
        order = fused_order(pool.rows, fused, k)
        ranks = {n: ordinal_ranks(s) for n, s in pool.ranker_scores.items()}
        timings["fusion"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        meta = self.reader.records(pool.rows[order]) if len(order) else None
        timings["metadata"] = (time.perf_counter() - t) * 1e3
        thr = fusion.threshold
        results = []
        for pos, i in enumerate(order):
            results.append({
                "rank": pos + 1,
                "row": int(pool.rows[i]),
                "id": meta["id"][pos],
                "image": meta["image"][pos],
                "caption": meta["caption"][pos],
                "score": _clean(fused[i]),
                "above_threshold": None if thr is None else bool(fused[i] >= thr),
                "evidence": {f: _clean(pool.feats[f][i]) for f in FEATURES},
                "ranks": {n: (int(ranks[n][i]) or None) for n in MAIN_RANKERS},
            })
        verdict = self._verdict(results, fusion)
        timings["search_total"] = (time.perf_counter() - t0) * 1e3
        warnings = []
        if self.untrained:
            warnings.append(UNTRAINED_BANNER.format(profile=self.manifest["models"]["profile"]))
        if thr is None:
            warnings.append("no calibrated threshold for this fusion: results are ranked but no verdict is given")
        return Attribution(
            query={"image": q.image, "prompt": q.prompt},
            models=self.models_info, fusion=fusion.describe(), verdict=verdict, results=results,
            timings_ms={k2: round(v, 3) for k2, v in timings.items()}, warnings=warnings, query_input=q,
            pool_rows=pool.rows,
        )

    @staticmethod
    def _verdict(results: list[dict], fusion: Fusion) -> dict:
        thr = fusion.threshold
        if thr is None:
            return {"likely_source": None, "threshold": None, "n_above": None,
                    "label": "No calibrated threshold: ranked candidates only"}
        above = [r for r in results if r["above_threshold"]]
        if above and fusion.weights is not None and fusion.weights.method == "logistic":
            p = 1.0 / (1.0 + np.exp(-np.asarray([r["score"] for r in above], np.float64)))
            shares = p / p.sum()
            for r, s in zip(above, shares):
                r["share"] = round(float(s), 4)
        elif above:
            for r in above:
                r["share"] = round(1.0 / len(above), 4)
        return {
            "likely_source": bool(above),
            "threshold": _clean(thr),
            "n_above": len(above),
            "label": "Likely sources found" if above else "No likely source in this index",
            "share_note": "attribution shares are similarity-based estimates normalised over the results above the "
                          "threshold, not causal claims",
        }

    @blas_single
    def correspondences(self, q: QueryInput, rows: Sequence[int], baseline_rows: Sequence[int] | None = None,
                        n_matches: int = 12) -> list[Correspondence | None]:
        """Patch correspondences between the query and each record of ``rows`` (None for records without an
        image, or when the query has no image). ``baseline_rows`` (default: the query's candidate pool) say
        what "ordinary" similarity is, so that only evidence specific to a record lights up."""
        grid = self.reader.grid
        if q.dino_cells is None:
            return [None] * len(rows)
        if baseline_rows is None:
            baseline_rows = self.pool(q).rows
        base_rows = np.asarray(list(baseline_rows), np.int64)
        base_slots = self.reader.rows_to_slots(base_rows) if len(base_rows) else np.zeros(0, np.int64)
        keep = base_slots >= 0
        base_rows, base_slots = base_rows[keep], base_slots[keep]
        qc = q.dino_cells.astype(np.float32)
        if len(base_slots):
            base_best = cell_similarities(qc, self.reader.patches.get(base_slots)).max(axis=1)
        else:
            base_best = np.zeros((0, qc.shape[0]), np.float32)
        out: list[Correspondence | None] = []
        for row in rows:
            slot = int(self.reader.rows_to_slots(np.asarray([row]))[0])
            if slot < 0:
                out.append(None)
                continue
            sc = self.reader.patches.get(np.asarray([slot]))[0]
            sims = qc @ sc.T  # (Cq, Cs)
            others = base_best[base_rows != row]
            baseline = np.median(others, axis=0) if len(others) else np.zeros(qc.shape[0], np.float32)
            excess = sims - baseline[:, None]
            q_heat = np.clip(excess.max(axis=1), 0, None)
            s_heat = np.clip(excess.max(axis=0), 0, None)
            qi = np.arange(sims.shape[0])
            sj = excess.argmax(axis=1)
            mutual = excess.argmax(axis=0)[sj] == qi
            cand = [(int(i), int(sj[i]), float(excess[i, sj[i]])) for i in qi[mutual] if excess[i, sj[i]] > 0]
            cand.sort(key=lambda t: -t[2])
            out.append(Correspondence(int(row), grid, q_heat.reshape(grid, grid), s_heat.reshape(grid, grid),
                                      sims.max(axis=1).reshape(grid, grid), cand[:n_matches]))
        return out

    def write_report(self, result: Attribution, out_path: str | os.PathLike, query_image: Any = None) -> Path:
        """Write the self-contained HTML report of a query result (see ``attrib query --html``)."""
        from ._report_html import write_query_report

        return write_query_report(self, result, out_path, query_image=query_image)

    def query(self, image=None, prompt: str | None = None, k: int = 10, weights: Any = "auto") -> Attribution:
        """Attribute one generated image and/or prompt. Either side may be missing (its rankers take no part)."""
        if image is None and not (prompt or "").strip():
            raise QueryInputError("a query needs an image, a prompt, or both")
        if k < 1:
            raise QueryInputError(f"k must be at least 1 (got {k})")
        fusion = self.resolve_fusion(weights)  # refuse a bad weights file before the slow part
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        q = self.encode_query(image, prompt, timings=timings)
        res = self.search(q, k, fusion=fusion, timings=timings)
        res.timings_ms["total"] = round((time.perf_counter() - t0) * 1e3, 3)
        return res


@dataclass
class Correspondence:
    """Where one indexed record matches the query, on the pooled DINOv2 patch grid (row-major cells).

    ``query_heat[i]`` is how much better this record explains query cell i than the other candidates do
    (best cosine to any of its cells minus the median best cosine over the baseline candidates, floored at
    0); ``source_heat[j]`` is the same evidence seen from the record's cell j. A copied object or texture
    lights up where it sits in both images; shared plain backgrounds do not (every candidate has them).
    """

    row: int
    grid: int
    query_heat: np.ndarray  # (grid, grid)
    source_heat: np.ndarray  # (grid, grid)
    query_best: np.ndarray  # (grid, grid) best raw cosine of each query cell to this record's cells
    matches: list[tuple[int, int, float]]  # (query cell, record cell, heat) for the strongest mutual matches


def _identity_diff(a: dict, b: dict) -> str:
    diffs = []
    for side in ("clip", "dino"):
        for key in ("arch", "weights_tag", "weights_sha256", "dim"):
            if a.get(side, {}).get(key) != b.get(side, {}).get(key):
                diffs.append(f"{side} {key} {a.get(side, {}).get(key)!r} vs {b.get(side, {}).get(key)!r}")
    return "; ".join(diffs) or "input handling differs"


def open_index(path: str | os.PathLike, **kwargs) -> Index:
    """Open an index folder for querying (see :class:`Index`)."""
    return Index(path, **kwargs)
