"""Ctrl-C while the ``attrib`` console script is still starting (importing): one line, exit code 130, no
traceback. Installed by ``engine/__init__`` (the first of our code the script runs) only when the program is
the console script; ``engine.cli.main`` replaces it with the normal KeyboardInterrupt handling as it starts."""
from __future__ import annotations

import os
import signal
import sys

EXIT_INTERRUPTED = 130
INTERRUPTED = "interrupted: nothing half-written was left behind"


def interrupted_at_start_up(signum, frame):  # pragma: no cover - exercised by the SIGINT test in a subprocess
    """Nothing has been done yet: say so and leave at once."""
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


_pending = False  # a Ctrl-C (or SIGTERM) has arrived and was not handled yet
_dropped = False  # ... and Python dropped the KeyboardInterrupt it raised (in a finaliser)


def raise_interrupt(signum, frame):
    """The CLI's SIGINT/SIGTERM handler: raise KeyboardInterrupt, and remember that it came. Python drops an
    exception raised while a finaliser runs (``__del__``, a weakref callback, a generator being closed by the
    garbage collector), so a Ctrl-C landing there would be lost: long loops also call :func:`check_interrupt`."""
    global _pending
    _pending = True
    raise KeyboardInterrupt


def quiet_unraisable(unraisable) -> None:
    """``sys.unraisablehook`` while the CLI runs: a Ctrl-C that Python dropped in a finaliser (an import lock's
    weakref callback, on a loaded machine) is remembered: long loops raise it again (:func:`check_interrupt`),
    and a command that returns without noticing it ends as interrupted (:func:`was_dropped`, ``engine.cli``).
    Printing it as "Exception ignored in ... Traceback" would only put a traceback before the one-line
    message. Anything else goes to Python's own hook."""
    global _dropped
    if _pending and isinstance(unraisable.exc_value, KeyboardInterrupt):
        _dropped = True
        release_import_lock_left_by(unraisable.exc_traceback)
        return
    sys.__unraisablehook__(unraisable)


def release_import_lock_left_by(tb) -> None:
    """importlib's weakref callback (``cb`` in ``_get_module_lock``) takes Python's global import lock and gives it
    back in a ``finally`` that begins after the call: a Ctrl-C raised as that call returns leaves the lock taken for
    ever, and every later import, in any thread, waits on it (a build's decode threads, importing an image plugin,
    hung so, and the build with them). The traceback tells: the callback's frame (the signal handler's is below
    it), on the line of that call. Then the lock is given back once, here, in the thread that took it."""
    import _imp

    last = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "cb" and "importlib._bootstrap" in code.co_filename:
            last = tb
        tb = tb.tb_next
    if last is not None and last.tb_lineno in _acquire_lines(last.tb_frame.f_code) and _imp.lock_held():
        try:
            _imp.release_lock()
        except RuntimeError:  # held by another thread: not the one this callback took
            pass


def _acquire_lines(code) -> set[int]:
    import dis

    return {i.positions.lineno for i in dis.get_instructions(code) if i.argval == "acquire_lock" and i.positions}


def release_import_locks() -> None:
    """Give back every hold of Python's global import lock by this thread: called where a command ends on a Ctrl-C,
    where no import of ours is running any more, so a hold that is left is one an interrupt stranded (see
    :func:`release_import_lock_left_by`), and the exit (which joins worker threads that import) would wait for it."""
    import _imp

    while _imp.lock_held():
        try:
            _imp.release_lock()
        except RuntimeError:  # held by another thread
            return


def was_dropped() -> bool:
    """Whether a Ctrl-C came while a finaliser ran and Python dropped it (see :func:`quiet_unraisable`)."""
    return _dropped


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came and was swallowed (see :func:`raise_interrupt`); a no-op
    otherwise, and always outside the CLI (which is the only place the handler is installed)."""
    if _pending:
        raise KeyboardInterrupt


def clear_interrupt() -> None:
    global _pending, _dropped
    _pending = _dropped = False


def is_console_script() -> bool:
    return os.path.basename(sys.argv[0] if sys.argv else "") == "attrib"


def install() -> None:
    try:
        signal.signal(signal.SIGINT, interrupted_at_start_up)
    except ValueError:  # not the main thread
        pass
