"""A stand-in for NVML and a slow backend, for the ``--gpus`` tests on a machine without GPUs (shared by
test_optimize.py and test_local_gpus.py, where Ray runs them in its workers)."""

from __future__ import annotations

import os
import time
from typing import Any

from ecoquant.energy.meter import Measurement

WATTS = 100.0
"""What each fake GPU draws, busy or idle: a window of t seconds measures WATTS * t J on each of its GPUs."""


class FakeGpuMeter:
    """Meters some GPUs as NVML would: ``gpus``, or with None the ones ``CUDA_VISIBLE_DEVICES`` names (in a Ray
    task, the GPU Ray gave it), as :func:`ecoquant.energy.nvml.open_meter` reads them. Records its windows."""

    def __init__(self, gpus: list[int] | None) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0")
        self.gpus = tuple(gpus) if gpus is not None else tuple(int(g) for g in visible.split(","))
        self.available = True
        self.description = f"fake NVML, GPU {','.join(map(str, self.gpus))}"
        self.gpu_names = tuple("Fake L4" for _ in self.gpus)
        self.windows: dict[str, tuple[float, float]] = {}
        self._open: dict[str, float] = {}
        METERS.append(self)

    def begin_window(self, name: str) -> None:
        self._open[name] = time.monotonic()

    def end_window(self, name: str) -> Measurement:
        t0 = self._open.pop(name)
        t1 = time.monotonic()
        self.windows[name] = (t0, t1)
        return Measurement(t1 - t0, {g: WATTS * (t1 - t0) for g in self.gpus})

    def close(self) -> None:
        pass


METERS: list[FakeGpuMeter] = []
"""Every FakeGpuMeter made in this process (a Ray worker's are in its own)."""


class SlowBackend:
    """Answers every request with "x" after a pause, so that parallel evaluations overlap measurably."""

    kind = "fake"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def generate(self, requests: Any, settings: Any, on_done: Any = None) -> list[Any]:
        from ecoquant.eval.backends.base import Completion

        time.sleep(0.5)
        return [Completion("x", 5, 1, "stop") for _ in requests]

    def close(self) -> None:
        pass


def slow_backend(ref: Any, index: int, config: Any) -> SlowBackend:
    """A backend factory (module-level, so that Ray can send it to its workers)."""
    return SlowBackend()
