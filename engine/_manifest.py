"""The index manifest: what makes an index folder self-describing (no torch import here)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from ._errors import IndexFormatError
from ._layout import COMPONENTS, MANIFEST
from .files import write_text_atomic

FORMAT_NAME = "attrib-index"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

UNTRAINED_BANNER = (
    "UNTRAINED WEIGHTS: this index uses randomly initialised encoders (profile {profile!r}). "
    "Rankings reflect low-level image statistics only and are not meaningful attributions."
)


def model_fingerprint(identity: dict) -> str:
    """Short hash of everything that changes the vectors: architectures, weight hashes and input handling."""
    keep = {k: identity[k] for k in ("clip", "dino")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "open_clip_torch", "timm", "faiss-cpu", "tantivy", "numpy", "polars",
                 "pyarrow", "pillow", "attrib-engine"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON through a temporary file, fsync and a rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", fsync=True)


def read_manifest(index_dir: str | os.PathLike) -> dict:
    """Read and validate the manifest; every failure names the folder and says what to do."""
    d = Path(index_dir)
    if not d.exists():
        raise IndexFormatError(f"index folder {d} does not exist; build one with `attrib index SOURCE --out {d}`")
    if not d.is_dir():
        raise IndexFormatError(f"{d} is a file, not an index folder; build one with `attrib index SOURCE --out DIR`")
    mpath = d / MANIFEST
    if not mpath.exists():
        hint = " (it looks like an interrupted build)" if any(d.glob("*.part")) else ""
        raise IndexFormatError(
            f"{d} is not an attrib index: it has no {MANIFEST}{hint}. "
            f"Rebuild it with `attrib index SOURCE --out {d} --overwrite`"
        )
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(
            f"the manifest {mpath} is damaged ({e}); rebuild the index with `attrib index SOURCE --out {d} --overwrite`"
        ) from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise IndexFormatError(
            f"{d} is not an attrib index: {mpath} has format "
            f"{m.get('format') if isinstance(m, dict) else type(m).__name__!r}"
        )
    if m.get("format_version") not in SUPPORTED_VERSIONS:
        raise IndexFormatError(
            f"{d} has index format version {m.get('format_version')!r}; this engine reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}. Rebuild it with this version of attrib."
        )
    for key in ("models", "dims", "counts", "components", "settings"):
        if key not in m:
            raise IndexFormatError(f"the manifest {mpath} is damaged: it lacks {key!r}; rebuild the index")
    return m


def check_components(index_dir: Path, manifest: dict) -> None:
    """Every component the manifest lists exists with the recorded size, and components whose size follows
    from the counts and dims have exactly that size (cheap damage detection)."""
    for c in COMPONENTS:
        entry = manifest["components"].get(c.name)
        if entry is None:
            continue
        p = index_dir / entry["path"]
        if not p.exists() and not c.required:  # an optional component (e.g. the calibration) may be absent
            continue
        if not p.exists():
            raise IndexFormatError(
                f"index {index_dir} is damaged: component {c.name!r} ({entry['path']}) is missing; rebuild the index"
            )
        if not p.is_file():
            continue
        size = p.stat().st_size
        try:
            implied = c.expected_bytes(manifest) if c.expected_bytes is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"the manifest of {index_dir} is damaged: {e.__class__.__name__} {e} in its counts "
                                   f"or dims; rebuild the index") from None
        for want, what in ((entry.get("bytes"), "the manifest records"), (implied, "its counts and dims imply")):
            if want is not None and size != want:
                raise IndexFormatError(
                    f"index {index_dir} is damaged: {entry['path']} has {size} bytes where {what} {want}; "
                    f"rebuild the index"
                )


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
