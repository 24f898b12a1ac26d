"""Changing a committed index: deleting records, compacting segments, and verifying every byte.

Each change writes its new files, then commits a new manifest generation (the one atomic step), then removes
what the new generation no longer lists. Readers that opened an older generation keep answering from it."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._codebooks import CAPTION_PQ_MAX_TRAIN, CAPTION_PQ_MIN_TRAIN, PATCH_ENCODE_BLOCK, PQ, Codebooks, sha256_file
from ._errors import AttribError, IndexFormatError
from ._layout import codebook_dir, deletes_file, path_of, segment_dir
from ._lock import WriterLock
from ._manifest import read_manifest, write_manifest
from ._reader import SMALL_SEGMENT_IMAGES, IndexReader
from ._search_tune import measure_after_write
from ._segment import (
    STORES,
    EncodedChunk,
    SegmentFiles,
    remove_uncommitted,
    row_sums,
    unified_schema,
)
from ._settings import check_caption_codec
from ._stores import ROW_FIELD, TextSink, is_panic
from ._threads import blas_single
from ._txn import recover
from .files import fsync_dir, remove
from .text import caption_key

URL_COLUMNS = ("url", "URL", "Url")
VERIFY_TERM_SEARCHES = 2000  # caption terms searched by `attrib verify` (all of them on smaller indexes)
ID_COLUMNS = ("id", "ID", "key")


# --------------------------------------------------------------------------------------------- delete
@dataclass
class DeleteSummary:
    deleted: int  # records deleted by this command
    not_found: list[str]  # given ids/urls that are not live records (unknown, or deleted before)
    live: int  # live records after the command
    total_deleted: int  # records deleted and not yet compacted away
    generation: int


def read_id_list(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(ids, urls) from a removal list: a text file with one id per line, or a parquet/CSV/JSONL table with an
    id column (``id``) and/or a URL column (``url``), e.g. a LAION opt-out list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AttribError(f"id list {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".csv", ".jsonl", ".ndjson"):
        try:
            df = (pl.read_parquet(p) if suffix == ".parquet" else pl.read_csv(p, infer_schema_length=0)
                  if suffix == ".csv" else pl.read_ndjson(p))
        except Exception as e:  # noqa: BLE001 - polars raises many types on bad files
            raise AttribError(f"cannot read id list {p}: {e.__class__.__name__}: {e}") from None
        idc = next((c for c in ID_COLUMNS if c in df.columns), None)
        urlc = next((c for c in URL_COLUMNS if c in df.columns), None)
        if idc is None and urlc is None:
            raise AttribError(f"id list {p} has neither an id column ({', '.join(ID_COLUMNS)}) nor a URL column "
                              f"({', '.join(URL_COLUMNS)}); its columns are {', '.join(df.columns)}")
        ids = [str(x) for x in df[idc].drop_nulls().to_list()] if idc else []
        urls = [str(x) for x in df[urlc].drop_nulls().to_list()] if urlc else []
        return ids, urls
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise AttribError(f"cannot read id list {p}: {e}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")], []


def _rows_of_urls(reader: IndexReader, urls: list[str]) -> dict[str, list[int]]:
    """Rows whose source URL (a url column of a table source, or the url of a sidecar's metadata) is in
    ``urls``. Each record table is read a row group at a time, only its row, URL and metadata columns, and matched
    in Arrow and polars: the captions of 10M records are never in memory, and no record costs Python work."""
    # a URL that is not UTF-8 (a removal list's bad line) matches no stored URL: it is not found, the others are
    wanted = pa.array(sorted({u.encode("utf-8", "replace").decode("utf-8") for u in urls}), pa.string())
    found: dict[str, list[int]] = {}
    for seg in reader.segments:
        f = pq.ParquetFile(seg.path / path_of("records"))
        names = f.schema_arrow.names
        url_cols = [c for c in URL_COLUMNS if c in names]
        if not url_cols and "meta" not in names:
            continue
        for batch in f.iter_batches(batch_size=LIVE_PART_RECORDS,
                                    columns=["row", *url_cols, *(["meta"] if "meta" in names else [])]):
            values = [batch.column(c).cast(pa.string()) for c in url_cols]
            if "meta" in names:  # the first url key of the JSON object (invalid JSON: none)
                meta = pl.DataFrame({"m": pl.from_arrow(batch.column("meta")).cast(pl.String)})
                values.append(meta.select(pl.coalesce([pl.col("m").str.json_path_match(f"$.{k}")
                                                       for k in URL_COLUMNS])).to_series().to_arrow())
            rows = batch.column("row").to_numpy()
            for v in values:
                hit = np.flatnonzero(pc.is_in(v, value_set=wanted).fill_null(False).to_numpy(zero_copy_only=False))
                for r, u in zip(rows[hit].tolist(), v.take(pa.array(hit)).to_pylist()):
                    found.setdefault(u, []).append(int(r))
    return found


def delete_records(index: str | os.PathLike, ids: list[str] = (), urls: list[str] = ()) -> DeleteSummary:
    """Delete records by id and/or source URL. From the moment this returns, a newly opened index never
    returns them from any ranker, the pool, reports or benchmarks (`attrib compact` removes them physically).

    Args:
        index: the index folder.
        ids: record ids.
        urls: source URLs (matched against a table's url column or a sidecar's url).
    Returns:
        A :class:`DeleteSummary` (ids or URLs not found are listed, not an error).
    Raises:
        IndexBusyError: another process is writing the index.
        IndexFormatError: the index is missing, damaged or read-only.
    """
    folder = Path(index).expanduser().absolute()
    recover(folder)
    read_manifest(folder)  # a missing folder, a file or a folder that is no index: a clear error, no lock file left
    with WriterLock(folder, "delete"):
        reader = IndexReader(folder, hash_files=False)
        m = reader.manifest
        remove_uncommitted(folder, m)  # what a killed writer left
        rows = reader.rows_of(list(ids))
        not_found = [str(i) for i, r in zip(ids, rows) if r < 0]
        targets = set(int(r) for r in rows if r >= 0)
        if urls:
            by_url = _rows_of_urls(reader, list(urls))
            not_found += [u for u in urls if u not in by_url]
            for rs in by_url.values():
                targets.update(r for r in rs if reader.live.keep(np.asarray([r]))[0])
        new = np.asarray(sorted(targets), np.int64)
        if len(new) == 0:
            reader.close()
            return DeleteSummary(0, not_found, int(m["counts"]["records"]), int(m["counts"]["deleted"]),
                                 int(m["generation"]))
        n_img = int(reader.has_image(new).sum())
        all_deleted = np.union1d(reader.live.deleted, new).astype(np.int64)
        reader.close()
        gen = int(m["generation"]) + 1
        m2 = json.loads(json.dumps(m))
        m2["generation"] = gen
        old = m2.get("deletes")
        m2["deletes"] = _write_deletes(folder, gen, all_deleted)
        m2["counts"]["records"] -= len(new)
        m2["counts"]["images"] -= n_img
        m2["counts"]["deleted"] = int(len(all_deleted))
        m2 = write_manifest(folder, m2)
        _delete_text(folder, new)  # after the commit: the tombstones already hide them from readers
        if old and old["path"] != m2["deletes"]["path"]:
            remove(folder / old["path"])
        return DeleteSummary(len(new), not_found, int(m2["counts"]["records"]), int(len(all_deleted)), gen)


def _write_deletes(folder: Path, gen: int, rows: np.ndarray) -> dict | None:
    """Write generation ``gen``'s tombstones (every deleted row not yet removed physically), durably; returns their
    manifest entry (None when there are none)."""
    if len(rows) == 0:
        return None
    rel = deletes_file(gen)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    with open(folder / rel, "wb") as f:
        np.save(f, np.asarray(rows, np.int64), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir((folder / rel).parent)
    return {"path": rel, "count": int(len(rows)), "sha256": sha256_file(folder / rel)}


def _delete_text(folder: Path, rows: np.ndarray) -> None:
    sink = TextSink(folder / path_of("text"))
    try:
        sink.delete_rows(rows.tolist())
        sink.close()
    except BaseException:
        sink.abort()
        raise


# --------------------------------------------------------------------------------------------- compact
@dataclass
class CompactSummary:
    segments_before: int
    segments_after: int
    records: int  # live records kept
    purged: int  # deleted records removed physically
    retrained: bool
    seconds: float
    codebooks: dict = field(default_factory=dict)
    search: dict | None = None  # search settings measured afterwards (engine._search_tune)


@blas_single
def compact(index: str | os.PathLike, retrain: bool = False, progress: bool = True, codec: str | None = None,
            ann: str | None = None, keep_old_for_tests=None, measure_search: bool = True,
            caption_codec: str | None = None) -> CompactSummary:
    """Merge every segment into one, dropping deleted records physically; ``retrain`` refits the codebooks
    (IVF, PQ and refine quantizers) on the live records first, for an index that has grown or drifted since
    its first chunk, and may change the ``codec`` (fp16 / pq) and ``ann`` (flat / ivf) of the stores and the
    ``caption_codec`` (pq / int8) of the caption embeddings (the vectors are decoded from the finest stored codes;
    fp16 ones are exact). An index made before caption product codes (no ``caption_codec`` in its settings) keeps
    int8 caption codes, and the index format its engine reads, unless ``caption_codec="pq"`` is given. Queries
    keep answering from the previous generation while this runs. Afterwards the search settings are measured again
    (``engine._search_tune``; ``measure_search=False`` leaves that to the caller)."""
    if (codec or ann or caption_codec) and not retrain:
        raise AttribError("--codec, --ann and --caption-codec change the codebooks: give --retrain too")
    if caption_codec is not None:
        check_caption_codec(caption_codec)
    t0 = time.perf_counter()
    folder = Path(index).expanduser().absolute()
    recover(folder)
    read_manifest(folder)  # a missing folder, a file or a folder that is no index: a clear error, no lock file left
    with WriterLock(folder, "compact"):
        reader = IndexReader(folder, hash_files=False)
        m = reader.manifest
        remove_uncommitted(folder, m)  # what a killed compaction (or writer) left half-written
        cb = reader.codebooks
        before = len(reader.segments)
        purged = int(len(reader.live.deleted))
        with_captions = reader.captions.has_vectors
        seg_id = int(m["next_segment"])
        m2 = json.loads(json.dumps(m))
        new_cb = cb
        from .ui import progress_bar

        passes = 2 if retrain else 1  # a retraining reads the segments twice: a sample to fit on, then everything
        with progress_bar("compacting", before * passes, enabled=progress, unit="seg") as advance:
            if retrain:
                settings = m["settings"]
                sample = _training_sample(reader, folder, with_captions, advance)
                want_pq = (caption_codec or settings.get("caption_codec")) == "pq"
                have = len(sample["captions"]) if sample["captions"] is not None else None
                if want_pq and have is not None and have < CAPTION_PQ_MIN_TRAIN:
                    raise AttribError(f"--caption-codec pq needs at least {CAPTION_PQ_MIN_TRAIN} captions to train "
                                      f"its quantizer, and index {folder} holds {have} live ones; retrain with "
                                      "--caption-codec int8 (or auto)")
                new_cb = Codebooks.train(cb.generation + 1, cb.projection, sample["clip"], sample["dino"],
                                         sample["cells"], ann or settings.get("ann", "auto"),
                                         codec or settings.get("codec", "auto"), sample["images"],
                                         int(settings.get("ann_flat_max", 50_000)), int(settings.get("patch_pq_m", 8)),
                                         sample["captions"], caption_codec or settings.get("caption_codec", "int8"),
                                         keep=cb, ranges=sample["ranges"])
                del sample
                chosen = (("codec", codec), ("ann", ann), ("caption_codec", caption_codec))
                m2["settings"].update({k: v for k, v in chosen if v})  # the choices hold for later retrainings too
                m2["codebooks"] = new_cb.save(folder / codebook_dir(new_cb.generation))
                m2["codebooks"]["path"] = codebook_dir(new_cb.generation)
                entry = _write_live(reader, folder, seg_id, with_captions, advance, new_cb)
            else:  # streamed: one old segment's live records at a time; only the merged IVF lists are in memory
                entry = _write_live(reader, folder, seg_id, with_captions, advance)
        deleted = np.asarray(reader.live.deleted, np.int64)
        reader.close()
        m2["compactions"] = int(m.get("compactions", 0)) + 1
        _commit_merged(folder, m, m2, 0, entry, deleted, deleted, keep_old_for_tests)
        if retrain:
            remove(folder / codebook_dir(cb.generation))
        fsync_dir(folder)
        search = measure_after_write(folder) if measure_search else None
    return CompactSummary(before, 1, int(m2["counts"]["records"]), purged, retrain, time.perf_counter() - t0,
                          new_cb.describe(), search)


# --------------------------------------------------------------------------------------------- merge after an append
@dataclass
class MergeSummary:
    merged: int  # segments merged into one
    records: int  # live records of the merged segment
    purged: int  # deleted records of those segments removed physically
    seconds: float
    segments_after: int


def tail_run(entries: list[dict], first_row: int) -> int:
    """Position, in a manifest's segment list, of the first segment an append that started at row ``first_row``
    merges: every segment it wrote, and before them, like the carries of a binary counter, each earlier small
    segment (fewer than ``SMALL_SEGMENT_IMAGES`` records) that holds at most as many records as the segments
    merged so far. A record is written again only into a segment at least twice as large as the one it leaves,
    so repeated small appends keep about log2(262,144 / append size) small segments and write each record a
    handful of times, where merging every small segment each time would write it again at every append."""
    i = len(entries)
    while i > 0 and (entries[i - 1].get("first_row") is None or int(entries[i - 1]["first_row"]) >= first_row):
        i -= 1
    total = sum(int(e["records"]) for e in entries[i:])
    while i > 0 and int(entries[i - 1]["records"]) < SMALL_SEGMENT_IMAGES and int(entries[i - 1]["records"]) <= total:
        i -= 1
        total += int(entries[i]["records"])
    return i


@blas_single
def merge_appended(index: str | os.PathLike, first_row: int, progress: bool = True) -> MergeSummary | None:
    """After an append (rows from ``first_row`` on): merge the segments it wrote, one per ``--chunk`` of images,
    and the small segments :func:`tail_run` adds to them, into one, dropping their deleted records physically.
    A query pays for every segment it reads (about 0.3 ms each at 100,000 records), so an append of 50,000 images
    in 2,000-image chunks would otherwise make every later query slower by 10-20 ms until ``attrib compact``.
    Only the merged segments are written (a compaction writes the whole index); queries keep answering from the
    previous generation meanwhile, and an interrupted merge leaves the index as the append committed it. None
    when there is nothing to merge."""
    t0 = time.perf_counter()
    folder = Path(index).expanduser().absolute()
    recover(folder)
    read_manifest(folder)  # a folder that is no index: a clear error, no lock file left
    with WriterLock(folder, "merge"):
        reader = IndexReader(folder, hash_files=False)
        m = reader.manifest
        remove_uncommitted(folder, m)
        start = tail_run(m["segments"], first_row)
        if len(m["segments"]) - start < 2:
            reader.close()
            return None
        run = reader.segments[start:]
        gone = _deleted_within(reader, run)
        seg_id = int(m["next_segment"])
        from .ui import progress_bar

        with progress_bar("merging appended segments", len(run), enabled=progress, unit="seg") as advance:
            entry = _write_live(reader, folder, seg_id, reader.captions.has_vectors, advance, segments=run, gone=gone)
        deleted = np.asarray(reader.live.deleted, np.int64)
        reader.close()
        m2 = _commit_merged(folder, m, json.loads(json.dumps(m)), start, entry, deleted, gone)
        fsync_dir(folder)
    return MergeSummary(len(run), int(entry["records"]), int(len(gone)), time.perf_counter() - t0,
                        len(m2["segments"]))


def _commit_merged(folder: Path, m: dict, m2: dict, start: int, entry: dict, deleted: np.ndarray, gone: np.ndarray,
                   after_commit=None) -> dict:
    """Commit ``m2`` (a copy of manifest ``m``) with the segments from position ``start`` on replaced by the merged
    segment ``entry``, then remove what it no longer lists. The tombstones ``gone`` of the records the merge dropped
    go, the other ``deleted`` rows stay; the caption documents of ``gone`` are deleted first (a deletion interrupted
    before it removed them left them hidden only by those tombstones; idempotent, and hidden either way until the
    commit). A merged segment whose records were all deleted is not listed when segments come before it (an empty
    segment after others has no rows to be placed by); as the first one it stays, empty. ``after_commit`` runs
    between the commit and the removals (tests). Returns ``m2``."""
    if len(gone):
        _delete_text(folder, gone)
    m2["generation"] = int(m["generation"]) + 1
    m2["segments"] = m["segments"][:start] + ([entry] if entry["records"] or start == 0 else [])
    m2["next_segment"] = int(m["next_segment"]) + 1
    old_deletes = (m.get("deletes") or {}).get("path")
    if len(gone):
        remaining = np.setdiff1d(deleted, gone).astype(np.int64)
        m2["deletes"] = _write_deletes(folder, m2["generation"], remaining)
        m2["counts"]["deleted"] = int(len(remaining))
        m2["counts"]["purged"] = int(m["counts"].get("purged", 0)) + int(len(gone))
    write_manifest(folder, m2)
    if after_commit is not None:
        after_commit()
    if entry not in m2["segments"]:
        remove(folder / entry["path"])
    for e in m["segments"][start:]:
        remove(folder / e["path"])
    if len(gone) and old_deletes:
        remove(folder / old_deletes)
    return m2


def _deleted_within(reader: IndexReader, segments: list) -> np.ndarray:
    """The deleted rows that ``segments`` hold (every deleted row when they are all of the reader's)."""
    d = np.asarray(reader.live.deleted, np.int64)
    if segments is reader.segments or len(d) == 0:
        return d
    inside = np.zeros(len(d), bool)
    for seg in segments:
        if seg.n_records:
            rows = np.asarray(seg.rows)
            inside |= rows[np.minimum(np.searchsorted(rows, d), len(rows) - 1)] == d
    return d[inside]


LIVE_PART_RECORDS = 131_072  # records of a segment read, checked and written at a time by a compaction


def _record_blocks(path: Path, size: int):
    """Consecutive blocks of ``size`` records (the last one shorter; one empty table for an empty file) of a
    segment's record table, read a row group at a time: a segment's records (1.7 GB of real captions and URLs
    at 10M records) are never in memory at once."""
    f = pq.ParquetFile(path)
    buf, have = [], 0
    for batch in f.iter_batches(batch_size=size):
        buf.append(batch)
        have += batch.num_rows
        while have >= size:
            t = pa.Table.from_batches(buf, schema=batch.schema)
            yield t.slice(0, size)
            rest = t.slice(size)
            buf, have = rest.to_batches(), rest.num_rows
    if have or not f.metadata.num_rows:
        yield pa.Table.from_batches(buf, schema=f.schema_arrow)


def _live_parts(reader: IndexReader, folder: Path, with_captions: bool, segments: list | None = None):
    """Per segment (of ``segments``, default all), in row order, blocks of at most ``LIVE_PART_RECORDS`` records:
    their live records as an :class:`EncodedChunk` without stores (table, record CRCs, caption keys, image rows,
    refine codes, patch codes, image checksums; with ``with_captions`` the caption codes, copied: those of a segment
    without embeddings encode zeros), and whether the block ends its segment. Codes are checked against their
    checksums. Blocks, not whole segments: a compacted 10M-record index is one segment, whose codes alone are 13 GB."""
    cb = reader.codebooks
    for seg in reader.segments if segments is None else segments:
        tables = _record_blocks(seg.path / path_of("records"), LIVE_PART_RECORDS)
        rows_all, irows_all = np.asarray(seg.rows), np.asarray(seg.image_rows)
        n = seg.n_records
        for a in range(0, max(n, 1), LIVE_PART_RECORDS):  # a segment without records: one empty part
            b = min(a + LIVE_PART_RECORDS, n)
            rows = rows_all[a:b]
            keep = reader.live.keep(rows)
            block = next(tables)
            if block.num_rows != b - a or (len(rows) and block.column("row")[0].as_py() != rows[0]):
                raise IndexFormatError(f"index {folder} is damaged (the record table of segment {seg.path.name} "
                                       f"does not match its rows); run `attrib verify` and rebuild it")
            table = block.filter(pa.array(keep))
            keys = (np.asarray(seg.caption_keys[a:b])[keep] if seg.caption_keys is not None else
                    np.asarray([caption_key(c) for c in table.column("caption").to_pylist()], np.uint64))
            caps = None
            if with_captions:  # the stored codes (checked), not decoded and coded again: a copy loses nothing
                caps = (seg.caption_code_rows(a + np.flatnonzero(keep)) if seg.caption_codes is not None
                        else cb.encode_captions(np.zeros((int(keep.sum()), cb.stores["clip"].dim), np.float32)))
            ia, ib = ((int(np.searchsorted(irows_all, rows[0])), int(np.searchsorted(irows_all, rows[-1], "right")))
                      if len(rows) else (0, 0))  # the images of this block's records
            li = ia + np.flatnonzero(reader.live.keep(irows_all[ia:ib]))
            part = EncodedChunk(table, irows_all[li], {}, {n_: np.asarray(seg.refine[n_][li]) for n_ in STORES},
                                np.asarray(seg.patches[li]), np.asarray(seg.record_crc[a:b])[keep],
                                np.asarray(seg.image_sums[li]).astype(np.uint64), caps, keys.astype(np.uint64))
            for j, (name, codes) in enumerate((("clip", part.refine["clip"]), ("dino", part.refine["dino"]),
                                               ("p", part.patches))):
                if len(codes) and not np.array_equal(row_sums(codes), part.image_sums[:, j]):
                    raise IndexFormatError(f"index {folder} is damaged ({name} codes of segment {seg.path.name} do "
                                           f"not match their checksums); run `attrib verify` and rebuild it")
            yield part, b >= n


def _live_layout(reader: IndexReader, segments: list | None = None) -> tuple[int, int, pa.Schema]:
    """(live records, live images, unified record schema) of ``segments`` (default all): what a merged segment
    holds."""
    n_records = n_images = 0
    schemas = []
    for seg in reader.segments if segments is None else segments:
        n_records += int(reader.live.keep(np.asarray(seg.rows)).sum())
        n_images += int(reader.live.keep(np.asarray(seg.image_rows)).sum())
        schemas.append(pq.read_schema(seg.path / path_of("records")))
    return n_records, n_images, unified_schema(schemas)


RETRAIN_SAMPLE_MIN = 65_536  # images whose vectors a retraining fits the first stage on, at least (all, when fewer)
RETRAIN_PER_LIST = 64  # ... and per IVF list the retrained stores can have (as many as a fit on everything samples)
PATCH_SAMPLE_IMAGES = 4_096  # images whose decoded cells fit a new patch quantizer (65,536 of their cells are used)
RANGE_BLOCK = 65_536  # images decoded at a time for the ranges of a retraining


def _training_sample(reader: IndexReader, folder: Path, with_captions: bool, advance,
                     stream: bool = False) -> dict:
    """The first pass of a retraining. It gathers:

    * decoded vectors of a random sample of the live images: 64 per IVF list the retrained stores can have,
      65,536 at least, so every image of a smaller index (whose codebooks are then those a fit on everything
      gives);
    * decoded patch cells of a smaller sample of images (every image below ``PATCH_SAMPLE_IMAGES``);
    * where no caption quantizer is there to keep, up to ``CAPTION_PQ_MAX_TRAIN`` non-empty caption embeddings,
      a uniform sample of all of them (however few records have a caption);
    * where the refine quantizers are fitted anew (from the fp16 codec), the min and max of every dimension over
      all live vectors: their range, as if fitted on everything.

    Ranges and captions need every record, read a block at a time (or ``stream``, which gives the same samples);
    the samples alone are read where they lie, checked against their checksums (of a 10M-image index, 405,000
    images). Memory: the samples (allocated once at their final size) and one block, however large the index."""
    cb = reader.codebooks
    n_records, n_images, _ = _live_layout(reader)
    rng = np.random.default_rng(0)
    nlist = min(65_536, int(2 * math.sqrt(max(n_images, 1))))  # the most lists a store of this size gets

    def pick(n: int, size: int) -> np.ndarray:
        return np.sort(rng.choice(n, size=min(n, size), replace=False)) if n else np.zeros(0, np.int64)

    images = pick(n_images, max(RETRAIN_SAMPLE_MIN, RETRAIN_PER_LIST * nlist))
    cell_images = pick(n_images, PATCH_SAMPLE_IMAGES)
    dims = {n: cb.stores[n].dim for n in STORES}
    vecs = {n: np.empty((len(images), d), np.float32) for n, d in dims.items()}
    cells = np.empty((len(cell_images), cb.patch_cells, cb.patch_dims), np.float32)
    ranges = {n: (np.full(d, np.inf, np.float32), np.full(d, -np.inf, np.float32)) for n, d in dims.items()}
    with_ranges = n_images > 0 and cb.stores["clip"].codec != PQ  # pq refine quantizers are kept, or dropped
    fit_captions = with_captions and cb.caption_pq is None
    caps = np.zeros((0, dims["clip"]), np.float32)
    cap_keys = np.zeros(0, np.float64)  # a random key per kept caption: the smallest keys form a uniform sample
    ia = 0
    filled = {"vecs": 0, "cells": 0}

    def within(sample: np.ndarray, start: int, n: int) -> np.ndarray:
        return sample[(sample >= start) & (sample < start + n)] - start

    def gather(start: int, count: int, vectors, patch_cells) -> None:
        """Fill the samples with the sampled images among live images ``start .. start + count``:
        ``vectors(store, i)`` and ``patch_cells(i)`` decode those at positions ``i`` of that run."""
        for sample, key in ((images, "vecs"), (cell_images, "cells")):
            sel = within(sample, start, count)
            if len(sel):
                a, b = filled[key], filled[key] + len(sel)
                if key == "vecs":
                    for n in STORES:
                        vecs[n][a:b] = vectors(n, sel)
                else:
                    cells[a:b] = patch_cells(sel)
                filled[key] = b

    if not (stream or with_ranges or fit_captions):  # the samples alone: read where they lie
        for seg in reader.segments:  # the live images in the order the stream gives them: segment, then position
            live = np.flatnonzero(reader.live.keep(np.asarray(seg.image_rows)))
            for a in range(0, len(live), RANGE_BLOCK):
                block = live[a:a + RANGE_BLOCK]
                gather(ia + a, len(block), lambda n, i, s=seg, b=block: s.vectors(n, b[i]),
                       lambda i, s=seg, b=block: s.patch_cells(b[i]))
            ia += len(live)
            advance(1)
    else:
        for part, last in _live_parts(reader, folder, with_captions):
            ni = len(part.image_rows)
            for n in STORES:
                for a in range(0, ni if with_ranges else 0, RANGE_BLOCK):  # every vector, a block at a time
                    x = cb.decode_refine(n, part.refine[n][a:a + RANGE_BLOCK])
                    np.minimum(ranges[n][0], x.min(axis=0), out=ranges[n][0])
                    np.maximum(ranges[n][1], x.max(axis=0), out=ranges[n][1])
            gather(ia, ni, lambda n, i, p=part: cb.decode_refine(n, p.refine[n][i]),
                   lambda i, p=part: cb.decode_patches(p.patches[i]))
            if fit_captions and len(part.table):
                x = cb.decode_captions(part.caption_codes)
                x = x[x.any(axis=1)]
                caps, cap_keys = np.concatenate([caps, x]), np.concatenate([cap_keys, rng.random(len(x))])
                if len(caps) > CAPTION_PQ_MAX_TRAIN:  # keep the smallest keys, in record order
                    keep = np.sort(np.argpartition(cap_keys, CAPTION_PQ_MAX_TRAIN - 1)[:CAPTION_PQ_MAX_TRAIN])
                    caps, cap_keys = caps[keep], cap_keys[keep]
            ia += ni
            advance(int(last))
    return {"clip": vecs["clip"], "dino": vecs["dino"], "cells": cells, "images": n_images,
            "captions": caps if fit_captions else None, "ranges": ranges if with_ranges else None}


def _write_live(reader: IndexReader, folder: Path, seg_id: int, with_captions: bool, advance,
                new_cb: Codebooks | None = None, segments: list | None = None, gone: np.ndarray | None = None) -> dict:
    """Write the live records of ``segments`` (default: every segment) into one new segment, streamed a block of
    records at a time; returns its manifest entry. Memory: one block's codes plus the merged IVF lists. ``gone``:
    the deleted rows those segments hold, where the caller has them (``_deleted_within``).

    With the codebooks unchanged (``new_cb`` None) every code is copied and the old stores' lists are merged. With
    retrained codebooks the stores are filled again from the decoded refine vectors, and the refine, patch and
    caption codes are copied where their quantizer was kept (``Codebooks.train(keep=...)``), else decoded and coded
    with the new one, a block of images at a time."""
    cb = reader.codebooks
    segments = reader.segments if segments is None else segments
    n_records, n_images, schema = _live_layout(reader, segments)
    out = SegmentFiles(folder, segment_dir(seg_id), n_records, n_images, schema, with_captions)
    try:
        stores = {n: new_cb.new_store(n) for n in STORES} if new_cb is not None else {}
        for part, last in _live_parts(reader, folder, with_captions, segments):
            if new_cb is not None:
                part = _recoded(part, cb, new_cb, stores, with_captions)
            out.append(part)
            advance(int(last))
        if new_cb is None:
            gone = _deleted_within(reader, segments) if gone is None else gone
            for n in STORES:
                merged = cb.new_store(n)
                for seg in segments:
                    merged.merge_from(faiss.read_index(str(seg.path / path_of(n))), 0)
                if len(gone):
                    merged.remove_ids(faiss.IDSelectorBatch(gone))
                stores[n] = merged
        return out.commit(seg_id, stores)
    except BaseException:
        out.abort()
        raise


def _recoded(part: EncodedChunk, cb: Codebooks, new_cb: Codebooks, stores: dict,
             with_captions: bool) -> EncodedChunk:
    """One block of live records for codebooks ``new_cb``: its decoded vectors added to the new ``stores``, and its
    codes copied where their quantizer is the same, else coded again (image checksums then computed anew)."""
    refine = {}
    for n in STORES:
        x = cb.decode_refine(n, part.refine[n]) if len(part.image_rows) else np.zeros((0, cb.stores[n].dim), np.float32)
        if len(x):
            stores[n].add_with_ids(np.ascontiguousarray(x, np.float32), np.asarray(part.image_rows, np.int64))
        same = cb.stores[n].codec == new_cb.stores[n].codec and cb.sq.get(n) is new_cb.sq.get(n)
        refine[n] = part.refine[n] if same else new_cb.refine_codes(n, x)
    same_patches = cb.patch_codec == new_cb.patch_codec and cb.patch_pq is new_cb.patch_pq
    patches = part.patches
    if not same_patches:
        patches = np.concatenate([new_cb.encode_patches(cb.decode_patches(part.patches[a:a + PATCH_ENCODE_BLOCK]))
                                  for a in range(0, len(part.patches), PATCH_ENCODE_BLOCK)] or
                                 [np.zeros((0, *new_cb.patch_code_shape[:2]), new_cb.patch_code_shape[2])])
    caps = part.caption_codes
    if with_captions and not (cb.caption_codec == new_cb.caption_codec and cb.caption_pq is new_cb.caption_pq):
        caps = new_cb.encode_captions(cb.decode_captions(caps))
    copied = same_patches and all(refine[n] is part.refine[n] for n in STORES)
    return EncodedChunk(part.table, part.image_rows, {}, refine, patches, part.record_crc,
                        part.image_sums if copied else None, caps, part.caption_keys)


# --------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyReport:
    ok: bool
    problems: list[dict]  # {"component", "where", "problem"}
    checked: dict  # what was checked (counts)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "checked": self.checked}


def verify(index: str | os.PathLike, progress: bool = True) -> VerifyReport:
    """Check every byte of an index: the manifest's own checksum, every file against its sha256, every code
    against its checksum, every record against its CRC, finite vectors, row tables, deletions and the caption
    index. Each problem names the damaged component."""
    folder = Path(index).expanduser().absolute()
    problems: list[dict] = []
    checked = {"files": 0, "bytes": 0, "records": 0, "images": 0}

    def bad(component: str, where: str, problem: str) -> None:
        problems.append({"component": component, "where": where, "problem": problem})

    try:
        m = read_manifest(folder)
    except IndexFormatError as e:
        return VerifyReport(False, [{"component": "manifest", "where": str(folder), "problem": str(e)}], checked)
    files = []
    cb = m.get("codebooks") or {}
    for name, want in cb.get("files", {}).items():
        files.append(("codebooks", f"{codebook_dir(int(cb['generation']))}/{name}", want))
    for seg in m["segments"]:
        for name, want in seg["files"].items():
            files.append((_component_of(name), f"{seg['path']}/{name}", want))
    if m.get("deletes"):
        files.append(("deletes", m["deletes"]["path"], {"sha256": m["deletes"]["sha256"]}))
    from .ui import progress_bar

    with progress_bar("verifying files", len(files), enabled=progress, unit="file") as advance:
        for comp, rel, want in files:
            p = folder / rel
            if not p.is_file():
                bad(comp, rel, "missing")
            elif "bytes" in want and p.stat().st_size != want["bytes"]:
                bad(comp, rel, f"{p.stat().st_size} bytes, the manifest records {want['bytes']}")
            elif sha256_file(p) != want["sha256"]:
                bad(comp, rel, "content does not match its sha256 (changed or damaged)")
            else:
                checked["files"] += 1
                checked["bytes"] += p.stat().st_size
            advance(1)
    if problems:
        return VerifyReport(False, problems, checked)
    try:
        reader = IndexReader(folder, hash_files=False)
    except IndexFormatError as e:
        bad("index", str(folder), str(e))
        return VerifyReport(False, problems, checked)
    seen_ids: set[str] = set()
    for seg in reader.segments:
        where = seg.path.name
        rows = np.asarray(seg.rows)
        if not np.isin(np.asarray(seg.image_rows), rows).all():
            bad("image_rows", where, "image rows that are not record rows")
        for j, name in enumerate(("clip_refine", "dino_refine", "patches")):
            codes = (seg.refine["clip"], seg.refine["dino"], seg.patches)[j]
            if len(codes):
                got = row_sums(np.asarray(codes))
                wrong = np.flatnonzero(got != np.asarray(seg.image_sums)[:, j])
                if len(wrong):
                    bad(name, where, f"{len(wrong)} images do not match their checksums (rows "
                                     f"{np.asarray(seg.image_rows)[wrong[:5]].tolist()})")
                if np.asarray(codes).dtype == np.float16 and not np.isfinite(np.asarray(codes)).all():
                    bad(name, where, "holds non-finite values")
        if seg.caption_codes is not None and seg.n_records:
            wrong = np.flatnonzero(row_sums(np.asarray(seg.caption_codes)) != np.asarray(seg.caption_sums))
            if len(wrong):
                bad("caption_clip", where, f"{len(wrong)} caption embeddings do not match their checksums (rows "
                                           f"{np.asarray(seg.rows)[wrong[:5]].tolist()})")
        try:
            seg.serving(np.arange(seg.n_records))
        except IndexFormatError as e:
            bad("serving", where, str(e))
        live = reader.live.keep(rows)
        ids = [str(x) for x, ok in zip(seg.all_ids(), live) if ok]
        dup = seen_ids.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            bad("records", where, f"duplicate ids, e.g. {sorted(dup)[:3]}")
        seen_ids.update(ids)
        checked["records"] += seg.n_records
        checked["images"] += seg.n_images
    if len(reader.live.deleted):
        if len(np.setdiff1d(reader.live.deleted, np.concatenate([np.asarray(s.rows) for s in reader.segments]))):
            bad("deletes", m["deletes"]["path"], "lists rows that are in no segment")
    try:
        _check_text(reader, bad)
    except MemoryError:
        raise
    except BaseException as e:  # noqa: BLE001 - tantivy may panic (a BaseException) on damaged files
        if not (isinstance(e, Exception) or is_panic(e)):
            raise
        bad("text", "text", f"reading the caption index failed ({e.__class__.__name__}: {e}); rebuild the index")
    reader.close()
    return VerifyReport(not problems, problems, checked)


def _check_text(reader: IndexReader, bad) -> None:
    """The caption index against the records: one document per live record, and every term of the live captions
    in at least as many documents as live captions hold it (a damaged term dictionary or posting list changes
    these counts, and with them every BM25 score). Documents of deleted records may linger until tantivy merges
    its segments, so counts may be higher, never lower."""
    from collections import Counter

    text_rows = _text_rows(reader)
    live_rows = reader.live_rows()
    missing = np.setdiff1d(live_rows, text_rows)
    if len(missing):
        bad("text", "text", f"{len(missing)} live records have no caption document (e.g. rows {missing[:5].tolist()})")
    stray = np.setdiff1d(np.unique(text_rows), live_rows)
    if len(stray):
        bad("text", "text", f"{len(stray)} caption documents belong to no live record (rows {stray[:5].tolist()}); "
                            f"an interrupted writer leaves these, the next write removes them")
    analyzer = reader.text.analysis.analyzer
    df: Counter = Counter()
    for seg in reader.segments:
        caps = pq.read_table(seg.path / path_of("records"), columns=["caption"]).column("caption").to_pylist()
        for cap, live in zip(caps, reader.live.keep(np.asarray(seg.rows))):
            if live and cap:
                df.update(set(analyzer.analyze(cap)))
    indexed = {t: reader.text.doc_freq(t) for t in df}
    short = [(t, n, indexed[t]) for t, n in df.items() if indexed[t] < n]
    if short:
        eg = ", ".join(f"{t!r} in {got} documents for {want} captions" for t, want, got in short[:3])
        bad("text", "text", f"{len(short)} caption terms are in fewer documents than live captions hold them ({eg}): "
                            "the caption index is damaged; rebuild the index")
        return
    # the posting lists and row values: a search for each term (a fixed sample of them on large indexes) finds at
    # least the live captions that hold it, each with its row
    terms = sorted(df)
    if len(terms) > VERIFY_TERM_SEARCHES:
        terms = [terms[i] for i in np.random.default_rng(0).choice(len(terms), VERIFY_TERM_SEARCHES, replace=False)]
    for t in terms:
        got, _ = reader.text.search([t], max(1, indexed[t]))
        if len(got) < df[t]:
            bad("text", "text", f"a search for the caption term {t!r} finds {len(got)} documents for {df[t]} live "
                                "captions that hold it: the caption index is damaged; rebuild the index")
            return


def _text_rows(reader: IndexReader) -> np.ndarray:
    import tantivy

    s = reader.text.searcher
    n = s.num_docs
    if n == 0:
        return np.zeros(0, np.int64)
    hits = s.search(tantivy.Query.all_query(), limit=n, count=False).hits
    return np.asarray(s.fast_field_values(ROW_FIELD, [a for _, a in hits]), np.int64)


def _component_of(file_name: str) -> str:
    from ._layout import at_level

    for c in at_level("segment"):
        if c.path == file_name:
            return c.name
    return file_name
