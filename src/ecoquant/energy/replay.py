"""Recorded NVML counter readings, served back through the real meter code.

Why a stand-in for the ``pynvml`` module rather than a fake meter: the
arithmetic worth testing (counter deltas, mJ -> J, the sum over GPUs, the
idle baseline) lives in :class:`~ecoquant.energy.nvml.NvmlMeter` and
:mod:`~ecoquant.energy.meter`; replaying readings *below* them tests that
code, not a copy of it.

A recording is what :attr:`NvmlMeter.readings` holds, saved as JSON::

    {"readings": [{"time_s": 0.0, "energy_mj": {"0": 1000000, "1": 20000}}, ...]}

:class:`ReplayNvml` hands out one reading per meter read: its ``clock``
advances to the next recorded reading, and the energy calls that follow
return that reading's counters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ecoquant.energy.meter import Reading


class ReplayNvmlError(Exception):
    """Plays the role of ``pynvml.NVMLError``."""


class ReplayNvml:
    """Enough of the ``pynvml`` module for :func:`~ecoquant.energy.nvml.open_meter`, serving recorded values."""

    NVMLError = ReplayNvmlError

    def __init__(self, readings: Sequence[Reading]) -> None:
        if not readings:
            raise ValueError("a replay needs at least one reading")
        gpus = set(readings[0].energy_mj)
        if any(set(r.energy_mj) != gpus for r in readings):
            raise ValueError("every recorded reading must cover the same GPUs")
        self._readings = list(readings)
        self._gpus = sorted(gpus)
        self._cursor = -1  # before the first clock() call, energy calls see reading 0
        self.initialized = False

    @classmethod
    def from_json(cls, path: Path | str) -> ReplayNvml:
        return cls(load_readings(path))

    # --- the pynvml surface the meter uses

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.initialized = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return max(self._gpus) + 1 if self._gpus else 0

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if index not in self._gpus:
            raise ReplayNvmlError(f"GPU {index} is not in the recording")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:  # noqa: N802
        return f"GPU-replay-{handle}"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802
        return self._readings[max(self._cursor, 0)].energy_mj[handle]

    # --- the clock the meter is built with

    def clock(self) -> float:
        """Advance to the next recorded reading and return its timestamp."""
        if self._cursor + 1 >= len(self._readings):
            raise RuntimeError(f"the recording has only {len(self._readings)} readings")
        self._cursor += 1
        return self._readings[self._cursor].time_s


def save_readings(readings: Sequence[Reading], path: Path | str) -> Path:
    """Write readings (e.g. ``NvmlMeter.readings`` after a run) as a replayable JSON recording."""
    path = Path(path)
    rows = [{"time_s": r.time_s, "energy_mj": {str(g): e for g, e in r.energy_mj.items()}} for r in readings]
    path.write_text(json.dumps({"readings": rows}, indent=1) + "\n", encoding="utf-8")
    return path


def load_readings(path: Path | str) -> list[Reading]:
    """Read a recording written by :func:`save_readings`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [Reading(float(r["time_s"]), {int(g): int(e) for g, e in r["energy_mj"].items()}) for r in data["readings"]]
