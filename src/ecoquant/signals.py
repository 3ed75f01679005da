"""SIGTERM and SIGHUP stop a command the way Ctrl-C does.

A job scheduler, ``timeout`` and a closed terminal send SIGTERM or SIGHUP,
not SIGINT. Python's default for both is to die on the spot, which skips every
``finally`` and ``except BaseException`` that removes temporary folders and
names the resumable state kept (``.OUT.calib``, optimize's store). Turned into
:class:`Interrupted`, a :class:`KeyboardInterrupt`, they take the same path as
Ctrl-C. Further signals during that clean-up are ignored, so a second
SIGTERM cannot cut the clean-up itself short; SIGKILL still can, and
:mod:`ecoquant.scratch` clears what it leaves on the next run.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: The signals turned into :class:`Interrupted` (SIGHUP does not exist on Windows).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        for s in STOP_SIGNALS:  # once is enough: let the clean-up finish
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C)."""
    return 128 + (exc.signum if isinstance(exc, Interrupted) else signal.SIGINT)
