"""Console output and the per-run log file: one place so every long step reports progress the same way."""
from __future__ import annotations

import contextlib
import datetime as _dt
import io
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class RunLog:
    """Prints to the console and appends the same line, time-stamped, to ``run.log`` in the run folder."""

    def __init__(self, path: Path | None = None, quiet: bool = False) -> None:
        self.path = path
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            console.print(message)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{_dt.datetime.now().isoformat(timespec='seconds')} {message}\n")


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """Swallow what is printed to stdout inside the block: nnU-Net prints a lot while it plans, builds its trainer
    and predictor and trains, and the console is kept for our own progress lines (on stderr)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextlib.contextmanager
def progress_bar(quiet: bool = False) -> Iterator[Progress]:
    """A rich progress display with counts, elapsed and remaining time."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
                        disable=quiet, transient=False)
    with progress:
        yield progress


def no_progress(description: str, total: int) -> Callable[[], None]:
    """A progress-bar factory that shows nothing (``progress(description, total)`` returns ``advance()``): the
    default where a long step is run outside a run's display, e.g. in tests."""
    return lambda: None
