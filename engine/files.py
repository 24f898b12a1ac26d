"""Folder helpers: build a folder under a hidden sibling name and rename it into place only when complete,
so an interrupted or crashed writer never leaves a folder that looks finished. Single files are written
atomically too, and never over anything but a regular file (see :func:`write_bytes_atomic`)."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ._errors import OutputError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errors of a full disk or quota


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


def allocate(path: Path) -> None:
    """Reserve the disk blocks of a file already sized (a ``w+`` memory map is a sparse file): a full disk then
    fails here, as an ``OSError`` naming the file, instead of killing the process with SIGBUS on the first write
    into the map. Filesystems that cannot reserve blocks are left as they are."""
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return
            raise OSError(e.errno, e.strerror, str(path)) from None


def disk_full(e: Exception, path: str | os.PathLike) -> OSError | None:
    """The ``OSError`` of a full disk (or quota) that a library reported as the text of another exception
    (tantivy: a ValueError), naming ``path``; None when ``e`` is not about a full disk."""
    for code in DISK_FULL:
        if os.strerror(code) in str(e):
            return OSError(code, os.strerror(code), os.fspath(path))
    return None


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


def require_utf8_path(path: str | os.PathLike, what: str, error: type[Exception] = OutputError) -> None:
    """Refuse a path whose name is not valid UTF-8 (bytes Python keeps as lone surrogates): the stores (tantivy,
    Arrow, parquet) take UTF-8 text only. The message shows the bad bytes as ``\\xNN``."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise error(f"{what} {shown} is not valid UTF-8; rename it (or use a link with a UTF-8 name)") from None


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "named pipe (FIFO)"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _refuse_target(out: Path) -> None:
    """Raise OutputError unless ``out`` is absent or a regular file (never a link, folder, device, FIFO...)."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise OutputError(f"cannot write {out}: a part of its folder path is a file, not a folder") from None
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(out)
        except OSError:
            target = "?"
        raise OutputError(f"refusing to write {out}: it is a symbolic link (to {target}); name the file it points "
                          f"to, or remove the link")
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"cannot write {out}: it is a folder; give a file path")
    raise OutputError(f"refusing to write {out}: it is a {_kind(st.st_mode)}, not a regular file; choose another path")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_file(out_path: str | os.PathLike) -> Path:
    """Check, before any work, that a single output file (a report, a weights file) may be written at
    ``out_path``: it is absent or a regular file (never a symbolic link, a folder, a device, a FIFO or a socket),
    and its folder exists or can be created, and is writable. Returns the path; raises :class:`OutputError`
    with a one-line message naming the path otherwise.

    Symbolic links are refused rather than written through: replacing a link's target in place is the classic
    way a planted link makes a program overwrite another file, and replacing the link itself would silently
    leave the target stale. Name the target itself to write it."""
    out = Path(out_path).expanduser()
    _refuse_target(out)
    _check_parent(out.parent, out)
    return out


def _index_folder_of(path: Path) -> Path | None:
    """The attrib index folder ``path`` (a resolved path) is or lies in: a folder with a manifest and the writer
    lock or segments."""
    for a in (path, *path.parents):
        if (a / "manifest.json").is_file() and ((a / ".attrib-lock").exists() or (a / "segments").is_dir()):
            return a
    return None


def _head(path: Path, n: int = 1 << 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _is_html(head: bytes) -> bool:
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return h.startswith(b"<!doctype html") or h.startswith(b"<html")


def _is_json_with(head: bytes, path: Path, keys: dict) -> bool:
    import json

    try:
        d = json.loads(path.read_bytes()) if path.stat().st_size <= 64 << 20 else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and all((k in d) if v is None else d.get(k) == v for k, v in keys.items())


#: What an existing file must already be for a user-named output of each kind to replace it.
OUTPUT_KINDS = {
    "html": ("an HTML report", lambda head, p: _is_html(head)),
    "weights": ("an attrib weights file", lambda head, p: _is_json_with(head, p, {"format": "attrib-fusion-weights"})),
    "bench.json": ("a benchmark result", lambda head, p: _is_json_with(head, p, {"benchmark": None, "metrics": None})),
    "png": ("a PNG plot", lambda head, p: head.startswith(b"\x89PNG\r\n\x1a\n")),
}
REPORT_FILES = {"bench.json": "bench.json", "hard_cases.html": "html", "recall_at_k.png": "png"}  # bench run --report


def refuse_clobbering(out_path: str | os.PathLike, inputs: Iterable = (), kind: str | None = None,
                      folder: bool = False) -> None:
    """Check a user-named output (a report, a weights file, a report folder) before the work starts: what
    :func:`check_output_file` (or, for a ``folder``, :func:`check_output_folder`) checks, and then refuse, with
    :class:`OutputError`, one that would overwrite what a command reads or an index:

    * a path inside an attrib index folder, symbolic links resolved (its files change only through the index
      commands);
    * an existing file that is one of the command's ``inputs`` (the query image, a weights file, a benchmark's
      tables);
    * an existing file that is not already an output of the same ``kind`` (``OUTPUT_KINDS``): a report replaces
      a report, never a training image, a manifest or a weights file. For a report ``folder``, each file the
      report writes (``REPORT_FILES``) is checked so."""
    (check_output_folder if folder else check_output_file)(out_path)
    raw = Path(out_path).expanduser()
    # symbolic links resolved before `..` is applied (as the kernel does): lnk/../x is in the folder lnk points into
    out = Path(os.path.realpath(raw)) if folder else Path(os.path.realpath(raw.parent)) / raw.name
    idx = _index_folder_of(out if folder else out.parent)
    if idx is not None:
        raise OutputError(f"refusing to write {out_path}: it is inside the index {idx}, whose files only attrib's "
                          "index commands may change; choose a path outside it")
    targets = [(out / name, k) for name, k in REPORT_FILES.items()] if folder else [(out, kind)]
    for target, k in targets:
        if not os.path.isfile(target):
            continue
        for inp in inputs:
            try:
                same = inp is not None and os.path.samefile(target, Path(inp).expanduser())
            except OSError:
                same = False
            if same:
                raise OutputError(f"refusing to write {target}: it is an input of this command ({inp}); choose "
                                  "another path")
        if k is not None and os.path.getsize(target) > 0:  # an empty file (`touch`, `mktemp`) may be filled
            what, ok = OUTPUT_KINDS[k]
            if not ok(_head(target), target):
                raise OutputError(f"refusing to replace {target}: it is not {what} (it would be lost); choose a new "
                                  "file name, or move that file first")


def check_output_folder(out_path: str | os.PathLike) -> Path:
    """Check, before any work, that a folder of outputs (``bench run --report DIR``) can be made or written at
    ``out_path``: it is absent or a folder (a link to a folder is fine), inside a writable folder."""
    out = Path(out_path).expanduser()
    if os.path.lexists(out):
        if not out.is_dir():
            if os.path.islink(out):
                raise OutputError(f"cannot write into {out}: it is a symbolic link to something that is not a folder")
            try:
                mode = os.lstat(out).st_mode
            except OSError as e:
                raise OutputError(f"cannot write into {out}: {e.strerror or e}") from None
            what = "a file" if stat.S_ISREG(mode) else f"a {_kind(mode)}"
            raise OutputError(f"cannot write into {out}: it is {what}, not a folder; give a folder path")
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write into {out}: no permission to write in that folder")
        return out
    _check_parent(out.parent, out)
    return out


def _check_parent(parent: Path, out: Path) -> None:
    anc = _nearest_existing(parent)
    if not anc.is_dir():
        raise OutputError(f"cannot write {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: no permission to write in {anc}")


def write_bytes_atomic(out_path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` through a fresh temporary file in the same folder and a rename (parents created), so a
    reader never sees half a file. The file gets the usual permissions (not mkstemp's 0600).

    Only a regular file (or nothing) is ever replaced: a symbolic link, folder, device, FIFO or socket at
    ``out_path`` is refused with :class:`OutputError` (checked before writing and again just before the rename),
    as is a path under a file or in a folder that cannot be written. Any OSError becomes an OutputError naming
    the path (its ``errno`` kept); nothing is left behind."""
    out = check_output_file(out_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {out}: cannot create its folder ({e.strerror or e})") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        _refuse_target(out)  # it may have changed while we wrote
        os.replace(tmp, out)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            err = OutputError(f"cannot write {out}: {e.strerror or e}")
            err.errno = e.errno  # a full disk is told apart (engine._manifest.write_json_atomic)
            raise err from None
        raise
    return out.absolute()


def write_text_atomic(out_path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """:func:`write_bytes_atomic` of UTF-8 text (characters that are not valid Unicode, such as the surrogates
    that stand for undecodable bytes of a file name, are written as backslash escapes)."""
    return write_bytes_atomic(out_path, text.encode("utf-8", errors="backslashreplace"), fsync)


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
