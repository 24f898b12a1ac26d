"""One writer at a time per index folder: an exclusive ``flock`` on ``INDEX/.attrib-lock``.

The kernel releases the lock when its process dies (Ctrl-C, kill -9, power loss), so a lock left by a dead
writer never blocks the next one; the file's content (pid, host, command, start time) only serves the message
shown to a second writer. Readers never take the lock: they read one committed generation (see
``engine._manifest``)."""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from ._errors import IndexBusyError, IndexFormatError

LOCK_NAME = ".attrib-lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; concurrent writers are not detected
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """Held while a command writes an index folder (build, append, delete, compact, calibrate)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise IndexFormatError(f"index {self.folder} is read-only ({e.strerror}); it can be queried but not "
                                       f"changed. Copy it to a writable place to {self.what} it") from None
            raise
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                raise IndexBusyError(
                    f"index {self.folder} is being written by another attrib process ({holder}); wait for it to "
                    f"finish, or stop it, then run this command again") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[:6])[:300],
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_active(folder: Path) -> bool:
    """Whether another process holds ``folder``'s writer lock, without taking it (a reader never takes the lock:
    even a shared lock for a moment would make a writer starting then report the index busy). Linux lists every
    flock in /proc/locks, by file; elsewhere the lock file's content tells (a writer writes its pid there and
    empties the file when it ends; a writer killed with kill -9 leaves it, so a live pid that is not a writer's
    counts too)."""
    path = Path(folder) / LOCK_NAME
    try:
        st = os.stat(path)
    except OSError:
        return False
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            held = f.read()
    except OSError:
        held = None
    if held is not None:
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in held.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev and parts[4] != str(os.getpid()):
                return True
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        info = _holder_info(fd)
    finally:
        os.close(fd)
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():  # this process's own writer opens no reader beside itself
        return False
    if info.get("host") != socket.gethostname():
        return True  # another machine's writer (a shared folder): it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's live process
        return True
    return True


def _holder_info(fd: int) -> dict:
    """What the writer holding the lock wrote into the lock file (empty when nothing, or nothing readable)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _read_holder(fd: int) -> str:
    info = _holder_info(fd)
    if not info:
        return "unknown process"
    return (f"pid {info.get('pid')} on {info.get('host')}, {info.get('what', 'writing')} since {info.get('since')}: "
            f"`{info.get('command')}`")
