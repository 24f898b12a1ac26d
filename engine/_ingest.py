"""Training-set sources: a folder of images with sidecar captions (img2dataset's folder output included),
tar shards (img2dataset / webdataset output), or a parquet / CSV / JSONL table with LAION-style columns."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import polars as pl

from ._errors import SourceError
from .images import DEFAULT_MAX_BYTES, TAR_SEP, is_image_name

IMAGE_COLUMNS = ("image", "path")
CAPTION_COLUMNS = ("caption", "text", "TEXT")
ID_COLUMNS = ("id",)
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
RESERVED_COLUMNS = ("id", "image", "caption", "row", "slot")  # the engine's own columns (slot: format 1)


@dataclass
class Record:
    id: str | None  # id from the source; None means "derive a stable one" (see derived_id)
    image: str | None  # image reference (absolute path, or shard.tar::member); None = caption-only record
    caption: str  # training caption ("" when unknown)
    where: str  # where the record came from, for messages ("cats/01.jpg", "row 17 of laion.parquet")
    derived_id: str  # stable id used when ``id`` is None (relative path, or table:row)
    extra: dict = field(default_factory=dict)  # other columns / sidecar fields
    data: bytes | None = None  # already-read image bytes (tar members)
    reject: tuple[str, str] | None = None  # (reason, detail): not indexable, goes to rejects.jsonl as it is
    part: str | None = None  # the tar shard (relative name) the record came from; None for other records

    @property
    def key(self) -> str:
        return self.id if self.id is not None else self.derived_id


@dataclass
class Source:
    kind: str  # folder | tar | table
    path: Path  # what the user named
    count: int | None  # number of records when known in advance (for the progress bar)
    extra_columns: dict[str, pl.DataType]  # extra metadata columns and their types
    ignored: list[str]  # files passed over (not images, not sidecars), for the summary
    _iter: object = None  # callable(skip, parts_done) -> iterator of records
    renamed_columns: dict[str, str] = field(default_factory=dict)  # table column -> its name in the index
    fingerprint: str = ""  # changes when the source's content list changes (a resumed build must match it)
    _parts: object = None  # callable(size) -> list of SourcePart (see ``parts``)
    _rows: object = None  # tables: callable(start, stop) -> the records of that slice of rows

    def parts(self, size: int) -> list["SourcePart"]:
        """The source cut into pieces that can be read apart, in source order (reading them one after the other
        gives exactly ``records()``): a folder's images ``size`` at a time, then each tar shard; a table ``size``
        rows at a time; a tar shard whole. See :func:`part_records`."""
        return self._parts(max(1, int(size)))  # type: ignore[operator]

    def records(self, skip: int = 0, parts_done: dict[str, int] | None = None) -> Iterator[Record]:
        """The records in source order, the first ``skip`` left out (a resumed build). ``parts_done``: items
        each fully consumed tar shard yielded before: those shards are not opened again, and skipped images are
        not read."""
        return self._iter(skip, parts_done or {})  # type: ignore[operator]


@dataclass(frozen=True)
class SourcePart:
    """A piece of a source that any machine that sees the source can read on its own (a unit of distributed
    work): a slice of a folder's images, one tar shard, a slice of a table's rows, or the folders that could not
    be listed (rejects only). It carries what reading it needs, so no machine lists the whole source again."""

    kind: str  # "unreadable", "images", "tar" or "rows"
    name: str  # for progress and rejects: "images 0-1999", "shards/00001.tar", "rows 0-1999 of laion.parquet"
    root: str  # the source: a folder (unreadable, images, tar in a folder), the .tar shard, or the table file
    start: int = 0  # first image / row of the slice (kinds images and rows)
    stop: int = 0  # one past its last image / row
    paths: tuple[str, ...] = ()  # images: their paths relative to ``root``; tar: the shard's (one); else empty
    rejects: tuple[tuple[str, str], ...] = ()  # unreadable: (folder, why) of each folder that could not be listed
    max_records: int = 0  # the most records reading it can give (an upper bound: its image members for a shard)
    items: int | None = None  # records plus rejects it gives, when known without reading it (None for a shard)
    table_format: str = ""  # rows: parquet, csv or jsonl

    def describe(self) -> dict:
        """A JSON-able description (what a plan's checksum covers)."""
        return {"kind": self.kind, "name": self.name, "start": self.start, "stop": self.stop,
                "paths": _fingerprint(*self.paths), "rejects": len(self.rejects), "max_records": self.max_records,
                "items": self.items}


def part_records(part: SourcePart, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Record]:
    """The records (and rejects) of one part, exactly as ``Source.records`` gives them at that place."""
    if part.kind == "unreadable":
        for where, why in part.rejects:
            yield _rejected(where, "unreadable folder", why)
    elif part.kind == "images":
        root = Path(part.root)
        for rel in part.paths:
            yield _image_record(root, root / rel)
    elif part.kind == "tar":
        root = Path(part.root)
        shard = root / part.paths[0] if part.paths else root
        yield from _tar_records(shard, part.paths[0] if part.paths else shard.name, max_bytes)
    elif part.kind == "rows":
        yield from _cached_table(part.root, part.table_format)._rows(part.start, part.stop)  # type: ignore[misc]
    else:
        raise ValueError(f"unknown source part kind {part.kind!r}")


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def open_source(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> Source:
    """Recognise a source by its path; errors name the path and list what is accepted. Tar members larger
    than ``max_bytes`` are not read into memory (the build then rejects them as too large)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(
            f"source {p} does not exist; give a folder of images, a .tar shard or a .parquet/.csv/.jsonl table"
        )
    if p.is_dir():
        return _folder_source(p, max_bytes)
    suffix = p.suffix.lower()
    if suffix == ".tar":
        return _tar_source(p, max_bytes)
    if suffix in TABLE_SUFFIXES:
        return _table_source(p, TABLE_SUFFIXES[suffix])
    raise SourceError(
        f"cannot read {p}: unknown source type {suffix or '(no suffix)'!r}; valid sources: a folder, a .tar shard, "
        f"or a table ending in {', '.join(TABLE_SUFFIXES)}"
    )


# --------------------------------------------------------------------------------------------- sidecars
def _json_sidecar(raw: bytes, name: str, has_text: bool = False) -> tuple[str | None, str | None, dict]:
    """(caption, id, other scalar fields) of a JSON sidecar's bytes. Not JSON, or JSON that is not an object,
    raises _SidecarRejected: the record goes to the rejects rather than being indexed without its caption. So does
    a sidecar whose only caption fields (caption, text, TEXT) hold lists, objects or booleans, unless a ``.txt``
    sidecar gives the caption (``has_text``)."""
    try:
        obj = json.loads(raw.decode("utf-8-sig", errors="replace"))  # a leading byte-order mark is not an error
    except (json.JSONDecodeError, RecursionError) as e:
        raise _SidecarRejected("unreadable sidecar", f"{name} is not valid JSON ({e}); fix or remove it, then "
                               "index the record again (--append)") from None
    if not isinstance(obj, dict):
        raise _SidecarRejected("unreadable sidecar", f"{name} holds a JSON {type(obj).__name__}, not an object with "
                               "a caption or text field; fix or remove it, then index the record again (--append)")
    caption, rid, extra = _sidecar_fields(obj)
    odd = [k for k in ("caption", "text", "TEXT") if obj.get(k) is not None and not _is_text_like(obj[k])]
    if caption is None and odd and not has_text:
        raise _SidecarRejected("unreadable sidecar", f"the {odd[0]!r} of {name} is a JSON {type(obj[odd[0]]).__name__}"
                               ", not text; fix it, then index the record again (--append)")
    return caption, rid, extra


def _is_text_like(v: object) -> bool:
    """A caption value: text, or a number (a caption "1984" written as a JSON number); never true/false."""
    return isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _sidecar_fields(obj: dict) -> tuple[str | None, str | None, dict]:
    """(caption, id, other scalar fields) from a JSON sidecar object."""
    caption = None
    for k in ("caption", "text", "TEXT"):
        if _is_text_like(obj.get(k)):
            caption = str(obj[k])
            break
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and str(rid) else None
    extra = {k: v for k, v in obj.items()
             if k not in ("caption", "text", "TEXT", "id") and isinstance(v, (str, int, float, bool))}
    return caption, rid, extra


def _decode_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").strip()


def _meta_json(extra: dict) -> dict:
    return {"meta": json.dumps(extra, ensure_ascii=False, sort_keys=True)} if extra else {"meta": None}


def printable(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (which Python keeps as lone
    surrogates) become a visible ``\\xNN``, so rejects, messages and JSON never carry invalid UTF-8."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that does not stand for a byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_NOT_UTF8 = ("file name is not valid UTF-8", "rename it with a UTF-8 name to index it")


def _rejected(where: str, reason: str, detail: str) -> Record:
    """A record that cannot be indexed; the build writes it to rejects.jsonl (never silently dropped)."""
    w = printable(where)
    return Record(None, None, "", w, w, reject=(reason, printable(detail)))


class _SidecarRejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _read_sidecar(path: Path) -> bytes | None:
    """The bytes of a folder sidecar, None when there is none. Too large (over 1 MiB) or unreadable (a folder,
    no permission, a link loop, an I/O error) raises _SidecarRejected: the record goes to the rejects."""
    if not os.path.lexists(path):
        return None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a folder, FIFO or device: never opened (a FIFO would block)
            raise _SidecarRejected("unreadable sidecar", f"{path.name} is not a regular file")
        with open(path, "rb") as f:
            raw = f.read(_SIDECAR_MAX_BYTES + 1)
    except OSError as e:
        raise _SidecarRejected("unreadable sidecar", f"{path.name}: {e.strerror or e}") from None
    if len(raw) > _SIDECAR_MAX_BYTES:
        raise _SidecarRejected("sidecar too large", f"{path.name} is over {_SIDECAR_MAX_BYTES} bytes (1 MiB)")
    return raw


# --------------------------------------------------------------------------------------------- folders
def _folder_source(root: Path, max_bytes: int) -> Source:
    images: list[Path] = []
    shards: list[Path] = []
    ignored: list[str] = []
    unreadable: list[OSError] = []  # folders os.walk could not list (reported as rejects, never skipped silently)
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        image_stems = {os.path.splitext(n)[0] for n in filenames if is_image_name(n)}
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            if is_image_name(name):
                images.append(full)
            elif name.lower().endswith(".tar"):
                shards.append(full)
            else:
                stem, ext = os.path.splitext(name)
                if ext.lower() in (".txt", ".json") and stem in image_stems:
                    continue  # a sidecar
                ignored.append(printable(str(full.relative_to(root))))
    shard_counts = [_tar_count(s, strict=False) for s in shards]
    count = len(images) + sum(shard_counts) + len(unreadable)
    rels = [s.relative_to(root).as_posix() for s in shards]
    fingerprint = _fingerprint(len(images), *[printable(i.relative_to(root).as_posix()) for i in images],
                               *[f"{printable(r)}:{s.stat().st_size}" for r, s in zip(rels, shards)])

    def rel_of(path: Path | str) -> str:
        try:
            return Path(path).relative_to(root).as_posix() or "."
        except ValueError:
            return str(path)

    def it(skip: int, parts_done: dict[str, int]) -> Iterator[Record]:
        left = skip
        for e in unreadable:
            if left:
                left -= 1
                continue
            yield _rejected(rel_of(e.filename or root) + "/", "unreadable folder",
                            f"{e.strerror or e}; its files were not indexed")
        first = min(left, len(images))
        left -= first
        for img in images[first:]:
            yield _image_record(root, img)
        for shard, rel in zip(shards, rels):
            if rel in parts_done and left >= parts_done[rel]:  # done by an earlier run: not opened again
                left -= parts_done[rel]
                continue
            if not _is_utf8(str(shard)):
                if left:
                    left -= 1
                    continue
                r = _rejected(rel, *_NOT_UTF8)
                r.part = rel
                yield r
                continue
            left = yield from _tar_records(shard, rel, max_bytes, skip=left)

    def parts(size: int) -> list[SourcePart]:
        out = []
        if unreadable:
            out.append(SourcePart("unreadable", "unreadable folders", str(root), rejects=tuple(
                (rel_of(e.filename or root) + "/", f"{e.strerror or e}; its files were not indexed")
                for e in unreadable), items=len(unreadable)))
        rel_images = [i.relative_to(root).as_posix() for i in images]
        for a in range(0, len(images), size):
            b = min(a + size, len(images))
            out.append(SourcePart("images", f"images {a}-{b - 1}", str(root), a, b, tuple(rel_images[a:b]),
                                  max_records=b - a, items=b - a))
        for shard, rel in zip(shards, rels):
            out.append(SourcePart("tar", printable(rel), str(root), paths=(rel,),
                                  max_records=_tar_image_members(shard)))
        return out

    return Source("folder", root, count, {"meta": pl.String}, ignored, it, fingerprint=fingerprint, _parts=parts)


def _image_record(root: Path, img: Path) -> Record:
    """The record of one image of a folder source (with its sidecars), or its reject."""
    rel = img.relative_to(root).as_posix()
    if not _is_utf8(str(img)):
        return _rejected(rel, *_NOT_UTF8)
    try:
        ref = str(img.resolve())
    except (OSError, RuntimeError) as e:  # RuntimeError: a symbolic link loop (Python < 3.13)
        return _rejected(rel, "unreadable file", f"cannot resolve the path: {e}")
    caption, rid, extra = "", None, {}
    try:
        js, txt = _read_sidecar(img.with_suffix(".json")), _read_sidecar(img.with_suffix(".txt"))
        if js is not None:
            c, rid, extra = _json_sidecar(js, img.with_suffix(".json").name, has_text=txt is not None)
            caption = c if c is not None else caption
    except _SidecarRejected as e:
        return _rejected(rel, e.reason, e.detail)
    if txt is not None:
        caption = _decode_text(txt)
    return Record(rid, ref, caption, rel, rel, _meta_json(extra))


# --------------------------------------------------------------------------------------------- tar shards
def _tar_count(shard: Path, strict: bool = True) -> int:
    """Image members of a shard (for the progress bar). A shard that cannot be read raises SourceError when
    ``strict`` (a shard named as the source), else counts 0: reading it then yields one reject."""
    try:
        with tarfile.open(shard) as tf:
            return sum(1 for m in tf.getmembers() if m.isfile() and is_image_name(m.name))
    except Exception as e:  # noqa: BLE001 - tarfile raises many types on damaged or hostile shards
        if strict:
            raise SourceError(f"tar shard {printable(str(shard))} cannot be read ({e}); remove it or re-create "
                              f"it") from None
        return 0


def _tar_image_members(shard: Path) -> int:
    """Image members of a shard up to the first damage (0 when it cannot be opened): the most records reading
    it can give (``_tar_records`` yields one record per group of members with an image, and stops at damage)."""
    n = 0
    try:
        with tarfile.open(shard) as tf:
            for m in tf:
                n += m.isfile() and is_image_name(m.name)
    except Exception:  # noqa: BLE001 - damaged or hostile shard: reading it stops here too (one reject)
        pass
    return n


_SIDECAR_MAX_BYTES = 1024 * 1024
class _TooLarge:
    """Marks a sidecar member over the size limit (compared by identity: an empty member reads as ``b""``,
    which CPython shares between all empty bytes objects, so an empty bytes marker would match it)."""


_TOO_LARGE = _TooLarge()


def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return f"symbolic link to {m.linkname}"
    if m.islnk():
        return f"hard link to {m.linkname}"
    if m.ischr() or m.isblk():
        return "device"
    if m.isfifo():
        return "named pipe (FIFO)"
    return "special member"


def _tar_records(shard: Path, rel: str, max_bytes: int, skip: int = 0):
    """Group consecutive members by key (name up to the first dot of the basename), webdataset style.
    Only images (up to ``max_bytes``; larger ones are left unread and rejected later by size) and .txt/.json
    sidecars are read; other regular members are skipped without reading them. Every member that cannot be
    used is a reject, never a silent skip: links and devices, a sidecar over 1 MiB (its record), a name that is
    not UTF-8; and a shard that is corrupt or truncated ends with one reject naming it and the reason (the
    records read before the damage are kept). The first ``skip`` items (records and rejects) are left out
    without reading their data (a resumed build); returns how many of ``skip`` this shard did not cover."""
    absolute = str(shard.resolve())
    done = 0  # items produced so far, skipped ones included

    def emit(item: Record):
        nonlocal done
        done += 1
        item.part = rel
        if done > skip:
            yield item

    def flush(key: str, group: dict[str, bytes | None]) -> Iterator[Record]:
        img_name = next((n for n in group if is_image_name(n)), None)
        if img_name is None:
            return
        where = f"{rel}{TAR_SEP}{img_name}"
        if not _is_utf8(where):
            yield from emit(_rejected(where, *_NOT_UTF8))
            return
        big = [n for n, raw in group.items() if raw is _TOO_LARGE]
        if big:
            yield from emit(_rejected(where, "sidecar too large",
                                      f"{big[0]} is over {_SIDECAR_MAX_BYTES} bytes (1 MiB)"))
            return
        caption, rid, extra = "", None, {}
        for n, raw in group.items():
            low = n.lower()
            if raw is None or n == img_name:
                continue
            if low.endswith(".json"):
                try:
                    c, rid, extra = _json_sidecar(raw, n, has_text=any(
                        m.lower().endswith(".txt") and v is not None for m, v in group.items()))
                except _SidecarRejected as e:
                    yield from emit(_rejected(where, e.reason, e.detail))
                    return
                caption = c if c is not None and not caption else caption
            elif low.endswith(".txt"):
                caption = _decode_text(raw)
        yield from emit(Record(rid, f"{absolute}{TAR_SEP}{img_name}", caption, where, where, _meta_json(extra),
                               group[img_name]))

    try:
        tf = tarfile.open(shard)
    except Exception as e:  # noqa: BLE001 - tarfile raises many types on damaged or hostile shards
        yield from emit(_rejected(rel, "unreadable tar shard",
                                  f"{e.__class__.__name__}: {e}; none of its members were read"))
        return max(0, skip - done)
    with tf:
        key, group = None, {}
        members = iter(tf)
        while True:
            try:
                m = next(members, None)
                if m is None:
                    break
                if m.isdir():
                    continue
                if not m.isfile():
                    yield from emit(_rejected(f"{rel}{TAR_SEP}{m.name}", "unsupported tar member",
                                              f"{_member_kind(m)}; only regular files are read from a shard"))
                    continue
                base = os.path.basename(m.name)
                k = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                if k != key and key is not None:
                    yield from flush(key, group)
                    group = {}
                key = k
                low = m.name.lower()
                read = done >= skip  # a record a resumed build already committed: its data is not read
                if is_image_name(m.name):
                    f = tf.extractfile(m) if m.size <= max_bytes and read else None
                    group[m.name] = f.read() if f is not None else None
                elif low.endswith((".txt", ".json")):
                    if m.size > _SIDECAR_MAX_BYTES:
                        group[m.name] = _TOO_LARGE
                    else:
                        f = tf.extractfile(m) if read else None
                        group[m.name] = f.read() if f is not None else None
            except Exception as e:  # noqa: BLE001 - truncated or corrupt data: tarfile, zlib, EOF, OS errors
                where = f" (from the sample {key})" if key is not None else ""
                yield from emit(_rejected(rel, "unreadable tar shard", f"{e.__class__.__name__}: {e}; the records "
                                          f"before the damage were indexed, the rest of the shard{where} was not"))
                return max(0, skip - done)
        if key is not None:
            yield from flush(key, group)
    return max(0, skip - done)


def _tar_source(shard: Path, max_bytes: int) -> Source:
    count = _tar_count(shard)
    st = shard.stat()

    def it(skip: int, parts_done: dict[str, int]) -> Iterator[Record]:
        yield from _tar_records(shard, shard.name, max_bytes, skip=skip)

    def parts(size: int) -> list[SourcePart]:
        return [SourcePart("tar", printable(shard.name), str(shard), max_records=_tar_image_members(shard))]

    return Source("tar", shard, count, {"meta": pl.String}, [], it,
                  fingerprint=_fingerprint(st.st_size, st.st_mtime_ns), _parts=parts)


# --------------------------------------------------------------------------------------------- tables
TEXT_LIKE_COLUMNS = (*IMAGE_COLUMNS, *CAPTION_COLUMNS, *ID_COLUMNS, "key", "url")  # read as text from CSV


def _read_table(p: Path, fmt: str) -> pl.DataFrame:
    """A source table. In CSV, ids, keys, paths, URLs and captions are read as the text they are (type inference
    would turn the id ``007`` into ``7.0`` and the LAION key ``000000001`` into ``1``), and a row with more fields
    than the header is an error naming its line (it would otherwise be cut, shifting values between columns)."""
    try:
        if fmt == "parquet":
            return pl.read_parquet(p)
        if fmt == "csv":
            return _read_csv(p)
        return pl.read_ndjson(p, infer_schema_length=10_000)
    except SourceError:
        raise
    except Exception as e:  # noqa: BLE001 - polars raises many error types on bad files
        raise SourceError(f"cannot read table {p} as {fmt}: {e.__class__.__name__}: {e}") from None


def _read_csv(p: Path) -> pl.DataFrame:
    header = pl.read_csv(p, n_rows=0).columns
    text_like = {t.lower() for t in TEXT_LIKE_COLUMNS}
    text = {c for c in header if c.lower() in text_like}
    kw = dict(infer_schema_length=10_000, schema_overrides={c: pl.String for c in text})
    try:
        return pl.read_csv(p, **kw)
    except Exception:  # noqa: BLE001 - a row with more fields than the header, or another error
        more = _ragged_line(p)
        if more is not None:
            raise SourceError(f"cannot read table {p} as csv: line {more[0]} has {more[1]} fields, the header "
                              f"{more[2]}; quote fields that contain commas (\"a fox, in snow\")") from None
        return pl.read_csv(p, truncate_ragged_lines=True, **kw)  # only empty extra fields ("a.png,x,"): dropped


def _ragged_line(p: Path) -> tuple[int, int, int] | None:
    """(line number, fields, header fields) of the first CSV row with more non-empty fields than the header, if
    any (a trailing comma, an empty field past the header, loses nothing)."""
    import csv

    try:
        with open(p, newline="", encoding="utf-8", errors="replace") as f:
            rows = csv.reader(f)
            width = len(next(rows, []))
            for row in rows:
                if len(row) > width and any(f.strip() for f in row[width:]):
                    return rows.line_num, len(row), width
    except (OSError, csv.Error):
        return None
    return None


def _pick(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    for w in wanted:
        if w in columns:
            return w
    lower = {c.lower(): c for c in columns}
    for w in wanted:
        if w.lower() in lower:
            return lower[w.lower()]
    return None


def _table_source(p: Path, fmt: str) -> Source:
    df = _read_table(p, fmt)
    cols = df.columns
    image_col, caption_col, id_col = _pick(cols, IMAGE_COLUMNS), _pick(cols, CAPTION_COLUMNS), _pick(cols, ID_COLUMNS)
    if image_col is None and caption_col is None:
        raise SourceError(
            f"table {p} has neither an image column ({' or '.join(IMAGE_COLUMNS)}) nor a caption column "
            f"({', '.join(CAPTION_COLUMNS)}); its columns are: {', '.join(cols) or '(none)'}"
        )
    if image_col is not None and df.schema[image_col] not in (pl.String, pl.Null):
        raise SourceError(
            f"column {image_col!r} of {p} holds {df.schema[image_col]}, not file paths; export the images to files "
            f"and put their paths in that column"
        )
    # every caption-like column, the chosen one first: a row whose caption is missing or empty takes the next
    # one's text (JSONL rows of mixed schemas: some with "caption", some with "text" only)
    caption_cols = [caption_col] + [c for c in cols if c != caption_col and _pick([c], CAPTION_COLUMNS)] \
        if caption_col else []
    used = {c for c in (image_col, caption_col, id_col) if c}
    rename = _extra_names([c for c in cols if c not in used])
    extras = {rename[c]: df.schema[c] for c in rename}
    base = p.resolve().parent
    name = p.name

    def it(skip: int, parts_done: dict[str, int]) -> Iterator[Record]:
        return rows(skip, df.height)

    def rows(start: int, stop: int) -> Iterator[Record]:
        for i, row in enumerate(df.slice(start, max(0, stop - start)).iter_rows(named=True), start):
            raw_img = row.get(image_col) if image_col else None
            image = None
            if isinstance(raw_img, str) and raw_img.strip():
                raw_img = raw_img.strip()
                image = raw_img if TAR_SEP in raw_img and os.path.isabs(raw_img) else str((base / raw_img))
            cap = next((row[c] for c in caption_cols if row.get(c) is not None and str(row[c]).strip()), None)
            caption = "" if cap is None else str(cap)
            rid = row.get(id_col) if id_col else None
            rid = None if rid is None or str(rid) == "" else str(rid)
            derived = raw_img if image else f"{name}:row{i}"
            extra = {rename[c]: row[c] for c in rename}
            yield Record(rid, image, caption, f"row {i} of {name}", derived, extra)

    def parts(size: int) -> list[SourcePart]:
        return [SourcePart("rows", f"rows {a}-{min(a + size, df.height) - 1} of {name}", str(p), a,
                           min(a + size, df.height), max_records=min(size, df.height - a),
                           items=min(size, df.height - a), table_format=fmt)
                for a in range(0, df.height, size)]

    renamed = {c: n for c, n in rename.items() if c != n}
    st = p.stat()
    return Source("table", p, df.height, extras, [], it, renamed,
                  fingerprint=_fingerprint(st.st_size, st.st_mtime_ns, df.height), _parts=parts, _rows=rows)


@functools.lru_cache(maxsize=2)
def _cached_table_at(path: str, fmt: str, size: int, mtime_ns: int) -> Source:
    return _table_source(Path(path), fmt)


def _cached_table(path: str, fmt: str) -> Source:
    """A table source read once per process (a worker reads many slices of the same table)."""
    st = os.stat(path)
    return _cached_table_at(path, fmt, st.st_size, st.st_mtime_ns)


def _extra_names(columns: list[str]) -> dict[str, str]:
    """Index column name of each extra table column: a column named like one of the engine's own
    (``RESERVED_COLUMNS``: id, image, caption, slot) is kept as ``extra_NAME`` (``extra_NAME_2``, ... when that
    is taken too), never dropped or overwritten; the renames are reported in the build summary."""
    taken = set(RESERVED_COLUMNS) | set(columns)
    out = {}
    for c in columns:
        if c not in RESERVED_COLUMNS:
            out[c] = c
            continue
        new, i = f"extra_{c}", 2
        while new in taken:
            new, i = f"extra_{c}_{i}", i + 1
        taken.add(new)
        out[c] = new
    return out
