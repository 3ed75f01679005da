"""GPU energy from NVML's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ).

:func:`open_meter` is the one entry point: it returns an :class:`NvmlMeter`
over the GPUs in use when NVML answers, and otherwise a
:class:`~ecoquant.energy.null.NullMeter` whose description says why (``"no
NVML device"`` on a machine without an NVIDIA driver). It never raises for a
missing GPU: evaluation still runs and reports wall time and tokens.

The NVML module is a parameter (default: ``pynvml`` from nvidia-ml-py) so
tests can hand in :class:`~ecoquant.energy.replay.ReplayNvml`, which serves
recorded counter values through exactly this code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ecoquant.energy.meter import Measurement, Reading, WindowBook, energy_between
from ecoquant.energy.null import NullMeter

NO_DEVICE = "no NVML device"


class NvmlMeter:
    """Windows over the NVML energy counters of some GPUs, summed in the report.

    Every reading is kept in :attr:`readings` (a few per window) so a run can
    save them next to its results and anyone can redo the arithmetic.
    """

    def __init__(self, nvml: Any, handles: Mapping[int, Any], clock: Callable[[], float] = time.monotonic) -> None:
        if not handles:
            raise ValueError("an NVML meter needs at least one GPU")
        self._nvml = nvml
        self._handles = dict(handles)
        self._clock = clock
        self._book = WindowBook()
        self.readings: list[Reading] = []

    @property
    def gpus(self) -> tuple[int, ...]:
        return tuple(self._handles)

    @property
    def available(self) -> bool:
        return True

    @property
    def description(self) -> str:
        return f"NVML total-energy counter, GPU {', '.join(map(str, self.gpus))}"

    @property
    def gpu_names(self) -> tuple[str, ...]:
        """NVML's model name of each metered GPU (e.g. ``NVIDIA L4``): energies are only compared within one model."""
        names = (self._nvml.nvmlDeviceGetName(h) for h in self._handles.values())
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

    def read(self) -> Reading:
        """Timestamp first, then each counter: the same order every time, which replays rely on."""
        now = self._clock()
        energy = {gpu: int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for gpu, h in self._handles.items()}
        reading = Reading(now, energy)
        self.readings.append(reading)
        return reading

    def begin_window(self, name: str) -> None:
        self._book.begin(name, self.read())

    def end_window(self, name: str) -> Measurement:
        start = self._book.end(name)
        return energy_between(start, self.read())

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def visible_gpus(nvml: Any, count: int, cuda_visible_devices: str | None) -> list[int]:
    """NVML indices of the GPUs this process may use: all of them, or those ``CUDA_VISIBLE_DEVICES`` names.

    Entries may be indices or ``GPU-<uuid>`` prefixes. Indices are taken as
    NVML (PCI bus) order, which matches CUDA's when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``;
    pass ``gpus`` to :func:`open_meter` explicitly when it does not.
    """
    if not cuda_visible_devices or not cuda_visible_devices.strip():
        return list(range(count))
    uuids: dict[int, str] | None = None
    chosen: list[int] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if entry.isdigit():
            index = int(entry)
        elif entry.startswith(("GPU-", "MIG-")):
            if uuids is None:
                uuids = {i: str(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)}
            matches = [i for i, u in uuids.items() if u.startswith(entry)]
            if len(matches) != 1:
                break  # CUDA stops at the first entry it cannot resolve
            index = matches[0]
        else:
            break
        if index >= count:
            break
        chosen.append(index)
    return chosen


def open_meter(
    gpus: Sequence[int] | None = None,
    *,
    nvml: Any = None,
    clock: Callable[[], float] = time.monotonic,
    environ: Mapping[str, str] | None = None,
) -> NvmlMeter | NullMeter:
    """An NVML meter over ``gpus`` (default: the visible GPUs), or a NullMeter saying why not."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return NullMeter(f"{NO_DEVICE}: nvidia-ml-py is not installed", clock)
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return NullMeter(NO_DEVICE, clock)
    try:
        count = int(nvml.nvmlDeviceGetCount())
        env = os.environ if environ is None else environ
        indices = list(gpus) if gpus is not None else visible_gpus(nvml, count, env.get("CUDA_VISIBLE_DEVICES"))
        if count == 0 or not indices:
            nvml.nvmlShutdown()
            return NullMeter(NO_DEVICE, clock)
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            nvml.nvmlShutdown()
            return NullMeter(f"GPU {bad} not among the {count} NVML devices", clock)
        handles = {i: nvml.nvmlDeviceGetHandleByIndex(i) for i in indices}
        for i, handle in handles.items():
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            except nvml.NVMLError as exc:
                nvml.nvmlShutdown()
                return NullMeter(f"GPU {i} has no NVML energy counter ({exc})", clock)
    except nvml.NVMLError as exc:
        nvml.nvmlShutdown()
        return NullMeter(f"NVML error: {exc}", clock)
    return NvmlMeter(nvml, handles, clock)
