"""Progress bars for long work, shared by the library entry points.

Library functions take ``show_progress``; the bars go to stderr so that
stdout stays clean for paths and JSON. When stderr is not a terminal (a log
file, CI, a job runner) a bar would only appear at the end, and a line per
module or per sample buries the decision (the demo's log was 662 lines), so
off a terminal a bar is one line when it finishes, with its count and time;
inside a step that prints its own line with its time (``optimize``'s
:class:`~ecoquant.optimize.run.Stages`), nothing. ``--verbose``
(:func:`verbose`) brings back a line per step off a terminal.

The level is a context variable set by the command (:func:`verbose`, and
:func:`quiet` around a step that reports itself) rather than a flag threaded
through quantize, calibrate, export and evaluate: it is how the run is shown,
not what it computes. Threads start at the default level.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


Detail = Literal["steps", "summary", "quiet"]
"""Off a terminal: a line per step, one line per bar, or none (the caller reports the step itself)."""

_DETAIL: ContextVar[Detail] = ContextVar("ecoquant_progress_detail", default="summary")


@contextmanager
def detail(level: Detail) -> Iterator[None]:
    """Set how much a bar prints off a terminal, for the code inside."""
    token = _DETAIL.set(level)
    try:
        yield
    finally:
        _DETAIL.reset(token)


def verbose(on: bool = True) -> Any:
    """``--verbose``: a line per step off a terminal (per module exported, per sample evaluated)."""
    return detail("steps") if on else detail(_DETAIL.get())


def quiet() -> Any:
    """Around a step that prints its own line with its time: its bars print nothing off a terminal
    (unless ``--verbose``)."""
    return detail("steps" if is_verbose() else "quiet")


def is_verbose() -> bool:
    return _DETAIL.get() == "steps"


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(label)``; draws a bar on stderr when enabled (off a terminal: see the module docstring)."""
    if not enabled:
        yield lambda label: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        start = time.perf_counter()
        done = 0
        level = _DETAIL.get()

        def log(label: str) -> None:
            nonlocal done
            done += 1
            if level == "steps":
                console.print(f"{description}: {done}/{total} {label} ({time.perf_counter() - start:.1f} s)",
                              highlight=False, soft_wrap=True)

        yield log
        if level == "summary":
            console.print(f"{description}: {done}/{total} in {time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[label]}", style="dim"),
        console=console,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, label="")
        yield lambda label: bar.update(task, advance=1, label=label)
