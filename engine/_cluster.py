"""Distributed builds without the distributed engine: the plan, the work of one unit, and the driver's commits.

A distributed build (``attrib index --engine ray``, see ``engine._ray``) cuts the source into **parts**
(``Source.parts``: a folder's images ``--chunk`` at a time, each tar shard, a table ``--chunk`` rows at a time)
and groups consecutive parts into **units** of at most ``--chunk`` records. The plan is a pure function of the
source and the settings, so a rerun finds the same units. Each unit gets, before any work starts:

* a **row range** as long as the records it can hold (records rejected while reading leave gaps: rows are
  record ids, not positions), so units never collide and a unit's rows do not depend on any other unit;
* a **segment id**.

The first unit (grown to at least ``--chunk`` records) is the **bootstrap**: it runs the local writer's own code
(the same batches, the DINO projection fitted on the first ``pca_sample`` images, the codebooks trained on the
first ``--chunk`` images), so a distributed build equals a local one. It is committed before the other units
start; they load its codebooks from the index folder.

A worker reads its unit's parts, decodes and encodes them with the local pipeline (``engine._build``), writes
one segment with ``write_segment`` into ``INDEX/incoming/`` and then a done marker
``incoming/unit-NNNNNN.json`` (its segment's files and checksums, its rejects, how many items each part gave).

The driver commits done units in plan order (so the first of two records with the same id wins, as in a local
build): it rejects ids the index already has (rewriting that segment without them), moves the segment into
``segments/``, adds the captions to the one caption index, appends the rejects and writes a new manifest
generation that records how many units are committed. Killed at any moment, a rerun skips committed units,
commits finished ones from their markers without encoding them again, and redoes the rest. The manifest also
keeps the local build's progress fields (``consumed``, ``parts_done``), so the local engine can finish an
interrupted distributed build too.

Nothing here imports Ray: ``engine._ray`` runs :func:`run_unit` on worker actors and drives :class:`Committer`.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._codebooks import Codebooks, sha256_file
from ._errors import AttribError
from ._ingest import Source, SourcePart, part_records
from ._layout import codebook_dir, path_of, segment_dir
from ._manifest import write_json_atomic, write_manifest
from ._segment import STORES, Chunk, EncodedChunk, Segment, segment_ids, write_segment
from ._settings import IndexSettings
from ._threads import blas_single
from ._writer import IndexWriter
from .files import fsync_dir, remove

INCOMING = "incoming"  # finished, not yet committed units: segments, codebooks and done markers
MARKER_FORMAT = 1
MAX_WORKERS = 10_000
MAX_RETRIES = 100


@dataclass(frozen=True)
class ClusterSettings:
    """How a distributed build uses its cluster (``attrib index --engine ray``)."""

    address: str | None = None  # Ray cluster to join ("auto", "ray://HOST:PORT"); None starts one on this machine
    workers: int = 1  # worker actors; each loads both encoders once and encodes one unit at a time
    gpus_per_worker: float = 0.0  # GPUs per worker (0: encode on CPU; fractions share a GPU between workers)
    cpus_per_worker: int | None = None  # CPUs per worker (torch threads); None: all CPUs / workers when local, else 1
    local_cpus: int | None = None  # CPUs of a Ray started on this machine (None: all of this machine's)
    retries: int = 2  # attempts after the first before a failing unit goes to rejects.jsonl
    wait_seconds: float = 600.0  # longest wait with no worker alive (cluster start-up, lost nodes) before giving up
    commit_seconds: float = 2.0  # finished units are committed together at most this often (one generation each)

    def __post_init__(self) -> None:
        def bad(name: str, value, want: str) -> AttribError:
            return AttribError(f"cluster setting {name}={value!r} is invalid: it must be {want}")

        for name, low, high in (("workers", 1, MAX_WORKERS), ("retries", 0, MAX_RETRIES)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise bad(name, v, f"an integer in {low}..{high}")
        for name in ("cpus_per_worker", "local_cpus"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4096):
                raise bad(name, v, "an integer in 1..4096")
        g = self.gpus_per_worker
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 64 or g != g:
            raise bad("gpus_per_worker", g, "a number in 0..64")
        for name in ("wait_seconds", "commit_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 86_400:
                raise bad(name, v, "a number of seconds in 0..86400")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise bad("address", self.address, "'auto', HOST:PORT or ray://HOST:PORT")


# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Unit:
    """One unit of work: consecutive source parts that become one segment."""

    index: int  # position in the plan (units are committed in this order)
    parts: tuple[SourcePart, ...]  # what to read, in source order
    first_row: int  # the unit's records take rows first_row .. first_row + capacity - 1 (rejects leave gaps)
    capacity: int  # the most records its parts can give
    seg_id: int  # the id of its segment
    bootstrap: bool = False  # fits the DINO projection and trains the codebooks (the first unit of a new index)

    @property
    def name(self) -> str:
        return self.parts[0].name if len(self.parts) == 1 else f"{self.parts[0].name} .. {self.parts[-1].name}"

    @property
    def planned_items(self) -> int:
        """Records and rejects it gives when known in advance (tar shards: their image members)."""
        return sum(p.items if p.items is not None else p.max_records for p in self.parts)


@dataclass(frozen=True)
class Plan:
    units: tuple[Unit, ...]
    checksum: str  # of the source, the settings that shape the plan and every unit (a rerun must match it)
    base_row: int  # the first unit's first row
    base_segment: int  # the first unit's segment id
    bootstrap: bool  # the first unit trains the codebooks (a build that started on an empty index)

    @property
    def end_row(self) -> int:
        return self.base_row + sum(u.capacity for u in self.units)


def plan_units(src: Source, chunk: int, base_row: int, base_segment: int, bootstrap: bool) -> Plan:
    """Cut ``src`` into units of at most ``chunk`` records (a part larger than that is a unit alone); with
    ``bootstrap`` the first unit grows until it can hold ``chunk`` records, so that it trains the codebooks on
    the same images as a local build's first commit."""
    parts = src.parts(chunk)
    units: list[Unit] = []
    cur: list[SourcePart] = []
    cap = 0
    row = base_row

    def close() -> None:
        nonlocal cur, cap, row
        units.append(Unit(len(units), tuple(cur), row, cap, base_segment + len(units), bootstrap and not units))
        row += cap
        cur, cap = [], 0

    for p in parts:
        growing_bootstrap = bootstrap and not units
        if cur and not growing_bootstrap and cap + p.max_records > chunk:
            close()
        cur.append(p)
        cap += p.max_records
        if cap >= chunk:
            close()
    if cur:
        close()
    desc = {"source": src.fingerprint, "kind": src.kind, "chunk": chunk, "base_row": base_row,
            "base_segment": base_segment, "bootstrap": bootstrap,
            "units": [[u.first_row, u.capacity, u.seg_id, [p.describe() for p in u.parts]] for u in units]}
    checksum = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    return Plan(tuple(units), checksum, base_row, base_segment, bootstrap)


# --------------------------------------------------------------------------------------------- a unit's work
@dataclass(frozen=True)
class JobSpec:
    """What every unit of one build needs besides the unit itself (sent to each worker with each unit)."""

    index_dir: str  # the index folder (the same path on every node: a shared filesystem)
    plan: str  # the plan's checksum (written into each done marker)
    fingerprint: str  # the models' fingerprint: a worker with other weights is refused
    settings: IndexSettings  # the index's settings
    extra_schema: dict  # extra source columns -> polars types
    expected_images: int  # the size of the whole build (chooses the codec and IVF size)
    codebooks: dict | None  # the committed codebooks' manifest entry (None for the bootstrap unit)


def marker_path(index_dir: Path, unit_index: int) -> Path:
    return index_dir / INCOMING / f"unit-{unit_index:06d}.json"


def incoming_segment(seg_id: int) -> str:
    return f"{INCOMING}/seg-{seg_id:06d}"


def incoming_codebooks(generation: int) -> str:
    return f"{INCOMING}/cb-{generation:04d}"


class _UnitWriter(IndexWriter):
    """The local writer's collection code (batches, the projection fit, codebook training, the captions' CLIP
    text embeddings) for one unit, without a folder: no lock, no caption index, no manifest. Its records take the
    unit's rows; a bootstrap unit trains the codebooks at the first full chunk exactly like a local build's first
    commit, and everything it collects becomes one segment."""

    def __init__(self, identity: dict, settings: IndexSettings, extra_schema: dict, codebooks: Codebooks | None,
                 first_row: int, expected_images: int,
                 caption_encoder=None) -> None:  # noqa: D107 - no super(): nothing on disk
        self.identity = identity
        self.caption_encoder = caption_encoder  # Encoders.encode_texts, as the local build gives its writer
        self.extra_schema = dict(extra_schema)
        self.source = {}
        self.clip_dim = int(identity["clip"]["dim"])
        self.dino_dim = int(identity["dino"]["dim"])
        self.manifest = None
        self.settings = settings
        self.codebooks = codebooks
        self.projection = codebooks.projection if codebooks is not None else None
        self.expected_images = int(expected_images or 0)
        self.cells = settings.patch_grid ** 2
        self.patch_dims = self.projection.cell_dim if self.projection is not None else \
            min(settings.patch_dims, self.dino_dim)
        self.rejected: list[dict] = []
        self.known_ids = set()
        self._reset_chunk()
        self.auto_commit = False
        self.n_rows = 0
        self.n_images = 0
        self.committed_this_run = 0
        self.first_row = int(first_row)
        self.chunks: list[Chunk] = []

    @property
    def next_row(self) -> int:
        return self.first_row + self.n_rows - len(self._records)

    def reject(self, where: str, rid: str | None, reason: str, detail: str = "") -> None:
        self.rejected.append({"record": where, "id": rid, "reason": reason, "detail": detail})

    def chunk_full(self, pending_images: int = 0, pending_records: int = 0) -> bool:
        # until the codebooks exist, chunks close where a local build's would (its first commit trains them)
        return self.codebooks is None and super().chunk_full(pending_images, pending_records)

    @blas_single
    def commit(self, progress: dict | None = None, complete: bool = False, extra: dict | None = None) -> dict:
        if self.projection is None and (self._pending or self.codebooks is None):
            self._fit_projection()
        clip, dino, cells = self._chunk_arrays()
        captions = self._caption_vectors() if self._records else None
        if self.codebooks is None:
            self._train_codebooks(clip, dino, cells, captions)
        if self._records:
            self.chunks.append(Chunk(self._table(), np.asarray(self._image_rows, np.int64), clip, dino, cells,
                                     captions))
        self._reset_chunk()
        return {}

    def chunk(self) -> Chunk | None:
        """Everything collected, as one chunk (None when the unit gave no record)."""
        if not self.chunks:
            return None
        if len(self.chunks) == 1:
            return self.chunks[0]
        c = self.chunks
        captions = None if any(x.captions is None for x in c) else np.concatenate([x.captions for x in c])
        return Chunk(pa.concat_tables([x.table for x in c]), np.concatenate([x.image_rows for x in c]),
                     np.concatenate([x.clip for x in c]), np.concatenate([x.dino for x in c]),
                     np.concatenate([x.cells for x in c]), captions)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def run_unit(unit: Unit, spec: JobSpec, encoders, codebooks: Codebooks | None) -> dict:
    """Read, decode and encode one unit, write its segment (and, for the bootstrap unit, the codebooks) into
    ``incoming/``, then its done marker; returns the marker. Runs on a worker (any machine that sees the source
    and the index folder)."""
    from ._build import _run_pipeline  # the local build's own pipeline: the same decoding, batching and rejects

    t0 = time.perf_counter()
    folder = Path(spec.index_dir)
    if encoders.identity["fingerprint"] != spec.fingerprint:
        raise AttribError(f"worker {socket.gethostname()} has other model weights (fingerprint "
                          f"{encoders.identity['fingerprint']}) than the build ({spec.fingerprint})")
    settings = spec.settings
    w = _UnitWriter(encoders.identity, settings, spec.extra_schema, codebooks, unit.first_row, spec.expected_images,
                    caption_encoder=encoders.encode_texts)
    items = [0] * len(unit.parts)
    accepted = 0

    def records():
        nonlocal accepted
        for k, part in enumerate(unit.parts):
            for rec in part_records(part, settings.max_bytes):
                items[k] += 1
                if rec.reject is None:
                    accepted += 1
                    if accepted > unit.capacity:  # the source changed since it was planned: never past the range
                        rec.reject = ("over the planned rows", f"{unit.name} gave more records than the "
                                                               f"{unit.capacity} planned; the source changed while "
                                                               f"it was indexed: rebuild with --overwrite")
                yield rec

    root = unit.parts[0].root
    src = Source(unit.parts[0].kind, Path(root), unit.planned_items, dict(spec.extra_schema), [],
                 lambda skip, parts_done: records())
    encoded, encode_s = _run_pipeline(src, w, encoders, settings, progress=False)
    w.commit()
    chunk = w.chunk()
    cb = w.codebooks
    entry = None
    if chunk is not None:
        entry = write_segment(folder, incoming_segment(unit.seg_id), unit.seg_id, chunk, cb)
    cb_entry = None
    if unit.bootstrap:
        cb_dir = folder / incoming_codebooks(cb.generation)
        remove(cb_dir)
        cb_entry = cb.save(cb_dir)
        fsync_dir(cb_dir)
    marker = {
        "format": MARKER_FORMAT, "plan": spec.plan, "unit": unit.index, "name": unit.name,
        "fingerprint": spec.fingerprint, "segment": entry, "codebooks": cb_entry, "rejects": w.rejected,
        "items": items, "records": entry["records"] if entry else 0, "images": entry["images"] if entry else 0,
        "encoded": int(encoded), "encode_seconds": round(encode_s, 4), "seconds": round(time.perf_counter() - t0, 4),
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    write_json_atomic(marker_path(folder, unit.index), marker)
    return marker


def failed_marker(unit: Unit, plan: str, attempts: int, error: str) -> dict:
    """What the driver commits for a unit that failed on every attempt: one reject naming it and the reason."""
    detail = (f"{attempts} attempt{'s' if attempts != 1 else ''} failed; its up to {unit.capacity} records were not "
              f"indexed (rerun with --overwrite to try again). Last error: {error}")
    return {"format": MARKER_FORMAT, "plan": plan, "unit": unit.index, "name": unit.name, "segment": None,
            "codebooks": None, "failed": True, "rejects": [{"record": unit.name, "id": None, "reason": "unit failed",
                                                            "detail": detail[:2000]}],
            "items": [0] * len(unit.parts), "records": 0, "images": 0, "encoded": 0, "encode_seconds": 0.0,
            "seconds": 0.0}


# --------------------------------------------------------------------------------------------- the driver side
def _files_ok(folder: Path, files: dict, deep: bool) -> bool:
    for name, want in files.items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != want["bytes"]:
            return False
        if deep and sha256_file(p) != want["sha256"]:
            return False
    return True


def valid_marker(index_dir: Path, unit: Unit, plan: str, fingerprint: str, deep: bool) -> dict | None:
    """The done marker of ``unit`` when it is complete and its files are there (``deep``: their sha256 too)."""
    p = marker_path(index_dir, unit.index)
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(m, dict) or m.get("format") != MARKER_FORMAT or m.get("plan") != plan \
            or m.get("unit") != unit.index or m.get("fingerprint") != fingerprint \
            or len(m.get("items") or ()) != len(unit.parts):
        return None
    seg = m.get("segment")
    if seg is not None:
        if seg.get("path") != incoming_segment(unit.seg_id) or \
                not _files_ok(index_dir / seg["path"], seg.get("files") or {}, deep):
            return None
    cb = m.get("codebooks")
    if unit.bootstrap and (cb is None or not _files_ok(index_dir / incoming_codebooks(int(cb["generation"])),
                                                       cb.get("files") or {}, deep)):
        return None
    return m


def recover_incoming(index_dir: Path) -> None:
    """Undo the moves of a commit that was interrupted before its manifest was written: a segment (or codebooks)
    moved out of ``incoming/`` but not listed by the manifest goes back, so its done marker is valid again (the
    writer would otherwise delete it as a crashed writer's leftover)."""
    inc = index_dir / INCOMING
    if not inc.is_dir():
        return
    try:
        m = json.loads((index_dir / "manifest.json").read_text(encoding="utf-8"))
        listed = {e["path"] for e in m.get("segments", [])}
        cb_listed = (m.get("codebooks") or {}).get("path")
    except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError):
        listed, cb_listed = set(), None
    for p in sorted(inc.glob("unit-*.json")):
        try:
            mk = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(mk, dict):
            continue
        seg = mk.get("segment") or {}
        if seg.get("path", "").startswith(f"{INCOMING}/"):
            moved = index_dir / segment_dir(int(seg["id"]))
            here = index_dir / seg["path"]
            if not here.exists() and moved.is_dir() and segment_dir(int(seg["id"])) not in listed \
                    and _files_ok(moved, seg.get("files") or {}, True):
                os.replace(moved, here)
        cb = mk.get("codebooks")
        if cb:
            gen = int(cb["generation"])
            moved, here = index_dir / codebook_dir(gen), index_dir / incoming_codebooks(gen)
            if not here.exists() and moved.is_dir() and cb_listed != codebook_dir(gen) \
                    and _files_ok(moved, cb.get("files") or {}, True):
                os.replace(moved, here)


@dataclass
class Committer:
    """Commits finished units into the index, in plan order, through the driver's :class:`IndexWriter` (the
    lock, the caption index, the rejects file and the manifest are the local writer's own)."""

    writer: IndexWriter
    plan: Plan
    source: dict  # the source being indexed (the manifest's build.source)
    committed: int = 0  # units committed (a prefix of the plan)
    consumed: int = 0  # source items (records and rejects) of the committed units
    parts_done: dict = field(default_factory=dict)  # tar shard -> items, for the local engine's resume
    added: int = 0  # records this run committed
    last: float = 0.0  # when the last commit was written

    @classmethod
    def resume(cls, writer: IndexWriter, plan: Plan, source: dict) -> "Committer":
        """The committer of an unfinished distributed build: the units its manifest records as committed."""
        b = (writer.manifest or {}).get("build") or {}
        r = b.get("ray") or {}
        if r.get("plan") != plan.checksum:
            raise AttribError(f"the unfinished build in {writer.folder} was planned differently (plan "
                              f"{r.get('plan')}, now {plan.checksum}): its source or settings changed; pass "
                              f"--overwrite to start again")
        c = cls(writer, plan, source)
        c.committed = int(r.get("units_committed", 0))
        c.consumed = int(b.get("consumed", 0))
        c.parts_done = dict(b.get("parts_done") or {})
        return c

    def progress(self) -> dict:
        return {"consumed": self.consumed, "parts_done": dict(self.parts_done), "current_part": [None, 0],
                "source": self.source, "engine": "ray",
                "ray": {"plan": self.plan.checksum, "units": len(self.plan.units), "units_committed": self.committed,
                        "base_row": self.plan.base_row, "base_segment": self.plan.base_segment,
                        "bootstrap": self.plan.bootstrap, "chunk": int(self.writer.settings.chunk)}}

    @blas_single
    def commit(self, markers: list[dict]) -> dict:
        """Commit the done markers of the next units of the plan (in order) as one manifest generation."""
        w = self.writer
        folder = w.folder
        m = w._next_manifest()
        for mk in markers:
            unit = self.plan.units[mk["unit"]]
            if unit.index != self.committed:
                raise RuntimeError(f"unit {unit.index} committed out of order (expected {self.committed})")
            if mk.get("codebooks"):
                self._adopt_codebooks(m, mk["codebooks"])
            for r in mk["rejects"]:
                w.reject(r["record"], r.get("id"), r["reason"], r.get("detail", ""))
            entry = mk.get("segment")
            if entry is not None:
                entry = self._adopt_segment(unit, entry)
            if entry is not None:
                m["segments"].append(entry)
                m["counts"]["records"] += entry["records"]
                m["counts"]["images"] += entry["images"]
                self.added += entry["records"]
            m["next_row"] = max(int(m["next_row"]), unit.first_row + unit.capacity)
            m["next_segment"] = max(int(m["next_segment"]), unit.seg_id + 1)
            self.committed += 1
            self.consumed += sum(mk["items"])
            for part, n in zip(unit.parts, mk["items"]):
                if part.kind == "tar" and part.paths:
                    self.parts_done[part.paths[0]] = int(n)
        w.text.commit()
        w.rejects.flush()
        os.fsync(w.rejects.fileno())
        m["rejects_bytes"] = w.rejects_path.stat().st_size
        m["counts"]["rejected"] = int(sum(w.reject_reasons.values()))
        m["counts"]["reject_reasons"] = dict(w.reject_reasons)
        m["counts"]["caption_only"] = m["counts"]["records"] - m["counts"]["images"]
        m["build"].update(self.progress())
        m["build"]["complete"] = False
        w.manifest = write_manifest(folder, m)
        self.last = time.monotonic()
        for mk in markers:
            remove(marker_path(folder, mk["unit"]))
        return w.manifest

    def _adopt_codebooks(self, m: dict, entry: dict) -> None:
        w = self.writer
        gen = int(entry["generation"])
        dest = w.folder / codebook_dir(gen)
        remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(w.folder / incoming_codebooks(gen), dest)
        fsync_dir(dest.parent)
        m["codebooks"] = {**entry, "path": codebook_dir(gen)}
        w.codebooks = Codebooks.load(dest, m["codebooks"])
        w.projection = w.codebooks.projection
        w.patch_dims = w.projection.cell_dim

    def _adopt_segment(self, unit: Unit, entry: dict) -> dict | None:
        """Reject ids the index (or an earlier unit) already has, move the segment into ``segments/`` and add its
        captions; returns its manifest entry (None when every record was a duplicate)."""
        w = self.writer
        folder = w.folder
        rows, ids = segment_ids(folder, entry)
        ids = [str(i) for i in ids]
        dup = [(r, i) for r, i in zip(rows.tolist(), ids) if i in w.known_ids]
        if dup:
            for _, i in dup:
                w.reject(unit.name, i, "duplicate id", "an earlier record (or the index) already has this id")
            entry = drop_rows(folder, entry, np.asarray([r for r, _ in dup], np.int64), w.codebooks)
            if entry is None:
                return None
        rel = segment_dir(int(entry["id"]))
        dest = folder / rel
        remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / entry["path"], dest)
        fsync_dir(dest.parent)
        entry = {**entry, "path": rel}
        table = pq.read_table(dest / path_of("records"), columns=["row", "id", "caption"])
        for row, rid, cap in zip(table.column("row").to_pylist(), table.column("id").to_pylist(),
                                 table.column("caption").to_pylist()):
            w.text.add(row, cap, int(entry["id"]))
            w.known_ids.add(str(rid))
        return entry


def drop_rows(folder: Path, entry: dict, drop: np.ndarray, cb: Codebooks) -> dict | None:
    """Rewrite an uncommitted segment without the records of rows ``drop`` (their codes are copied, never
    re-encoded); None (and the segment removed) when nothing is left."""
    seg = Segment(folder, entry, cb)
    enc = None
    try:
        rows = np.asarray(seg.rows)
        keep = ~np.isin(rows, drop)
        if keep.any():
            table = pq.read_table(seg.path / path_of("records")).filter(pa.array(keep))
            irows = np.asarray(seg.image_rows)
            li = np.flatnonzero(~np.isin(irows, drop))
            stores = {}
            for n in STORES:
                index = faiss.read_index(str(seg.path / path_of(n)))
                index.remove_ids(faiss.IDSelectorBatch(np.asarray(drop, np.int64)))
                stores[n] = index
            enc = EncodedChunk(table, irows[li], stores, {n: np.asarray(seg.refine[n][li]) for n in STORES},
                               np.asarray(seg.patches[li]), np.asarray(seg.record_crc)[keep],
                               np.asarray(seg.image_sums)[li],
                               None if seg.caption_codes is None else np.asarray(seg.caption_codes)[keep],
                               None if seg.caption_keys is None else np.asarray(seg.caption_keys)[keep])
    finally:
        seg.close()
    if enc is None:
        remove(folder / entry["path"])
        return None
    return write_segment(folder, entry["path"], int(entry["id"]), enc, cb)


def clear_incoming(index_dir: Path, keep_units: set[int] | None = None) -> None:
    """Remove what ``incoming/`` holds, except the files of the done markers of ``keep_units`` (None: all)."""
    inc = index_dir / INCOMING
    if not inc.is_dir():
        return
    if keep_units is None:
        remove(inc)
        return
    keep: set[str] = set()
    for u in keep_units:
        p = marker_path(index_dir, u)
        try:
            mk = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        keep.add(p.name)
        if (mk.get("segment") or {}).get("path"):
            keep.add(Path(mk["segment"]["path"]).name)
        if mk.get("codebooks"):
            keep.add(Path(incoming_codebooks(int(mk["codebooks"]["generation"]))).name)
    for p in inc.iterdir():
        if p.name not in keep:
            remove(p)

