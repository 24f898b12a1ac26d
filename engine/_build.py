"""Building an index: ingestion -> parallel decoding -> batched encoding -> the writer's segments.

A build commits a segment (and a new manifest generation) every ``--chunk`` images, recording how many source
records it has consumed, so a build killed at any moment (Ctrl-C, SIGTERM, kill -9, power loss) resumes from its
last commit when the same command runs again; readers only ever see committed generations. ``--overwrite``
builds beside the old index and swaps when complete (see ``engine._txn``); ``--append`` adds to an index.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ._errors import AttribError, EmptyCorpusError, SourceError
from ._ingest import Record, Source, open_source
from ._layout import MANIFEST, path_of
from ._lock import LOCK_NAME, WriterLock
from ._manifest import now_iso, read_manifest
from ._profiles import get_profile
from ._settings import IndexSettings
from ._startup import check_interrupt
from ._txn import manifest_state, recover, staging_path, swap_in
from ._writer import IndexWriter
from .files import remove, require_utf8_path
from .images import ImageLimits, ImageRejected, encoder_inputs, read_bytes
from .ui import progress_bar


@dataclass
class BuildSummary:
    index_dir: Path
    records: int  # live records in the index after this command (with or without image)
    images: int  # live records with an encoded image
    rejected: int  # records skipped, over the index's whole history (see rejects.jsonl)
    reject_reasons: dict[str, int]  # reason -> count
    ignored_files: list[str]  # files in a folder source that were neither images nor sidecars
    seconds: float  # wall time of this command
    encode_seconds: float  # time spent inside the encoders by this command
    manifest: dict = field(default_factory=dict)
    encoded_this_run: int = 0  # images this command encoded (a resumed build skips what was committed)
    added_this_run: int = 0  # records this command added
    mode: str = "build"  # build, resume, append or overwrite
    segments: int = 0  # segments the index is made of
    renamed_columns: dict[str, str] = field(default_factory=dict)  # table column -> its index name (a clash)
    engine: str = "local"  # local (this process) or ray (engine._ray)
    startup_seconds: float = 0.0  # ray: starting or joining the cluster and loading the models on the workers
    calibration: dict | None = None  # self-calibration after the build: its time and fit, or why it was skipped
    search: dict | None = None  # search settings measured on the finished index (engine._search_tune)
    merged: dict | None = None  # an append: the segments it wrote (and small ones before) merged into one

    @property
    def throughput(self) -> float:
        return self.added_this_run / self.seconds if self.seconds else 0.0

    @property
    def deleted(self) -> int:
        return int(self.manifest.get("counts", {}).get("deleted", 0))


# --------------------------------------------------------------------------------------------- pipeline
def _prefetch(items: Iterable[Record], fn: Callable[[Record], object], workers: int,
              window: int) -> Iterator[tuple[Record, object]]:
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


#: Files and folders an index folder may hold (anything else means the folder is not ours).
_OURS = {MANIFEST, LOCK_NAME, "text", "segments", "codebooks", "deletes", "rejects.jsonl", "calibration.json",
         "search.json",
         "incoming"}  # incoming: a distributed build's finished, not yet committed units (engine._cluster)


def _is_ours(folder: Path) -> bool:
    """A folder that holds only what an attrib build writes (e.g. a build killed before its first commit)."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError:
        return False
    return names <= _OURS and bool(names & {"text", "segments", LOCK_NAME})


def _plan(out: Path, overwrite: bool, append: bool, src_info: dict,
          settings: IndexSettings | None = None) -> tuple[str, Path]:
    """(mode, folder to write): "build" (new), "resume" (an unfinished build of the same source), "append",
    or "overwrite" (a new index built beside the old one, swapped in when complete)."""
    recover(out)
    if out.exists() and not out.is_dir():
        raise AttribError(f"{out} exists and is a file; choose another --out")
    state = manifest_state(out) if out.exists() else "none"
    if state == "none":
        if append:
            raise AttribError(f"--append needs an existing index, and {out} is not one; build it first with "
                              f"`attrib index SOURCE --out {out}`")
        if out.exists() and any(out.iterdir()) and not _is_ours(out):
            raise AttribError(f"{out} is a non-empty folder that is not an attrib index; refusing to write into it"
                              f"{' or replace it' if overwrite else ''}. Choose another --out")
        return "build", out
    if state == "damaged":
        raise AttribError(f"{out} has a manifest that cannot be read (a damaged index, or not an attrib index); "
                          f"refusing to replace it. Remove it yourself if it is an index you no longer need")
    m = read_manifest(out)
    if state == "unfinished" and not overwrite:
        prev = (m["build"].get("source") or {})
        if prev.get("path") == src_info["path"] and prev.get("fingerprint") == src_info["fingerprint"]:
            return "resume", out
        if prev.get("path") == src_info["path"]:
            raise AttribError(f"the source {src_info['path']} changed since its build into {out} was interrupted; "
                              f"pass --overwrite to start again")
        raise AttribError(f"{out} holds an unfinished build of {prev.get('path')}; run `attrib index "
                          f"{prev.get('path')} --out {out}` to finish it, or pass --overwrite to replace it")
    if append:
        if state != "complete":
            raise AttribError(f"{out} has an unfinished build; finish it first, then append")
        return "append", out
    if not overwrite:
        raise AttribError(f"{out} already exists (an index of {(m['build'].get('source') or {}).get('path')}); "
                          f"pass --overwrite to replace it, --append to add records to it, or choose another --out")
    staged = staging_path(out)
    if staged.exists() and manifest_state(staged) in ("unfinished", "complete"):
        staged_m = read_manifest(staged)
        prev = staged_m["build"].get("source") or {}
        if prev.get("path") == src_info["path"] and prev.get("fingerprint") == src_info["fingerprint"] and \
                _same_format(staged_m, settings):
            # resume the interrupted replacement build; one stopped after its last record (while merging its
            # segments, before the swap) is finished without encoding anything again
            return "overwrite", staged
    if staged.exists():
        remove_staged(staged)
    return "overwrite", staged


def _same_format(m: dict, settings: IndexSettings | None) -> bool:
    """Whether a run given ``settings`` may continue the build of manifest ``m`` (IndexSettings.for_run)."""
    try:
        IndexSettings.from_dict(m.get("settings") or {}).for_run(settings)
    except AttribError:
        return False
    return True


def remove_staged(staged: Path) -> None:
    """Delete an abandoned replacement build beside an index. Its lock is taken first (IndexBusyError while
    another --overwrite is building into it), and the folder is renamed away under that lock before it is
    deleted, so that a build starting there meanwhile gets a fresh folder instead of losing files to the rmtree."""
    trash = staged.parent / f"{staged.name}.removing-{os.getpid()}"
    with WriterLock(staged, "overwrite"):
        os.replace(staged, trash)
    remove(trash)


#: What the folder a build writes may hold once its lock is taken, for each planned mode.
_PLANNED_STATES = {"build": ("none",), "resume": ("unfinished",), "append": ("complete",),
                   "overwrite": ("none", "unfinished", "complete")}


def _confirm_plan(out: Path, mode: str, writer, overwrite: bool, append: bool, src_info: dict,
                  engine: str = "local") -> None:
    """The plan was made before the models loaded (seconds to minutes), without the lock: another attrib process
    may have built into the same folder since. Now that this one holds the lock, the folder must still be in the
    state the plan saw; otherwise this run stops (with the message the plan would give now) instead of silently
    turning into an append or a resume of someone else's work. An unfinished build is continued only if it is
    this source's and, for ``engine="ray"``, one the Ray engine started (the local engine can finish both)."""
    m = writer.manifest
    b = (m or {}).get("build") or {}
    state = "none" if m is None else ("complete" if b.get("complete") else "unfinished")
    prev = b.get("source") or {}
    ours = (prev.get("path") == src_info["path"] and prev.get("fingerprint") == src_info["fingerprint"]
            and (engine == "local" or b.get("engine") == engine))  # the local engine finishes any build
    if state in _PLANNED_STATES[mode] and (state == "none" or mode == "append" or ours):
        return
    writer.abort()
    if m is None:
        _drop_empty(writer.folder)  # what opening the writer created (its lock file, an empty caption index)
    if mode != "overwrite":
        _plan(out, overwrite, append, src_info)  # raises the message that fits the folder as it is now
    now = {"none": "no index", "complete": "a complete index"}.get(
        state, f"an unfinished build of {prev.get('path')} ({b.get('engine', 'local')} engine)")
    raise AttribError(f"{writer.folder} was changed by another attrib process while this one was loading its "
                      f"models (it now holds {now}); run the command again to see what to do")


def build_index(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    models: str = "default",
    device: str | None = None,
    settings: IndexSettings | None = None,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = True,
    clip_weights: str | None = None,
    dino_weights: str | None = None,
    encoders=None,
    calibrate=None,
) -> BuildSummary:
    """Index a training set into the folder ``out`` (or add one to it).

    A build commits a segment every ``settings.chunk`` images: killed at any moment, the same command run again
    continues from its last commit. ``overwrite`` builds the new index beside the old one and swaps it in when
    complete (the old one is never lost, even by a crash in the middle); ``append`` adds the records of
    ``source`` to an existing index built with the same models.

    Args:
        source: a folder of images with .txt/.json sidecars (img2dataset folder output, .tar shards inside
            are read too), a .tar shard, or a parquet/CSV/JSONL table with LAION-style columns.
        out: the index folder.
        models: the model profile (``default``: pretrained; ``offline``/``tiny``: untrained, for trying things).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (default: CUDA when available).
        settings: index settings (batch size, chunk, codec, patch grid, limits...); when appending or resuming,
            the index keeps its format and this run uses the batch size, decoding threads, chunk and input limits
            given (a format setting that differs from the index's is refused: ``IndexSettings.for_run``).
        overwrite: replace an existing index at ``out``.
        append: add the records of ``source`` to the existing index at ``out`` (ids it already has are rejected).
        progress: show a progress bar on stderr.
        clip_weights, dino_weights: local weights files or folders for the pretrained profile.
        encoders: already-loaded encoders (``engine.load_encoders``) instead of ``models``.
        calibrate: learn the index's own fusion weights once the index is complete (``engine.calibrate``):
            None (default) when it has at least ``engine.calibrate.AUTO_MIN_IMAGES`` images or already had a
            calibration (an append makes it stale; it is learned again with its own settings); True always;
            False never; or the ``CalibrationSettings`` to calibrate with (always). Ctrl-C while calibrating
            raises ``engine.calibrate.CalibrationInterrupted`` (a KeyboardInterrupt): the index is complete.
    Returns:
        A :class:`BuildSummary`: counts, rejects by reason, timings and the manifest written.
    Raises:
        SourceError: the source is missing or cannot be read.
        EmptyCorpusError: nothing could be indexed (every record was rejected, or there are none).
        AttribError: ``out`` exists and may not be replaced, or an option is invalid.
        IndexBusyError: another process is writing ``out``.
        WeightsUnavailableError: pretrained weights cannot be found.
    Example:
        >>> s = build_index("photos/", "my-index", models="offline")  # doctest: +SKIP
        >>> s.records, s.rejected  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    settings = settings or IndexSettings()
    if encoders is None:
        grid = get_profile(models).dino_patch_grid  # an unknown profile fails before any slow work
        if grid is not None:  # so does a patch grid larger than the model's (checked again once it is loaded)
            _check_patch_grid(settings, {"profile": models, "dino": {"patch_grid": [grid, grid]}})
    if overwrite and append:
        raise AttribError("--overwrite and --append exclude each other")
    out = Path(out).expanduser().absolute()
    require_utf8_path(out, "the index folder", AttribError)
    require_utf8_path(Path(source).expanduser().absolute(), "the source", SourceError)
    src = open_source(source, settings.max_bytes)
    src_info = {"path": str(Path(source).expanduser().absolute()), "kind": src.kind, "fingerprint": src.fingerprint,
                "records": src.count, "started": now_iso()}
    mode, folder = _plan(out, overwrite, append, src_info, settings)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if encoders is None:
        from ._encoders import Encoders

        encoders = Encoders(models, device=device, clip_weights=clip_weights, dino_weights=dino_weights)
    _check_patch_grid(settings, encoders)  # before any image is decoded (a larger grid would upsample: GBs)
    writer = IndexWriter(folder, encoders.identity, settings, src.extra_columns, expected_images=src.count or 0,
                         source=src_info, caption_encoder=encoders.encode_texts)
    _confirm_plan(out, mode, writer, overwrite, append, src_info)
    skip = 0
    if mode in ("resume", "overwrite") and writer.manifest is not None:
        skip = int(writer.manifest["build"].get("consumed", 0))
        writer.source = writer.manifest["build"].get("source") or src_info
        mode = "resume" if mode == "resume" else mode
    elif mode == "append":
        writer.source = src_info
    writer.auto_commit = False
    first_row = writer.next_row
    if mode == "overwrite" and writer.manifest is not None and writer.manifest["build"].get("complete"):
        # a replacement build stopped after its last commit (while merging its segments, before the swap): it is
        # finished as it is, without reading the source again (its last commit counted the source's records as
        # consumed, not the items read, and a rerun would read the end of the source again: rejects twice)
        manifest = writer.manifest
        writer.abort()  # nothing to commit: closes the caption index and releases the lock
        return finish_build(out, folder, mode, manifest, src, t0, 0.0, 0, 0, calibrate, encoders, progress,
                            first_row=first_row)
    try:
        b = writer.manifest["build"] if skip else {}
        encoded, encode_s = _run_pipeline(src, writer, encoders, writer.settings, progress, skip,
                                          b.get("parts_done"), b.get("current_part"))
        if writer.n_rows == 0 and (writer.manifest is None or mode == "append"):
            writer.rejects.flush()
            kept = " (the index was left as it was)" if mode == "append" else ""
            raise EmptyCorpusError(_empty_message(src, folder, writer.committed_rejects_bytes) + kept)
        manifest = writer.finalize(progress={"consumed": (src.count or 0), "source": writer.source, "engine": "local"})
        remove(folder / "incoming")  # what an interrupted distributed build (engine._cluster) had not committed
    except BaseException:
        writer.abort()
        if writer.manifest is None:  # nothing was ever committed: leave no folder that looks like an index
            _drop_empty(folder)
        raise
    return finish_build(out, folder, mode, manifest, src, t0, encode_s, encoded,
                        int(manifest["next_row"]) - first_row, calibrate, encoders, progress, first_row=first_row)


def finish_build(out: Path, folder: Path, mode: str, manifest: dict, src: Source, t0: float, encode_s: float,
                 encoded: int, added: int, calibrate, encoders, progress: bool, first_row: int | None = None,
                 **extra) -> BuildSummary:
    """The last steps of every completed build, local or distributed (engine._ray): a fresh index is compacted
    into one segment (the fastest searches), an append's segments (rows from ``first_row`` on) are merged
    (``_maintain.merge_appended``; a failed compaction or merge, a full disk say, is reported in ``merged``, not
    raised: every record is committed and the index is complete), an
    --overwrite build is swapped in, the summary is made, and the index is calibrated (``extra``: further
    :class:`BuildSummary` fields)."""
    merged = None
    whole = mode in ("build", "resume", "overwrite") and len(manifest["segments"]) > 1
    if whole or (mode == "append" and added and first_row is not None):  # an append: its segments, not the index
        from ._maintain import compact, merge_appended

        try:
            if whole:
                compact(folder, progress=False, measure_search=False)
            else:
                m = merge_appended(folder, first_row, progress=progress)
                if m is not None:
                    merged = {"segments": m.merged, "records": m.records, "purged": m.purged,
                              "seconds": round(m.seconds, 2)}
        except Exception as e:  # noqa: BLE001 - every record is committed: the index is complete, only unmerged
            merged = {"error": f"{e.__class__.__name__}: {e}"}
        manifest = read_manifest(folder)  # merged (or failed part-way): the manifest may have moved on
    if mode == "overwrite":
        swap_in(folder, out)
        manifest = read_manifest(out)
    from ._search_tune import measure_after_write

    extra.setdefault("search", measure_after_write(out))
    summary = BuildSummary(
        out, int(manifest["counts"]["records"]), int(manifest["counts"]["images"]),
        int(manifest["counts"]["rejected"]), dict(manifest["counts"]["reject_reasons"]), list(src.ignored),
        time.perf_counter() - t0, encode_s, manifest, encoded_this_run=encoded, added_this_run=added, mode=mode,
        segments=len(manifest["segments"]), renamed_columns=dict(src.renamed_columns), merged=merged, **extra,
    )
    if calibrate is not False:  # the index is complete and in place: an interrupted calibration loses nothing of it
        from .calibrate import after_build

        summary.calibration = after_build(summary, encoders, calibrate, progress=progress)
    return summary


def _check_patch_grid(settings: IndexSettings, encoders_or_identity) -> None:
    ident = getattr(encoders_or_identity, "identity", encoders_or_identity)
    grid = ident.get("dino", {}).get("patch_grid")
    if grid and settings.patch_grid > min(grid):
        raise AttribError(f"patch grid {settings.patch_grid} (--patch-grid) is larger than the {grid[0]}x{grid[1]} "
                          f"patch grid of the DINOv2 model of profile {ident.get('profile')!r}; "
                          f"give at most {min(grid)}")


def _drop_empty(folder: Path) -> None:
    if folder.exists() and _is_ours(folder) and not (folder / MANIFEST).exists():
        remove(folder)


def _empty_message(src: Source, folder: Path, start: int = 0) -> str:
    """Why a source gave no record, with its first rejects (those written from byte ``start`` of
    ``rejects.jsonl`` on: an append's own, not the index's earlier ones)."""
    lines = []
    try:
        with open(folder / path_of("rejects"), "rb") as f:
            f.seek(start)
            lines = [json.loads(x) for x in f.read().decode("utf-8").splitlines()[:10]]
    except (OSError, json.JSONDecodeError):
        pass
    if not lines:
        return f"the source {src.path} holds no records (no images, no captions); nothing was written"
    detail = "; ".join(f"{r['record']}: {r['reason']}" for r in lines)
    return f"every record of {src.path} was rejected, so no index was written. First rejects: {detail}"


def _run_pipeline(src: Source, writer: IndexWriter, encoders, settings: IndexSettings, progress: bool,
                  skip: int = 0, parts_done: dict[str, int] | None = None,
                  current_part: list | None = None) -> tuple[int, float]:
    """Decode, encode and write every record of ``src`` after the first ``skip`` (already committed), committing
    a segment every ``settings.chunk`` images with the number of source records consumed so far (and how many
    items each finished tar shard gave), so that a rerun resumes exactly after the last commit without opening
    finished shards again. Returns (images encoded, seconds inside the encoders)."""
    limits = ImageLimits(settings.max_pixels, settings.max_bytes)
    cin, din = encoders.clip_input, encoders.dino_input

    def prepare(rec: Record):
        if rec.reject is not None:  # found unusable while reading the source: goes to the rejects as it is
            return ImageRejected(*rec.reject)
        if rec.image is None:
            return None
        try:
            data = rec.data if rec.data is not None else read_bytes(rec.image, limits)
            return encoder_inputs(data, limits, cin, din)
        except ImageRejected as e:
            return e
        except MemoryError:
            return ImageRejected("image too large (decompression bomb)", "out of memory while decoding")

    # Items keep source order: caption-only records wait with the images so row numbers follow the source.
    batch: list[tuple[Record, tuple[np.ndarray, np.ndarray] | None]] = []
    n_img = 0
    encoded = 0
    encode_s = 0.0
    consumed = skip
    parts_done = dict(parts_done or {})
    part, part_items = (current_part or [None, 0])  # the tar shard being read, and its items so far (all runs)

    def flush() -> None:
        nonlocal encode_s, n_img, encoded
        if not batch:
            return
        imgs = [(r, o) for r, o in batch if o is not None]
        feats = None
        if imgs:
            t = time.perf_counter()
            feats = encoders.encode_images(np.stack([o[0] for _, o in imgs]), np.stack([o[1] for _, o in imgs]),
                                           settings.patch_grid)
            encode_s += time.perf_counter() - t
            encoded += len(imgs)
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

    def commit_if_full() -> None:
        if writer.chunk_full(pending_images=n_img, pending_records=len(batch)):
            flush()
            writer.commit({"consumed": consumed, "parts_done": dict(parts_done), "current_part": [part, part_items],
                           "engine": "local"})  # which engine can resume it (engine._ray checks)

    window = max(2 * settings.batch_size, 4 * max(1, settings.workers))
    total = None if src.count is None else max(0, src.count - skip)
    with progress_bar("indexing", total, enabled=progress, unit="img") as advance, \
            contextlib.closing(_prefetch(src.records(skip, parts_done), prepare, settings.workers, window)) as prepared:
        for rec, out in prepared:
            check_interrupt()  # a Ctrl-C that Python dropped (it landed in a finaliser) still stops the build
            rec.data = None  # free tar bytes early
            advance(1)
            consumed += 1
            if rec.part != part:  # the previous shard is finished: a resumed build skips it unopened
                if part is not None and part not in parts_done:
                    parts_done[part] = part_items
                part, part_items = rec.part, 0
            part_items += rec.part is not None
            key = rec.key
            if writer.has_id(key):
                writer.reject(rec.where, key, "duplicate id", "an earlier record (or the index) already has this id")
            elif isinstance(out, ImageRejected):
                writer.reject(rec.where, key, out.reason, out.detail)
            else:
                writer.known_ids.add(str(key))
                batch.append((rec, out))
                if out is not None:
                    n_img += 1
                if n_img >= settings.batch_size or len(batch) >= 64 * settings.batch_size:
                    flush()
            commit_if_full()
        flush()
    return encoded, encode_s
