"""The index's stores: faiss vectors, the DINO patch store, the tantivy caption index and the PCA/centering
state that turns raw DINOv2 tokens into stored features. numpy / faiss / tantivy only (no torch)."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import tantivy

from .text import DEFAULT_CHAIN, Analyzer, TextChain, get_chain

# --------------------------------------------------------------------------------------------- vectors
FLAT, IVF = "flat", "ivf"


def l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    n = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(n, 1e-12)


class RawVectorSink:
    """Append-only float32 rows on disk; the faiss structure is built from it once encoding ends."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim, self.n = path, dim, 0
        self._f = open(path, "wb")

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        assert x.ndim == 2 and x.shape[1] == self.dim  # internal invariant, not input validation
        self._f.write(x.tobytes())
        self.n += x.shape[0]

    def abort(self) -> None:
        self._f.close()

    def close(self) -> np.memmap:
        self._f.close()
        return (np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.n, self.dim)) if self.n
                else np.zeros((0, self.dim), np.float32))


IVF_MIN_VECTORS = 1000  # below this an IVF index cannot be trained sensibly: a flat scan is used


def choose_ann(kind: str, n: int, flat_max: int) -> str:
    if kind not in ("auto", FLAT, IVF):
        raise ValueError(f"unknown ann kind {kind!r}; valid choices: auto, flat, ivf")
    if n < IVF_MIN_VECTORS:
        return FLAT
    if kind == "auto":
        return FLAT if n <= flat_max else IVF
    return kind


def build_faiss(vectors: np.ndarray, path: Path, kind: str, nlist: int | None = None, chunk: int = 65536) -> dict:
    """Write a faiss inner-product index of (already L2-normalised) vectors. Returns its settings.

    ``flat`` is an exhaustive scan over fp16 codes (exact up to fp16 rounding, half the bytes of fp32, and
    faster because the scan is memory-bound). ``ivf`` partitions the space (nlist ~ 2 sqrt(n), nprobe ~
    nlist/32, i.e. about 3% of the vectors scanned per query) and is memory-mapped at query time, for corpora
    too large to scan or to hold in RAM.
    """
    n, d = vectors.shape
    sq = faiss.ScalarQuantizer.QT_fp16
    if kind == FLAT:
        index = faiss.IndexScalarQuantizer(d, sq, faiss.METRIC_INNER_PRODUCT)
        info = {"kind": FLAT}
    else:
        nlist = nlist or max(1, min(65536, int(2 * math.sqrt(max(n, 1)))))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, sq, faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # codes are the fp16 vectors themselves: same scores as the flat store
        rng = np.random.default_rng(0)
        sample = vectors[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))] if n else vectors
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        info = {"kind": IVF, "nlist": nlist, "nprobe": min(nlist, max(8, nlist // 32))}
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(vectors[s:s + chunk], dtype=np.float32))
    if kind == IVF:
        index.make_direct_map()  # lets candidates be re-scored exactly by slot
    faiss.write_index(index, str(path))
    return info


class VectorStore:
    """A faiss index opened for search plus exact re-scoring of arbitrary slots."""

    def __init__(self, path: Path, info: dict) -> None:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if info.get("kind") == IVF else 0
        self.index = faiss.read_index(str(path), flags)
        if info.get("kind") == IVF:
            faiss.extract_index_ivf(self.index).nprobe = int(info.get("nprobe", 16))
        self.ntotal = int(self.index.ntotal)
        self.dim = int(self.index.d)

    def search(self, q: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, slots) for each query row; slots are -1 where fewer than k exist. ``exclude``: slots that
        must not come back (deleted or masked records), skipped inside faiss, so k results still come back."""
        q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
        k = max(1, min(k, self.ntotal))
        if self.ntotal == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if exclude is None or len(exclude) == 0:
            return self.index.search(q, k)
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64)))
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)
        else:
            params = faiss.SearchParameters(sel=sel)
        return self.index.search(q, k, params=params)

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(slots)


# --------------------------------------------------------------------------------------------- DINO features
@dataclass
class DinoProjection:
    """Corpus statistics that turn raw DINOv2 tokens into stored features.

    * global descriptor = [CLS - mean_cls, patch-mean - mean_pm], each part scaled by its corpus RMS norm,
      then L2-normalised. Centring removes the component every image shares (with random weights the CLS
      token is almost constant, see DESIGN.md); the RMS scaling keeps one part from swamping the other.
    * patch cells = PCA (fitted on corpus cells, centred) to ``dims`` dims, L2-normalised, stored as fp16.
    """

    cls_mean: np.ndarray  # (D,)
    cls_scale: float
    pm_mean: np.ndarray  # (D,)
    pm_scale: float
    cell_mean: np.ndarray  # (D,)
    components: np.ndarray  # (D, dims) orthonormal columns

    @property
    def cell_dim(self) -> int:
        return self.components.shape[1]

    @classmethod
    def identity(cls, d: int, dims: int) -> "DinoProjection":
        """No statistics to fit (a caption-only corpus): no centring, unit scales, the first ``dims`` axes."""
        z = np.zeros(d, np.float32)
        return cls(z, 1.0, z.copy(), 1.0, z.copy(), np.eye(d, dtype=np.float32)[:, :min(dims, d)])

    @classmethod
    def fit(cls, cls_tok: np.ndarray, pmean: np.ndarray, cells: np.ndarray, dims: int) -> "DinoProjection":
        cls_tok, pmean = cls_tok.astype(np.float64), pmean.astype(np.float64)
        flat = cells.reshape(-1, cells.shape[-1]).astype(np.float64)
        cm, pm, cellm = cls_tok.mean(0), pmean.mean(0), flat.mean(0)
        cs = float(np.sqrt(((cls_tok - cm) ** 2).sum(1).mean())) or 1.0
        ps = float(np.sqrt(((pmean - pm) ** 2).sum(1).mean())) or 1.0
        d = flat.shape[1]
        dims = min(dims, d)
        if dims >= d:
            comps = np.eye(d)
        elif flat.shape[0] < dims:  # fewer sample cells than dims: PCA is undetermined, keep the first axes
            comps = np.eye(d)[:, :dims]
        else:
            _, _, vt = np.linalg.svd(flat - cellm, full_matrices=False)
            comps = vt[:dims].T
            # Fix the sign of each component so that fitting is deterministic across BLAS builds.
            comps *= np.sign(comps[np.abs(comps).argmax(0), np.arange(dims)])
        return cls(cm.astype(np.float32), cs, pm.astype(np.float32), ps, cellm.astype(np.float32),
                   comps.astype(np.float32))

    def global_desc(self, cls_tok: np.ndarray, pmean: np.ndarray) -> np.ndarray:
        g = np.concatenate([(cls_tok - self.cls_mean) / self.cls_scale, (pmean - self.pm_mean) / self.pm_scale],
                           axis=-1)
        return l2n(g).astype(np.float32)

    def project_cells(self, cells: np.ndarray) -> np.ndarray:
        return l2n((cells - self.cell_mean) @ self.components).astype(np.float32)

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, cls_mean=self.cls_mean, cls_scale=np.float32(self.cls_scale), pm_mean=self.pm_mean,
                     pm_scale=np.float32(self.pm_scale), cell_mean=self.cell_mean, components=self.components)

    @classmethod
    def load(cls, path: Path) -> "DinoProjection":
        with np.load(path) as z:
            return cls(z["cls_mean"], float(z["cls_scale"]), z["pm_mean"], float(z["pm_scale"]), z["cell_mean"],
                       z["components"])


class PatchStore:
    """(n_images, cells, dims) float16 patch features in one flat file, read by slot.

    Reads use one positioned read (``os.preadv``) per record: with scattered slots in a large file this costs
    about 1 ms for 400 records, where touching fresh pages of a memory map costs 6 ms in page faults. Where
    ``preadv`` does not exist (Windows) the file is memory-mapped instead."""

    def __init__(self, path: Path, n: int, cells: int, dims: int) -> None:
        self.shape = (n, cells, dims)
        self.path = path
        self._rec = cells * dims * 2
        self._fd: int | None = None
        self._map = None
        if n and not hasattr(os, "preadv"):
            self._map = np.memmap(path, dtype=np.float16, mode="r", shape=self.shape)
        # faiss's fp16 decoder is SIMD (F16C): ~3x faster than numpy's float16 -> float32 cast
        self._fp16 = faiss.ScalarQuantizer(dims, faiss.ScalarQuantizer.QT_fp16)

    def _read(self, slots: np.ndarray) -> np.ndarray:
        if self._map is not None:
            return np.ascontiguousarray(self._map[slots])
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        buf = bytearray(len(slots) * self._rec)
        view = memoryview(buf)
        rec = self._rec
        for i, s in enumerate(slots.tolist()):
            if os.preadv(self._fd, [view[i * rec:(i + 1) * rec]], s * rec) != rec:
                raise OSError(f"{self.path} is shorter than its manifest says (slot {s}); rebuild the index")
        return np.frombuffer(buf, np.float16).reshape((len(slots),) + self.shape[1:])

    def get(self, slots: np.ndarray) -> np.ndarray:
        """float32 (len(slots), cells, dims) copies of the given images' cells."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.size == 0:
            return np.zeros((0,) + self.shape[1:], np.float32)
        half = self._read(slots)
        return self._fp16.decode(half.view(np.uint8).reshape(-1, 2 * self.shape[2])).reshape(half.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def cell_similarities(q_cells: np.ndarray, c_cells: np.ndarray) -> np.ndarray:
    """(n, Cc, Cq) cosines between n candidates' cells (n, Cc, d) and one query's cells (Cq, d): one BLAS call.
    Note the order: candidate cell first, query cell last."""
    n, cc, d = c_cells.shape
    return (c_cells.reshape(n * cc, d) @ q_cells.T.astype(np.float32)).reshape(n, cc, -1)


@functools.lru_cache(maxsize=8)
def _layout_index(grid: int) -> np.ndarray:
    """(C, 9) flat indices into a row of (Cc * Cq) similarities: candidate cell dst in the 3x3 neighbourhood of
    query cell src, as dst * C + src. Out-of-grid neighbours repeat the cell itself, which is in every
    neighbourhood anyway, so the max over the 9 is unchanged."""
    C = grid * grid
    idx = np.arange(C)
    r, c = idx // grid, idx % grid
    cols = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            rr, cc = r + dr, c + dc
            ok = (rr >= 0) & (rr < grid) & (cc >= 0) & (cc < grid)
            cols.append(np.where(ok, rr * grid + cc, idx) * C + idx)
    return np.stack(cols, axis=1)


def patch_scores(q_cells: np.ndarray, c_cells: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Local and layout agreement between one query's cells (C, d) and candidates' cells (n, C, d).

    Returns (chamfer, layout):
    * chamfer: mean over query cells of the best cosine to any candidate cell (MaxSim): copied parts and
      textures score high wherever they sit.
    * layout: mean over cells of the cosine between the cells at the same grid position, with a tolerance of
      one cell (max over the 3x3 neighbourhood, so a small shift or crop is forgiven): composition and pose.
    """
    if c_cells.shape[0] == 0:
        z = np.zeros(0, np.float32)
        return z, z
    sims = cell_similarities(q_cells, c_cells)  # (n, Cc, Cq)
    n, C, _ = sims.shape
    chamfer = sims.max(axis=1).mean(axis=1)
    layout = sims.reshape(n, C * C)[:, _layout_index(grid)].max(axis=2).mean(axis=1)  # (n, C, 9): best neighbour
    return chamfer.astype(np.float32), layout.astype(np.float32)


# --------------------------------------------------------------------------------------------- captions
TEXT_FIELD, ROW_FIELD = "caption", "row"
ANALYZER_DESC = DEFAULT_CHAIN  # the analysis chain new indexes use; the manifest's "text" entry records its name
MAX_QUERY_TERMS = 256


def make_analyzer(chain: str | None = None) -> "tantivy.TextAnalyzer":
    """The tantivy analyzer of an analysis chain (``engine.text.CHAINS``; default: the chain new indexes use)."""
    return get_chain(chain).build()


def _schema(chain: TextChain) -> "tantivy.Schema":
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field(ROW_FIELD, stored=False, indexed=True, fast=True)
    sb.add_text_field(TEXT_FIELD, stored=False, tokenizer_name=chain.registered_as, index_option="freq")
    return sb.build()


class TextSink:
    def __init__(self, path: Path, heap_bytes: int = 64_000_000, chain: str | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.chain = get_chain(chain)
        self.index = tantivy.Index(_schema(self.chain), path=str(path))
        self.index.register_tokenizer(self.chain.registered_as, self.chain.build())
        self.writer = self.index.writer(heap_size=heap_bytes, num_threads=1)
        self.n = 0

    def add(self, row: int, caption: str) -> None:
        doc = tantivy.Document()
        doc.add_integer(ROW_FIELD, int(row))
        doc.add_text(TEXT_FIELD, caption or "")
        self.writer.add_document(doc)
        self.n += 1

    def close(self) -> None:
        self.writer.commit()
        self.writer.wait_merging_threads()

    def abort(self) -> None:
        """Drop what was added and stop the writer's threads (a failed build)."""
        self.writer.rollback()
        self.writer.wait_merging_threads()


class TextStore:
    """BM25 over captions. The prompt is analysed into terms and the query built from them, never parsed:
    quotes, parentheses, ``field:``, AND/OR, ``~ ^ *`` are just characters, and cannot change the meaning.
    ``chain``: the analysis chain the index was built with (its manifest says which)."""

    def __init__(self, path: Path, chain: str | None = None) -> None:
        self.index = tantivy.Index.open(str(path))
        self.analysis = Analyzer(chain)  # the chain's analyzer plus prompt/caption helpers (engine.text)
        self.analyzer = self.analysis.analyzer
        self.index.register_tokenizer(self.analysis.chain.registered_as, self.analyzer)
        self.schema = self.index.schema
        self.searcher = self.index.searcher()

    def terms(self, prompt: str | None) -> list[str]:
        """Distinct analysed terms of the prompt (none when it is empty or only stop words)."""
        return self.analysis.terms(prompt, MAX_QUERY_TERMS)

    def _terms_query(self, terms: list[str], fuzzy: dict[str, float] | None = None):
        """Should(every term). Stop-word terms only add to the score of captions that share a content term
        (or a ``fuzzy`` match) with the prompt: a caption sharing only "a" and "on" is no BM25 match."""
        def should(ts: list[str]) -> list:
            return [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, TEXT_FIELD, t)) for t in ts]

        stop = self.analysis.stop_terms
        content = should([t for t in terms if t not in stop]) + [(tantivy.Occur.Should, tantivy.Query.boost_query(
            tantivy.Query.fuzzy_term_query(self.schema, TEXT_FIELD, t, distance=1, transposition_cost_one=True), b))
            for t, b in (fuzzy or {}).items()]
        stops = should([t for t in terms if t in stop])
        if not content or not stops:
            return tantivy.Query.boolean_query(content + stops)
        return tantivy.Query.boolean_query([(tantivy.Occur.Must, tantivy.Query.boolean_query(content)),
                                            (tantivy.Occur.Should, tantivy.Query.boolean_query(stops))])

    def doc_freq(self, term: str) -> int:
        return int(self.searcher.doc_freq(TEXT_FIELD, term))

    def _collect(self, result) -> tuple[np.ndarray, np.ndarray]:
        hits = result.hits
        if not hits:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows = self.searcher.fast_field_values(ROW_FIELD, [a for _, a in hits])
        return np.asarray(rows, np.int64), np.asarray([s for s, _ in hits], np.float32)

    def search(self, terms: list[str], k: int, fuzzy: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, bm25 scores), best first; empty when there are no terms. ``fuzzy``: term -> boost of terms
        also matched within one edit (a constant score of ``boost`` per matching caption)."""
        if not terms or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        return self._collect(self.searcher.search(self._terms_query(terms, fuzzy), limit=k, count=False))

    def score_rows(self, terms: list[str], rows: np.ndarray) -> np.ndarray:
        """BM25 of the prompt for given rows (0 where no term matches), computed by tantivy itself so it
        equals what ``search`` returns: Must(row in set, constant 0) + Should(terms)."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros(len(rows), np.float32)
        if not terms or len(rows) == 0:
            return out
        # A disjunction of row terms: direct term lookups (a term-set query walks the whole row dictionary,
        # 3 ms at 100k records against 0.5 ms for this).
        restrict = tantivy.Query.const_score_query(tantivy.Query.boolean_query(
            [(tantivy.Occur.Should, tantivy.Query.term_query(self.schema, ROW_FIELD, int(r))) for r in rows]), 0.0)
        q = tantivy.Query.boolean_query(
            [(tantivy.Occur.Must, restrict), (tantivy.Occur.Should, self._terms_query(terms))])
        got_rows, got = self._collect(self.searcher.search(q, limit=len(rows), count=False))
        pos = {int(r): i for i, r in enumerate(rows)}
        for r, s in zip(got_rows.tolist(), got.tolist()):
            out[pos[r]] = s
        return out

    @property
    def num_docs(self) -> int:
        return int(self.searcher.num_docs)
