"""Display helpers: rich progress bars and consoles on stderr (display only; never machine output)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console: Console | None = None


def stderr_console() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True)
        if not _console.is_terminal:  # logs and pipes: wide enough for the result tables
            _console = Console(stderr=True, width=max(_console.width, 140))
    return _console


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # type: ignore[override]
        speed = task.finished_speed or task.speed
        text = f"-- {self.unit}/s" if speed is None else f"{speed:.1f} {self.unit}/s"
        return Text(text, style="progress.data.speed")


@contextmanager
def progress_bar(
    label: str, total: int | None, enabled: bool = True, unit: str = "rec"
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n, label=None)``; shows ``unit``s per second and the time left on stderr (``label``
    replaces the bar's label, e.g. to show a second count)."""
    if not enabled:
        yield lambda n, label=None: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with Progress(*cols, console=stderr_console(), transient=False) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n, label=None: prog.update(task, advance=n, **({"description": label} if label else {}))
