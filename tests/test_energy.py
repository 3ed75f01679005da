"""Energy meters: NVML counter arithmetic replayed through the real meter, the idle baseline, "not measured"."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ecoquant.energy import (
    NO_DEVICE,
    IdleBaseline,
    Measurement,
    NullMeter,
    NvmlMeter,
    Reading,
    energy_between,
    idle_corrected_energy_j,
    measure_idle,
    not_measured_line,
    open_meter,
)
from ecoquant.energy.nvml import visible_gpus
from ecoquant.energy.replay import ReplayNvml, load_readings, save_readings
from ecoquant.errors import EcoquantError

# A two-GPU recording: idle for 5 s, a pause, then a 2.5 s window.
# GPU 0 idles at 60 W (300 J / 5 s) and works at 250.5 J; GPU 1 barely moves.
RECORDING = [
    Reading(100.0, {0: 1_000_000, 1: 20_000}),  # idle begins
    Reading(105.0, {0: 1_300_000, 1: 20_500}),  # idle ends: 300 J, 0.5 J
    Reading(106.0, {0: 1_400_000, 1: 20_600}),  # suite begins
    Reading(108.5, {0: 1_650_500, 1: 21_000}),  # suite ends: 250.5 J, 0.4 J
]


def replay_meter(readings: list[Reading] = RECORDING, **kwargs: object) -> NvmlMeter:
    nvml = ReplayNvml(readings)
    meter = open_meter(nvml=nvml, clock=nvml.clock, environ={}, **kwargs)  # type: ignore[arg-type]
    assert isinstance(meter, NvmlMeter), meter.description
    return meter


def test_counter_deltas_are_joules_per_gpu() -> None:
    m = energy_between(RECORDING[2], RECORDING[3])
    assert m.time_s == pytest.approx(2.5)
    assert dict(m.gpu_energy_j or {}) == pytest.approx({0: 250.5, 1: 0.4})
    assert m.total_energy_j == pytest.approx(250.9)


def test_replayed_run_idle_baseline_and_suite_window() -> None:
    meter = replay_meter()
    slept: list[float] = []
    idle = measure_idle(meter, 5.0, sleep=slept.append)
    assert slept == [5.0]
    assert idle is not None
    assert idle.time_s == pytest.approx(5.0)
    assert dict(idle.gpu_power_w) == pytest.approx({0: 60.0, 1: 0.1})
    assert idle.total_power_w == pytest.approx(60.1)

    meter.begin_window("suite")
    m = meter.end_window("suite")
    assert m.total_energy_j == pytest.approx(250.9)  # both GPUs summed
    assert m.time_s == pytest.approx(2.5)
    # Raw stays raw; the correction is a separate number: 250.9 - 60.1 W x 2.5 s.
    assert idle_corrected_energy_j(m, idle) == pytest.approx(250.9 - 150.25)
    assert len(meter.readings) == 4


def test_only_the_gpus_in_use_are_summed() -> None:
    nvml = ReplayNvml(RECORDING)
    meter = open_meter(nvml=nvml, clock=nvml.clock, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert isinstance(meter, NvmlMeter) and meter.gpus == (1,)
    nvml.clock()  # skip to the suite readings
    nvml.clock()
    meter.begin_window("w")
    assert meter.end_window("w").total_energy_j == pytest.approx(0.4)

    explicit = replay_meter(gpus=[0])
    explicit.begin_window("w")
    assert explicit.end_window("w").total_energy_j == pytest.approx(300.0)


def test_overlapping_windows_and_misuse() -> None:
    meter = replay_meter()
    meter.begin_window("outer")  # reading 0
    meter.begin_window("inner")  # reading 1
    inner = meter.end_window("inner")  # reading 2
    outer = meter.end_window("outer")  # reading 3
    assert inner.total_energy_j == pytest.approx(100.0 + 0.1)
    assert outer.total_energy_j == pytest.approx(650.5 + 1.0)
    with pytest.raises(ValueError, match="no open energy window"):
        meter.end_window("outer")
    nvml = ReplayNvml(RECORDING)
    meter = open_meter(nvml=nvml, clock=nvml.clock, environ={})
    meter.begin_window("a")
    with pytest.raises(ValueError, match="already open"):
        meter.begin_window("a")


def test_counter_going_backwards_is_an_error_not_a_negative_energy() -> None:
    with pytest.raises(EcoquantError, match="went backwards"):
        energy_between(Reading(0.0, {0: 5_000}), Reading(1.0, {0: 4_000}))


def test_recording_round_trips_through_json(tmp_path: Path) -> None:
    meter = replay_meter()
    meter.begin_window("w")
    first = meter.end_window("w")
    path = save_readings(meter.readings, tmp_path / "readings.json")
    replayed = replay_meter(load_readings(path))
    replayed.begin_window("w")
    assert replayed.end_window("w") == first


class _NoDriverNvml:
    """What pynvml does on a machine without the NVIDIA driver: nvmlInit raises."""

    class NVMLError(Exception):
        pass

    def nvmlInit(self) -> None:  # noqa: N802
        raise self.NVMLError("NVML Shared Library Not Found")


class _NoCounterNvml(ReplayNvml):
    """A GPU whose driver has no total-energy counter (pre-Volta)."""

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802
        raise self.NVMLError("Not Supported")


def test_no_nvml_device_gives_a_meter_that_measures_time_only() -> None:
    ticks = iter([10.0, 12.5])
    meter = open_meter(nvml=_NoDriverNvml(), clock=lambda: next(ticks))
    assert isinstance(meter, NullMeter)
    assert not meter.available
    assert not_measured_line(meter) == "energy: not measured (no NVML device)"
    meter.begin_window("suite")
    m = meter.end_window("suite")
    assert m.time_s == pytest.approx(2.5)
    assert m.gpu_energy_j is None and m.total_energy_j is None  # not zero: not measured
    slept: list[float] = []
    assert measure_idle(meter, 5.0, sleep=slept.append) is None
    assert slept == []  # no pointless idle wait without a meter


def test_gpu_without_energy_counter_says_so() -> None:
    meter = open_meter(nvml=_NoCounterNvml(RECORDING), environ={})
    assert isinstance(meter, NullMeter)
    assert "no NVML energy counter" in meter.description


def test_this_machine_without_a_gpu_reports_no_nvml_device() -> None:
    meter = open_meter()
    if meter.available:
        pytest.skip("an NVML device is present; the real meter is exercised by the GPU benchmark")
    assert meter.description == NO_DEVICE


def test_visible_gpus_from_cuda_visible_devices() -> None:
    nvml = ReplayNvml([Reading(0.0, {0: 0, 1: 0, 2: 0})])
    assert visible_gpus(nvml, 3, None) == [0, 1, 2]
    assert visible_gpus(nvml, 3, "2,0") == [2, 0]
    assert visible_gpus(nvml, 3, "GPU-replay-1") == [1]
    assert visible_gpus(nvml, 3, "1,7,2") == [1]  # CUDA stops at the first unknown entry


def test_idle_baseline_arithmetic() -> None:
    idle = IdleBaseline.from_measurement(Measurement(4.0, {0: 200.0, 3: 40.0}))
    assert dict(idle.gpu_power_w) == {0: 50.0, 3: 10.0}
    assert math.isclose(idle_corrected_energy_j(Measurement(2.0, {0: 130.0, 3: 20.0}), idle) or 0.0, 150.0 - 120.0)
    assert idle_corrected_energy_j(Measurement(2.0, None), idle) is None
    assert idle_corrected_energy_j(Measurement(2.0, {0: 1.0}), None) is None
    with pytest.raises(ValueError):
        IdleBaseline.from_measurement(Measurement(2.0, None))
