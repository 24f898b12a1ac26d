"""One immutable segment: a contiguous run of records with their metadata, vectors and patch cells, encoded
against the index's codebooks. Written once (into a temporary folder, fsynced, then renamed), listed by the
manifest when committed, read through memory maps, and deleted only when a newer generation no longer lists it.

Every per-image code read by a query is checked against a checksum stored beside it, and every record read
against a CRC of its id, image and caption, so damage that keeps file sizes (a flipped byte, 0xFF over a
record) is reported by name instead of changing answers silently."""
from __future__ import annotations

import mmap
import os
import shutil
import sys
import threading
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc  # noqa: F401 - pa.ipc
import pyarrow.parquet as pq

from ._codebooks import REFINE_BLOCK, Codebooks, faiss_write, file_entry
from ._errors import IndexFormatError
from ._layout import CODEBOOKS_DIR, DELETES_DIR, at_level, codebook_dir, path_of
from .files import allocate, fsync_dir, remove
from .text import caption_key

SERVING_COLUMNS = ("id", "image", "caption")
STORES = ("clip", "dino")
_WEIGHTS = np.random.default_rng(20261128).integers(1, 2**63, size=4096, dtype=np.uint64) | np.uint64(1)


def row_sums(codes: np.ndarray) -> np.ndarray:
    """A checksum per row of a 2-d (or more) array of codes: the bytes as little-endian 64-bit words, each times a
    fixed odd weight, summed modulo 2^64. Vectorised; any change of a single byte changes the sum."""
    n = codes.shape[0]
    b = np.ascontiguousarray(codes).view(np.uint8).reshape(n, -1)
    pad = (-b.shape[1]) % 8
    if pad:
        b = np.concatenate([b, np.zeros((n, pad), np.uint8)], axis=1)
    words = b.view("<u8")
    if words.shape[1] > len(_WEIGHTS):
        raise ValueError("codes are too wide for the checksum weights")
    # einsum wraps modulo 2^64 like the product-and-sum, without its (n, words) temporary: 4x faster on the
    # re-scoring codes of a query (6,400 rows of 768 bytes)
    return np.einsum("ij,j->i", words, _WEIGHTS[: words.shape[1]])


# How much of the index's code files one process keeps mapped. Reading a row of a memory-mapped file makes the
# kernel map more than the row: the pages around it that are in the page cache ("fault-around") and, with large
# page-cache folios, the whole folio (about 1 MB per scattered read of a 5 GB file, measured at 10M records). They
# stay mapped and counted in the process's resident set until it unmaps them: at 10M records, 100 queries' scattered
# re-scoring reads left 10.5 GB of the 12.8 GB of re-scoring codes mapped, where the process had allocated 1.9 GB.
MAPPED_BUDGET_ENV = "ATTRIB_MAPPED_BUDGET_MB"  # MiB; 0 turns the budget off (faster re-scoring, larger RSS)


def _budget_from_env() -> int:
    raw = os.environ.get(MAPPED_BUDGET_ENV, "").strip()
    try:
        mib = int(raw) if raw else 256
        if mib < 0:
            raise ValueError
    except ValueError:
        sys.stderr.write(f"warning: {MAPPED_BUDGET_ENV}={raw!r} is not a whole number of MiB (0: no budget); "
                         f"using 256\n")
        mib = 256
    return (mib << 20) if mib > 0 else 1 << 62


MAPPED_BUDGET_BYTES = _budget_from_env()
TAKE_BLOCK = 256  # rows read between two looks at the process's mapped pages, when the maps are larger than the budget


_statm: int | None = None  # this process's descriptor of /proc/self/statm (a forked child opens its own)
_statm_lock = threading.Lock()


def _file_resident_bytes() -> int | None:
    """Resident file-backed (and shared) bytes of this process (/proc/self/statm), or None where there is none.
    The file is opened once per process and read again with pread: a read is 1-2 us, where opening it each time
    cost 10-20 us, and a query over an index grown by appends reads it once per segment and code file."""
    global _statm
    try:
        if _statm is None:
            with _statm_lock:
                if _statm is None:
                    _statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        return int(os.pread(_statm, 256, 0).split()[2]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


def _forked() -> None:
    """In a forked child: the inherited descriptor shows the parent's pages (closed here, where it is surely still
    ours), and the lock may have been copied while held."""
    global _statm, _statm_lock
    if _statm is not None:
        try:
            os.close(_statm)
        except OSError:
            pass
    _statm, _statm_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


class _MappedBudget:
    """One budget for every :class:`MappedCodes` of the process (all segments, all readers). When the maps are
    larger than ``MAPPED_BUDGET_BYTES`` altogether, reads look at the process's resident file-backed bytes every
    ``TAKE_BLOCK`` rows, and once they have grown by more than the budget since the last drop, the pages of every
    map are dropped. Many small segments are bounded as one large one is. Without /proc (not Linux) nothing is
    dropped."""

    def __init__(self) -> None:
        self.maps: weakref.WeakSet = weakref.WeakSet()
        self.total = 0  # bytes of the live maps
        self.base: int | None = None  # resident file-backed bytes after the last drop
        self.drops = 0  # times the maps' pages were dropped (tests, benchmarks)
        # reentrant: a map's finaliser (_gone) can run in this thread while it holds the lock (a garbage collection
        # of an old reader's reference cycles, triggered by an allocation in add or check)
        self.lock = threading.RLock()
        self.available = _file_resident_bytes() is not None and hasattr(mmap, "MADV_DONTNEED")

    def add(self, m: "MappedCodes") -> None:
        with self.lock:
            self.maps.add(m)
            self.total += m.nbytes
            now = _file_resident_bytes() or 0
            if self.base is None or now < self.base:  # before any page of the new map is read
                self.base = now
        weakref.finalize(m, self._gone, m.nbytes)

    def _gone(self, nbytes: int) -> None:
        with self.lock:
            self.total -= nbytes

    @property
    def active(self) -> bool:
        return self.available and self.total > MAPPED_BUDGET_BYTES

    def check(self) -> None:
        with self.lock:
            now = _file_resident_bytes() or 0
            if now - (self.base or 0) <= MAPPED_BUDGET_BYTES:
                return
            maps = list(self.maps)
            self.drops += 1
            self.base = now  # other threads checking meanwhile: this overshoot is being dropped already
        for m in maps:
            m.drop()
        with self.lock:
            self.base = _file_resident_bytes() or 0  # what stays: libraries, row tables, other files


MAPPED = _MappedBudget()


class MappedCodes:
    """A headerless code file (one row per image or record) read through a memory map whose pages count against
    the process's mapped budget (``MAPPED``): when it is spent, the pages are dropped with
    ``madvise(MADV_DONTNEED)``. For a read-only shared file mapping the pages stay in the page cache and the next
    read maps them again, so no data changes; only the process's resident set shrinks. ``codes`` is the
    ``np.memmap`` itself (for whole-file scans that need no budget: compaction, verification)."""

    __slots__ = ("codes", "nbytes", "_mm", "__weakref__")

    def __init__(self, codes, mm: mmap.mmap | None = None) -> None:
        """``codes``: an ``np.memmap``; or, with ``mm``, any object reading through that map (a table whose
        pages count and are dropped with the codes', and is never read with :meth:`take`)."""
        self.codes = codes
        mm = getattr(codes, "_mmap", None) if mm is None else mm
        self.nbytes = len(mm) if mm is not None else int(getattr(codes, "nbytes", 0))
        self._mm = mm if MAPPED.available else None
        if self._mm is not None:
            MAPPED.add(self)

    def take(self, local: np.ndarray) -> np.ndarray:
        """The rows at ``local``, copied out of the map (a block of rows at a time when the budget is active)."""
        if self._mm is None or not MAPPED.active or len(local) == 0:
            return np.asarray(np.take(self.codes, local, axis=0))  # take: faster than fancy indexing of a memmap
        out = np.empty((len(local), *self.codes.shape[1:]), self.codes.dtype)
        for a in range(0, len(local), TAKE_BLOCK):
            np.take(self.codes, local[a:a + TAKE_BLOCK], axis=0, out=out[a:a + TAKE_BLOCK])
            MAPPED.check()
        return out

    def drop(self) -> None:
        """Unmap this map's resident pages (they stay in the page cache)."""
        try:
            self._mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map (the segment was closed meanwhile): nothing is mapped
            pass


def record_crc(rid: str, image: str | None, caption: str | None) -> int:
    text = f"{rid}\0{image or ''}\0{caption or ''}"
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


class StringColumn:
    """Zero-copy reads of one string column of a (memory-mapped) Arrow array: its offsets, bytes and validity
    buffers seen through memoryviews, so that reading a few hundred scattered values costs a few hundred slices
    (an Arrow ``take`` across many record batches costs three times as much)."""

    __slots__ = ("offsets", "data", "valid", "base")

    def __init__(self, arr: pa.Array) -> None:
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise TypeError(f"a string column was expected, got {arr.type}")
        validity, offsets, data = arr.buffers()
        width = "q" if pa.types.is_large_string(arr.type) else "i"
        self.offsets = (memoryview(offsets).cast(width)[arr.offset: arr.offset + len(arr) + 1] if offsets is not None
                        else memoryview(b"\0" * 8).cast("q")[:1])
        self.data = memoryview(data) if data is not None else memoryview(b"")
        self.valid = memoryview(validity) if validity is not None and arr.null_count else None
        self.base = arr.offset

    def get(self, i: int) -> str | None:
        """Value ``i`` (None when null); raises UnicodeDecodeError on bytes that are not UTF-8 (damage)."""
        if self.valid is not None:
            j = self.base + i
            if not (self.valid[j >> 3] >> (j & 7)) & 1:
                return None
        return str(self.data[self.offsets[i]: self.offsets[i + 1]], "utf-8")


@dataclass
class Chunk:
    """The records of one segment, as the writer collected them (rows ascending)."""

    table: pa.Table  # row, id, image, caption, source columns
    image_rows: np.ndarray  # int64 rows that have an image, ascending
    clip: np.ndarray  # (n_images, Dc) float32, L2-normalised
    dino: np.ndarray  # (n_images, Dg) float32 global descriptors, L2-normalised
    cells: np.ndarray  # (n_images, C, Dp) projected patch cells (float16 as the writer buffers them, or float32)
    captions: np.ndarray | None = None  # (n_records, Dc) float32 caption embeddings (zeros: none), or None


@dataclass
class EncodedChunk:
    """A segment's content as stored: the record table and every code, ready to be written."""

    table: pa.Table  # row, id, image, caption, source columns (rows ascending)
    image_rows: np.ndarray  # int64 rows with an image, ascending
    stores: dict  # "clip"/"dino" -> faiss index holding this segment's codes (ids = rows)
    refine: dict  # "clip"/"dino" -> row-aligned refine codes (n_images, D)
    patches: np.ndarray  # (n_images, C, width) stored patch codes
    record_crc: np.ndarray | None = None  # uint32 per record (computed when None)
    image_sums: np.ndarray | None = None  # (n_images, 3) uint64 (computed when None)
    caption_codes: np.ndarray | None = None  # (n_records, width) stored caption embeddings, or None
    caption_keys: np.ndarray | None = None  # uint64 per record (computed from the captions when None)


def encode_chunk(chunk: Chunk, cb: Codebooks) -> EncodedChunk:
    """Encode a chunk of vectors with the codebooks."""
    stores, refine = {}, {}
    for name, x in (("clip", chunk.clip), ("dino", chunk.dino)):
        index = cb.new_store(name)
        if len(x):
            index.add_with_ids(np.ascontiguousarray(x, np.float32), np.asarray(chunk.image_rows, np.int64))
        stores[name] = index
        refine[name] = cb.refine_codes(name, x)
    return EncodedChunk(chunk.table, np.asarray(chunk.image_rows, np.int64), stores, refine,
                        cb.encode_patches(chunk.cells),
                        caption_codes=None if chunk.captions is None else cb.encode_captions(chunk.captions))


def write_segment(index_dir: Path, rel: str, seg_id: int, chunk: Chunk | EncodedChunk, cb: Codebooks) -> dict:
    """Write a segment folder (temporary name, fsynced, then renamed to ``rel``); returns its manifest entry."""
    enc = chunk if isinstance(chunk, EncodedChunk) else encode_chunk(chunk, cb)
    out = SegmentFiles(index_dir, rel, len(enc.table), len(enc.image_rows), enc.table.schema,
                       enc.caption_codes is not None)
    try:
        out.append(enc)
        return out.commit(seg_id, enc.stores)
    except BaseException:
        out.abort()
        raise


class SegmentFiles:
    """One segment's files written part by part, so that memory holds one part at a time: a build's chunk is a
    single part; a compaction streams the live records of every old segment as parts of the merged one. Files go
    to a temporary folder (the writer's pid in its name), fsynced and renamed to ``rel`` by :meth:`commit`;
    :meth:`abort` removes it. The record and image counts and the table schema are known before the first part
    (row-aligned ``.npy`` files are sized up front), parts come in ascending row order, and every part's table
    is cast to ``schema`` (columns a part lacks are nulls)."""

    def __init__(self, index_dir: Path, rel: str, n_records: int, n_images: int, schema: pa.Schema,
                 with_captions: bool) -> None:
        self.final = index_dir / rel
        self.rel = rel
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{os.getpid()}"
        self.n_records, self.n_images, self.schema = int(n_records), int(n_images), schema
        self.with_captions = with_captions
        self.done = {"records": 0, "images": 0}
        self.first_row = self.last_row = None
        self._records = self._serving = self._serving_sink = None
        self._npy: dict[str, np.memmap] = {}
        self._bins: dict = {}
        remove(self.tmp)
        self.tmp.mkdir(parents=True)
        try:
            self._open()
        except BaseException:
            self.abort()
            raise

    def _open(self) -> None:
        self._records = pq.ParquetWriter(self.tmp / path_of("records"), self.schema, compression="zstd")
        serving = pa.schema([self.schema.field(c) for c in SERVING_COLUMNS])
        self._serving_sink = pa.OSFile(str(self.tmp / path_of("serving")), "wb")
        self._serving = pa.ipc.new_file(self._serving_sink, serving)
        shapes = {"rows": (np.int64, (self.n_records,)), "record_crc": (np.uint32, (self.n_records,)),
                  "caption_keys": (np.uint64, (self.n_records,)), "image_rows": (np.int64, (self.n_images,)),
                  "image_sums": (np.uint64, (self.n_images, 3))}
        if self.with_captions:
            shapes["caption_sums"] = (np.uint64, (self.n_records,))
        for name, (dt, shape) in shapes.items():
            self._npy[name] = np.lib.format.open_memmap(self.tmp / path_of(name), "w+", dt, shape)
            allocate(self.tmp / path_of(name))  # a full disk is an OSError here, not SIGBUS on a write below
        for name in (*(f"{n}_refine" for n in STORES), "patches", *(("caption_clip",) if self.with_captions else ())):
            self._bins[name] = open(self.tmp / path_of(name), "wb")

    def append(self, enc: EncodedChunk) -> None:
        """Write one part: a table of records (rows ascending, after those of earlier parts) and their codes."""
        t = enc.table
        if t.schema != self.schema:
            t = cast_table(t, self.schema)
        rows = np.asarray(t.column("row").to_numpy(), np.int64)
        a, b = self.done["records"], self.done["records"] + len(rows)
        ia, ib = self.done["images"], self.done["images"] + len(enc.image_rows)
        if b > self.n_records or ib > self.n_images:
            raise ValueError(f"segment {self.rel}: more records or images than the {self.n_records} / "
                             f"{self.n_images} it was opened for")
        if len(rows) and self.last_row is not None and rows[0] <= self.last_row:
            raise ValueError(f"segment {self.rel}: rows of a part must follow those of the earlier parts")
        if len(t):
            self._records.write_table(t)
            self._serving.write_table(t.select(list(SERVING_COLUMNS)), max_chunksize=8192)
        self._npy["rows"][a:b] = rows
        self._npy["image_rows"][ia:ib] = enc.image_rows
        crc = enc.record_crc
        if crc is None:
            ids, imgs, caps = (t.column(c).to_pylist() for c in SERVING_COLUMNS)
            crc = np.asarray([record_crc(x, y, z) for x, y, z in zip(ids, imgs, caps)], np.uint32)
        self._npy["record_crc"][a:b] = np.asarray(crc, np.uint32)
        sums = enc.image_sums
        if sums is None:
            sums = np.zeros((len(enc.image_rows), 3), np.uint64)
            if len(enc.image_rows):
                sums[:, 0] = row_sums(enc.refine["clip"])
                sums[:, 1] = row_sums(enc.refine["dino"])
                sums[:, 2] = row_sums(enc.patches)
        self._npy["image_sums"][ia:ib] = np.asarray(sums, np.uint64)
        keys = enc.caption_keys
        if keys is None:
            keys = np.asarray([caption_key(c) for c in t.column("caption").to_pylist()], np.uint64)
        self._npy["caption_keys"][a:b] = np.asarray(keys, np.uint64)
        for name in STORES:
            self._bins[f"{name}_refine"].write(np.ascontiguousarray(enc.refine[name]).tobytes())
        self._bins["patches"].write(np.ascontiguousarray(enc.patches).tobytes())
        if self.with_captions:
            if enc.caption_codes is None or len(enc.caption_codes) != len(rows):
                got = 0 if enc.caption_codes is None else len(enc.caption_codes)
                raise ValueError(f"{got} caption embeddings for {len(rows)} records")
            self._bins["caption_clip"].write(np.ascontiguousarray(enc.caption_codes).tobytes())
            if len(rows):
                self._npy["caption_sums"][a:b] = row_sums(enc.caption_codes)
        elif enc.caption_codes is not None:
            raise ValueError(f"segment {self.rel} was opened without caption embeddings")
        self.done = {"records": b, "images": ib}
        if len(rows):
            self.first_row = int(rows[0]) if self.first_row is None else self.first_row
            self.last_row = int(rows[-1])

    def _close_files(self) -> None:
        """Flush and close every file (data reaches the disk in ``commit``)."""
        for f in self._bins.values():
            f.close()
        self._serving.close()
        self._serving_sink.close()
        self._records.close()
        for name in list(self._npy):
            self._npy.pop(name).flush()

    def commit(self, seg_id: int, stores: dict) -> dict:
        """Write the faiss stores, fsync everything and rename the folder into place; returns the manifest entry."""
        if self.done != {"records": self.n_records, "images": self.n_images}:
            raise ValueError(f"segment {self.rel}: {self.done} written, {self.n_records} records and "
                             f"{self.n_images} images expected")
        self._close_files()
        for name in STORES:
            faiss_write(faiss.write_index, stores[name], self.tmp / path_of(name))
        for p in self.tmp.iterdir():  # the memory-mapped and faiss files: data on disk before the rename
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        files = {p.name: file_entry(p) for p in sorted(self.tmp.iterdir()) if p.is_file()}
        fsync_dir(self.tmp)
        if self.final.exists():  # a leftover of a crashed writer that never reached the manifest
            remove(self.final)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return {"id": seg_id, "path": self.rel, "records": self.n_records, "images": self.n_images,
                "first_row": self.first_row, "last_row": self.last_row, "files": files}

    def abort(self) -> None:
        """Close whatever is open, each on its own (a failing one does not keep the others open), and remove the
        temporary folder."""
        try:
            handles = [*self._bins.values(), self._serving, self._serving_sink, self._records]
            for h in handles:
                try:
                    if h is not None:
                        h.close()
                except Exception:  # noqa: BLE001 - the files are deleted below whatever their state
                    pass
            self._npy.clear()  # unmapped when collected; nothing is flushed into files about to be deleted
        finally:
            remove(self.tmp)


def remove_uncommitted(index_dir: Path, manifest: dict | None) -> None:
    """Remove every segment and codebook folder and every deletes file that the committed generation does not
    list: what a killed writer (a build, an append, a deletion, a compaction, a retraining) left, e.g. a
    half-written ``.seg-N.tmp-PID`` folder, the codebooks of a retraining that never committed, or the tombstones
    of a generation before the committed one. Only a writer that holds the index's lock may call it."""
    listed = {e["path"] for e in manifest["segments"]} if manifest else set()
    if manifest and manifest.get("codebooks"):
        listed.add(codebook_dir(int(manifest["codebooks"]["generation"])))
    if manifest and manifest.get("deletes"):
        listed.add(manifest["deletes"]["path"])
    for top in ("segments", CODEBOOKS_DIR, DELETES_DIR):
        root = index_dir / top
        if root.is_dir():
            for p in root.iterdir():
                if f"{top}/{p.name}" not in listed:
                    remove(p)


def unified_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for record tables of several segments (sources may add different columns; a column that is
    all nulls in one segment takes the other's type). A column whose types cannot be reconciled (an int64 ``key``
    written by an older version that inferred CSV types, text now) becomes text."""
    if len(schemas) <= 1:
        return schemas[0]
    names: dict[str, list[pa.DataType]] = {}
    for sch in schemas:
        for f in sch:
            names.setdefault(f.name, []).append(f.type)
    fields = []
    for name, types in names.items():
        try:
            t = pa.unify_schemas([pa.schema([(name, x)]) for x in types], promote_options="permissive").field(0).type
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            t = pa.large_string()
        fields.append(pa.field(name, t))
    return pa.schema(fields, metadata=schemas[0].metadata)


def cast_table(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` with the columns of ``schema``, in its order and types (a column ``t`` lacks: nulls)."""
    cols = [t.column(f.name).cast(f.type) if f.name in t.schema.names else pa.nulls(len(t), f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


class Segment:
    """A committed segment opened for reading: every file is memory-mapped when it is opened, so later
    changes to the folder (a compaction deleting it, an overwrite replacing the index) cannot mix into the
    answers of a reader that already opened it."""

    def __init__(self, index_dir: Path, entry: dict, cb: Codebooks, hash_files: bool = False) -> None:
        self.entry = entry
        self.id = int(entry["id"])
        self.path = index_dir / entry["path"]
        self.cb = cb
        self.n_records = int(entry["records"])
        self.n_images = int(entry["images"])
        try:
            self._check_files(hash_files)  # a file gone between its checks (a writer's commit removed it): damaged
            self.rows = np.load(self.path / path_of("rows"), mmap_mode="r")
            self.image_rows = np.load(self.path / path_of("image_rows"), mmap_mode="r")
            self.record_crc = np.load(self.path / path_of("record_crc"), mmap_mode="r")
            self.image_sums = np.load(self.path / path_of("image_sums"), mmap_mode="r")
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
            self.stores = {name: _no_prefetch(faiss.read_index(str(self.path / path_of(name)), flags))
                           for name in STORES}
            self.refine = {name: self._map(f"{name}_refine", cb.stores[name].refine_dtype, (cb.stores[name].dim,))
                           for name in STORES}
            cells, width, dtype = cb.patch_code_shape
            self.patches = self._map("patches", dtype, (cells, width))
            with open(self.path / path_of("serving"), "rb") as f:  # a map of ours: its pages count in the budget
                serving_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            reader = pa.ipc.open_file(pa.py_buffer(serving_map))  # zero-copy: the batches' buffers are the map's
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            self.caption_keys = self._optional_npy("caption_keys")
            self.caption_codes = self.caption_sums = None
            if path_of("caption_clip") in entry["files"]:
                width, dtype = cb.caption_code_shape
                self.caption_codes = self._map("caption_clip", dtype, (width,), self.n_records)
                self.caption_sums = self._optional_npy("caption_sums")
                if self.caption_sums is None:
                    raise self._damaged(f"the manifest lists no {path_of('caption_sums')}")
        except IndexFormatError:
            raise
        except Exception as e:  # noqa: BLE001 - numpy/faiss/arrow raise many types on damaged files
            raise IndexFormatError(f"segment {self.path} is damaged ({e.__class__.__name__}: {e}); run "
                                   f"`attrib verify` on the index, then rebuild it") from None
        self._refine_maps = {name: MappedCodes(codes) for name, codes in self.refine.items()}
        self._patch_map = MappedCodes(self.patches)
        self._caption_map = MappedCodes(self.caption_codes) if self.caption_codes is not None else None
        # The serving table is read by row too (captions of pool candidates, 1 MB mapped per scattered read): its
        # pages count and are dropped with the codes'. The row tables are not: every query reads the same few pages
        # of them (binary searches), and dropping those made searches at 10M records 2-3 times slower.
        self._serving_map = MappedCodes(self.batches, serving_map)
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])[:-1].astype(np.int64)
        self._columns: list[list[StringColumn]] | None = None  # made on the first read of the serving table
        self._check_shapes()

    # ----------------------------------------------------------------------------------------- checks
    def _damaged(self, what: str) -> IndexFormatError:
        return IndexFormatError(f"segment {self.path.name} of index {self.path.parent.parent} is damaged: {what}; "
                                f"run `attrib verify` on the index, then rebuild it")

    def _check_files(self, hash_files: bool) -> None:
        from ._codebooks import sha256_file

        for c in at_level("segment"):
            want = self.entry["files"].get(c.path)
            p = self.path / c.path
            if want is None:
                if c.required:
                    raise self._damaged(f"the manifest lists no {c.path}")
                continue
            if not p.is_file():
                raise self._damaged(f"{c.path} is missing")
            size = p.stat().st_size
            if size != want["bytes"]:
                raise self._damaged(f"{c.path} has {size} bytes, the manifest records {want['bytes']}")
            if c.expected_bytes is not None and size != c.expected_bytes(self.entry):
                raise self._damaged(f"{c.path} has {size} bytes, its counts imply {c.expected_bytes(self.entry)}")
            if hash_files and sha256_file(p) != want["sha256"]:
                raise self._damaged(f"{c.path} does not match its checksum")

    def _map(self, name: str, dtype: np.dtype, tail: tuple[int, ...], n: int | None = None) -> np.ndarray:
        """Memory-map a headerless per-image (or, with ``n``, per-record) code file."""
        n = self.n_images if n is None else n
        p = self.path / path_of(name)
        per = int(np.prod(tail)) * dtype.itemsize
        if p.stat().st_size != n * per:
            raise self._damaged(f"{p.name} holds {p.stat().st_size} bytes, expected {n} x {per}")
        if n == 0:
            return np.zeros((0, *tail), dtype)
        return np.memmap(p, dtype=dtype, mode="r", shape=(n, *tail))

    def _optional_npy(self, name: str) -> np.ndarray | None:
        if path_of(name) not in self.entry["files"]:
            return None
        return np.load(self.path / path_of(name), mmap_mode="r")

    def _check_shapes(self) -> None:
        if self.rows.shape != (self.n_records,) or self.image_rows.shape != (self.n_images,):
            raise self._damaged("its row tables do not match its counts")
        if self.record_crc.shape != (self.n_records,) or self.image_sums.shape != (self.n_images, 3):
            raise self._damaged("its checksum tables do not match its counts")
        for name in ("caption_keys", "caption_sums"):
            got = getattr(self, name)
            if got is not None and (got.shape != (self.n_records,) or got.dtype != np.uint64):
                raise self._damaged(f"{path_of(name)} does not match its counts")
        if sum(b.num_rows for b in self.batches) != self.n_records:
            raise self._damaged(f"{path_of('serving')} holds another number of records")
        for name, index in self.stores.items():
            if index.ntotal != self.n_images or index.d != self.cb.stores[name].dim:
                raise self._damaged(f"{path_of(name)} holds {index.ntotal} vectors of {index.d} dims")
        if self.n_records:
            if self.rows.dtype != np.int64 or np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0:
                raise self._damaged("its record rows are not ascending")
            if self.n_images and (np.any(np.diff(self.image_rows) <= 0)
                                  or np.any(self.rows[np.minimum(np.searchsorted(self.rows, self.image_rows),
                                                                 self.n_records - 1)] != self.image_rows)):
                raise self._damaged("its image rows are not ascending record rows")

    # ----------------------------------------------------------------------------------------- reading
    def local_records(self, rows: np.ndarray) -> np.ndarray:
        """Positions of ``rows`` (which must belong to this segment) among its records."""
        pos = np.searchsorted(self.rows, rows)
        return pos

    def local_images(self, rows: np.ndarray) -> np.ndarray:
        """Positions of ``rows`` among this segment's images; -1 for rows without an image."""
        if not self.n_images:
            return np.full(len(rows), -1, np.int64)
        pos = np.minimum(np.searchsorted(self.image_rows, rows), self.n_images - 1)
        return np.where(self.image_rows[pos] == rows, pos, -1).astype(np.int64)

    def _checked(self, codes: np.ndarray, local: np.ndarray, col: int, what: str) -> np.ndarray:
        if len(local) and not np.array_equal(row_sums(codes), self.image_sums[local, col]):
            bad = local[row_sums(codes) != self.image_sums[local, col]]
            rows = np.asarray(self.image_rows[bad[:5]]).tolist()
            raise self._damaged(f"the {what} of rows {rows} do not match their checksums")
        return codes

    def refine_codes(self, name: str, local: np.ndarray) -> np.ndarray:
        codes = self._refine_maps[name].take(local)
        return self._checked(codes, local, STORES.index(name), f"{name} vectors")

    def vectors(self, name: str, local: np.ndarray) -> np.ndarray:
        """float32 vectors of store ``name`` for local image positions (checked)."""
        return self.cb.decode_refine(name, self.refine_codes(name, local))

    def scores(self, name: str, local: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Inner products of ``q`` with the stored vectors of store ``name`` at local image positions (checked),
        computed from the codes (``Codebooks.refine_scores``). A block of rows at a time is read, checked and
        scored while it is in the processor's cache (a query re-scores up to 6,400 rows of 768 bytes)."""
        out = np.empty(len(local), np.float32)
        for a in range(0, len(local), REFINE_BLOCK):
            block = local[a:a + REFINE_BLOCK]
            out[a:a + len(block)] = self.cb.refine_scores(name, self.refine_codes(name, block), q)
        return out

    def patch_cells(self, local: np.ndarray) -> np.ndarray:
        """float32 patch cells (n, C, Dp) for local image positions (checked)."""
        return self.cb.decode_patches(self.patch_codes(local))

    def patch_codes(self, local: np.ndarray) -> np.ndarray:
        """Stored patch codes for local image positions (checked)."""
        return self._checked(self._patch_map.take(local), local, 2, "patch cells")

    def caption_code_rows(self, local: np.ndarray) -> np.ndarray:
        """Stored caption-embedding codes of local record positions (checked)."""
        codes = self._caption_map.take(local)
        if len(local) and not np.array_equal(row_sums(codes), self.caption_sums[local]):
            bad = local[row_sums(codes) != self.caption_sums[local]]
            raise self._damaged(f"the caption embeddings of rows {np.asarray(self.rows[bad[:5]]).tolist()} do not "
                                f"match their checksums")
        return codes

    def caption_vectors(self, local: np.ndarray) -> np.ndarray:
        """float32 caption embeddings (n, Dc) of local record positions (checked; zeros: no caption)."""
        return self.cb.decode_captions(self.caption_code_rows(local))

    def serving(self, local: np.ndarray) -> tuple[list, list, list]:
        """(ids, images, captions) of local record positions, in that order, checked against their CRCs."""
        local = np.asarray(local, np.int64)
        if self._columns is None:
            try:
                self._columns = [[StringColumn(b.column(c)) for c in SERVING_COLUMNS] for b in self.batches]
            except (TypeError, KeyError, ValueError) as e:
                raise self._damaged(f"{path_of('serving')} has unexpected columns ({e})") from None
        which = np.searchsorted(self.starts, local, side="right") - 1
        within = (local - self.starts[which]).tolist()
        crc = np.asarray(self.record_crc[local]).tolist()
        ids, imgs, caps = [], [], []
        for n, (b, i) in enumerate(zip(which.tolist(), within)):
            rid, img, cap = self._columns[b]
            try:
                a, m, c = rid.get(i), img.get(i), cap.get(i)
            except UnicodeDecodeError:
                a = m = c = "\ufffd"  # not UTF-8: fails the CRC below
            if record_crc(a, m, c) != crc[n]:
                raise self._damaged(f"record row {int(self.rows[local[n]])} does not match its CRC "
                                    f"({path_of('serving')} was changed)")
            ids.append(a)
            imgs.append(m)
            caps.append(c)
        return ids, imgs, caps

    def all_ids(self) -> list:
        return [x for b in self.batches for x in b.column(0).to_pylist()]

    def metadata(self) -> pl.DataFrame:
        """The full record table of this segment (records.parquet)."""
        return pl.read_parquet(self.path / path_of("records"))

    def close(self) -> None:
        self.stores.clear()
        self.refine.clear()
        self._refine_maps.clear()
        self._patch_map = self._caption_map = self._serving_map = None
        self.batches = []
        self._columns = None
        self.caption_codes = self.caption_sums = self.caption_keys = None


def segment_ids(index_dir: Path, entry: dict) -> tuple[np.ndarray, list]:
    """(rows, ids) of a committed segment, read from its serving table alone."""
    path = index_dir / entry["path"]
    reader = pa.ipc.open_file(pa.memory_map(str(path / path_of("serving")), "r"))
    ids = [x for i in range(reader.num_record_batches) for x in reader.get_batch(i).column(0).to_pylist()]
    return np.load(path / path_of("rows"), allow_pickle=False), ids


def remove_segment(index_dir: Path, rel: str) -> None:
    shutil.rmtree(index_dir / rel, ignore_errors=True)


def _no_prefetch(index: faiss.Index) -> faiss.Index:
    """A memory-mapped IVF store reads its lists through ``OnDiskInvertedLists``, which by default starts 32
    threads per search to touch the probed lists' pages ahead of the scan. With the index in the page cache
    (a serving index) that is pure overhead: it doubled the scan time of 19 lists at 100k records on 2 cores.
    The kernel's readahead still applies to cold pages."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # a flat store: no lists
        return index
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if hasattr(lists, "prefetch_nthread"):
        lists.prefetch_nthread = 0
    return index
