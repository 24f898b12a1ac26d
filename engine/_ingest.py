"""Training-set sources: a folder of images with sidecar captions (img2dataset's folder output included),
tar shards (img2dataset / webdataset output), or a parquet / CSV / JSONL table with LAION-style columns."""
from __future__ import annotations

import hashlib
import json
import os
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
RESERVED_COLUMNS = ("id", "image", "caption", "row")


@dataclass
class Record:
    id: str | None  # id from the source; None means "derive a stable one" (see derived_id)
    image: str | None  # image reference (absolute path, or shard.tar::member); None = caption-only record
    caption: str  # training caption ("" when unknown)
    where: str  # where the record came from, for messages ("cats/01.jpg", "row 17 of laion.parquet")
    derived_id: str  # stable id used when ``id`` is None (relative path, or table:row)
    extra: dict = field(default_factory=dict)  # other columns / sidecar fields
    data: bytes | None = None  # already-read image bytes (tar members)

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
    _iter: object = None  # callable(skip) -> iterator of records
    fingerprint: str = ""  # changes when the source's content list changes (a resumed build must match it)
    shard_counts: dict[str, int] = field(default_factory=dict)  # records per tar shard (relative name)

    def records(self, skip: int = 0) -> Iterator[Record]:
        """The records in source order, the first ``skip`` left out (a resumed build): skipped tar shards are
        not opened at all, and skipped images are not read."""
        return self._iter(skip)  # type: ignore[operator]


def _fingerprint(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def open_source(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                known_counts: dict[str, int] | None = None) -> Source:
    """Recognise a source by its path; errors name the path and list what is accepted. Tar members larger
    than ``max_bytes`` are not read into memory (the build then rejects them as too large). ``known_counts``:
    record counts of tar shards from an earlier pass (a resumed build does not read done shards again)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(
            f"source {p} does not exist; give a folder of images, a .tar shard or a .parquet/.csv/.jsonl table"
        )
    if p.is_dir():
        return _folder_source(p, max_bytes, known_counts or {})
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
def _sidecar_fields(obj: object) -> tuple[str | None, str | None, dict]:
    """(caption, id, other scalar fields) from a JSON sidecar object."""
    if not isinstance(obj, dict):
        return None, None, {}
    caption = None
    for k in ("caption", "text", "TEXT"):
        if isinstance(obj.get(k), str):
            caption = obj[k]
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


# --------------------------------------------------------------------------------------------- folders
def _folder_source(root: Path, max_bytes: int, known_counts: dict[str, int]) -> Source:
    images: list[Path] = []
    shards: list[Path] = []
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
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
                ignored.append(str(full.relative_to(root)))
    rels = [s.relative_to(root).as_posix() for s in shards]
    shard_counts = {r: known_counts[r] if r in known_counts else _tar_count(s) for r, s in zip(rels, shards)}
    count = len(images) + sum(shard_counts.values())
    fingerprint = _fingerprint(len(images), *[i.relative_to(root).as_posix() for i in images],
                               *[f"{r}:{s.stat().st_size}" for r, s in zip(rels, shards)])

    def it(skip: int) -> Iterator[Record]:
        for img in images[skip:]:
            rel = img.relative_to(root).as_posix()
            caption, rid, extra = "", None, {}
            txt, js = img.with_suffix(".txt"), img.with_suffix(".json")
            if js.exists():
                try:
                    c, rid, extra = _sidecar_fields(json.loads(js.read_text(encoding="utf-8", errors="replace")))
                    caption = c if c is not None else caption
                except (OSError, json.JSONDecodeError):
                    extra = {"sidecar_error": f"unreadable {js.name}"}
            if txt.exists():
                try:
                    caption = _decode_text(txt.read_bytes())
                except OSError:
                    pass
            yield Record(rid, str(img.resolve()), caption, rel, rel, _meta_json(extra))
        left = max(0, skip - len(images))
        for shard, rel in zip(shards, rels):
            n = shard_counts[rel]
            if left >= n:  # done: not opened again
                left -= n
                continue
            yield from _tar_records(shard, rel, max_bytes, skip=left)
            left = 0

    return Source("folder", root, count, {"meta": pl.String}, ignored, it, fingerprint, shard_counts)




# --------------------------------------------------------------------------------------------- tar shards
def _member_key(name: str) -> str:
    base = os.path.basename(name)
    return os.path.join(os.path.dirname(name), base.split(".", 1)[0])


def _tar_count(shard: Path) -> int:
    """Records of a shard (groups of members with an image), from its headers only."""
    try:
        with tarfile.open(shard) as tf:
            keys: dict[str, bool] = {}
            last = None
            n = 0
            for m in tf:
                if not m.isfile():
                    continue
                k = _member_key(m.name)
                if k != last:
                    if last is not None and keys.get(last):
                        n += 1
                    last = k
                    keys = {k: False}
                keys[k] = keys[k] or is_image_name(m.name)
            if last is not None and keys.get(last):
                n += 1
            return n
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"tar shard {shard} cannot be read ({e}); remove it or re-create it") from None


_SIDECAR_MAX_BYTES = 1024 * 1024


def _tar_records(shard: Path, rel: str, max_bytes: int, skip: int = 0) -> Iterator[Record]:
    """Group consecutive members by key (name up to the first dot of the basename), webdataset style.
    Only images (up to ``max_bytes``; larger ones are left unread and rejected later by size) and .txt/.json
    sidecars (up to 1 MiB) are read; other members are skipped without reading them, and so are the members
    of the first ``skip`` records."""
    absolute = str(shard.resolve())

    def flush(key: str, group: dict[str, bytes | None]) -> Iterator[Record]:
        img_name = next((n for n in group if is_image_name(n)), None)
        if img_name is None:
            return
        caption, rid, extra = "", None, {}
        for n, raw in group.items():
            low = n.lower()
            if raw is None or n == img_name:
                continue
            if low.endswith(".json"):
                try:
                    c, rid, extra = _sidecar_fields(json.loads(raw.decode("utf-8", errors="replace")))
                    caption = c if c is not None and not caption else caption
                except json.JSONDecodeError:
                    extra = {"sidecar_error": f"unreadable {n}"}
            elif low.endswith(".txt"):
                caption = _decode_text(raw)
        where = f"{rel}{TAR_SEP}{img_name}"
        yield Record(rid, f"{absolute}{TAR_SEP}{img_name}", caption, where, where, _meta_json(extra), group[img_name])

    with tarfile.open(shard) as tf:
        key, group, has_image, done = None, {}, False, 0
        for m in tf:
            if not m.isfile():
                continue
            k = _member_key(m.name)
            if k != key and key is not None:
                if done >= skip:
                    yield from flush(key, group)
                done += has_image
                group, has_image = {}, False
            key = k
            low = m.name.lower()
            has_image = has_image or is_image_name(m.name)
            if done < skip:
                group[m.name] = None  # a record of a resumed build's done part: not read
                continue
            if is_image_name(m.name):
                f = tf.extractfile(m) if m.size <= max_bytes else None
                group[m.name] = f.read() if f is not None else None
            elif low.endswith((".txt", ".json")) and m.size <= _SIDECAR_MAX_BYTES:
                f = tf.extractfile(m)
                group[m.name] = f.read() if f is not None else None
        if key is not None and done >= skip:
            yield from flush(key, group)


def _tar_source(shard: Path, max_bytes: int) -> Source:
    count = _tar_count(shard)
    st = shard.stat()
    return Source("tar", shard, count, {"meta": pl.String}, [],
                  lambda skip: _tar_records(shard, shard.name, max_bytes, skip=skip),
                  _fingerprint(st.st_size, st.st_mtime_ns), {shard.name: count})


# --------------------------------------------------------------------------------------------- tables
def _read_table(p: Path, fmt: str) -> pl.DataFrame:
    try:
        if fmt == "parquet":
            return pl.read_parquet(p)
        if fmt == "csv":
            return pl.read_csv(p, infer_schema_length=10_000, truncate_ragged_lines=True)
        return pl.read_ndjson(p, infer_schema_length=10_000)
    except Exception as e:  # noqa: BLE001 - polars raises many error types on bad files
        raise SourceError(f"cannot read table {p} as {fmt}: {e.__class__.__name__}: {e}") from None


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
    used = {c for c in (image_col, caption_col, id_col) if c}
    extras = {}
    for c in cols:
        if c in used:
            continue
        name = f"extra_{c}" if c in RESERVED_COLUMNS else c
        extras[name] = df.schema[c]
    rename = {c: (f"extra_{c}" if c in RESERVED_COLUMNS else c) for c in cols if c not in used}
    base = p.resolve().parent
    name = p.name

    def it(skip: int) -> Iterator[Record]:
        for i, row in enumerate(df.iter_rows(named=True)):
            if i < skip:
                continue
            raw_img = row.get(image_col) if image_col else None
            image = None
            if isinstance(raw_img, str) and raw_img.strip():
                raw_img = raw_img.strip()
                image = raw_img if TAR_SEP in raw_img and os.path.isabs(raw_img) else str((base / raw_img))
            cap = row.get(caption_col) if caption_col else None
            caption = "" if cap is None else str(cap)
            rid = row.get(id_col) if id_col else None
            rid = None if rid is None or str(rid) == "" else str(rid)
            derived = raw_img if image else f"{name}:row{i}"
            extra = {rename[c]: row[c] for c in rename}
            yield Record(rid, image, caption, f"row {i} of {name}", derived, extra)

    st = p.stat()
    return Source("table", p, df.height, extras, [], it, _fingerprint(st.st_size, st.st_mtime_ns, df.height))
