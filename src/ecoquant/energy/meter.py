"""The energy meter interface: named windows over cumulative GPU energy counters.

Why windows over counters, and not sampled power: NVIDIA GPUs since Volta keep
a total-energy counter in millijoules that the driver integrates at a much
higher rate than any polling loop could, so the energy of a window is just
``counter(end) - counter(start)`` per GPU -- exact, free of sampling error,
and with no thread running beside the model (the Zeus approach). A suite's
energy is one window around all of its requests; warm-up requests run before
the window opens.

An idle baseline (power drawn with nothing running) is measured separately,
with the same window code, and reported next to the raw energy -- never
subtracted silently, because what "idle" means (clocks, other tenants, a model
resident in memory or not) is a judgement the reader should see.

Units are in every name: ``time_s``, ``gpu_energy_j``, ``gpu_power_w``,
``energy_mj`` for the raw counters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from ecoquant.errors import EcoquantError


@dataclass(frozen=True)
class Reading:
    """One look at the counters: a monotonic timestamp and each GPU's cumulative energy."""

    time_s: float
    energy_mj: Mapping[int, int]
    """NVML index -> total energy since the driver loaded, in millijoules."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "energy_mj", MappingProxyType(dict(self.energy_mj)))


@dataclass(frozen=True)
class Measurement:
    """What one window cost.

    Attributes:
        time_s: wall time between ``begin_window`` and ``end_window``.
        gpu_energy_j: NVML index -> joules used by that GPU in the window, or
            None when there is no meter: "not measured" is not zero.
    """

    time_s: float
    gpu_energy_j: Mapping[int, float] | None

    def __post_init__(self) -> None:
        if self.gpu_energy_j is not None:
            object.__setattr__(self, "gpu_energy_j", MappingProxyType(dict(self.gpu_energy_j)))

    @property
    def total_energy_j(self) -> float | None:
        """Energy summed over the GPUs in use, or None when not measured."""
        if self.gpu_energy_j is None:
            return None
        return math.fsum(self.gpu_energy_j.values())


def energy_between(start: Reading, end: Reading) -> Measurement:
    """The window from ``start`` to ``end``: per-GPU counter deltas in joules.

    Worked example: GPU 0 reads 1,000,000 mJ then 1,250,500 mJ, GPU 1 reads
    20,000 then 20,400 over 2.5 s -> ``{0: 250.5, 1: 0.4}`` J, 250.9 J in total.

    Raises:
        EcoquantError: the two readings cover different GPUs, or a counter went
            backwards (a driver reload resets it; the window is then unusable).
    """
    if set(start.energy_mj) != set(end.energy_mj):
        raise EcoquantError(
            f"energy readings cover different GPUs ({sorted(start.energy_mj)} vs {sorted(end.energy_mj)})"
        )
    energy_j: dict[int, float] = {}
    for gpu, first in start.energy_mj.items():
        delta_mj = end.energy_mj[gpu] - first
        if delta_mj < 0:
            raise EcoquantError(
                f"the energy counter of GPU {gpu} went backwards ({first} -> {end.energy_mj[gpu]} mJ);"
                " the driver was probably reloaded during the run: run it again"
            )
        energy_j[gpu] = delta_mj / 1000.0
    return Measurement(time_s=end.time_s - start.time_s, gpu_energy_j=energy_j)


@dataclass(frozen=True)
class IdleBaseline:
    """Power drawn with nothing running, measured over ``time_s`` seconds before the suite."""

    time_s: float
    gpu_power_w: Mapping[int, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpu_power_w", MappingProxyType(dict(self.gpu_power_w)))

    @property
    def total_power_w(self) -> float:
        return math.fsum(self.gpu_power_w.values())

    @classmethod
    def from_measurement(cls, m: Measurement) -> IdleBaseline:
        """Average power over an idle window: energy / time per GPU."""
        if m.gpu_energy_j is None:
            raise ValueError("an idle baseline needs a measured window")
        if m.time_s <= 0:
            raise ValueError(f"an idle window must last a positive time, got {m.time_s} s")
        return cls(time_s=m.time_s, gpu_power_w={g: e / m.time_s for g, e in m.gpu_energy_j.items()})


def idle_corrected_energy_j(m: Measurement, idle: IdleBaseline | None) -> float | None:
    """Energy above idle: ``total - idle power x window time``; None without a meter or baseline.

    Worked example: 250.9 J over 2.5 s with a 60 W idle baseline -> 250.9 - 150 = 100.9 J.
    It can come out negative when the idle sample was noisy; that is reported as is.
    """
    total = m.total_energy_j
    if total is None or idle is None:
        return None
    return total - idle.total_power_w * m.time_s


@runtime_checkable
class EnergyMeter(Protocol):
    """Named measurement windows (Zeus's API shape).

    Windows may nest or overlap; each name is open at most once at a time.
    """

    @property
    def available(self) -> bool:
        """True when ``end_window`` returns measured energy, False when it returns only time."""
        ...

    @property
    def description(self) -> str:
        """One line for the report: what is measured, or why nothing is, e.g. ``"no NVML device"``."""
        ...

    def begin_window(self, name: str) -> None: ...

    def end_window(self, name: str) -> Measurement: ...


class WindowBook:
    """Open windows by name; shared by the meters so they fail the same way on misuse."""

    def __init__(self) -> None:
        self._open: dict[str, Reading] = {}

    def begin(self, name: str, reading: Reading) -> None:
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open")
        self._open[name] = reading

    def end(self, name: str) -> Reading:
        try:
            return self._open.pop(name)
        except KeyError:
            raise ValueError(f"no open energy window named {name!r}") from None


def not_measured_line(meter: EnergyMeter) -> str:
    """The report line for a meter that measures nothing, e.g. ``energy: not measured (no NVML device)``."""
    return f"energy: not measured ({meter.description})"


def measure_idle(
    meter: EnergyMeter, seconds: float, sleep: Callable[[float], None] = time.sleep
) -> IdleBaseline | None:
    """Sample idle power for ``seconds`` through the meter's own window; None when it measures nothing."""
    if not meter.available or seconds <= 0:
        return None
    meter.begin_window("__idle__")
    sleep(seconds)
    return IdleBaseline.from_measurement(meter.end_window("__idle__"))
