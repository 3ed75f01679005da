"""The meter for machines without one: it times windows and measures no energy.

It exists so the runner has one code path everywhere, and so "not measured"
travels as ``gpu_energy_j=None`` (never 0.0) from the window to the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ecoquant.energy.meter import Measurement, Reading, WindowBook


class NullMeter:
    """Wall time only; ``description`` says why there is no energy (e.g. ``"no NVML device"``)."""

    def __init__(self, reason: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._reason = reason
        self._clock = clock
        self._book = WindowBook()

    @property
    def available(self) -> bool:
        return False

    @property
    def description(self) -> str:
        return self._reason

    def begin_window(self, name: str) -> None:
        self._book.begin(name, Reading(self._clock(), {}))

    def end_window(self, name: str) -> Measurement:
        start = self._book.end(name)
        return Measurement(time_s=self._clock() - start.time_s, gpu_energy_j=None)
