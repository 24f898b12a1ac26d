"""Building an index folder: ingestion -> parallel decoding -> batched encoding -> stores -> manifest.

The folder is written under a hidden temporary name next to the target and renamed into place only when
complete (manifest last), so an interrupted or crashed build never leaves a folder that looks valid.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from ._errors import AttribError, EmptyCorpusError
from ._images import ImageLimits, ImageRejected, encoder_inputs, read_bytes
from ._ingest import Record, Source, open_source
from ._manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, library_versions, now_iso,
                        write_json_atomic)
from ._profiles import get_profile
from ._settings import IndexSettings
from ._fs import fsync_dir, staged_folder
from ._stores import ANALYZER_DESC, DinoProjection, RawVectorSink, TextSink, build_faiss, choose_ann
from ._threads import blas_single
from ._ui import progress_bar

# File names inside an index folder.
RECORDS, CLIP_INDEX, DINO_INDEX, PATCHES = "records.parquet", "clip.faiss", "dino.faiss", "patches.f16"
SERVING = "records.arrow"  # id, image, caption as uncompressed Arrow IPC: memory-mapped by queries
SERVING_COLUMNS = ("id", "image", "caption")
SLOTS, ROW_SLOT, PROJECTION, TEXT_DIR, REJECTS = "slots.npy", "row_slot.npy", "projection.npz", "text", "rejects.jsonl"


@dataclass
class BuildSummary:
    index_dir: Path
    records: int  # records indexed (with or without image)
    images: int  # records with an encoded image
    rejected: int  # records skipped (see rejects.jsonl)
    reject_reasons: dict[str, int]  # reason -> count
    ignored_files: list[str]  # files in a folder source that were neither images nor sidecars
    seconds: float  # wall time of the whole build
    encode_seconds: float  # time spent inside the encoders
    manifest: dict = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


class IndexWriter:
    """Writes the stores of one index folder from already-encoded records.

    ``build_index`` drives it with real images; benchmarks drive it with synthetic vectors through the same
    calls (``add_caption_only`` / ``add_images``), so both produce identical folders.
    """

    def __init__(self, folder: Path, identity: dict, settings: IndexSettings,
                 extra_columns: dict[str, pl.DataType] | None = None) -> None:
        self.folder, self.identity, self.settings = folder, identity, settings
        folder.mkdir(parents=True, exist_ok=True)
        self.clip_dim = int(identity["clip"]["dim"])
        self.dino_dim = int(identity["dino"]["dim"])
        self.cells = settings.patch_grid ** 2
        self.patch_dims = min(settings.patch_dims, self.dino_dim)
        self.extra_schema = dict(extra_columns or {})
        self.schema = {"id": pl.String, "image": pl.String, "caption": pl.String, "slot": pl.Int32, **self.extra_schema}
        self._clip = RawVectorSink(folder / "clip.f32.part", self.clip_dim)
        self._dino = RawVectorSink(folder / "dino.f32.part", 2 * self.dino_dim)
        self._patches = open(folder / PATCHES, "wb")
        self._text = TextSink(folder / TEXT_DIR)
        self._pq: pq.ParquetWriter | None = None
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._rows: list[dict] = []
        self._slots: list[int] = []
        self._row_slot: list[int] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # raw DINO outputs before the PCA fit
        self._pending_n = 0
        self.projection: DinoProjection | None = None
        self.rejects = open(folder / REJECTS, "w", encoding="utf-8")
        self.reject_reasons: collections.Counter[str] = collections.Counter()
        self.n_rows = 0
        self.n_images = 0

    # ------------------------------------------------------------------------------------------ adding
    def _add_row(self, rid: str, image: str | None, caption: str, extra: dict, slot: int) -> int:
        row = self.n_rows
        rec = {"id": rid, "image": image, "caption": caption, "slot": slot}
        for k in self.extra_schema:
            rec[k] = extra.get(k)
        self._rows.append(rec)
        self._row_slot.append(slot)
        self._text.add(row, caption)
        self.n_rows += 1
        if len(self._rows) >= 8192:
            self._flush_rows()
        return row

    def add_caption_only(self, rid: str, caption: str, extra: dict | None = None) -> int:
        return self._add_row(rid, None, caption, extra or {}, -1)

    def add_images(self, ids: list[str], images: list[str | None], captions: list[str], extras: list[dict],
                   clip: np.ndarray, dino_cls: np.ndarray, dino_mean: np.ndarray, dino_cells: np.ndarray) -> None:
        """Add a batch of image records with their raw encoder outputs (see ``ImageFeatures``)."""
        for rid, img, cap, ex in zip(ids, images, captions, extras):
            row = self._add_row(rid, img, cap, ex, self.n_images)
            self._slots.append(row)
            self.n_images += 1
        self._clip.add(clip)
        if self.projection is None:
            self._pending.append((dino_cls, dino_mean, dino_cells))
            self._pending_n += len(ids)
            if self._pending_n >= self.settings.pca_sample:
                self._fit_projection()
        else:
            self._write_dino(dino_cls, dino_mean, dino_cells)

    def reject(self, where: str, rid: str | None, reason: str, detail: str = "") -> None:
        self.rejects.write(json.dumps({"record": where, "id": rid, "reason": reason, "detail": detail}, ensure_ascii=False) + "\n")
        self.reject_reasons[reason] += 1

    # ------------------------------------------------------------------------------------------ internals
    def _fit_projection(self) -> None:
        if self._pending:
            cls = np.concatenate([p[0] for p in self._pending])
            pm = np.concatenate([p[1] for p in self._pending])
            cells = np.concatenate([p[2] for p in self._pending])
            self.projection = DinoProjection.fit(cls, pm, cells, self.patch_dims)
        else:  # a caption-only corpus: nothing to fit and nothing to project
            self.projection = DinoProjection.identity(self.dino_dim, self.patch_dims)
        self.patch_dims = self.projection.cell_dim
        for p in self._pending:
            self._write_dino(*p)
        self._pending.clear()

    @blas_single
    def _write_dino(self, cls: np.ndarray, pm: np.ndarray, cells: np.ndarray) -> None:
        assert self.projection is not None
        self._dino.add(self.projection.global_desc(cls, pm))
        self._patches.write(self.projection.project_cells(cells).astype(np.float16).tobytes())

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        table = pl.DataFrame(self._rows, schema=self.schema, strict=False, orient="row").to_arrow()
        self._write_tables(table)

    def _write_tables(self, table: pa.Table) -> None:
        """The full metadata to parquet (interchange) and its serving columns to Arrow IPC (queries)."""
        if self._pq is None:
            self._pq = pq.ParquetWriter(self.folder / RECORDS, table.schema, compression="zstd")
            serving = table.select(list(SERVING_COLUMNS)).schema
            self._ipc = pa.ipc.new_file(str(self.folder / SERVING), serving)
        table = table.cast(self._pq.schema)
        self._pq.write_table(table)
        self._ipc.write_table(table.select(list(SERVING_COLUMNS)))
        self._rows.clear()

    def abort(self) -> None:
        """Release every open file, writer and thread after a failed build (the folder is then deleted)."""
        closers = [self._patches.close, self.rejects.close, self._clip.abort, self._dino.abort]
        if self._pq is not None:
            closers += [self._pq.close, self._ipc.close]
        closers.append(self._text.abort)
        for close in closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort: the folder is deleted next
                pass

    # ------------------------------------------------------------------------------------------ finishing
    def finalize(self, source: dict, extra_manifest: dict | None = None) -> dict:
        """Close every store, build the faiss indexes and write the manifest last. Returns the manifest."""
        if self.projection is None:
            self._fit_projection()
        self._flush_rows()
        if self._pq is None:  # no rows at all: still write valid (empty) tables
            self._write_tables(pl.DataFrame(schema=self.schema).to_arrow())
        self._pq.close()
        self._ipc.close()
        self._patches.close()
        self.rejects.close()
        self._text.close()
        assert self.projection is not None
        self.projection.save(self.folder / PROJECTION)
        np.save(self.folder / SLOTS, np.asarray(self._slots, np.int64))
        np.save(self.folder / ROW_SLOT, np.asarray(self._row_slot, np.int32))
        ann = {}
        for name, sink, out in (("clip", self._clip, CLIP_INDEX), ("dino", self._dino, DINO_INDEX)):
            vecs = sink.close()
            kind = choose_ann(self.settings.ann, vecs.shape[0], self.settings.ann_flat_max)
            ann[name] = build_faiss(vecs, self.folder / out, kind)
            del vecs
            sink.path.unlink()
        components = {
            "records": RECORDS, "serving": SERVING, "clip": CLIP_INDEX, "dino": DINO_INDEX, "patches": PATCHES, "text": TEXT_DIR,
            "slots": SLOTS, "row_slot": ROW_SLOT, "projection": PROJECTION, "rejects": REJECTS,
        }
        comp = {}
        for name, rel in components.items():
            p = self.folder / rel
            comp[name] = {"path": rel, "bytes": p.stat().st_size} if p.is_file() else {"path": rel}
        rejected = int(sum(self.reject_reasons.values()))
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": now_iso(),
            "models": self.identity,
            "untrained": not self.identity.get("pretrained", False),
            "dims": {
                "clip": self.clip_dim,
                "dino": self.dino_dim,
                "dino_global": 2 * self.dino_dim,
                "patch_grid": self.settings.patch_grid,
                "patch_cells": self.cells,
                "patch_dims": self.patch_dims,
            },
            "counts": {
                "records": self.n_rows,
                "images": self.n_images,
                "caption_only": self.n_rows - self.n_images,
                "rejected": rejected,
                "reject_reasons": dict(self.reject_reasons),
            },
            "settings": self.settings.to_dict(),
            "ann": ann,
            "text": {"analyzer": ANALYZER_DESC, "bm25": {"k1": 1.2, "b": 0.75}},
            "extra_columns": list(self.extra_schema),
            "source": source,
            "components": comp,
            "versions": library_versions(),
            **(extra_manifest or {}),
        }
        fsync_dir(self.folder)
        write_json_atomic(self.folder / MANIFEST_NAME, manifest)
        return manifest


# --------------------------------------------------------------------------------------------- pipeline
def _prefetch(items: Iterable[Record], fn: Callable[[Record], object], workers: int, window: int) -> Iterator[tuple[Record, object]]:
    """Ordered parallel map with a bounded number of items in flight."""
    if workers <= 0:
        for it in items:
            yield it, fn(it)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attrib-decode") as ex:
        q: collections.deque[tuple[Record, Future]] = collections.deque()
        try:
            for it in items:
                q.append((it, ex.submit(fn, it)))
                if len(q) >= window:
                    r, f = q.popleft()
                    yield r, f.result()
            while q:
                r, f = q.popleft()
                yield r, f.result()
        finally:
            for _, f in q:
                f.cancel()


def _stale_builds(out: Path) -> None:
    """Remove temporary folders left by builds of ``out`` whose process is gone (a kill -9, a power cut)."""
    for p in out.parent.glob(f".{out.name}.building-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AttribError(f"{out} exists and is a file; choose another --out")
    if not any(out.iterdir()):
        return
    is_index = (out / MANIFEST_NAME).exists()
    if not overwrite:
        what = "an index" if is_index else "a non-empty folder"
        raise AttribError(f"{out} already exists ({what}); pass --overwrite to replace it, or choose another --out")
    if not is_index:
        raise AttribError(f"{out} is a non-empty folder that is not an attrib index; refusing to replace it")


def build_index(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str = "default",
    device: str | None = None,
    settings: IndexSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    clip_weights: str | None = None,
    dino_weights: str | None = None,
    encoders=None,
) -> BuildSummary:
    """Index a training set (folder, tar shard, or parquet/CSV/JSONL table) into the folder ``out``."""
    t0 = time.perf_counter()
    settings = settings or IndexSettings()
    if encoders is None:
        get_profile(models)  # an unknown profile fails before any slow work
    out = Path(out).expanduser().absolute()
    src = open_source(source, settings.max_bytes)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _stale_builds(out)
    if encoders is None:
        from ._encoders import Encoders

        encoders = Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
    with staged_folder(out, "building") as tmp:  # renamed into place only when complete
        writer = IndexWriter(tmp, encoders.identity, settings, src.extra_columns)
        try:
            encode_s = _run_pipeline(src, writer, encoders, settings, progress)
            if writer.n_rows == 0:
                writer.rejects.flush()
                raise EmptyCorpusError(_empty_message(src, tmp))
            manifest = writer.finalize({"path": str(Path(source).expanduser().absolute()), "kind": src.kind,
                                        "ignored_files": len(src.ignored)})
        except BaseException:
            writer.abort()
            raise
    return BuildSummary(
        out, writer.n_rows, writer.n_images, int(sum(writer.reject_reasons.values())), dict(writer.reject_reasons),
        list(src.ignored), time.perf_counter() - t0, encode_s, manifest,
    )


def _empty_message(src: Source, tmp: Path) -> str:
    lines = []
    try:
        with open(tmp / REJECTS, encoding="utf-8") as f:
            lines = [json.loads(x) for x in f.read().splitlines()[:10]]
    except (OSError, json.JSONDecodeError):
        pass
    if not lines:
        return f"the source {src.path} holds no records (no images, no captions); nothing was written"
    detail = "; ".join(f"{r['record']}: {r['reason']}" for r in lines)
    return f"every record of {src.path} was rejected, so no index was written. First rejects: {detail}"


def _run_pipeline(src: Source, writer: IndexWriter, encoders, settings: IndexSettings, progress: bool) -> float:
    limits = ImageLimits(settings.max_pixels, settings.max_bytes)
    cin, din = encoders.clip_input, encoders.dino_input

    def prepare(rec: Record):
        if rec.image is None:
            return None
        try:
            data = rec.data if rec.data is not None else read_bytes(rec.image, limits)
            return encoder_inputs(data, limits, cin, din)
        except ImageRejected as e:
            return e
        except MemoryError:
            return ImageRejected("image too large (decompression bomb)", "out of memory while decoding")

    seen: set[str] = set()
    # Items keep source order: caption-only records wait with the images so row numbers follow the source.
    batch: list[tuple[Record, tuple[np.ndarray, np.ndarray] | None]] = []
    n_img = 0
    encode_s = 0.0

    def flush() -> None:
        nonlocal encode_s, n_img
        if not batch:
            return
        imgs = [(r, o) for r, o in batch if o is not None]
        feats = None
        if imgs:
            t = time.perf_counter()
            feats = encoders.encode_images(np.stack([o[0] for _, o in imgs]), np.stack([o[1] for _, o in imgs]),
                                           settings.patch_grid)
            encode_s += time.perf_counter() - t
        j = 0
        i = 0
        while i < len(batch):
            rec, o = batch[i]
            if o is None:
                writer.add_caption_only(rec.key, rec.caption, rec.extra)
                i += 1
                continue
            run = []
            while i < len(batch) and batch[i][1] is not None:
                run.append(batch[i][0])
                i += 1
            sl = slice(j, j + len(run))
            j += len(run)
            writer.add_images([r.key for r in run], [r.image for r in run], [r.caption for r in run],
                              [r.extra for r in run], feats.clip[sl], feats.dino_cls[sl], feats.dino_mean[sl],
                              feats.dino_cells[sl])
        batch.clear()
        n_img = 0

    window = max(2 * settings.batch_size, 4 * max(1, settings.workers))
    with progress_bar("indexing", src.count, enabled=progress) as advance, \
            contextlib.closing(_prefetch(src.records(), prepare, settings.workers, window)) as prepared:
        for rec, out in prepared:
            rec.data = None  # free tar bytes early
            advance(1)
            key = rec.key
            if key in seen:
                writer.reject(rec.where, key, "duplicate id", "an earlier record already has this id")
                continue
            if isinstance(out, ImageRejected):
                writer.reject(rec.where, key, out.reason, out.detail)
                continue
            seen.add(key)
            batch.append((rec, out))
            if out is not None:
                n_img += 1
            if n_img >= settings.batch_size or len(batch) >= 64 * settings.batch_size:
                flush()
        flush()
    return encode_s

