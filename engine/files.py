"""Folder helpers: build a folder under a hidden sibling name and rename it into place only when complete,
so an interrupted or crashed writer never leaves a folder that looks finished."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def remove(path: Path) -> None:
    """Delete a file or folder. A folder is retried briefly: a writer's background thread that is still
    finishing (tantivy's, after a rollback) can add a file while it is being deleted."""
    if path.is_dir() and not path.is_symlink():
        for _ in range(20):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                return
            time.sleep(0.05)
    elif path.exists() or path.is_symlink():
        path.unlink()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(out_path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write ``text`` through a fresh temporary file in the same folder and a rename (parents created), so a
    reader never sees half a file. The file gets the usual permissions (not mkstemp's 0600)."""
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return out.absolute()


def swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, replacing what was there."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        remove(old)


@contextmanager
def staged_folder(out: Path, tag: str) -> Iterator[Path]:
    """Yield a new hidden sibling folder of ``out``; on success it replaces ``out``, on any failure (an
    interrupt included) it is removed. The caller checks beforehand whether ``out`` may be replaced."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        swap_into_place(tmp, out)
    except BaseException:
        remove(tmp)
        raise
