"""The index manifest: what makes an index folder self-describing, and the one atomic step of every change.

A change (a committed segment, a deletion, a compaction) writes its new files first, then replaces the manifest
with the next generation (temporary file, fsync, rename, fsync of the folder). A reader reads the manifest once
and opens exactly the files of that generation. The manifest carries a checksum of its own content, so an
edited or truncated manifest is refused instead of believed (no torch import here)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ._errors import IndexFormatError, OutputError
from ._layout import MANIFEST
from .files import DISK_FULL, write_text_atomic

FORMAT_NAME = "attrib-index"
FORMAT_VERSION = 3  # 3: first-stage product codes may be 4-bit (codebooks "nbits"), which version 2 readers lack
CAPTION_PQ_VERSION = 4  # 4: caption embeddings may be product codes (codebooks "caption_codec"), unknown to 3
SUPPORTED_VERSIONS = (2, 3, 4)
MAX_MANIFEST_BYTES = 256 * 1024 * 1024

UNTRAINED_BANNER = (
    "UNTRAINED WEIGHTS: this index uses randomly initialised encoders (profile {profile!r}). "
    "Rankings reflect low-level image statistics only and are not meaningful attributions."
)


def model_fingerprint(identity: dict) -> str:
    """Short hash of everything that changes the vectors: architectures, weight hashes and input handling."""
    keep = {k: identity[k] for k in ("clip", "dino")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def is_pretrained(identity: dict) -> bool:
    """Whether the models of ``identity`` are trained, decided by the model identity itself: the profile must be
    a registered pretrained profile whose weight tags the identity carries (a manifest cannot claim it)."""
    from ._profiles import PROFILES

    name = identity.get("profile")
    if name not in PROFILES:
        return False
    p = PROFILES.get(name)
    return bool(p.pretrained and identity.get("clip", {}).get("weights_tag") == p.clip.pretrained
                and identity.get("dino", {}).get("weights_tag") == p.dino.tag and p.clip.pretrained and p.dino.tag)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "open_clip_torch", "timm", "faiss-cpu", "tantivy", "numpy", "polars",
                 "pyarrow", "pillow", "attrib-engine"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def manifest_stamp(index_dir: str | os.PathLike) -> tuple | None:
    """What tells one committed manifest of ``index_dir`` from the next without reading it (a commit replaces the
    file: a new inode); None when there is none."""
    return file_stamp(Path(index_dir) / MANIFEST)


def file_stamp(path: Path) -> tuple | None:
    """(inode, mtime, size) of a file that is replaced, not edited, when it changes; None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON through a temporary file, fsync and a rename, so a reader never sees half a file. A full disk is
    raised as its ``OSError`` (an index file, not an output file: the command says what of its work was kept)."""
    try:
        write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", fsync=True)
    except OutputError as e:
        code = getattr(e, "errno", None)
        if code not in DISK_FULL:
            raise
        raise OSError(code, os.strerror(code), str(path)) from None


def _checksum(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_manifest(index_dir: Path, m: dict) -> dict:
    """Commit ``m`` as the index's current generation (the one atomic step of every change)."""
    m = dict(m)
    m["updated"] = now_iso()
    m["format_version"] = format_version_of(m)
    m["manifest_sha256"] = _checksum(m)
    write_json_atomic(Path(index_dir) / MANIFEST, m)
    return m


def format_version_of(m: dict) -> int:
    """The format version a manifest is written with: the oldest that can read it. 3 once its codebooks name
    their codes' bits (``nbits``, which engines of version 2 refuse as damaged codebooks), 4 once they product-
    quantize caption embeddings (``caption_codec``, which version 3 would decode as int8), else the version it
    has. An index made by an older version stays readable by the engines that made it until
    ``attrib compact --retrain``."""
    version = m.get("format_version", FORMAT_VERSION)
    cb = m.get("codebooks") or {}
    if cb.get("caption_codec") == "pq":
        return max(version, CAPTION_PQ_VERSION)
    if version == CAPTION_PQ_VERSION:  # retrained to int8 caption codes: version 3 engines read it again
        return FORMAT_VERSION
    if version == 2 and any(isinstance(st, dict) and "nbits" in st for st in (cb.get("stores") or {}).values()):
        return 3
    return version


def _rebuild_hint(d: Path) -> str:
    return f"rebuild it with `attrib index SOURCE --out {d} --overwrite`"


def read_manifest(index_dir: str | os.PathLike) -> dict:
    """Read and validate the manifest; every failure names the folder and says what to do."""
    d = Path(index_dir)
    if not d.exists():
        raise IndexFormatError(f"index folder {d} does not exist; build one with `attrib index SOURCE --out {d}`")
    if not d.is_dir():
        raise IndexFormatError(f"{d} is a file, not an index folder; build one with `attrib index SOURCE --out DIR`")
    mpath = d / MANIFEST
    if not mpath.exists():
        raise IndexFormatError(
            f"{d} is not an attrib index: it has no {MANIFEST}. If a build into it was interrupted before its first "
            f"commit, run the same `attrib index` command again; otherwise build one with "
            f"`attrib index SOURCE --out {d}`")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            raise IndexFormatError(f"the manifest {mpath} is larger than {MAX_MANIFEST_BYTES} bytes: not an attrib "
                                   f"manifest; {_rebuild_hint(d)}")
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except IndexFormatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFormatError(f"the manifest {mpath} is damaged ({e.__class__.__name__}: {e}); "
                               f"{_rebuild_hint(d)}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        kind = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise IndexFormatError(f"{d} is not an attrib index: {mpath} has format {kind!r}")
    if m.get("format_version") not in SUPPORTED_VERSIONS:
        raise IndexFormatError(
            f"{d} has index format version {m.get('format_version')!r}; this engine reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. {_rebuild_hint(d)[0].upper()}{_rebuild_hint(d)[1:]} "
            f"with this version of attrib.")
    if m.get("manifest_sha256") != _checksum(m):
        raise IndexFormatError(f"the manifest {mpath} was changed after it was written (its checksum does not "
                               f"match); {_rebuild_hint(d)}")
    _check_types(m, mpath)
    if m["models"].get("fingerprint") != model_fingerprint(m["models"]):
        raise IndexFormatError(f"the manifest {mpath} is damaged: its model identity does not match its fingerprint; "
                               f"{_rebuild_hint(d)}")
    return m


def _check_types(m: dict, mpath: Path) -> None:
    """The fields queries rely on have the types and ranges they need (names the first bad field)."""

    def bad(field: str, want: str):
        return IndexFormatError(f"the manifest {mpath} is damaged: {field} must be {want}; "
                                f"{_rebuild_hint(mpath.parent)}")

    def count(obj: dict, key: str, where: str) -> None:
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"{where}.{key}", "a non-negative integer")

    for key, kind in (("models", dict), ("dims", dict), ("counts", dict), ("settings", dict), ("segments", list),
                      ("codebooks", (dict, type(None))), ("build", dict)):
        if not isinstance(m.get(key), kind):
            raise bad(key, "an object" if kind is dict else "a list")
    for key in ("records", "images", "deleted", "rejected"):
        count(m["counts"], key, "counts")
    for key in ("clip", "dino", "dino_global", "patch_grid", "patch_cells", "patch_dims"):
        count(m["dims"], key, "dims")
    for key in ("next_row", "next_segment", "generation"):
        count(m, key, "manifest")
    for i, seg in enumerate(m["segments"]):
        if not isinstance(seg, dict) or not isinstance(seg.get("path"), str) or not isinstance(seg.get("files"), dict):
            raise bad(f"segments[{i}]", "an object with a path and files")
        for key in ("id", "records", "images"):
            count(seg, key, f"segments[{i}]")
        if ".." in Path(seg["path"]).parts or Path(seg["path"]).is_absolute():
            raise bad(f"segments[{i}].path", "a path inside the index")
    for key, v in m["settings"].items():
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(f"settings.{key}", "finite")
    if not isinstance(m["models"].get("clip"), dict) or not isinstance(m["models"].get("dino"), dict):
        raise bad("models", "an object with clip and dino")


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
