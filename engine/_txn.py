"""Replacing a whole index folder safely (``attrib index --overwrite``), and recovering from a crash in the
middle of it.

The new index is built in a sibling ``.NAME.next`` (resumable like any build). When it is complete, the swap
runs under the writer locks of both folders: ``NAME -> .NAME.old``, ``.NAME.next -> NAME``, then ``.NAME.old``
is removed. A crash or a signal between the steps leaves a state that :func:`recover` (run by every writer and
reader that opens ``NAME``) completes or undoes, so the previous index is never lost: with a complete
``.NAME.next`` the swap is finished, otherwise ``.NAME.old`` goes back to ``NAME``."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ._errors import IndexFormatError
from ._layout import MANIFEST
from ._lock import LOCK_NAME, WriterLock
from .files import fsync_dir, remove


def staging_path(out: Path) -> Path:
    return out.parent / f".{out.name}.next"


def old_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def manifest_state(folder: Path) -> str:
    """"complete", "unfinished" (a build not yet finished), "damaged" (a manifest that cannot be read), "none"."""
    p = folder / MANIFEST
    if not p.is_file():
        return "none"
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return "damaged"
    if not isinstance(m, dict) or m.get("format") != "attrib-index":
        return "damaged"
    return "complete" if (m.get("build") or {}).get("complete") else "unfinished"


def _held(folder: Path) -> bool:
    """Whether a writer holds the lock of ``folder`` right now."""
    if not (folder / LOCK_NAME).exists():
        return False
    lock = WriterLock(folder, "recover")
    try:
        lock.acquire()
    except Exception:  # noqa: BLE001 - busy (or unreadable): someone is at work, leave it alone
        return True
    lock.release()
    return False


def recover(out: Path, writable_only: bool = False) -> str | None:
    """Complete or undo an interrupted swap of ``out``. Returns what was done (None: nothing to do).
    ``writable_only``: where the parent folder cannot be written (a reader on a read-only mount), do nothing
    unless ``out`` itself is missing, and then say how to restore it."""
    out = Path(out)
    old, nxt = old_path(out), staging_path(out)
    if not old.exists():
        return None
    if not os.access(out.parent, os.W_OK):
        if out.exists() or not writable_only:
            return None
        raise IndexFormatError(f"index {out} is missing and its previous version is at {old} (an interrupted "
                               f"--overwrite); rename {old} to {out} to restore it")
    if _held(old) or (nxt.exists() and _held(nxt)):
        return None  # a swap is running right now
    if not out.exists():
        if manifest_state(nxt) == "complete":
            os.replace(nxt, out)
            fsync_dir(out.parent)
            remove(old)
            return "finished an interrupted --overwrite: the new index is in place"
        os.replace(old, out)
        fsync_dir(out.parent)
        return "restored the previous index after an interrupted --overwrite"
    if manifest_state(out) == "complete":
        remove(old)
        return "removed the previous index left by an interrupted --overwrite"
    return None


def swap_in(staged: Path, out: Path, between=None) -> None:
    """Replace ``out`` (a complete attrib index) by the complete index ``staged`` (see the module docstring).
    The caller holds the writer lock of ``staged``; this takes the one of ``out`` (the lock file moves with the
    folder, so both renames happen under it). ``between`` is called between the two renames (tests inject
    faults there)."""
    old = old_path(out)
    with WriterLock(out, "replace"):
        if old.exists():
            remove(old)
        os.replace(out, old)
        fsync_dir(out.parent)
        if between is not None:
            between()
        os.replace(staged, out)
        fsync_dir(out.parent)
    remove(old)
