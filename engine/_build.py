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

from ._errors import AttribError, EmptyCorpusError
from ._ingest import Record, Source, open_source
from ._layout import MANIFEST, path_of
from ._profiles import get_profile
from ._settings import IndexSettings
from ._writer import IndexWriter
from .files import staged_folder
from .images import ImageLimits, ImageRejected, encoder_inputs, read_bytes
from .ui import progress_bar


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
    calibration: dict | None = None  # self-calibration after the build: its time and fit, or why it was skipped

    @property
    def throughput(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


# --------------------------------------------------------------------------------------------- pipeline
def _prefetch(
    items: Iterable[Record], fn: Callable[[Record], object], workers: int, window: int
) -> Iterator[tuple[Record, object]]:
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
    is_index = (out / MANIFEST).exists()
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
    calibrate=None,
) -> BuildSummary:
    """Index a training set into the folder ``out``.

    Args:
        source: a folder of images with .txt/.json sidecars (img2dataset folder output, .tar shards inside
            are read too), a .tar shard, or a parquet/CSV/JSONL table with LAION-style columns.
        out: the index folder to create.
        models: the model profile (``default``: pretrained; ``offline``/``tiny``: untrained, for trying things).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
        settings: index settings (batch size, patch grid, ANN structure, limits...).
        overwrite: replace an existing index at ``out``.
        progress: show a progress bar on stderr.
        clip_weights, dino_weights: local weights files or folders for the pretrained profile.
        encoders: already-loaded encoders (``engine.load_encoders``) instead of ``models``.
        calibrate: learn the index's own fusion weights after the build (``engine.calibrate``): None (default)
            when it has at least ``engine.calibrate.AUTO_MIN_IMAGES`` images; True always; False never; or the
            ``CalibrationSettings`` to calibrate with (always).
    Returns:
        A :class:`BuildSummary`: counts, rejects by reason, timings and the manifest written.
    Raises:
        SourceError: the source is missing or cannot be read.
        EmptyCorpusError: nothing could be indexed (every record was rejected, or there are none).
        AttribError: ``out`` exists and may not be replaced, or an option is invalid.
        WeightsUnavailableError: pretrained weights cannot be found.
    Example:
        >>> s = build_index("photos/", "my-index", models="offline")  # doctest: +SKIP
        >>> s.records, s.rejected  # doctest: +SKIP
    """
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
    summary = BuildSummary(
        out, writer.n_rows, writer.n_images, int(sum(writer.reject_reasons.values())), dict(writer.reject_reasons),
        list(src.ignored), time.perf_counter() - t0, encode_s, manifest,
    )
    if calibrate is not False:  # the index is in place: an interrupted calibration loses nothing of it
        from .calibrate import after_build

        summary.calibration = after_build(summary, encoders, calibrate, progress=progress)
    return summary


def _empty_message(src: Source, tmp: Path) -> str:
    lines = []
    try:
        with open(tmp / path_of("rejects"), encoding="utf-8") as f:
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

