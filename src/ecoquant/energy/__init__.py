"""Energy measurement: named windows over GPU energy counters (see :mod:`ecoquant.energy.meter`).

>>> meter = open_meter()            # NVML if there is a GPU, else a meter that says why not
>>> meter.begin_window("suite")     # doctest: +SKIP
>>> m = meter.end_window("suite")   # doctest: +SKIP
>>> m.time_s, m.total_energy_j      # doctest: +SKIP
"""

from ecoquant.energy.meter import (
    EnergyMeter,
    IdleBaseline,
    Measurement,
    Reading,
    energy_between,
    idle_corrected_energy_j,
    measure_idle,
    not_measured_line,
)
from ecoquant.energy.null import NullMeter
from ecoquant.energy.nvml import NO_DEVICE, NvmlMeter, open_meter

__all__ = [
    "NO_DEVICE",
    "EnergyMeter",
    "IdleBaseline",
    "Measurement",
    "NullMeter",
    "NvmlMeter",
    "Reading",
    "energy_between",
    "idle_corrected_energy_j",
    "measure_idle",
    "not_measured_line",
    "open_meter",
]
