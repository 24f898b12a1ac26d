"""Read side of an index folder: one committed generation, opened and checked as a whole.

The reader reads the manifest once and opens every file of that generation at once (memory maps, the faiss
lists, the tantivy searcher), so a rebuild, an append, a deletion or a compaction that commits a newer
generation meanwhile never mixes into its answers: it keeps answering from the snapshot it opened (see
``Index.reopen_if_changed`` to move to the newest one). Records deleted as of its generation never come back."""
from __future__ import annotations

import ctypes
import itertools
import json
import resource
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa

from ._captions import CaptionSignals
from ._codebooks import PQ, Codebooks, sha256_file
from ._errors import IndexFormatError
from ._layout import MANIFEST, at_level, codebook_dir, path_of
from ._lock import writer_active
from ._manifest import dir_size, file_stamp, is_pretrained, manifest_stamp, read_manifest
from ._rows import by_segment
from ._segment import STORES, Segment
from ._stores import TextStore, is_panic

#: Indexes up to this size on disk have every file checked against its sha256 when opened (larger ones: sizes,
#: headers and ranges at open, checksums of what each query reads, and everything with `attrib verify`).
HASH_AT_OPEN_MAX_BYTES = 64 * 1024 * 1024


class LiveRows:
    """Which rows exist in a snapshot: below its ``next_row`` and not deleted."""

    def __init__(self, deleted: np.ndarray, next_row: int) -> None:
        self.deleted = np.asarray(deleted, np.int64)
        self.next_row = int(next_row)

    def keep(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        ok = (rows >= 0) & (rows < self.next_row)
        if len(self.deleted) and len(rows):
            pos = np.minimum(np.searchsorted(self.deleted, rows), len(self.deleted) - 1)
            ok &= self.deleted[pos] != rows
        return ok

    def overfetch(self, n: int) -> int:
        return n + min(len(self.deleted), 10_000) + 64


def _raise_fd_limit() -> None:
    """Every mapped segment file holds a descriptor: lift the soft limit to the hard one (many segments)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (ValueError, OSError):  # pragma: no cover - not permitted: keep the limit
        pass


SEARCH_FORMAT = "attrib-search"


def _live_selector(deleted: np.ndarray, next_row: int) -> faiss.IDSelector:
    """A faiss selector of the rows below ``next_row`` that are not deleted: one bit per row (1.25 MB at 10M
    rows), one bit test per candidate. Searching with it costs less than testing candidates against a set of
    the deleted rows (an IDSelectorBatch: a hash lookup per candidate), which the lists of a fast-scan store
    need until a compaction drops them (``IndexReader._fast_scan_shell``)."""
    live = np.ones(next_row, bool)
    live[deleted[(deleted >= 0) & (deleted < next_row)]] = False
    bits = np.packbits(live, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    sel.referenced_objects = [bits]  # the selector reads the array: it lives as long as the selector
    return sel


def search_path(index_dir: Path) -> Path:
    return Path(index_dir) / path_of("search")


MAX_REFINE = 64  # re-scoring depth a search.json may ask for at most


def read_search(index_dir: Path, codebook_generation: int) -> dict | None:
    """The measured settings for these codebooks, or None (no file, other codebooks, unreadable: the defaults).
    Values out of range are dropped (nprobe is clamped to the store's lists by the reader)."""
    try:
        d = json.loads(search_path(index_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("format") != SEARCH_FORMAT or d.get("codebooks") != codebook_generation:
        return None
    stores = d.get("stores")
    if not isinstance(stores, dict):
        return None
    ok = {}
    for name, s in stores.items():
        try:
            ok[name] = {"nprobe": int(s["nprobe"]), "refine": int(s["refine"])}
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: Infinity
            continue
        if not (1 <= ok[name]["nprobe"] <= 1 << 31 and 1 <= ok[name]["refine"] <= MAX_REFINE):
            ok.pop(name)
        elif isinstance(s.get("recall_at_100"), (int, float)) and isinstance(s.get("reached_target"), bool):
            ok[name].update(recall_at_100=s["recall_at_100"], reached_target=s["reached_target"])
    return ok


DEFAULT_REFINE = 4  # PQ candidates re-scored per wanted result when the index has no measured setting (8-bit PQ)
DEFAULT_REFINE_FAST_SCAN = 8  # the same for 4-bit (fast-scan) codes, coarser per byte
SMALL_SEGMENT_IMAGES = 262_144  # segments with fewer images are packed together with their small neighbours
MAX_SMALL_PARTS = 4  # packed parts of small segments taken over from older generations, at most; beyond, one
GATHER_BATCH_BYTES = 64 << 20  # codes gathered per batch of lists while packing several segments together
FAST_SCAN_MIN_K = 21  # results a fast-scan search asks for at least (see PackedLists._part)


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; nothing elsewhere). Packing a
    fast-scan store frees many small blocks, which glibc otherwise keeps: at 100,000 records they doubled the
    memory the packed lists add to a query process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def default_refine(spec) -> int:
    return DEFAULT_REFINE_FAST_SCAN if spec.fast_scan else DEFAULT_REFINE


class PackedLists:
    """A fast-scan store searched as one index: its lists packed into parts (``parts``: (key, faiss
    ``IndexIVFPQFastScan``) pairs; a part holds one large segment or a run of small ones). The query is assigned
    to its nearest lists once, each part scans those lists, and the best ``k`` of all parts are kept. Fast-scan
    distances depend on the query and the codes only, so every candidate gets the distance one index over all
    segments would give. They are coarse (quantized lookup tables): many candidates can tie at the k-th distance,
    and faiss keeps whichever it meets first. Here the lower rows are kept, always, so an answer does not depend on
    how the records are split into segments or parts: compacting an index never changes it."""

    def __init__(self, quantizer: faiss.Index, parts: list[tuple[tuple, faiss.Index]]) -> None:
        self.quantizer = quantizer
        self.parts = parts
        self.ntotal = sum(p.ntotal for _, p in parts)
        self.sign = -1.0 if quantizer.metric_type == faiss.METRIC_INNER_PRODUCT else 1.0  # smaller: better

    def search(self, q: np.ndarray, k: int, params: faiss.SearchParametersIVF) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of each query's best ``k`` (-1: no result), not in order: callers re-score them.
        Each part is asked for some more than ``k``; a part that may hold more candidates at the k-th distance
        than it returned is asked again for twice as many (near many copies of one image, say)."""
        q = np.ascontiguousarray(q, np.float32)
        n, parts = len(q), len(self.parts)
        coarse = self.quantizer.search(q, params.nprobe) if parts > 1 else None
        d_out, i_out = np.full((n, k), self.sign * np.inf, np.float32), np.full((n, k), -1, np.int64)  # as faiss
        got: list[list] = [[None] * parts for _ in range(n)]  # per query and part: (distances, rows, may hold more)
        ask = {(qi, pj): k + max(16, k // 8) for qi in range(n) for pj in range(parts)}  # -> how many to ask for
        while ask:
            for pj, (_, p) in enumerate(self.parts):
                by_want: dict[int, list[int]] = {}
                for (qi, pk), want in ask.items():
                    if pk == pj:
                        by_want.setdefault(want, []).append(qi)
                for want, qs in by_want.items():
                    d, i, more = self._part(p, q[qs], want, params, None if coarse is None else
                                            (np.ascontiguousarray(coarse[0][qs]), np.ascontiguousarray(coarse[1][qs])))
                    for j, qi in enumerate(qs):
                        got[qi][pj] = (d[j], i[j], more)
            asked, ask = ask, {}
            for qi in sorted({qi for qi, _ in asked}):
                key = np.concatenate([self.sign * d for d, _, _ in got[qi]])
                rows = np.concatenate([i for _, i, _ in got[qi]])
                key, rows = key[rows >= 0], rows[rows >= 0]
                if len(rows) > k:
                    kth = np.partition(key, k - 1)[k - 1]
                    # a part that stopped at the k-th distance may hold more rows there: it is asked again
                    again = [pj for pj, (d, i, more) in enumerate(got[qi])
                             if more and i[-1] >= 0 and self.sign * d[-1] == kth]
                    if again:
                        ask.update({(qi, pj): 2 * len(got[qi][pj][1]) for pj in again})
                        continue
                    key, rows = _best(key, rows, k, kth)
                d_out[qi, :len(rows)], i_out[qi, :len(rows)] = self.sign * key, rows
        return d_out, i_out

    def _part(self, p: faiss.Index, q: np.ndarray, want: int, params, coarse) -> tuple[np.ndarray, np.ndarray, bool]:
        """One part's best ``want`` (best first), and whether it may hold more rows than it returned.

        faiss 1.15's fast-scan search for 2 to 20 results starts from whatever its output buffers hold (with two
        threads, recycled memory holding the best possible distance made whole queries come back empty): at least
        21 results are asked for, into buffers filled with the worst distance."""
        kp = max(FAST_SCAN_MIN_K, min(want, p.ntotal))
        d = np.full((len(q), kp), self.sign * np.finfo(np.float32).max, np.float32)
        i = np.full((len(q), kp), -1, np.int64)
        if coarse is None:
            p.search_c(len(q), faiss.swig_ptr(q), kp, faiss.swig_ptr(d), faiss.swig_ptr(i), params)
        else:  # faiss's Python wrapper of this call takes no search parameters
            p.search_preassigned_c(len(q), faiss.swig_ptr(q), kp, faiss.swig_ptr(coarse[1]),
                                   faiss.swig_ptr(coarse[0]), faiss.swig_ptr(d), faiss.swig_ptr(i), False, params)
        return d, i, kp < p.ntotal


def _is_small(segs: list[int], images: list[int]) -> bool:
    """Whether a part of these segments holds fewer than SMALL_SEGMENT_IMAGES images (a part as large as a large
    segment is kept as one, however it was made)."""
    return sum(images[i] for i in segs) < SMALL_SEGMENT_IMAGES


def _merge_small_runs(plan: list, images: list[int]) -> list:
    """``plan`` with every run of two or more consecutive small entries (``_is_small``) joined into one entry to
    pack."""
    runs: list[list] = []
    for entry in plan:
        small = _is_small(entry[0], images)
        if small and runs and runs[-1][0]:
            runs[-1][1].append(entry)
        else:
            runs.append([small, [entry]])
    return [entries[0] if len(entries) == 1 else ([i for segs, _ in entries for i in segs], None)
            for _, entries in runs]


def _best(key: np.ndarray, rows: np.ndarray, k: int, kth: float) -> tuple[np.ndarray, np.ndarray]:
    """The k smallest keys (the k-th of which is ``kth``) and their rows, not in order; at ``kth``, the lower
    rows."""
    better = np.flatnonzero(key < kth)
    tied = np.flatnonzero(key == kth)
    tied = tied[np.argsort(rows[tied], kind="stable")[:k - len(better)]]
    keep = np.concatenate([better, tied])
    return key[keep], rows[keep]


OPEN_RETRY_SECONDS = 2.0  # how long an open that meets a writer's commit is retried

class IndexReader:
    """The stores of one index generation (see the module docstring). Rows are global record ids (int64,
    stable across appends and compactions)."""

    def __init__(self, path: str | Path, nprobe: int | None = None, refine: int | None = None,
                 hash_files: bool | None = None, previous: "IndexReader | None" = None) -> None:
        """Open the newest committed generation. A writer committing meanwhile removes files of the generation
        before (segments merged away, an older list of deleted records, caption index files its merges replaced):
        an open that finds one missing while a writer holds the index, or after the manifest moved on, is
        retried (for up to ``OPEN_RETRY_SECONDS``) instead of calling a sound index damaged."""
        self.path = Path(path).expanduser().absolute()
        deadline = time.monotonic() + OPEN_RETRY_SECONDS
        for attempt in itertools.count():
            before = _generation_stamp(self.path)
            try:
                self._open(nprobe, refine, hash_files, previous)
                return
            except (IndexFormatError, FileNotFoundError):  # a file gone between a check and its use, too
                self.close()  # the segments this attempt opened
                if (time.monotonic() >= deadline and attempt >= 2) or not (  # a slow open gets its retries too
                        _generation_stamp(self.path) != before or writer_active(self.path)):
                    raise
            time.sleep(0.02)

    def _open(self, nprobe: int | None, refine: int | None, hash_files: bool | None,
              previous: "IndexReader | None") -> None:
        from ._txn import recover

        self.segments = []
        recover(self.path, writable_only=True)
        self.manifest = m = read_manifest(self.path)
        if m.get("codebooks") is None or not m["segments"]:
            self._empty_or_unfinished(m)
        total = sum(f["bytes"] for s in m["segments"] for f in s["files"].values())
        if hash_files is None:
            hash_files = total <= HASH_AT_OPEN_MAX_BYTES
        self.hashed_at_open = hash_files
        self.generation = int(m["generation"])
        self.grid = int(m["dims"]["patch_grid"])
        cb_entry = m["codebooks"]
        cb_dir = self.path / codebook_dir(int(cb_entry["generation"]))
        self._check_codebook_files(cb_dir, cb_entry)
        same_cb = previous is not None and previous.path == self.path and previous.manifest["codebooks"] == cb_entry
        # the same codebooks: shared, so that packed lists taken over keep no older copy of them alive
        self.codebooks = previous.codebooks if same_cb else Codebooks.load(cb_dir, cb_entry)
        self.projection = self.codebooks.projection
        _raise_fd_limit()
        self.segments = [Segment(self.path, e, self.codebooks, hash_files) for e in m["segments"]]
        self._firsts = np.asarray([s.rows[0] if s.n_records else -1 for s in self.segments], np.int64)
        if len(self._firsts) > 1 and np.any(np.diff(self._firsts) <= 0):
            raise IndexFormatError(f"index {self.path} is damaged: its segments overlap; rebuild it")
        self.next_row = int(m["next_row"])
        deleted = self._load_deletes(m.get("deletes"))
        self.live = LiveRows(deleted, self.next_row)
        self._live_sel = _live_selector(deleted, self.next_row) if len(deleted) else None
        self.n_records = int(m["counts"]["records"])
        self.n_images = int(m["counts"]["images"])
        if sum(s.n_records for s in self.segments) - len(deleted) != self.n_records:
            raise IndexFormatError(f"index {self.path} is damaged: its segments hold another number of live "
                                   f"records than the manifest says ({self.n_records}); rebuild it")
        self._given = (nprobe, refine)  # explicit settings (--nprobe) win over measured ones
        self.nprobe = {name: self.codebooks.stores[name].nprobe for name in STORES}
        # PQ candidates re-scored, as a multiple of k
        self.refine = {name: default_refine(self.codebooks.stores[name]) for name in STORES}
        self._shells: dict[str, faiss.Index] = {}  # built on a store's first search (see _shell)
        # packed segment stores of an older reader of this index, taken over by _fast_scan_shell
        offered = previous.packed_segments() if same_cb else {}
        self._reusable = {}  # only parts of this generation's segments
        for name in STORES:
            mine = {self._packed_key(seg, name) for seg in self.segments}
            self._reusable[name] = {k: p for k, p in offered.items() if set(k) <= mine}
        self._shell_locks = {name: threading.Lock() for name in STORES}  # one store packs while the other searches
        self.search_stamp: tuple | None = ("unread",)  # never the stamp of a file, nor None (no file)
        self.reload_search()
        try:
            self.text = TextStore(self.path / "text", (m.get("text") or {}).get("analyzer"), live=self.live)
        except BaseException as e:  # noqa: BLE001 - tantivy raises ValueError/OSError, or panics, on damaged files
            if not (isinstance(e, Exception) or is_panic(e)):
                raise
            raise IndexFormatError(f"index {self.path} is damaged: its caption index cannot be opened "
                                   f"({e.__class__.__name__}: {e}); rebuild it") from None
        if self.text.num_docs < self.n_records:
            raise IndexFormatError(f"index {self.path} is damaged: its caption index holds {self.text.num_docs} "
                                   f"documents for {self.n_records} records; rebuild it")
        self.captions = CaptionSignals(self)  # caption embeddings and duplicate counts (engine._captions)
        self._ids: tuple[np.ndarray, np.ndarray] | None = None  # id hashes and rows (rows_of builds it)
        self._ids_lock = threading.Lock()

    # ----------------------------------------------------------------------------------------- opening
    def _empty_or_unfinished(self, m: dict) -> None:
        b = m.get("build", {})
        if not b.get("complete", False):
            src = (b.get("source") or {}).get("path")
            raise IndexFormatError(f"index {self.path} is an unfinished build with nothing committed yet; run "
                                   f"`attrib index {src or 'SOURCE'} --out {self.path}` again to resume it")
        raise IndexFormatError(f"index {self.path} holds no records")

    def _check_codebook_files(self, folder: Path, entry: dict) -> None:
        for name, want in entry.get("files", {}).items():
            p = folder / name
            if not p.is_file() or p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
                raise IndexFormatError(f"index {self.path} is damaged: codebook file {p.relative_to(self.path)} is "
                                       f"missing or changed; rebuild it")

    def _load_deletes(self, entry: dict | None) -> np.ndarray:
        if not entry:
            return np.zeros(0, np.int64)
        p = self.path / entry["path"]
        try:
            if sha256_file(p) != entry["sha256"]:
                raise ValueError("checksum mismatch")
            d = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"index {self.path} is damaged: its list of deleted records {entry['path']} "
                                   f"cannot be used ({e}); rebuild it") from None
        if d.dtype != np.int64 or d.ndim != 1 or len(d) != int(entry["count"]) or np.any(np.diff(d) <= 0):
            raise IndexFormatError(f"index {self.path} is damaged: {entry['path']} is not a sorted list of rows")
        return d

    def _shell(self, name: str) -> faiss.Index:
        """The searchable faiss index of store ``name``, built on first use: opening an index for ``info``,
        ``delete`` or ``compact`` never packs fast-scan lists it will not search."""
        shell = self._shells.get(name)
        if shell is None:
            with self._shell_locks[name]:
                shell = self._shells.get(name)
                if shell is None:
                    shell = self._search_shell(name)
                    self._shells[name] = shell
                    self._reusable.pop(name, None)  # offered to a newer reader until the parts are in the shell
        return shell

    def warm(self) -> None:
        """Build every store's search index now (a service does this before its first request)."""
        for name in STORES:
            self._shell(name)

    def _search_shell(self, name: str) -> faiss.Index:
        """One faiss index over the lists of every segment: for 4-bit PQ stores a fast-scan index packed in
        memory (``_fast_scan_shell``); else HStackInvertedLists over the memory-mapped lists (a single segment
        directly)."""
        if self.codebooks.stores[name].fast_scan:
            return self._fast_scan_shell(name)
        parts = [s.stores[name] for s in self.segments]
        if len(parts) == 1:
            shell = parts[0]
        else:
            shell = self.codebooks.new_store(name)
            self._ilv = getattr(self, "_ilv", {})
            vec = faiss.InvertedListsPtrVector()
            for p in parts:
                vec.push_back(p.invlists)
            stacked = faiss.HStackInvertedLists(vec.size(), vec.data())
            shell.replace_invlists(stacked, False)
            shell.ntotal = sum(p.ntotal for p in parts)
            self._ilv[name] = (vec, stacked, parts)  # keep the parts alive as long as the shell
        return shell  # searched with its nprobe given (_params)

    def _fast_scan_shell(self, name: str) -> "PackedLists":
        """The lists of store ``name`` packed into in-memory faiss ``IndexIVFPQFastScan`` parts ((code + 8) bytes
        per image) and searched as one (``PackedLists``). Rows deleted since the last compaction stay in the packed
        lists and are skipped while searching (``_params``), which gives exactly the answers of lists without them.

        A part is one large segment, whose memory-mapped lists faiss packs directly, on every thread (10,000,000
        images: about 2 s), or a run of small ones (an append writes a segment every ``chunk`` images), packed
        together (``_gathered``), since each part costs a search some time of its own. Parts another generation
        of this index already packed (``previous`` when opening: an append or a deletion leaves the older segments
        as they are) are taken over, not packed again, so a service moves to a new generation without stalling
        its queries; beyond ``MAX_SMALL_PARTS`` parts of small segments, those are packed again as one."""
        template = self.codebooks.templates[name]
        keys = [self._packed_key(seg, name) for seg in self.segments]
        offered = self._reusable.get(name, {})  # part key (its segments' keys) -> packed part
        images = [seg.n_images for seg in self.segments]
        plan: list[tuple[list[int], faiss.Index | None]] = []  # (segment positions, part taken over or None)
        j = 0
        while j < len(keys):
            held = next((k for k in offered if tuple(keys[j:j + len(k)]) == k), None)
            if held is not None:
                plan.append((list(range(j, j + len(held))), offered[held]))
                j += len(held)
            elif not _is_small([j], images):
                plan.append(([j], None))
                j += 1
            else:  # a run of small segments that no part taken over holds
                run = [j]
                j += 1
                while j < len(keys) and _is_small([j], images) and not any(k[0] == keys[j] for k in offered):
                    run.append(j)
                    j += 1
                plan.append((run, None))
        if sum(_is_small(segs, images) for segs, _ in plan) > MAX_SMALL_PARTS:
            plan = _merge_small_runs(plan, images)
        parts = []
        for segs, packed in plan:
            if packed is None:
                packed = self._pack(name, [self.segments[i] for i in segs])
            parts.append((tuple(keys[i] for i in segs), packed))
        for seg in self.segments:
            # The packed copy is all a search reads: the segment's memory-mapped lists of this store are closed, so
            # their pages stop counting in this process's resident memory (about half of it at 10M records).
            seg.stores.pop(name, None)
        release_free_heap()  # the packing's temporaries were many small blocks: hand the pages back to the system
        return PackedLists(template.quantizer, parts)

    def _pack(self, name: str, segments: list[Segment]) -> faiss.Index:
        """One fast-scan part of store ``name`` over ``segments``."""
        template = self.codebooks.templates[name]
        if len(segments) > 1:
            return self._gathered(name, segments)
        packed = faiss.IndexIVFPQFastScan(segments[0].stores[name])
        # the packed index points at the segment's coarse quantizer and lists (and faiss's wrapper keeps the
        # segment's index alive): it gets the codebooks' quantizer instead (the same centroids: the segment was
        # encoded with it) and no source lists, so that the memory-mapped lists can be closed
        packed.quantizer = template.quantizer
        packed.orig_invlists = None
        packed.referenced_objects = [template]
        return packed

    def _gathered(self, name: str, segments: list[Segment]) -> faiss.Index:
        """The lists of several segments packed into one fast-scan index. faiss packs codes into its blocks of 32
        only from one index's lists (it crashes on stacked ones), and appending to a packed list that already holds
        entries is unsafe in faiss 1.15 (a fast path copies past the end of the list when the entries already there
        are a multiple of the block's byte size). So each list is filled exactly once: for a batch of lists, the
        codes of every segment are gathered into an in-memory IVF-PQ index, faiss packs it, and the packed lists
        are moved into the empty lists of the part. The extra memory is one batch."""
        shell = faiss.IndexIVFPQFastScan(self.codebooks.templates[name])  # empty; the codebooks' quantizer
        into = faiss.downcast_InvertedLists(shell.invlists)
        sources = [seg.stores[name].invlists for seg in segments]
        width = self.codebooks.stores[name].code_bytes
        total, li, nlist = 0, 0, shell.nlist
        while li < nlist:
            batch = self.codebooks.new_store(name)  # in-memory lists (ArrayInvertedLists)
            lists = faiss.downcast_InvertedLists(batch.invlists)
            first, size = li, 0
            while li < nlist and size < GATHER_BATCH_BYTES:
                ids_parts, code_parts = [], []
                for src in sources:
                    n = src.list_size(li)
                    if n:
                        ids_parts.append(faiss.rev_swig_ptr(src.get_ids(li), n))
                        code_parts.append(faiss.rev_swig_ptr(src.get_codes(li), n * width))
                if ids_parts:
                    ids = np.ascontiguousarray(np.concatenate(ids_parts))
                    codes = np.ascontiguousarray(np.concatenate(code_parts))
                    lists.add_entries(li, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                    size += codes.nbytes
                li += 1
            packed = faiss.IndexIVFPQFastScan(batch)
            del batch
            plists = packed.invlists
            for j in range(first, li):
                n = plists.list_size(j)
                if n:  # the part's list is empty: faiss copies whole blocks
                    into.add_entries(j, n, plists.get_ids(j), plists.get_codes(j))
                    total += n
            del packed
        shell.ntotal = total
        return shell

    @staticmethod
    def _packed_key(seg: Segment, name: str) -> tuple:
        """What a packed segment store depends on: the segment's lists file (the codebooks coding it are the same
        for every reader whose parts are taken over: see ``previous``)."""
        return (str(seg.path), name, seg.entry["files"][path_of(name)]["sha256"])

    def packed_segments(self) -> dict[tuple, faiss.Index]:
        """The packed parts this reader holds, by the ``_packed_key`` of each of their segments (a newer reader of
        the same index takes them over instead of packing them again: see ``previous``)."""
        out = {key: packed for r in list(self._reusable.values()) for key, packed in r.items()}
        out.update({key: packed for shell in list(self._shells.values()) if isinstance(shell, PackedLists)
                    for key, packed in shell.parts})
        return out

    def reload_search(self) -> bool:
        """Apply ``search.json`` (see engine._search_tune) if it changed since last read: the measured lists
        probed and re-scoring depth of each store, unless given explicitly when opening. True if it changed."""
        try:
            st = search_path(self.path).stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self.search_stamp:
            return False
        self.search_stamp = stamp
        measured = read_search(self.path, int(self.manifest["codebooks"]["generation"])) or {}
        self.search_settings = measured
        nprobe, refine = self._given
        for name in STORES:
            spec = self.codebooks.stores[name]
            self.set_search(name, min(spec.nlist, int(nprobe or measured.get(name, {}).get("nprobe") or spec.nprobe)),
                            int(refine or measured.get(name, {}).get("refine") or default_refine(spec)))
        return True

    def set_search(self, store: str, nprobe: int | None = None, refine: int | None = None) -> None:
        """Change how ``store`` is searched from now on: IVF lists probed, PQ candidates re-scored per result."""
        if nprobe is not None:
            self.nprobe[store] = max(1, min(int(nprobe), self.codebooks.stores[store].nlist))  # (_params)
        if refine is not None:
            self.refine[store] = max(1, int(refine))

    # ----------------------------------------------------------------------------------------- identity
    @property
    def fingerprint(self) -> str:
        return self.manifest["models"]["fingerprint"]

    @property
    def untrained(self) -> bool:
        return not is_pretrained(self.manifest["models"])

    # ----------------------------------------------------------------------------------------- rows
    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(segment index, local record position) of each row; segment -1 for rows not in this snapshot."""
        rows = np.asarray(rows, np.int64)
        seg = np.searchsorted(self._firsts, rows, side="right") - 1
        local = np.full(len(rows), -1, np.int64)
        for s, sel in by_segment(seg):
            segment = self.segments[s]
            pos = np.minimum(segment.local_records(rows[sel]), max(segment.n_records - 1, 0))
            ok = segment.n_records > 0
            hit = ok & (np.asarray(segment.rows[pos]) == rows[sel]) if ok else np.zeros(len(sel), bool)
            local[sel[hit]] = pos[hit]
        seg = np.where(local >= 0, seg, -1)
        live = self.live.keep(rows)
        return np.where(live, seg, -1), np.where(live, local, -1)

    def has_image(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        seg, _ = self._locate(rows)
        out = np.zeros(len(rows), bool)
        for s, sel in by_segment(seg):
            out[sel] = self.segments[s].local_images(rows[sel]) >= 0
        return out

    def _per_image(self, rows: np.ndarray, fetch) -> tuple[np.ndarray, np.ndarray | None]:
        """(has_image mask, stacked results of fetch(segment, local images) in row order for rows with one)."""
        rows = np.asarray(rows, np.int64)
        seg, _ = self._locate(rows)
        has = np.zeros(len(rows), bool)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for s, sel in by_segment(seg):
            li = self.segments[s].local_images(rows[sel])
            ok = li >= 0
            if ok.any():
                has[sel[ok]] = True
                parts.append((sel[ok], fetch(self.segments[s], li[ok])))
        if not parts:
            return has, None
        if len(parts) == 1:  # one segment (the usual case): already in row order, no copy
            return has, parts[0][1]
        # each segment's results go straight to their places (stored codes, decoded by the caller once for all
        # segments: concatenating, then reordering decoded patch cells copied a query's 6.5 MB twice, 3 ms a query
        # on an index of two segments)
        first = parts[0][1]
        out = np.empty((int(has.sum()), *first.shape[1:]), first.dtype)
        place = np.cumsum(has) - 1  # the position of each row with an image among them, in the order given
        for sel, got in parts:
            out[place[sel]] = got
        return has, out

    def vectors(self, store: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(has_image mask, float32 vectors of the rows that have an image, in row order), checked."""
        has, codes = self._per_image(rows, lambda s, li: s.refine_codes(store, li))  # decoded at once
        if codes is None:
            return has, np.zeros((0, self.codebooks.stores[store].dim), np.float32)
        return has, self.codebooks.decode_refine(store, codes)

    def scores(self, store: str, rows: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(has_image mask, inner products of ``q`` with the stored vectors of the rows that have an image, in
        row order), checked: ``vectors(store, rows)[1] @ q`` without decoding the vectors."""
        has, s = self._per_image(rows, lambda seg, li: seg.scores(store, li, q))
        return has, s if s is not None else np.zeros(0, np.float32)

    def patch_cells(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(has_image mask, float32 patch cells (n, C, Dp) of the rows that have an image), checked."""
        has, codes = self._per_image(rows, lambda s, li: s.patch_codes(li))  # decoded at once
        if codes is None:
            return has, np.zeros((0, self.codebooks.patch_cells, self.codebooks.patch_dims), np.float32)
        return has, self.codebooks.decode_patches(codes)

    def records(self, rows: np.ndarray) -> pl.DataFrame:
        """id, image, caption of the given rows, in that order (only their pages of the files are read)."""
        ids, imgs, caps = self._serving(rows)
        return pl.DataFrame({"id": ids, "image": imgs, "caption": caps},
                            schema={"id": pl.String, "image": pl.String, "caption": pl.String})

    def caption_texts(self, rows: np.ndarray) -> list[str | None]:
        """The captions of the given rows, in that order (what the text rankers read for every candidate: no
        DataFrame is made)."""
        return self._serving(rows)[2]

    def _serving(self, rows: np.ndarray) -> tuple[list, list, list]:
        """(ids, images, captions) of live rows, in the order given, checked against their CRCs."""
        rows = np.asarray(rows, np.int64)
        if len(rows) == 0:
            return [], [], []
        seg, local = self._locate(rows)
        if np.any(seg < 0):
            raise IndexFormatError(f"rows {rows[seg < 0][:5].tolist()} are not live records of index {self.path}")
        if len(self.segments) == 1 or np.all(seg == seg[0]):  # one segment: it keeps the order given
            return self.segments[int(seg[0])].serving(local)
        out: tuple[list, list, list] = ([None] * len(rows), [None] * len(rows), [None] * len(rows))
        for s, sel in by_segment(seg):
            for column, values in zip(out, self.segments[s].serving(local[sel])):
                for i, v in zip(sel.tolist(), values):
                    column[i] = v
        return out

    def live_rows(self) -> np.ndarray:
        """Every live row, ascending."""
        if not self.segments:
            return np.zeros(0, np.int64)
        rows = np.concatenate([np.asarray(s.rows) for s in self.segments])
        return rows[self.live.keep(rows)]

    def all_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids) of every live record, rows ascending."""
        rows = np.concatenate([np.asarray(s.rows) for s in self.segments]) if self.segments else np.zeros(0, np.int64)
        ids = np.asarray([x for s in self.segments for x in s.all_ids()], dtype=object)
        keep = self.live.keep(rows)
        return rows[keep], ids[keep]

    def rows_of(self, ids) -> np.ndarray:
        """The row of each id (-1 for ids that are not live records). The first call builds the id table: a
        sorted 64-bit hash per live record, 16 bytes each (160 MB at 10M records, where a dictionary of id
        strings took gigabytes and seconds); a hash match is confirmed against the record's stored id."""
        ids = [str(i) for i in ids]
        out = np.full(len(ids), -1, np.int64)
        if not ids:
            return out
        with self._ids_lock:
            if self._ids is None:
                self._ids = self._id_hashes()
        hashes, rows = self._ids
        q = id_hashes([i.encode("utf-8", "replace").decode("utf-8") for i in ids])  # lone surrogates: no stored id
        lo, hi = np.searchsorted(hashes, q, "left"), np.searchsorted(hashes, q, "right")
        n = hi - lo  # records whose id has the query's hash: one, unless two ids share a hash
        which = np.repeat(np.arange(len(ids)), n)
        pos = np.repeat(lo, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        for i, r, rid in zip(which.tolist(), rows[pos].tolist(), self._serving(rows[pos])[0]):  # one read for all
            if rid == ids[i]:
                out[i] = r
        return out

    def _id_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """(hashes, rows) of every live record, by hash."""
        hashes = [id_hashes(b.column(0)) for s in self.segments for b in s.batches]
        rows = [np.asarray(s.rows) for s in self.segments]
        if not hashes:  # no segment, or only segments without records
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        h, r = np.concatenate(hashes), np.concatenate(rows).astype(np.int64)
        keep = self.live.keep(r)
        h, r = h[keep], r[keep]
        order = np.argsort(h, kind="stable")
        return h[order], r[order]

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The id of each live row (an object array; benchmarks map rankings to ids with it)."""
        return np.asarray(self._serving(np.asarray(rows, np.int64))[0], dtype=object)

    # ----------------------------------------------------------------------------------------- search
    def _params(self, name: str, exclude: np.ndarray | None) -> tuple[object, list]:
        """faiss search parameters skipping deleted and excluded rows, and the selector objects they point to
        (the caller keeps them alive while searching)."""
        sel, refs = self._live_sel, []
        if exclude is not None and len(exclude):
            ex = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, np.int64))
            not_ex = faiss.IDSelectorNot(ex)
            refs += [ex, not_ex]
            sel = not_ex if sel is None else faiss.IDSelectorAnd(sel, not_ex)
        if sel is None:
            return faiss.SearchParametersIVF(nprobe=self.nprobe[name]), refs
        refs.append(sel)
        return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe[name]), refs

    def search(self, store: str, q: np.ndarray, k: int,
               exclude: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each query vector: (rows, scores) of the k nearest live records, best first. Compressed stores
        search ``refine`` x k candidates in the product-quantized lists and re-score them with finer codes."""
        q = np.ascontiguousarray(np.atleast_2d(q), np.float32)
        shell = self._shell(store)
        if shell.ntotal == 0 or k <= 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        compressed = self.codebooks.stores[store].codec == PQ
        kk = min(shell.ntotal, k * self.refine[store] if compressed else k)
        params, refs = self._params(store, exclude)
        scores, rows = shell.search(q, kk, params=params)
        del refs
        out = []
        for i in range(len(q)):
            r = rows[i][rows[i] >= 0]
            s = scores[i][rows[i] >= 0]
            if compressed and len(r):
                r = np.sort(r)  # the order is set below; in row order the codes are read page after page
                has, s = self.scores(store, r, q[i])
                r = r[has]
                top = np.lexsort((r, -s))[:k]
                r, s = r[top], s[top]
            out.append((r.astype(np.int64), s.astype(np.float32)))
        return out

    # ----------------------------------------------------------------------------------------- sizes
    def component_sizes(self) -> dict[str, int]:
        """Bytes on disk of each component (segment components summed over segments)."""
        sizes: dict[str, int] = {}
        for c in at_level("segment"):
            sizes[c.name] = sum(int(s.entry["files"][c.path]["bytes"]) for s in self.segments
                                if c.path in s.entry["files"])
        cb = self.manifest["codebooks"]
        sizes["codebooks"] = sum(int(f["bytes"]) for f in cb.get("files", {}).values())
        for c in at_level("index"):
            p = self.path / c.path
            if p.exists():
                sizes[c.name] = dir_size(p)
        return {k: v for k, v in sizes.items() if v}

    def close(self) -> None:
        for s in self.segments:
            s.close()
        self._shells = {}
        self._reusable = {}


def id_hashes(ids) -> np.ndarray:
    """A 64-bit hash of each record id (a list of str or an Arrow string array): polars' vectorised hash, the same
    for equal strings within a process (it is never stored)."""
    series = pl.from_arrow(ids) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pl.Series(ids, dtype=pl.String)
    return series.cast(pl.String).hash(seed=0).to_numpy().astype(np.uint64, copy=False)


def _generation_stamp(index_dir: Path) -> tuple:
    """What changes when a writer commits: the manifest, and the caption index's file lists (a deletion's caption
    documents go after its commit, and tantivy then removes the files it replaced, perhaps as the writer ends)."""
    text = index_dir / path_of("text")
    return manifest_stamp(index_dir), file_stamp(text / "meta.json"), file_stamp(text / ".managed.json")


def manifest_path(index_dir: Path) -> Path:
    return index_dir / MANIFEST
