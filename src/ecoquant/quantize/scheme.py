"""The weight quantization scheme: what every algorithm in ecoquant produces.

One frozen dataclass describes int-N weight-only quantization (W4A16 by
default). It maps one-to-one onto compressed-tensors' ``QuantizationArgs`` so
that what ecoquant writes is exactly what vLLM's ``CompressedTensorsWNA16``
loader and transformers' compressed-tensors integration read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ecoquant.errors import EcoquantError

Observer = Literal["minmax", "mse", "hessian", "grid"]

#: Observers that weigh each input channel by its calibration energy and so need calibration inputs.
ACTIVATION_AWARE: frozenset[str] = frozenset({"hessian"})

#: Group sizes that vLLM's Marlin int4 kernels accept (None = one scale per output channel).
MARLIN_GROUP_SIZES: tuple[int | None, ...] = (32, 64, 128, None)


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight-only quantization, group-wise along the input dimension.

    Attributes:
        num_bits: bits per weight (4 for W4A16).
        group_size: input channels that share one scale; ``None`` means one
            scale per output channel ("channel" strategy).
        symmetric: symmetric (no zero point) is what Marlin runs fastest and
            what the seed checkpoint used; asymmetric stores a zero point per group.
        observer: how scales are chosen: ``minmax`` (absolute max, identical to
            llmcompressor's W4A16 preset) or ``mse`` (per-group search over
            clipping ratios that minimises reconstruction error) or ``hessian``
            (the same search, each weight's error weighted by its input's
            energy on calibration data, ``diag(H)``: it minimises the layer's
            output error, not the weight error; needs calibration) or ``grid``
            (weights already on a symmetric integer grid, as QAT ``q4_0``
            checkpoints are: each group's own step is recovered so the
            checkpoint reproduces them; groups on no grid get min-max; symmetric only).
        mse_grid: number of clipping ratios tried by the MSE observer.
        mse_maxshrink: the smallest ratio tried is ``1 - mse_maxshrink``.
        mse_norm: the error exponent the MSE observer minimises (2 = squared error).
    """

    num_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    observer: Observer = "minmax"
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.num_bits <= 8:
            raise EcoquantError(f"num_bits={self.num_bits} is not supported; use 2..8 (4 for W4A16)")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 8):
            raise EcoquantError(
                f"group size {self.group_size} is invalid; use a positive multiple of 8 "
                "(32, 64 or 128 for vLLM Marlin) or -1 for one scale per output channel"
            )
        if self.observer not in ("minmax", "mse", "hessian", "grid"):
            raise EcoquantError(f"unknown observer {self.observer!r}; use 'minmax', 'mse', 'hessian' or 'grid'")
        if self.observer == "grid" and not self.symmetric:
            raise EcoquantError(
                "the grid observer recovers symmetric grids (w = step * q, as q4_0 stores them); drop --asymmetric"
            )
        if not 0.0 <= self.mse_maxshrink < 1.0 or self.mse_grid < 1:
            raise EcoquantError("MSE observer needs mse_grid >= 1 and 0 <= mse_maxshrink < 1")

    @property
    def qmin(self) -> int:
        """Smallest integer code. compressed-tensors uses the signed range for both modes."""
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.num_bits - 1) - 1

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for the scale layout."""
        return "channel" if self.group_size is None else "group"

    def groups_for(self, in_features: int) -> int:
        """Number of scale columns for a layer with ``in_features`` inputs."""
        return 1 if self.group_size is None else in_features // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for the provenance recipe."""
        return asdict(self)

    def to_quantization_args(self) -> Any:
        """compressed-tensors' ``QuantizationArgs`` for these weights."""
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.num_bits,
            type="int",
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
            # compressed-tensors has no grid or hessian observer and does not use the name when loading.
            observer="mse" if self.observer in ("mse", "hessian") else "minmax",
            dynamic=False,
        )
