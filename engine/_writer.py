"""Writing an index folder from already-encoded records: the stores, the rejects list and, last, the manifest.

``build_index`` drives the writer with real images; benchmarks drive it with synthetic vectors through the same
calls (``add_caption_only`` / ``add_images``), so both produce identical folders. File names come from the layout
table (``engine._layout``).
"""
from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from ._captions import CaptionSignalsSink
from ._layout import COMPONENTS, MANIFEST, path_of
from ._manifest import FORMAT_NAME, FORMAT_VERSION, library_versions, now_iso, write_json_atomic
from ._settings import IndexSettings
from ._stores import ANALYZER_DESC, DinoProjection, RawVectorSink, TextSink, build_faiss, choose_ann
from ._threads import blas_single
from .files import fsync_dir

SERVING_COLUMNS = ("id", "image", "caption")


class IndexWriter:
    """Writes the stores of one index folder from already-encoded records.

    ``build_index`` drives it with real images; benchmarks drive it with synthetic vectors through the same
    calls (``add_caption_only`` / ``add_images``), so both produce identical folders.
    """

    def __init__(self, folder: Path, identity: dict, settings: IndexSettings,
                 extra_columns: dict[str, pl.DataType] | None = None, caption_encoder=None) -> None:
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
        self._patches = open(folder / path_of("patches"), "wb")
        self._text = TextSink(folder / path_of("text"))
        self._captions = CaptionSignalsSink(folder, caption_encoder, self.clip_dim)  # captions -> CLIP, duplicates
        self._pq: pq.ParquetWriter | None = None
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._rows: list[dict] = []
        self._slots: list[int] = []
        self._row_slot: list[int] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # raw DINO outputs before the PCA fit
        self._pending_n = 0
        self.projection: DinoProjection | None = None
        self.rejects = open(folder / path_of("rejects"), "w", encoding="utf-8")
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
        self._captions.add(caption)
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
        self.rejects.write(
            json.dumps({"record": where, "id": rid, "reason": reason, "detail": detail}, ensure_ascii=False) + "\n")
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
            self._pq = pq.ParquetWriter(self.folder / path_of("records"), table.schema, compression="zstd")
            serving = table.select(list(SERVING_COLUMNS)).schema
            self._ipc = pa.ipc.new_file(str(self.folder / path_of("serving")), serving)
        table = table.cast(self._pq.schema)
        self._pq.write_table(table)
        self._ipc.write_table(table.select(list(SERVING_COLUMNS)))
        self._rows.clear()

    def abort(self) -> None:
        """Release every open file, writer and thread after a failed build (the folder is then deleted)."""
        closers = [self._patches.close, self.rejects.close, self._clip.abort, self._dino.abort, self._captions.abort]
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
        captions = self._captions.close()
        assert self.projection is not None
        self.projection.save(self.folder / path_of("projection"))
        np.save(self.folder / path_of("slots"), np.asarray(self._slots, np.int64))
        np.save(self.folder / path_of("row_slot"), np.asarray(self._row_slot, np.int32))
        ann = {}
        for name, sink in (("clip", self._clip), ("dino", self._dino)):
            vecs = sink.close()
            kind = choose_ann(self.settings.ann, vecs.shape[0], self.settings.ann_flat_max)
            ann[name] = build_faiss(vecs, self.folder / path_of(name), kind)
            del vecs
            sink.path.unlink()
        comp = {}
        for c in COMPONENTS:
            p = self.folder / c.path
            if not c.required and not p.exists():
                continue
            comp[c.name] = {"path": c.path, "bytes": p.stat().st_size} if p.is_file() else {"path": c.path}
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
            "text": {"analyzer": ANALYZER_DESC, "bm25": {"k1": 1.2, "b": 0.75}, "caption_signals": captions},
            "extra_columns": list(self.extra_schema),
            "source": source,
            "components": comp,
            "versions": library_versions(),
            **(extra_manifest or {}),
        }
        fsync_dir(self.folder)
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest


