"""Writing an index: records arrive (already encoded), are collected into chunks, and each chunk is committed as
an immutable segment plus a new manifest generation. A build killed at any moment resumes from its last
commit; nothing half-written is ever visible to a reader (it reads committed generations only).

``build_index`` drives the writer with real images; benchmarks drive it with synthetic vectors through the same
calls (``add_caption_only`` / ``add_images``), so both produce identical folders. File names come from the
layout table (``engine._layout``)."""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl

from ._codebooks import Codebooks
from ._errors import AttribError, IndexFormatError
from ._layout import MANIFEST, codebook_dir, path_of, segment_dir
from ._lock import WriterLock
from ._manifest import FORMAT_NAME, FORMAT_VERSION, library_versions, now_iso, read_manifest, write_manifest
from ._segment import Chunk, remove_segment, remove_uncommitted, segment_ids, write_segment
from ._settings import IndexSettings
from ._stores import ANALYZER_DESC, DinoProjection, TextSink
from ._threads import blas_single
from .files import remove

#: What a writer creates in an index folder (besides the manifest and the lock): removed by a new build that
#: finds no committed manifest, never anything else.
WRITTEN = ("text", "segments", "codebooks", "deletes", "rejects.jsonl")
#: A chunk also closes after this many records per image of --chunk (caption-only corpora).
RECORDS_PER_CHUNK_IMAGE = 16
CAPTION_BATCH = 256  # captions per call of the caption encoder


class IndexWriter:
    """Writes the segments of one index folder (see the module docstring).

    Args:
        folder: the index folder; created when missing. A folder that already holds a manifest is opened for
            appending (or resuming) instead, with ``models`` checked against it.
        identity: the encoders' identity (``Encoders.identity``); its fingerprint must match an existing index.
        settings: index settings (chunk size, codec, patch grid...); an existing index keeps its own format, and
            takes the run's batch size, decoding threads, chunk and input limits (``IndexSettings.for_run``).
        extra_columns: source columns beyond id/image/caption, with their polars types.
        expected_images: how many images the whole build should hold (chooses the codec and IVF size).
        source: what is being indexed ({"path", "kind", "fingerprint", ...}): a resumed build must match it.
        caption_encoder: captions -> (n, Dc) L2-normalised CLIP text embeddings (``Encoders.encode_texts``), stored
            per record for the caption_clip ranker; without it (and without ``caption_clip=`` given to
            ``add_projected``) segments hold no caption embeddings.
    """

    def __init__(self, folder: Path, identity: dict, settings: IndexSettings | None = None,
                 extra_columns: dict[str, pl.DataType] | None = None, expected_images: int | None = None,
                 source: dict | None = None, caption_encoder: Callable[[list[str]], np.ndarray] | None = None) -> None:
        self.folder = Path(folder)
        self.caption_encoder = caption_encoder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(self.folder, "build").acquire()
        try:
            self._open(identity, settings, extra_columns, expected_images, source)
        except BaseException:
            self.lock.release()
            raise

    # ----------------------------------------------------------------------------------------- opening
    def _open(self, identity, settings, extra_columns, expected_images, source) -> None:
        self.identity = identity
        self.extra_schema = dict(extra_columns or {})
        self.source = dict(source or {})
        self.clip_dim = int(identity["clip"]["dim"])
        self.dino_dim = int(identity["dino"]["dim"])
        if (self.folder / MANIFEST).exists():
            m = read_manifest(self.folder)
            if m["models"]["fingerprint"] != identity["fingerprint"]:
                raise AttribError(
                    f"index {self.folder} was built with models {m['models']['profile']!r} (fingerprint "
                    f"{m['models']['fingerprint']}); these are {identity['profile']!r} ({identity['fingerprint']}). "
                    f"Use the same models, or build another index")
            self.manifest = m
            self.settings = IndexSettings.from_dict(m["settings"]).for_run(settings)
            cb = m.get("codebooks")
            self.codebooks = Codebooks.load(self.folder / codebook_dir(int(cb["generation"])), cb) if cb else None
            self.projection = self.codebooks.projection if self.codebooks else None
        else:
            self.manifest = None
            self.settings = settings or IndexSettings()
            self.codebooks = None
            self.projection = None
        if self.manifest is None:  # a build killed before its first commit left nothing worth keeping
            for name in WRITTEN:
                remove(self.folder / name)
        self.expected_images = int(expected_images or 0)
        self.cells = self.settings.patch_grid ** 2
        self.patch_dims = min(self.settings.patch_dims, self.dino_dim)
        self._cleanup_uncommitted()
        chain = (self.manifest.get("text") or {}).get("analyzer") if self.manifest else None
        self.text = TextSink(self.folder / path_of("text"), chain=chain)
        self.text.delete_rows_from(self.next_row)  # documents of a crashed writer, never committed
        self.text.commit()
        self.rejects_path = self.folder / path_of("rejects")
        self._truncate_rejects()
        self.rejects = open(self.rejects_path, "a", encoding="utf-8")
        counts = self.manifest["counts"] if self.manifest else {}
        self.reject_reasons: collections.Counter[str] = collections.Counter(counts.get("reject_reasons", {}))
        self.known_ids: set[str] = set()
        if self.manifest:
            deleted = set(self._deleted_rows().tolist())
            for e in self.manifest["segments"]:
                rows, ids = segment_ids(self.folder, e)
                self.known_ids.update(str(i) for r, i in zip(rows.tolist(), ids) if r not in deleted)
        self._reset_chunk()
        self.auto_commit = True  # commit by itself when a chunk is full (a pipeline that tracks progress: False)
        self.n_rows = 0  # records added by this writer
        self.n_images = 0
        self.committed_this_run = 0

    def _deleted_rows(self) -> np.ndarray:
        d = self.manifest.get("deletes") if self.manifest else None
        return np.load(self.folder / d["path"], allow_pickle=False) if d else np.zeros(0, np.int64)

    @property
    def next_row(self) -> int:
        return int(self.manifest["next_row"]) if self.manifest else 0

    def _cleanup_uncommitted(self) -> None:
        """Remove what a crashed writer left that no committed generation lists (segments, codebooks, temps)."""
        remove_uncommitted(self.folder, self.manifest)

    @property
    def committed_rejects_bytes(self) -> int:
        """Length of ``rejects.jsonl`` as of the last committed generation (lines after it are this run's)."""
        return int(self.manifest.get("rejects_bytes", 0)) if self.manifest else 0

    def _truncate_rejects(self) -> None:
        committed = self.committed_rejects_bytes
        if self.rejects_path.exists() and self.rejects_path.stat().st_size > committed:
            with open(self.rejects_path, "r+b") as f:
                f.truncate(committed)

    def _reset_chunk(self) -> None:
        self._records: list[dict] = []
        self._image_rows: list[int] = []
        self._clip: list[np.ndarray] = []
        self._dino: list[np.ndarray] = []
        self._cells: list[np.ndarray] = []
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # raw DINO outputs before the PCA fit
        self._given_captions: dict[int, np.ndarray] = {}  # chunk position -> caption embedding given by a caller
        self._chunk_images = 0

    # ----------------------------------------------------------------------------------------- adding
    def _add_row(self, rid: str, image: str | None, caption: str, extra: dict) -> int:
        row = self.next_row + len(self._records)
        rec = {"row": row, "id": rid, "image": image, "caption": caption}
        for k in self.extra_schema:
            rec[k] = extra.get(k)
        self._records.append(rec)
        self.known_ids.add(str(rid))
        self.n_rows += 1
        return row

    def add_caption_only(self, rid: str, caption: str, extra: dict | None = None) -> int:
        row = self._add_row(rid, None, caption, extra or {})
        self._maybe_commit()
        return row

    def add_images(self, ids: list[str], images: list[str | None], captions: list[str], extras: list[dict],
                   clip: np.ndarray, dino_cls: np.ndarray, dino_mean: np.ndarray, dino_cells: np.ndarray) -> None:
        """Add a batch of image records with their raw encoder outputs (see ``ImageFeatures``)."""
        for rid, img, cap, ex in zip(ids, images, captions, extras):
            self._image_rows.append(self._add_row(rid, img, cap, ex))
        self.n_images += len(ids)
        self._chunk_images += len(ids)
        self._clip.append(np.asarray(clip, np.float32))
        if self.projection is None:
            self._pending.append((dino_cls, dino_mean, dino_cells))
            if sum(len(p[0]) for p in self._pending) >= self.settings.pca_sample:
                self._fit_projection()
        else:
            self._project(dino_cls, dino_mean, dino_cells)
        self._maybe_commit()

    def add_projected(self, ids: list[str], images: list[str | None], captions: list[str], extras: list[dict],
                      clip: np.ndarray, dino_global: np.ndarray, cells: np.ndarray,
                      caption_clip: np.ndarray | None = None) -> None:
        """Add image records whose descriptors are already in the stored space: L2-normalised CLIP vectors,
        DINO global descriptors (n, 2D) and projected patch cells (n, C, Dp) - e.g. embeddings computed
        elsewhere, or synthetic vectors in benchmarks. An index fed this way has no fitted projection (its
        DINO projection is the identity), so its queries must come in the same space. ``caption_clip``: the
        captions' CLIP text embeddings (n, Dc), when computed elsewhere too."""
        if self.projection is None:
            if self._pending:
                raise AttribError("add_projected cannot follow add_images before the projection is fitted")
            self.projection = DinoProjection.identity(self.dino_dim, self.patch_dims)
        for j, (rid, img, cap, ex) in enumerate(zip(ids, images, captions, extras)):
            if caption_clip is not None:
                self._given_captions[len(self._records)] = np.asarray(caption_clip[j], np.float32)
            self._image_rows.append(self._add_row(rid, img, cap, ex))
        self.n_images += len(ids)
        self._chunk_images += len(ids)
        self._clip.append(np.asarray(clip, np.float32))
        self._dino.append(np.asarray(dino_global, np.float32))
        self._cells.append(np.asarray(cells, np.float16))
        self._maybe_commit()

    def reject(self, where: str, rid: str | None, reason: str, detail: str = "") -> None:
        self.rejects.write(json.dumps({"record": where, "id": rid, "reason": reason, "detail": detail},
                                      ensure_ascii=False) + "\n")
        self.reject_reasons[reason] += 1

    def has_id(self, rid: str) -> bool:
        return str(rid) in self.known_ids

    # ----------------------------------------------------------------------------------------- internals
    def _fit_projection(self) -> None:
        if self._pending:
            cls = np.concatenate([p[0] for p in self._pending])
            pm = np.concatenate([p[1] for p in self._pending])
            cells = np.concatenate([p[2] for p in self._pending])
            self.projection = DinoProjection.fit(cls, pm, cells, self.patch_dims)
        else:  # a caption-only corpus: nothing to fit and nothing to project
            self.projection = DinoProjection.identity(self.dino_dim, self.patch_dims)
        self.patch_dims = self.projection.cell_dim
        pending, self._pending = self._pending, []
        for p in pending:
            self._project(*p)

    @blas_single
    def _project(self, cls: np.ndarray, pm: np.ndarray, cells: np.ndarray) -> None:
        self._dino.append(self.projection.global_desc(cls, pm))
        self._cells.append(self.projection.project_cells(cells).astype(np.float16))

    def chunk_full(self, pending_images: int = 0, pending_records: int = 0) -> bool:
        """Whether the current chunk (plus what a caller still holds) should be committed."""
        return self._chunk_images + pending_images >= self.settings.chunk or \
            len(self._records) + pending_records >= RECORDS_PER_CHUNK_IMAGE * self.settings.chunk

    def _maybe_commit(self) -> None:
        if self.auto_commit and self.chunk_full():
            self.commit()

    def _chunk_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        dc, dg = self.clip_dim, 2 * self.dino_dim
        clip = np.concatenate(self._clip) if self._clip else np.zeros((0, dc), np.float32)
        dino = np.concatenate(self._dino) if self._dino else np.zeros((0, dg), np.float32)
        cells = (np.concatenate(self._cells) if self._cells  # float16, as buffered: encoded in blocks
                 else np.zeros((0, self.cells, self.patch_dims), np.float16))
        return clip, dino, cells

    @blas_single
    def _train_codebooks(self, clip: np.ndarray, dino: np.ndarray, cells: np.ndarray,
                         captions: np.ndarray | None) -> None:
        if len(clip) == 0:  # no image yet (caption-only so far): exact fp16 stores, trained on a placeholder
            clip = np.zeros((1, self.clip_dim), np.float32)
            dino = np.zeros((1, 2 * self.dino_dim), np.float32)
            cells = np.zeros((1, self.cells, self.patch_dims), np.float32)
        expected = max(self.expected_images, len(clip))
        self.codebooks = Codebooks.train(1, self.projection, clip, dino, cells, self.settings.ann,
                                         self.settings.codec, expected, self.settings.ann_flat_max,
                                         self.settings.patch_pq_m, captions, self.settings.caption_codec)

    def _caption_vectors(self) -> np.ndarray | None:
        """(n_records, Dc) caption embeddings of the chunk (zeros for empty captions), or None when there is no
        text encoder and no caller gave any."""
        if self.caption_encoder is None and not self._given_captions:
            return None
        out = np.zeros((len(self._records), self.clip_dim), np.float32)
        todo = []
        for i, rec in enumerate(self._records):
            given = self._given_captions.get(i)
            if given is not None:
                out[i] = given
            elif self.caption_encoder is not None and (rec["caption"] or "").strip():
                todo.append(i)
        for a in range(0, len(todo), CAPTION_BATCH):
            part = todo[a:a + CAPTION_BATCH]
            emb = np.asarray(self.caption_encoder([self._records[i]["caption"] for i in part]), np.float32)
            if emb.shape != (len(part), self.clip_dim):
                raise AttribError(f"the caption encoder returned shape {emb.shape}, expected "
                                  f"({len(part)}, {self.clip_dim})")
            out[part] = emb
        return out

    def _table(self):
        schema = {"row": pl.Int64, "id": pl.String, "image": pl.String, "caption": pl.String, **self.extra_schema}
        return pl.DataFrame(self._records, schema=schema, strict=False, orient="row").to_arrow()

    @blas_single
    def commit(self, progress: dict | None = None, complete: bool = False, extra: dict | None = None) -> dict:
        """Write the collected records as a segment and commit a new generation (also when only ``progress``
        changed). ``complete`` marks the build finished (its source goes to the manifest's history); ``extra``
        keys are added to the manifest. Returns the new manifest."""
        if self.projection is None and (self._pending or self.codebooks is None):
            self._fit_projection()
        clip, dino, cells = self._chunk_arrays()
        captions = self._caption_vectors() if self._records else None
        new_codebooks = self.codebooks is None
        if new_codebooks:
            self._train_codebooks(clip, dino, cells, captions)
        m = self._next_manifest()
        if new_codebooks:
            m["codebooks"] = self.codebooks.save(self.folder / codebook_dir(self.codebooks.generation))
            m["codebooks"]["path"] = codebook_dir(self.codebooks.generation)
        if self._records:
            seg_id = int(m["next_segment"])
            chunk = Chunk(self._table(), np.asarray(self._image_rows, np.int64), clip, dino, cells, captions)
            entry = write_segment(self.folder, segment_dir(seg_id), seg_id, chunk, self.codebooks)
            for rec in self._records:
                self.text.add(rec["row"], rec["caption"], seg_id)
            self.text.commit()
            m["segments"].append(entry)
            m["next_segment"] = seg_id + 1
            m["next_row"] = int(self.next_row + len(self._records))
            m["counts"]["records"] += len(self._records)
            m["counts"]["images"] += len(self._image_rows)
        self.rejects.flush()
        os.fsync(self.rejects.fileno())
        m["rejects_bytes"] = self.rejects_path.stat().st_size
        m["counts"]["rejected"] = int(sum(self.reject_reasons.values()))
        m["counts"]["reject_reasons"] = dict(self.reject_reasons)
        m["counts"]["caption_only"] = m["counts"]["records"] - m["counts"]["images"]
        if progress is not None:
            m["build"].update(progress)
        m["build"]["complete"] = bool(complete)
        if complete and m["build"].get("source"):
            m["sources"].append({**m["build"]["source"], "completed": now_iso()})
        m.update(extra or {})
        self.committed_this_run += len(self._records)
        self.manifest = write_manifest(self.folder, m)
        self._reset_chunk()
        return self.manifest

    def _next_manifest(self) -> dict:
        if self.manifest is not None:
            m = json.loads(json.dumps(self.manifest))
            m["generation"] = int(m["generation"]) + 1
            m["versions"] = library_versions()
            return m
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "generation": 1,
            "created": now_iso(),
            "models": self.identity,
            "untrained": None,  # informational only: derived from the model identity when read
            "dims": {"clip": self.clip_dim, "dino": self.dino_dim, "dino_global": 2 * self.dino_dim,
                     "patch_grid": self.settings.patch_grid, "patch_cells": self.cells,
                     "patch_dims": self.patch_dims},
            "settings": self.settings.to_dict(),
            "codebooks": None,
            "segments": [],
            "next_row": 0,
            "next_segment": 1,
            "deletes": None,
            "counts": {"records": 0, "images": 0, "caption_only": 0, "deleted": 0, "rejected": 0,
                       "reject_reasons": {}},
            "text": {"analyzer": ANALYZER_DESC, "bm25": {"k1": 1.2, "b": 0.75}, "path": path_of("text")},
            "extra_columns": list(self.extra_schema),
            "build": {"source": self.source, "consumed": 0, "complete": False},
            "sources": [],
            "versions": library_versions(),
        }

    # ----------------------------------------------------------------------------------------- finishing
    def finalize(self, source: dict | None = None, extra_manifest: dict | None = None,
                 progress: dict | None = None) -> dict:
        """Commit what is left and mark the build complete; the writer is closed. Returns the manifest."""
        progress = dict(progress or {})
        if source is not None:
            progress["source"] = {**self.source, **source}
        m = self.commit(progress, complete=True, extra=extra_manifest)
        self.close()
        return m

    def close(self) -> None:
        for close in (self.text.close, self.rejects.close, self.lock.release):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass

    def abort(self) -> None:
        """Release every open file, writer and lock after a failed build. What was committed stays (a rerun
        resumes from it); the records collected since the last commit are dropped, and so are their lines in
        ``rejects.jsonl`` (the file keeps what the manifest counts)."""
        for close in (self.text.abort, self.rejects.close, self._truncate_rejects, self.lock.release):
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort: nothing uncommitted is ever read
                pass


def open_for_append(folder: Path, identity: dict) -> IndexWriter:
    """An existing complete index opened to add records (``attrib index SOURCE --out INDEX --append``)."""
    m = read_manifest(folder)
    if not (m.get("build") or {}).get("complete"):
        src = (m["build"].get("source") or {}).get("path")
        raise IndexFormatError(f"index {folder} has an unfinished build of {src}; finish it first by running "
                               f"`attrib index {src} --out {folder}` again, then append")
    return IndexWriter(folder, identity)


def drop_segment_files(folder: Path, rels: list[str]) -> None:
    for rel in rels:
        remove_segment(folder, rel)
