"""Self-calibration: fusion weights and the "no source" threshold learned from an index itself, with the index's
own models and without labels (``attrib calibrate INDEX``; run at the end of ``attrib index`` by default).

The index makes its own labelled queries:

* **sourced** queries: records turned into queries by transformations that resemble how generated images relate
  to training images (``engine.transforms``: near copies, crops, colour, blur and noise, flips and rotations,
  text and emoji overlays, pasted into another record's image, two records composited, style and texture
  changes), with prompts made from the record's caption (verbatim, reworded, partial), empty, or misleading
  (another record's caption). The source is the record, and every near-duplicate of it in the index.
* **novel** queries: records held out of the search (masked with ``exclude``), queried with their own image
  (raw: the stored vectors, nothing to encode; or transformed) and caption. When near-duplicates of the
  held-out record stay in the index, they are its sources and the query is a sourced one
  (kind ``near_duplicate``). What a near-duplicate looks like to these models is measured on the near-copy
  queries (a low quantile of their cosine to their source), never assumed.

Queries are split by record into a tune part (the weights and threshold are learned on it with the one learner
of ``attrib tune``, ``engine.fusion.learn``) and a held-out test part that reports the fit, by kind. The result
is written atomically to ``INDEX/calibration.json`` (``engine._calibration``): an interrupted calibration
leaves the previous weights in place. Its cost is capped: encoded query images are ``share`` of the indexed
images (the build's own encoding cost), between ``min_queries`` and ``max_queries``.
"""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._calibration import calibration_path, index_identity, store_codecs, write_calibration
from ._errors import AttribError, IndexFormatError
from ._index import Index
from ._manifest import library_versions, now_iso
from ._pool import Pool
from ._stores import patch_scores
from .files import DISK_FULL
from .fusion import FusionWeights
from .fusion.learn import learn_fusion, ranked
from .images import ImageLimits, ImageRejected, load_image
from .metrics import false_attribution_rate, parse_metric
from .rankers import QueryInput, ranking_order
from .transforms import IMAGE_TRANSFORMS, PROMPT_KINDS, WORK_SIDE, prepare, prompt_for, tone
from .ui import progress_bar, stderr_console

AUTO_MIN_IMAGES = 300  # `attrib index` calibrates by default from this many indexed images on
PROMPT_WEIGHTS = (0.30, 0.20, 0.15, 0.20, 0.15)  # verbatim, reworded, partial, empty, misleading
NOVEL_TRANSFORMS = ("near_copy", "crop_weak", "crop_strong", "colour", "blur_noise", "geometry", "text", "emoji",
                    "style")  # single-record transforms also applied to held-out records
CHAIN_P = 0.5  # share of transformed queries that get one or two more changes from CHAIN_TRANSFORMS
TONE_P = 0.5  # share of transformed queries (near copies aside) whose tones change a little (transforms.tone)
CHAIN_TRANSFORMS = ("near_copy", "crop_weak", "colour", "blur_noise", "geometry", "text", "emoji")
DUP_QUANTILE = 0.5  # near-duplicate levels: this quantile of the near-copy queries' similarity to their source
# (the median: a look-alike wrongly labelled a source teaches fusion that resemblance is copying, far worse
# than a missed duplicate, which only raises the threshold; measured on a synthetic corpus with known duplicate
# groups and untrained encoders: 144 true / 10 false pairs at the median, 357 / 4135 at the 5% quantile)
RANDOM_PAIRS = 4000  # record pairs whose cosines give the floor of the near-duplicate cosine
RANDOM_QUANTILE = 0.995  # ... that floor: this quantile of unrelated pairs' cosines
NEIGHBOURS = 16  # nearest neighbours checked for near-duplicates of a record
REPORT_METRICS = ("map@100", "recall@1")
L2_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)  # strengths tried; the strongest within one standard error of the best


@dataclass(frozen=True)
class CalibrationSettings:
    far: float = 0.05  # target false-attribution rate of the threshold on the self-made novel queries
    seed: int = 0  # every choice of records, transforms and prompts (same seed, same index: same weights)
    share: float = 0.2  # encoded query images per indexed image: the cost cap relative to the build's encoding
    min_queries: int = 240  # encoded query images at least, whatever the share (small corpora)
    max_queries: int = 1500  # encoded query images at most (large corpora)
    raw_per_encoded: float = 0.5  # raw held-out queries (stored vectors, nothing to encode) per encoded image
    novel_share: float = 0.2  # share of the encoded images that are transformed held-out records
    test_share: float = 0.3  # share of the records whose queries are held out to report the fit
    metric: str = "map@100"  # ranking metric cross-validation maximises (as `attrib tune --metric`)
    min_images: int = 20  # an index with fewer images cannot be calibrated

    def __post_init__(self) -> None:
        if not (0.0 < self.far < 1.0):
            raise AttribError(f"calibration far={self.far!r} must be between 0 and 1 (e.g. 0.05)")
        if not (0.0 < self.share <= 10.0):
            raise AttribError(f"calibration share={self.share!r} must be in (0, 10]")
        if self.min_queries < 10 or self.max_queries < self.min_queries:
            raise AttribError(f"calibration queries: min_queries={self.min_queries} must be at least 10 and at most "
                              f"max_queries={self.max_queries}")
        for f in ("raw_per_encoded", "novel_share", "test_share"):
            v = getattr(self, f)
            if not (0.0 <= v <= (5.0 if f == "raw_per_encoded" else 0.9)):
                raise AttribError(f"calibration setting {f}={v!r} is out of range")
        if self.min_images < 2:
            raise AttribError(f"calibration min_images={self.min_images!r} must be at least 2")
        parse_metric(self.metric)

    def budget(self, n_images: int) -> int:
        """Encoded query images for an index of ``n_images`` images (the cost cap)."""
        return int(min(self.max_queries, max(self.min_queries, round(self.share * n_images))))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SelfQuery:
    """One self-made query: how it was made, what it masks and which records are its sources."""

    query_id: str
    kind: str  # transform name; "novel" / "novel_<transform>" held out; "near_duplicate"
    prompt_kind: str  # engine.transforms.PROMPT_KINDS
    group: str  # the record it was made from: queries of one record share a fold and a split
    split: str  # "tune" or "test"
    sources: tuple[int, ...]  # rows the image was made from (empty for held-out records)
    exclude: tuple[int, ...]  # rows masked from the search (the held-out record, a paste background)
    primary: int  # the record it was made from
    transform: str | None  # engine.transforms.IMAGE_TRANSFORMS name; None: the record's stored vectors
    other: int | None = None  # second record of two-image transforms
    misleading: int | None = None  # record whose caption is the prompt
    seed: int = 0  # of its transform and prompt
    prompt: str = ""
    relevant: frozenset = frozenset()  # rows of every source in the index (empty: novel)
    pool: Pool | None = None
    pool_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def labels(self) -> np.ndarray:
        return np.isin(self.pool_ids, np.fromiter(self.relevant, np.int64, len(self.relevant)))

    @property
    def novel(self) -> bool:
        return not self.relevant


@dataclass
class CalibrationResult:
    weights: FusionWeights  # the learned weights, threshold and evidence levels (provenance included)
    path: Path | None  # where they were written (None: not written)
    seconds: float  # wall time of the whole calibration
    queries: list[SelfQuery] = field(repr=False, default_factory=list)

    @property
    def provenance(self) -> dict:
        return self.weights.provenance

    def to_dict(self) -> dict:
        return {"calibration": str(self.path) if self.path else None, "seconds": round(self.seconds, 3),
                "weights": self.weights.to_dict()}


# --------------------------------------------------------------------------------------------- planning
def _prompt_kind(rng: np.random.Generator) -> str:
    return PROMPT_KINDS[int(rng.choice(len(PROMPT_KINDS), p=PROMPT_WEIGHTS))]


def plan_queries(img_rows: np.ndarray, settings: CalibrationSettings) -> list[SelfQuery]:
    """Every self-made query decided from the image rows and the settings alone (no pixels): which record,
    transform, prompt kind, split and mask. Deterministic for ``settings.seed``."""
    rng = np.random.default_rng([settings.seed, 0xCA11B])
    n = len(img_rows)
    budget = settings.budget(n)
    n_novel_enc = int(round(settings.novel_share * budget))
    n_src = budget - n_novel_enc
    n_raw = int(round(settings.raw_per_encoded * budget))
    split = {int(r): ("test" if u < settings.test_share else "tune") for r, u in zip(img_rows, rng.random(n))}
    by_split = {s: np.array([r for r in img_rows.tolist() if split[r] == s], np.int64) for s in ("tune", "test")}

    def draw(k: int) -> np.ndarray:  # k records, each as rarely repeated as possible
        reps = -(-k // n) if n else 0
        return np.concatenate([rng.permutation(img_rows) for _ in range(reps)])[:k] if k else np.zeros(0, np.int64)

    def other_of(row: int, not_in: set[int]) -> int | None:
        pool = by_split[split[row]]
        for _ in range(8):
            o = int(pool[int(rng.integers(len(pool)))]) if len(pool) > 1 else int(img_rows[int(rng.integers(n))])
            if o not in not_in:
                return o
        return None

    names = list(IMAGE_TRANSFORMS)
    kinds = [names[int(j)] for _ in range(-(-n_src // len(names))) for j in rng.permutation(len(names))]
    out: list[SelfQuery] = []
    for i, s in enumerate(draw(n_src).tolist()):
        t = kinds[i]
        spec = IMAGE_TRANSFORMS[t]
        other = other_of(s, {s}) if spec.two else None
        if spec.two and other is None:
            t, other = "near_copy", None
        sources = (s, other) if t == "composite" else (s,)
        exclude = (other,) if t == "paste" else ()
        pk = _prompt_kind(rng)
        mis = other_of(s, {s, *(x for x in (other,) if x is not None)}) if pk == "misleading" else None
        out.append(SelfQuery(f"cal{len(out):05d}", t, pk, f"r{s}", split[s], sources, exclude, s, t, other, mis,
                             int(rng.integers(2**62))))
    held = draw(max(n_novel_enc, n_raw)).tolist()
    for j in range(n_raw):
        h = held[j % len(held)]
        pk = _prompt_kind(rng)
        mis = other_of(h, {h}) if pk == "misleading" else None
        out.append(SelfQuery(f"cal{len(out):05d}", "novel", pk, f"r{h}", split[h], (), (h,), h, None, None, mis,
                             int(rng.integers(2**62))))
    for j in range(n_novel_enc):
        h = held[(j + n_raw // 2) % len(held)]
        t = NOVEL_TRANSFORMS[j % len(NOVEL_TRANSFORMS)]
        pk = _prompt_kind(rng)
        mis = other_of(h, {h}) if pk == "misleading" else None
        out.append(SelfQuery(f"cal{len(out):05d}", f"novel_{t}", pk, f"r{h}", split[h], (), (h,), h, t, None, mis,
                             int(rng.integers(2**62))))
    return out


# --------------------------------------------------------------------------------------------- making the queries
class _Images:
    """Record images, decoded once and kept for a while (queries reuse records)."""

    def __init__(self, idx: Index, keep: int = 96) -> None:
        self.idx = idx
        self.refs: dict[int, str | None] = {}
        s = idx.manifest.get("settings", {})
        self.limits = ImageLimits(int(s.get("max_pixels", ImageLimits().max_pixels)))
        self.cache: OrderedDict[int, Any] = OrderedDict()
        self.keep = keep

    def get(self, row: int):
        if row in self.cache:
            self.cache.move_to_end(row)
            return self.cache[row]
        ref = self.refs.get(row)
        img = None
        if ref is not None:
            try:
                img = prepare(load_image(ref, self.limits, draft=WORK_SIDE))
            except ImageRejected:
                img = None  # a record whose image went missing since the build: its queries are dropped
        self.cache[row] = img
        if len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return img


def render(q: SelfQuery, images: _Images):
    """The query image of a transformed query (None when a record's image cannot be read)."""
    rng = np.random.default_rng([q.seed, 1])
    a = images.get(q.primary)
    if a is None:
        return None
    spec = IMAGE_TRANSFORMS[q.transform]
    if spec.two:
        b = images.get(q.other)
        if b is None:
            return None
        img = spec.fn(a, b, rng)
    else:
        img = spec.fn(a, rng)
    # generated images rarely differ from their source in one way only: sometimes one or two more changes, and
    # often a mild change of tones (which untrained encoders' global descriptors do not survive)
    if q.transform != "near_copy":
        if rng.random() < CHAIN_P:
            for name in rng.choice(CHAIN_TRANSFORMS, size=int(rng.integers(1, 3)), replace=False):
                img = IMAGE_TRANSFORMS[str(name)].fn(img, rng)
        if rng.random() < TONE_P:
            img = tone(img, rng)
    return img


def _stored(idx: Index, rows: list[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The stored image encodings of live records with an image, in the order of ``rows`` (what a raw held-out
    query is made of)."""
    r = idx.reader
    rows = np.asarray(rows, np.int64)
    out = {}
    for key, (has, v) in (("clip_image", r.vectors("clip", rows)), ("dino_global", r.vectors("dino", rows)),
                          ("dino_cells", r.patch_cells(rows))):
        if not has.all():
            raise IndexFormatError(f"rows {rows[~has][:5].tolist()} of index {idx.path} are not live records with "
                                   f"an image (deleted meanwhile?); run `attrib calibrate` again")
        out[key] = v
    return out


def image_rows(idx: Index) -> np.ndarray:
    """The live rows with an image, ascending: the only records calibration makes queries and sources of
    (deleted records never take part)."""
    r = idx.reader
    rows = r.live_rows()
    return rows[r.has_image(rows)] if len(rows) else rows


def encode(idx: Index, queries: list[SelfQuery], progress: bool, timings: dict) -> list[tuple[SelfQuery, QueryInput]]:
    """Encode every query (transformed images in batches; raw held-out records from their stored vectors)."""
    images = _Images(idx)
    rows = sorted({r for q in queries for r in (q.primary, q.other) if r is not None})
    meta = idx.reader.records(np.asarray(rows, np.int64))
    images.refs = dict(zip(rows, meta["image"].to_list()))
    out: list[tuple[SelfQuery, QueryInput]] = []
    raw = [q for q in queries if q.transform is None]
    made = [q for q in queries if q.transform is not None]
    bs = int(idx.manifest.get("settings", {}).get("batch_size", 32))
    t0 = time.perf_counter()
    with progress_bar("calibrating: making queries", len(queries), enabled=progress, unit="q") as advance:
        for s in range(0, len(raw), 256):
            chunk = raw[s:s + 256]
            enc = idx.encode_queries([None] * len(chunk), [q.prompt for q in chunk], [q.query_id for q in chunk])
            stored = _stored(idx, [q.primary for q in chunk])
            for j, (q, e) in enumerate(zip(chunk, enc)):
                e.encodings.update({k: v[j] for k, v in stored.items()})
                out.append((q, e))
            advance(len(chunk))
        for s in range(0, len(made), bs):
            chunk = made[s:s + bs]
            pics = [render(q, images) for q in chunk]
            keep = [(q, p) for q, p in zip(chunk, pics) if p is not None]
            if keep:
                enc = idx.encode_queries([p for _, p in keep], [q.prompt for q, _ in keep],
                                         [q.query_id for q, _ in keep])
                out += [(q, e) for (q, _), e in zip(keep, enc)]
            advance(len(chunk))
    timings["encode"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------- near-duplicates
@dataclass(frozen=True)
class DuplicateRule:
    clip: float  # two records are near-duplicates when their CLIP cosine ...
    dino: float  # ... their DINO global cosine ...
    layout: float  # ... and their patch-grid agreement (dino_layout) all reach these levels
    clip_caption: float  # or when their captions are identical and their CLIP cosine reaches this
    basis: str  # how the levels were measured


def _cos(q: np.ndarray | None, v: np.ndarray) -> float:
    return math.nan if q is None else float(np.dot(np.asarray(q, np.float32), v))


def _layout(idx: Index, q_cells: np.ndarray | None, cells: np.ndarray) -> np.ndarray:
    """dino_layout agreement between one set of query cells and each record's cells."""
    if q_cells is None or not len(cells):
        return np.full(len(cells), np.nan)
    return patch_scores(np.asarray(q_cells, np.float32), cells, idx.reader.grid)[1]


def duplicate_rule(idx: Index, encoded: list[tuple[SelfQuery, QueryInput]], seed: int) -> DuplicateRule:
    """What a near-duplicate looks like to these models: for each of three signals (CLIP cosine, DINO global
    cosine, patch-grid agreement), the median of its value between near-copy queries and their source, never
    below what unrelated record pairs reach (a high quantile over random pairs). One global cosine alone does not
    separate near copies from look-alikes for every model (untrained encoders give unrelated photos 0.99); the
    grid agreement of the patches does, and all three must agree."""
    r = idx.reader
    near = [(q, e) for q, e in encoded if q.kind == "near_copy"]
    single = [(q, e) for q, e in encoded if q.sources and q.transform in NOVEL_TRANSFORMS]
    nc: dict[str, list[float]] = {"clip": [], "dino": [], "layout": []}
    if near:
        st = _stored(idx, [q.primary for q, _ in near])
        for i, (_, e) in enumerate(near):
            nc["clip"].append(_cos(e.get("clip_image"), st["clip_image"][i]))
            nc["dino"].append(_cos(e.get("dino_global"), st["dino_global"][i]))
            nc["layout"].append(float(_layout(idx, e.get("dino_cells"), st["dino_cells"][i][None])[0]))
    ss = _stored(idx, [q.primary for q, _ in single]) if single else None
    clip_any = [_cos(e.get("clip_image"), ss["clip_image"][i]) for i, (_, e) in enumerate(single)] if ss else []
    rng = np.random.default_rng([seed, 0xD0B])
    rows = image_rows(idx)
    n = len(rows)
    a, b = rng.integers(0, n, RANDOM_PAIRS), rng.integers(0, n, RANDOM_PAIRS)
    ok = a != b
    a, b = rows[a[ok]], rows[b[ok]]
    floor = {"clip": 1.0, "dino": 1.0, "layout": 1.0}
    if len(a):
        for store in ("clip", "dino"):
            va, vb = r.vectors(store, a)[1], r.vectors(store, b)[1]
            floor[store] = float(np.quantile(np.sum(va * vb, axis=1), RANDOM_QUANTILE))
        m = min(len(a), RANDOM_PAIRS // 8)  # patch comparisons cost more: fewer pairs
        pa, pb = r.patch_cells(a[:m])[1], r.patch_cells(b[:m])[1]
        lay = [float(_layout(idx, pa[i], pb[i][None])[0]) for i in range(m)]
        floor["layout"] = float(np.quantile(lay, RANDOM_QUANTILE))

    def level(vals: list[float], signal: str) -> float:
        v = np.asarray([x for x in vals if math.isfinite(x)])
        q = float(np.quantile(v, DUP_QUANTILE)) if len(v) else 1.0
        return min(1.0, max(q, floor[signal]))

    return DuplicateRule(level(nc["clip"], "clip"), level(nc["dino"], "dino"), level(nc["layout"], "layout"),
                         level(clip_any, "clip"),
                         f"{DUP_QUANTILE:.0%} quantile over {len(near)} near-copy queries of each signal's value to "
                         f"their source, at least its {RANDOM_QUANTILE:.1%} quantile over random record pairs")


def _norm_caption(c: str | None) -> str:
    return " ".join((c or "").lower().split())


def near_duplicates(idx: Index, rows: list[int], rule: DuplicateRule) -> dict[int, set[int]]:
    """Other records of the index that are near-duplicates of each of ``rows``: images whose CLIP and DINO cosines
    and patch-grid agreement all reach the rule's levels, records with the identical caption and a CLIP cosine
    reaching its caption level, and caption-only records with the identical caption."""
    r = idx.reader
    rows = sorted(set(int(x) for x in rows))
    out: dict[int, set[int]] = {x: set() for x in rows}
    if not rows:
        return out
    st = _stored(idx, rows)
    found = r.search("clip", st["clip_image"], NEIGHBOURS + 1)  # live records only
    caps = dict(zip(rows, (_norm_caption(c) for c in r.records(np.asarray(rows, np.int64))["caption"].to_list())))
    cand_rows: dict[int, np.ndarray] = {}
    for i, row in enumerate(rows):
        nb = found[i][0]
        cand_rows[row] = nb[nb != row]
    by_text: dict[int, np.ndarray] = {}
    for row in rows:
        if caps[row]:
            found, _ = r.text.search(r.text.terms(caps[row]), 5)
            by_text[row] = np.asarray([x for x in found.tolist() if x != row], np.int64)
    every = sorted({int(x) for v in (*cand_rows.values(), *by_text.values()) for x in v.tolist()})
    other_caps = dict(zip(every, (_norm_caption(c) for c in r.records(np.asarray(every, np.int64))["caption"]
                                  .to_list()))) if every else {}
    for i, row in enumerate(rows):
        cands = np.unique(np.concatenate([cand_rows[row], by_text.get(row, np.zeros(0, np.int64))]))
        if not len(cands):
            continue
        has, clip_v = r.vectors("clip", cands)
        clip_c = np.full(len(cands), np.nan)
        dino_c = np.full(len(cands), np.nan)
        if has.any():
            clip_c[has] = clip_v @ st["clip_image"][i]
            dino_c[has] = r.vectors("dino", cands)[1] @ st["dino_global"][i]
        for j, c in enumerate(cands.tolist()):
            same_caption = bool(caps[row]) and other_caps.get(c) == caps[row]
            if has[j] and clip_c[j] >= rule.clip and dino_c[j] >= rule.dino and \
                    _layout(idx, st["dino_cells"][i], r.patch_cells(cands[j:j + 1])[1])[0] >= rule.layout:
                out[row].add(c)
            elif same_caption and (not has[j] or clip_c[j] >= rule.clip_caption):
                out[row].add(c)
    return out


def label_queries(queries: list[SelfQuery], dups: dict[int, set[int]]) -> None:
    """Sources and masks of each query: the records its image was made from and their near-duplicates are
    sources; a held-out record whose near-duplicates stay in the index is a sourced query (``near_duplicate``);
    a paste background is masked with its near-duplicates (they would be unlabelled copies in the query)."""
    for q in queries:
        masked = set(q.exclude)
        for x in q.exclude:
            if x != q.primary:
                masked |= dups.get(x, set())
        q.exclude = tuple(sorted(masked))
        rel = set(q.sources) | {d for s in q.sources for d in dups.get(s, set())}
        if not q.sources:
            rel |= dups.get(q.primary, set())
            if rel - masked:
                q.kind = "near_duplicate"
        q.relevant = frozenset(rel - masked)


# --------------------------------------------------------------------------------------------- evaluation
def _table(queries: list[SelfQuery], weights: FusionWeights, rrf) -> dict:
    """Per kind and overall: fused and RRF map@100 / recall@1 (queries with a source) and the fused
    false-attribution rate at the threshold (novel queries)."""
    thr = weights.threshold

    def summary(qs: list[SelfQuery]) -> dict:
        d: dict[str, Any] = {"n": len(qs)}
        src = [q for q in qs if not q.novel]
        nov = [q for q in qs if q.novel]
        if src:
            for m in REPORT_METRICS:
                fn = parse_metric(m)
                d[m] = round(float(np.mean([fn(ranked(q, weights)[0], q.relevant) for q in src])), 6)
                d[f"rrf_{m}"] = round(float(np.mean([fn(_rrf_ranked(q, rrf), q.relevant) for q in src])), 6)
        if nov and thr is not None:
            tops = np.array([ranked(q, weights, 1)[1] for q in nov], np.float64)
            d["false_attribution_rate"] = round(false_attribution_rate(tops, thr), 6)
        return d

    out = {"all": summary(queries)}
    for kind in sorted({q.kind for q in queries}):
        out[kind] = summary([q for q in queries if q.kind == kind])
    nov = [q for q in queries if q.novel]
    for pk in PROMPT_KINDS:
        sel = [q for q in nov if q.prompt_kind == pk]
        if sel:
            out[f"novel, {pk} prompt"] = summary(sel)
    return out


def _rrf_ranked(q: SelfQuery, rrf) -> list:
    if len(q.pool_ids) == 0:
        return []
    s = rrf.scores(q.pool)
    return [q.pool_ids[i] for i in ranking_order(q.pool.rows, s, 100)]


# --------------------------------------------------------------------------------------------- the whole run
def calibrate(index: Index | str | os.PathLike, *, settings: CalibrationSettings | None = None, progress: bool = True,
              write: bool = True, encoders=None) -> CalibrationResult:
    """Learn fusion weights and the "no source" threshold from the index itself and store them in the index
    folder (``INDEX/calibration.json``), where queries with ``"auto"`` weights find them.

    Args:
        index: an :class:`Index` or an index folder.
        settings: how many queries, the target false-attribution rate, the seed (:class:`CalibrationSettings`).
        progress: show progress bars on stderr.
        write: store the result in the index folder (atomically; the previous calibration stays until then).
        encoders: already-loaded encoders of the index's models (e.g. the build's).
    Returns:
        A :class:`CalibrationResult`: the weights with their provenance (tune/test table by kind, counts, time).
    Raises:
        AttribError: the index has too few images, or the self-made queries gave nothing to learn from.
    Example:
        >>> calibrate("my-index").weights.threshold  # doctest: +SKIP
    """
    settings = settings or CalibrationSettings()
    t0 = time.perf_counter()
    idx = index if isinstance(index, Index) else Index(index)
    if encoders is not None:
        idx.use_encoders(encoders)
    r = idx.reader
    img_rows = image_rows(idx)
    if len(img_rows) < settings.min_images:
        raise AttribError(f"index {idx.path} has {len(img_rows)} live images; calibration needs at least "
                          f"{settings.min_images} (fuse with RRF, or pass weights learned elsewhere with --weights)")
    timings: dict[str, float] = {}
    queries = plan_queries(img_rows, settings)
    if progress:
        stderr_console().print(f"calibrating {idx.path} with {len(queries)} self-made queries "
                               f"({sum(q.transform is not None for q in queries)} images to encode)")
    used = sorted({x for q in queries for x in (q.primary, q.misleading) if x is not None})
    caps = dict(zip(used, r.records(np.asarray(used, np.int64))["caption"].to_list()))
    for q in queries:
        rng = np.random.default_rng([q.seed, 2])
        q.prompt = prompt_for(q.prompt_kind, caps.get(q.primary) or "", rng, caps.get(q.misleading) or "")
        if not q.prompt.strip():
            q.prompt_kind, q.prompt = "empty", ""
    encoded = encode(idx, queries, progress, timings)
    t = time.perf_counter()
    rule = duplicate_rule(idx, encoded, settings.seed)
    involved = sorted({x for q, _ in encoded for x in (*q.sources, *q.exclude)})
    dups = near_duplicates(idx, involved, rule)
    label_queries([q for q, _ in encoded], dups)
    timings["duplicates"] = time.perf_counter() - t
    t = time.perf_counter()
    with progress_bar("calibrating: ranking", len(encoded), enabled=progress, unit="q") as advance:
        for q, e in encoded:
            q.pool = idx.pool(e, exclude=list(q.exclude) or None)
            q.pool_ids = q.pool.rows
            advance(1)
    timings["rank"] = time.perf_counter() - t
    made = [q for q, _ in encoded]
    tune = [q for q in made if q.split == "tune"]
    test = [q for q in made if q.split == "test"]
    if not any(not q.novel for q in tune) or not any(q.novel for q in tune):
        raise AttribError(f"index {idx.path}: the self-made tune queries lack sourced or novel ones; calibrate with "
                          "more queries (--queries) or another seed")
    t = time.perf_counter()
    m = idx.manifest["models"]
    models = {"profile": m["profile"], "pretrained": bool(m.get("pretrained")), "fingerprint": m["fingerprint"]}
    learned = learn_fusion(tune, models, metric=settings.metric, target_far=settings.far, seed=settings.seed,
                           rrf_k=idx.settings.rrf_k, what="self-made tune", l2_grid=L2_GRID, l2_rule="1se")
    timings["learn"] = time.perf_counter() - t
    w = learned.weights
    rrf = idx.resolve_fusion("rrf")
    tables = {"tune": _table(tune, w, rrf), "test": _table(test, w, rrf)}
    seconds = time.perf_counter() - t0
    n_enc = sum(1 for q in made if q.transform is not None)
    w.provenance = {
        "learned_by": "attrib calibrate",
        "learned_on": (f"this index's own records, no labels: {len(made)} self-made queries "
                       f"({sum(not q.novel for q in made)} with a source, {sum(q.novel for q in made)} held out), "
                       f"seed {settings.seed}"),
        "method": "self-calibration",
        "index": {"path": str(idx.path), **index_identity(idx.manifest), "codecs": store_codecs(idx.manifest)},
        "settings": settings.to_dict(),
        "metric": settings.metric,
        "l2": learned.l2,
        "l2_rule": "strongest within one standard error of the best cross-validated metric",
        "cv": {str(k): (round(v, 6) if math.isfinite(v) else None) for k, v in learned.cv.items()},
        "target_far": settings.far,
        "counts": {"queries": len(made), "tune": len(tune), "test": len(test), "encoded_images": n_enc,
                   "raw_held_out": len(made) - n_enc, "dropped": len(queries) - len(made),
                   "kinds": {k: sum(q.kind == k for q in made) for k in sorted({q.kind for q in made})}},
        "near_duplicates": {**asdict(rule), "records_checked": len(involved),
                            "records_with_duplicates": sum(1 for v in dups.values() if v)},
        "scores": {s: {k: v for k, v in tb["all"].items() if k != "n"} for s, tb in tables.items()},
        "by_kind": tables,
        "seconds": {"total": round(seconds, 3), **{k: round(v, 3) for k, v in timings.items()}},
        "created": now_iso(),
        "engine_version": library_versions().get("attrib-engine"),
    }
    path = None
    if write:
        path = write_calibration(idx.path, w)
    else:
        w.name = str(calibration_path(idx.path))
    return CalibrationResult(w, path, seconds, made)


class CalibrationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during the calibration that ends ``build_index``: the index itself is complete."""


def after_build(summary, encoders, how: bool | CalibrationSettings | None = None, progress: bool = True) -> dict:
    """Calibrate an index a build, resume, overwrite or append has just completed (``build_index``'s last step).

    ``how``: None (the default) calibrates an index of :data:`AUTO_MIN_IMAGES` images or more, and any index that
    already had a calibration (after an append it would be stale: learned on other records); True always;
    settings always, with them. A calibration that still matches the index's records is kept as it is (unless
    asked for). Returns what the build summary reports: the time, its share of this command's time, the fit, or
    why calibration was skipped (a failure to calibrate never fails the build; the previous calibration, if any,
    stays).
    Raises:
        CalibrationInterrupted: Ctrl-C while calibrating (the index is complete and kept).
    """
    from ._calibration import IndexCalibration

    previous, stale = IndexCalibration(summary.index_dir).load(summary.manifest)
    had = previous is not None or bool(stale)
    if how is None and previous is not None and not stale:
        return {"skipped": "the index's calibration still matches its records"}
    if how is None and not had and summary.images < AUTO_MIN_IMAGES:
        return {"skipped": f"{summary.images} images, fewer than {AUTO_MIN_IMAGES}: run `attrib calibrate` to "
                           "calibrate anyway"}
    settings = how if isinstance(how, CalibrationSettings) else None
    if settings is None and previous is not None:  # calibrate again as the user did (--far, --seed, --queries)
        try:
            settings = CalibrationSettings(**{k: v for k, v in (previous.provenance.get("settings") or {}).items()
                                              if k in CalibrationSettings.__dataclass_fields__})
        except (AttribError, TypeError):
            settings = None
    try:
        res = calibrate(summary.index_dir, settings=settings, progress=progress, encoders=encoders)
    except AttribError as e:
        return {"skipped": str(e) + ("; the previous calibration stays (stale)" if had else "")}
    except OSError as e:  # a full disk: the calibration is written whole or not at all
        if e.errno not in DISK_FULL:
            raise
        stale = "; the previous calibration stays (stale)" if had else ""
        return {"skipped": f"the calibration could not be written ({e}): free some space, then run `attrib "
                           f"calibrate {summary.index_dir}`{stale}"}
    except KeyboardInterrupt:
        raise CalibrationInterrupted() from None
    return calibration_summary(res, summary.seconds, summary.encode_seconds)


def calibration_summary(res: CalibrationResult, build_seconds: float | None = None,
                        encode_seconds: float | None = None) -> dict:
    """A short account of a calibration: where, how long (and its share of the build), how many queries, the
    threshold and the held-out fit."""
    p = res.provenance
    d = {"path": str(res.path) if res.path else None, "seconds": round(res.seconds, 3),
         "queries": p["counts"]["queries"], "encoded_images": p["counts"]["encoded_images"],
         "threshold": res.weights.threshold, "test": p["scores"]["test"]}
    if build_seconds:
        d["share_of_build"] = round(res.seconds / build_seconds, 4)
    if encode_seconds:
        d["share_of_build_encoding"] = round(res.seconds / encode_seconds, 4)
        d["encoding_share_of_build_encoding"] = round(p["seconds"].get("encode", 0.0) / encode_seconds, 4)
    return d
