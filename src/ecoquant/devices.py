"""Which device ecoquant runs on: ``auto`` is CUDA when one is visible, else the CPU.

Why a default of ``auto`` and not ``cpu``: GPTQ and AWQ calibration is the
longest step of ``ecoquant optimize`` (on this project's 2-core CPU, 68 s per
E4B layer at 16 x 512 tokens, projected 12 h at the seed's 256 x 2048), and a
user with a GPU who does not know the flag would leave it idle.

The machine is asked through one small probe, :func:`cuda_devices`; the
decisions (:func:`resolve_device`, :func:`choose_calibration_device`) are pure
functions of what it answered, so tests replay a machine with or without a GPU.
torch is imported inside the probe only: the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ecoquant.errors import EcoquantError

GIB = 1024**3

#: Devices the options take (``auto`` included); anything else is refused before any work.
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class CudaDevice:
    """One visible CUDA device, as torch reports it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


def cuda_devices() -> tuple[CudaDevice, ...]:
    """The CUDA devices torch sees here, with their memory now (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return ()
    found = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        found.append(CudaDevice(i, torch.cuda.get_device_name(i), int(total), int(free)))
    return tuple(found)


def check_device_name(asked: str) -> None:
    """Refuse a device string no command could use (``--device bogus``), even where the method never reads it."""
    if not _DEVICE.match(asked):
        raise EcoquantError(f"unknown device {asked!r}; use auto, cpu, cuda or cuda:N")


def resolve_device(asked: str, cuda: Sequence[CudaDevice]) -> str:
    """``asked`` as a concrete device: ``auto`` is ``cuda`` when ``cuda`` lists a device, else ``cpu``.

    Raises:
        EcoquantError: an unknown device, or a CUDA device this machine does not have.
    """
    check_device_name(asked)
    if asked == "auto":
        return "cuda" if cuda else "cpu"
    if asked.startswith("cuda"):
        if not cuda:
            raise EcoquantError(f"device {asked!r} requested but CUDA is not available; use --device cpu (or auto)")
        index = int(asked.partition(":")[2] or 0)
        if index >= len(cuda):
            raise EcoquantError(f"device {asked!r} requested but only {len(cuda)} CUDA device(s) are visible")
    return asked


@dataclass(frozen=True)
class DeviceChoice:
    """Where calibration runs, and the one line that says why (shown in logs and written to the recipe)."""

    device: str
    asked: str
    need_bytes: int | None
    free_bytes: int | None
    note: str

    @property
    def fell_back(self) -> bool:
        """``auto`` found a GPU but chose the CPU because the calibration would not fit."""
        return self.asked == "auto" and self.device == "cpu" and self.free_bytes is not None


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def choose_calibration_device(asked: str, need_bytes: int | None, cuda: Sequence[CudaDevice], need_text: str = "") -> DeviceChoice:
    """Where to calibrate, decided before any work so that a run never dies halfway for want of GPU memory.

    The walk keeps every calibration batch's activations on its device for the
    whole run, so a layer that does not fit means no layer fits: the decision
    is one per run, not per layer. ``auto`` falls back to the CPU with a line
    saying so; an explicit ``cuda`` refuses with the number it needs.

    Args:
        asked: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        need_bytes: the estimated peak of one layer's calibration on the device
            (:func:`ecoquant.calibrate.memory.estimate_calibration_memory`); None when unknown.
        cuda: the visible CUDA devices (:func:`cuda_devices`).
        need_text: what ``need_bytes`` is made of, for the messages.
    """
    device = resolve_device(asked, cuda)
    if not device.startswith("cuda"):
        why = "asked for" if asked == "cpu" else "auto: no CUDA device visible"
        return DeviceChoice(device, asked, need_bytes, None, f"calibrating on cpu ({why})")
    gpu = cuda[int(device.partition(":")[2] or 0)]
    if need_bytes is None or need_bytes <= gpu.free_bytes:
        need = "" if need_bytes is None else f", needs about {_gib(need_bytes)}"
        why = "auto: CUDA visible" if asked == "auto" else "asked for"
        return DeviceChoice(
            device, asked, need_bytes, gpu.free_bytes,
            f"calibrating on {device}: {gpu.name}, {_gib(gpu.free_bytes)} free of {_gib(gpu.total_bytes)} ({why}{need})",
        )
    detail = f" ({need_text})" if need_text else ""
    if asked == "auto":
        return DeviceChoice(
            "cpu", asked, need_bytes, gpu.free_bytes,
            f"calibrating on cpu: one layer's calibration needs about {_gib(need_bytes)}{detail}, "
            f"more than the {_gib(gpu.free_bytes)} free on {device} ({gpu.name}); "
            "fewer --calib-samples or --calib-length would fit it on the GPU",
        )
    raise EcoquantError(
        f"calibrating on {device} needs about {_gib(need_bytes)}{detail}, but {device} ({gpu.name}) has "
        f"{_gib(gpu.free_bytes)} free; calibrate on cpu or auto (quantize --device, optimize --quant-device), "
        "or with fewer --calib-samples / --calib-length"
    )
