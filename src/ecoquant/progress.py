"""Progress bars for long work, shared by the library entry points.

Library functions take ``show_progress``; the bars go to stderr so that
stdout stays clean for paths and JSON. When stderr is not a terminal (a log
file, CI, a job runner) a bar would only appear at the end, so each step is
printed as one log line with its elapsed time instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``advance(label)``; draws a bar on stderr when enabled."""
    if not enabled:
        yield lambda label: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:
        start = time.perf_counter()
        done = 0

        def log(label: str) -> None:
            nonlocal done
            done += 1
            console.print(f"{description}: {done}/{total} {label} ({time.perf_counter() - start:.1f} s)",
                          highlight=False, soft_wrap=True)

        yield log
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
