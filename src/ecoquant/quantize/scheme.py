"""The quantization scheme: what every algorithm in ecoquant produces.

One frozen dataclass describes the weights (int-N group-wise, W4A16 by
default, or 8-bit int / FP8 E4M3 per output channel) and, for W8A8, the
activations (quantized dynamically per token at run time, so no calibration
is needed for them). It maps one-to-one onto compressed-tensors'
``QuantizationScheme`` so that what ecoquant writes is exactly what vLLM's
loaders read: ``CompressedTensorsWNA16`` (Marlin) for W4A16,
``CompressedTensorsW8A8Fp8`` / ``CompressedTensorsW8A8Int8`` for W8A8.

Why W8A8 at all: W4A16 halves the bytes read per decoded token, but at
prefill the matmuls are compute-bound and W4A16 kernels run at bf16 speed.
8-bit activations let prefill (prompt tokens, image soft tokens, the vision
encoder) run on the 8-bit tensor cores, at twice the bf16 rate on an L4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ecoquant.errors import EcoquantError

Observer = Literal["minmax", "mse", "hessian", "grid"]
WeightType = Literal["int", "float"]

#: Largest finite FP8 E4M3 value (``torch.finfo(torch.float8_e4m3fn).max``): the float scheme's code range is +-448.
FP8_E4M3_MAX = 448.0

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
        type: ``int`` codes or ``float`` (FP8 E4M3, 8 bits only: the weight is
            cast to the nearest FP8 number after scaling, so there is no
            rounding grid to search and the observer is min-max).
        act_bits: None keeps activations in 16 bits (weight-only, W4A16);
            8 quantizes each Linear's input dynamically per token, in the
            weights' type, at run time (W8A8). Per-channel symmetric 8-bit
            weights only: that is what vLLM's W8A8 kernels take.
    """

    num_bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    observer: Observer = "minmax"
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.0
    type: WeightType = "int"
    act_bits: int | None = None

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
        if self.type not in ("int", "float"):
            raise EcoquantError(f"unknown weight type {self.type!r}; use 'int' or 'float' (FP8)")
        if self.type == "float" and (self.num_bits != 8 or self.group_size is not None or not self.symmetric):
            raise EcoquantError("float weights are FP8 E4M3: 8 bits, symmetric, one scale per output channel")
        if self.type == "float" and self.observer != "minmax":
            raise EcoquantError(f"FP8 weights take min-max scales (a cast has no grid to search), not the {self.observer} observer")
        if self.act_bits not in (None, 8):
            raise EcoquantError(f"act_bits={self.act_bits} is not supported; use None (16-bit activations) or 8 (W8A8)")
        if self.act_bits is not None and (self.num_bits != 8 or self.group_size is not None or not self.symmetric):
            raise EcoquantError(
                "W8A8 takes 8-bit symmetric weights with one scale per output channel "
                "(what vLLM's W8A8 kernels run); drop --group-size and --asymmetric"
            )

    @property
    def qmin(self) -> int | float:
        """Smallest code. compressed-tensors uses the signed range for both modes; FP8's is -448."""
        return -FP8_E4M3_MAX if self.type == "float" else -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int | float:
        """Largest code (448 for FP8 E4M3)."""
        return FP8_E4M3_MAX if self.type == "float" else 2 ** (self.num_bits - 1) - 1

    @property
    def code_dtype(self) -> Any:
        """The torch dtype codes are held (and, for W8A8, stored) in: int8, or float8_e4m3fn."""
        import torch

        return torch.float8_e4m3fn if self.type == "float" else torch.int8

    @property
    def format(self) -> str:
        """compressed-tensors' format for the weights: packed int32 words for weight-only schemes (what
        Marlin reads); one int8 / FP8 byte per weight for W8A8 (what vLLM's W8A8 loaders read)."""
        if self.act_bits is None:
            return "pack-quantized"
        return "float-quantized" if self.type == "float" else "int-quantized"

    @property
    def preset(self) -> str | None:
        """The compressed-tensors preset this scheme is, for W8A8 (its activation arguments come from it)."""
        if self.act_bits is None:
            return None
        return "FP8_DYNAMIC" if self.type == "float" else "W8A8"

    @property
    def label(self) -> str:
        """``W4A16``, ``W8A8-INT8``, ``W8A8-FP8``: for progress lines and model cards."""
        base = f"W{self.num_bits}A{self.act_bits or 16}"
        return base if self.act_bits is None else f"{base}-{'FP8' if self.type == 'float' else 'INT8'}"

    @property
    def strategy(self) -> str:
        """compressed-tensors' name for the scale layout."""
        return "channel" if self.group_size is None else "group"

    def groups_for(self, in_features: int) -> int:
        """Number of scale columns for a layer with ``in_features`` inputs."""
        return 1 if self.group_size is None else in_features // self.group_size

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, for the provenance recipe.

        ``type`` and ``act_bits`` appear only when they differ from int weights with 16-bit
        activations, so a W4A16 record (and the optimizer's reuse key built from it) is the same
        as before these fields existed; ``QuantScheme(**d)`` reads either form.
        """
        d = asdict(self)
        if d["type"] == "int":
            del d["type"]
        if d["act_bits"] is None:
            del d["act_bits"]
        return d

    def to_quantization_args(self) -> Any:
        """compressed-tensors' ``QuantizationArgs`` for these weights."""
        from compressed_tensors.quantization import QuantizationArgs

        return QuantizationArgs(
            num_bits=self.num_bits,
            type=self.type,
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
            # compressed-tensors has no grid or hessian observer and does not use the name when loading.
            observer="mse" if self.observer in ("mse", "hessian") else "minmax",
            dynamic=False,
        )

    def to_quantization_scheme(self, targets: list[str]) -> Any:
        """compressed-tensors' ``QuantizationScheme`` (one config group) for these weights and activations.

        W8A8's input activations are taken from compressed-tensors' own preset (``FP8_DYNAMIC``,
        ``W8A8``: dynamic, per token, symmetric), so they are exactly what llmcompressor writes.
        """
        from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

        activations = None if self.preset is None else preset_name_to_scheme(self.preset, targets).input_activations
        return QuantizationScheme(
            targets=targets, weights=self.to_quantization_args(), input_activations=activations, format=self.format
        )


#: The schemes ``--scheme`` (and ``--vision-scheme`` / ``--audio-scheme``) name, each beside the
#: compressed-tensors preset and the vLLM loader it corresponds to.
SCHEMES: dict[str, QuantScheme] = {
    # "W4A16": int4 weights, groups of 128, bf16 activations; vLLM CompressedTensorsWNA16 (Marlin). The default.
    "w4a16": QuantScheme(),
    # "FP8_DYNAMIC": FP8 E4M3 weights per output channel, FP8 activations per token at run time;
    # vLLM CompressedTensorsW8A8Fp8 (FP8 tensor cores on Ada/Hopper, sm89+). Data-free.
    "w8a8-fp8": QuantScheme(num_bits=8, group_size=None, type="float", act_bits=8),
    # "W8A8": int8 weights per output channel, int8 activations per token at run time;
    # vLLM CompressedTensorsW8A8Int8 (Turing and later; x86 CPUs in the CPU build).
    "w8a8-int8": QuantScheme(num_bits=8, group_size=None, act_bits=8),
}


def named_scheme(name: str) -> QuantScheme:
    """The scheme ``name`` stands for (:data:`SCHEMES`), or one line naming the choices."""
    if name not in SCHEMES:
        raise EcoquantError(f"unknown scheme {name!r}; use one of: {', '.join(SCHEMES)}")
    return SCHEMES[name]
