"""Datasheet figures of the GPUs the energy roofline models, as data, each with where it comes from.

The roofline (:mod:`ecoquant.energy.roofline`) needs five numbers per GPU:
peak dense tensor throughput at the precision a matmul runs in (bf16, FP8,
INT8), memory bandwidth, the board power limit (power drawn while busy, by
assumption) and idle power. Throughputs are the *dense* figures: NVIDIA's
datasheets print the 2:4-sparsity figure first (twice the dense one, marked
with an asterisk), and no checkpoint here is 2:4 sparse, so every value below
is the datasheet's sparse figure halved where only that is printed.

No datasheet states idle power. Those figures are assumptions (typical
``nvidia-smi`` readings of an idle board with a model resident), said so in
their source string; ``ecoquant eval`` on a GPU measures the real idle power,
which is the figure to trust.

A GPU without a tensor path for a precision (Ampere has no FP8) gets ``None``
there: :meth:`GpuSpec.tensor_flops` then falls back to the bf16 rate, which is
what an FP8 checkpoint effectively runs at on such a board (weights
up-converted to 16 bit; vLLM runs FP8 W8A8 there as weight-only Marlin).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from ecoquant.errors import EcoquantError

Precision = Literal["bf16", "fp8", "int8"]
PRECISIONS: tuple[Precision, ...] = ("bf16", "fp8", "int8")

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class Figure:
    """One datasheet value and where it comes from (``None``: the GPU has no such path)."""

    value: float | None
    source: str


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's roofline figures, in SI units (FLOP/s, bytes/s, W), each with its source.

    Attributes:
        name: the table key (``L4``).
        bf16_flops, fp8_flops, int8_flops: peak dense tensor-core throughput (FLOP/s; OP/s for INT8).
        memory_bandwidth: bytes per second to device memory.
        board_power_w: the board power limit: what the roofline charges while the GPU computes or reads.
        idle_power_w: what the board draws with nothing running (an assumption: see the module docstring).
    """

    name: str
    bf16_flops: Figure
    fp8_flops: Figure
    int8_flops: Figure
    memory_bandwidth: Figure
    board_power_w: Figure
    idle_power_w: Figure

    def __post_init__(self) -> None:
        for field in ("bf16_flops", "memory_bandwidth", "board_power_w", "idle_power_w"):
            value = getattr(self, field).value
            if value is None or value <= 0:
                raise ValueError(f"{self.name}: {field} must be a positive number, got {value}")

    def tensor_flops(self, precision: Precision) -> float:
        """Peak dense rate for a matmul in ``precision``; the bf16 rate where the GPU has no such path."""
        figure = {"bf16": self.bf16_flops, "fp8": self.fp8_flops, "int8": self.int8_flops}[precision]
        return float(figure.value if figure.value is not None else self.bf16_flops.value)  # type: ignore[arg-type]

    @property
    def bandwidth(self) -> float:
        return float(self.memory_bandwidth.value)  # type: ignore[arg-type]

    @property
    def busy_w(self) -> float:
        return float(self.board_power_w.value)  # type: ignore[arg-type]

    @property
    def idle_w(self) -> float:
        return float(self.idle_power_w.value)  # type: ignore[arg-type]

    def sources(self) -> dict[str, str]:
        """Field -> where its value comes from (for docs and ``--help``)."""
        return {
            f: getattr(self, f).source
            for f in ("bf16_flops", "fp8_flops", "int8_flops", "memory_bandwidth", "board_power_w", "idle_power_w")
        }


def _tf(dense_tflops: float | None, source: str) -> Figure:
    return Figure(None if dense_tflops is None else dense_tflops * TERA, source)


def _gbs(gb_per_s: float, source: str) -> Figure:
    return Figure(gb_per_s * GIGA, source)


_IDLE = (
    "ASSUMPTION, no datasheet states idle power: a typical nvidia-smi reading of an idle board with a model "
    "loaded; ecoquant eval measures the real one on a GPU"
)

_L4 = "NVIDIA L4 Tensor Core GPU datasheet (2023)"
_A10G = (
    "NVIDIA publishes no A10G datasheet (an AWS-only part); figures from Baseten's 'NVIDIA A10 vs A10G for ML "
    "model inference' spec comparison and nvidia-smi's power limit on AWS g5"
)
_L40S = "NVIDIA L40S datasheet (2023)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB column)"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column)"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column)"

GPUS: Mapping[str, GpuSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            GpuSpec(
                # The challenge's GPU: small, 72 W, memory-bound on decode at 300 GB/s.
                name="L4",
                bf16_flops=_tf(121.0, f"{_L4}: BF16 Tensor Core 242 TFLOPS with sparsity, halved for dense"),
                fp8_flops=_tf(242.5, f"{_L4}: FP8 Tensor Core 485 TFLOPS with sparsity, halved for dense"),
                int8_flops=_tf(242.5, f"{_L4}: INT8 Tensor Core 485 TOPS with sparsity, halved for dense"),
                memory_bandwidth=_gbs(300.0, f"{_L4}: GPU memory bandwidth 300 GB/s"),
                board_power_w=Figure(72.0, f"{_L4}: max thermal design power 72 W"),
                idle_power_w=Figure(16.0, f"{_IDLE} (L4: 12-20 W in P8)"),
            ),
            GpuSpec(
                name="A10G",
                bf16_flops=_tf(70.0, f"{_A10G}: 70 TFLOPS BF16 tensor, dense"),
                fp8_flops=_tf(None, "Ampere has no FP8 tensor path: FP8 matmuls run at the BF16 rate"),
                int8_flops=_tf(140.0, f"{_A10G}: ASSUMPTION, twice the BF16 rate as on every Ampere part"),
                memory_bandwidth=_gbs(600.0, f"{_A10G}: 600 GB/s GDDR6"),
                board_power_w=Figure(300.0, f"{_A10G}: 300 W power limit"),
                idle_power_w=Figure(25.0, f"{_IDLE} (A10G: ~20-30 W)"),
            ),
            GpuSpec(
                name="L40S",
                bf16_flops=_tf(362.05, f"{_L40S}: BF16 Tensor Core 362.05 TFLOPS dense (733 with sparsity)"),
                fp8_flops=_tf(733.0, f"{_L40S}: FP8 Tensor Core 733 TFLOPS dense (1,466 with sparsity)"),
                int8_flops=_tf(733.0, f"{_L40S}: INT8 Tensor Core 733 TOPS dense (1,466 with sparsity)"),
                memory_bandwidth=_gbs(864.0, f"{_L40S}: memory bandwidth 864 GB/s"),
                board_power_w=Figure(350.0, f"{_L40S}: max power consumption 350 W"),
                idle_power_w=Figure(35.0, f"{_IDLE} (L40S: ~30-40 W)"),
            ),
            GpuSpec(
                name="A100",
                bf16_flops=_tf(312.0, f"{_A100}: BF16 Tensor Core 312 TFLOPS dense (624 with sparsity)"),
                fp8_flops=_tf(None, "Ampere has no FP8 tensor path: FP8 matmuls run at the BF16 rate"),
                int8_flops=_tf(624.0, f"{_A100}: INT8 Tensor Core 624 TOPS dense (1,248 with sparsity)"),
                memory_bandwidth=_gbs(2039.0, f"{_A100}: GPU memory bandwidth 2,039 GB/s"),
                board_power_w=Figure(400.0, f"{_A100}: max thermal design power 400 W"),
                idle_power_w=Figure(55.0, f"{_IDLE} (A100 SXM: ~50-60 W)"),
            ),
            GpuSpec(
                name="H100",
                bf16_flops=_tf(989.5, f"{_H100}: BF16 Tensor Core 1,979 TFLOPS with sparsity, halved for dense"),
                fp8_flops=_tf(1979.0, f"{_H100}: FP8 Tensor Core 3,958 TFLOPS with sparsity, halved for dense"),
                int8_flops=_tf(1979.0, f"{_H100}: INT8 Tensor Core 3,958 TOPS with sparsity, halved for dense"),
                memory_bandwidth=_gbs(3350.0, f"{_H100}: GPU memory bandwidth 3.35 TB/s"),
                board_power_w=Figure(700.0, f"{_H100}: max thermal design power up to 700 W"),
                idle_power_w=Figure(70.0, f"{_IDLE} (H100 SXM: ~60-80 W)"),
            ),
            GpuSpec(
                name="H200",
                bf16_flops=_tf(989.5, f"{_H200}: BF16 Tensor Core 1,979 TFLOPS with sparsity, halved for dense"),
                fp8_flops=_tf(1979.0, f"{_H200}: FP8 Tensor Core 3,958 TFLOPS with sparsity, halved for dense"),
                int8_flops=_tf(1979.0, f"{_H200}: INT8 Tensor Core 3,958 TOPS with sparsity, halved for dense"),
                memory_bandwidth=_gbs(4800.0, f"{_H200}: GPU memory bandwidth 4.8 TB/s"),
                board_power_w=Figure(700.0, f"{_H200}: max thermal design power up to 700 W"),
                idle_power_w=Figure(75.0, f"{_IDLE} (H200 SXM: ~70-80 W)"),
            ),
        )
    }
)

DEFAULT_GPU = "L4"
"""The challenge's GPU: what ``--target-gpu`` means when not given."""


def gpu_spec(name: str) -> GpuSpec:
    """The table's entry for ``name`` (any case); one line listing the known names otherwise."""
    for key, spec in GPUS.items():
        if key.lower() == name.strip().lower():
            return spec
    raise EcoquantError(f"unknown GPU {name!r}; --target-gpu takes one of: {', '.join(GPUS)}")
