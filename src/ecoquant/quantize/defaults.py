"""What each method gets when it is not told: its observer, GPTQ's scale passes and dampening.

Shared by ``ecoquant quantize`` and ``ecoquant optimize``'s candidates, so a
candidate written as ``method: gptq`` is the checkpoint ``ecoquant quantize
--method gptq`` writes. No torch here: the CLI and the grid read it at import.
"""

from __future__ import annotations

from ecoquant.quantize.scheme import QuantScheme

#: Every ``--method``, in the order ``--help`` names them.
METHODS: tuple[str, ...] = ("rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq")

#: SmoothQuant eases 8-bit activation quantization, so these need a W8A8 INT8 scheme (for
#: W4A16, AWQ is the weight-only counterpart; FP8 weights are data-free).
SMOOTHQUANT_METHODS: tuple[str, ...] = ("smoothquant", "smoothquant-gptq")

#: Methods that fold scales by the family's smoothing mappings (and so need them).
SMOOTHING_METHODS: tuple[str, ...] = ("awq", "awq-gptq", *SMOOTHQUANT_METHODS)

#: Methods that end in GPTQ: ``ecoquant quantize`` gives them the hessian observer and two scale
#: passes unless told otherwise. Chosen by the out-of-domain figure (bench/RESULTS.md, issue 14:
#: on Gemma-3 270M, KL to bf16 on SQLite's documentation 0.352 -> 0.261 for GPTQ, 0.258 -> 0.217
#: for AWQ + GPTQ, against min-max scales, with in-domain KL within 2% of min-max's).
GPTQ_METHODS = ("gptq", "awq-gptq", "smoothquant-gptq")


def methods_text() -> str:
    """``rtn, gptq, ... or smoothquant-gptq``: for error lines."""
    return ", ".join(METHODS[:-1]) + " or " + METHODS[-1]


def method_scheme_problem(method: str, scheme: QuantScheme, *, flags: bool) -> str | None:
    """Why ``method`` cannot make ``scheme``, in one line, or None when it can.

    One rule set for ``ecoquant quantize`` and optimize's candidates; ``flags`` spells the options
    as the CLI does (``--method``) rather than as grid keys (``method``).
    """
    m, s = ("--method", "--scheme") if flags else ("method", "scheme")
    if scheme.observer == "grid" and method != "rtn":
        return (f"the grid observer keeps weights already on an int4 grid and works with {m} rtn only, "
                f"not {method} (which would move them off it)")
    if scheme.type == "float" and method != "rtn":
        return f"FP8 weights are data-free; use {m} rtn, not {method} (min-max scales, a cast per weight)"
    if method in SMOOTHQUANT_METHODS and not (scheme.act_bits == 8 and scheme.type == "int"):
        return (f"{method} smooths 8-bit activations; use it with {s} w8a8-int8 "
                f"(for {scheme.label}, awq is the weight-only counterpart)")
    return None


def default_observer(method: str) -> str:
    """The observer ``ecoquant quantize`` uses when none is given: hessian for GPTQ methods, else minmax.

    RTN keeps min-max because it is data-free by default (the hessian observer
    calibrates); AWQ keeps it because its own scale and clip searches already
    weigh by activations, and the hessian observer on top raised its KL
    (0.206 -> 0.256 in domain, level out of domain).
    """
    return "hessian" if method in GPTQ_METHODS else "minmax"


def default_scale_passes(method: str, act_order: bool) -> int:
    """Two scale passes for GPTQ methods with act-order's static groups (the second pass took GPTQ with
    the hessian observer from KL 0.150 to 0.125 in domain); one otherwise."""
    return 2 if method in GPTQ_METHODS and act_order else 1


def default_dampening(method: str) -> float:
    """GPTQ's dampening (a fraction of the mean Hessian diagonal added to it) when none is given.

    0.1, not the reference's 0.01: more dampening pulls GPTQ's error feedback
    towards plain rounding, so it fits the calibration text less. On Gemma-3
    270M with 128 x 512 calibration windows (bench/RESULTS.md, issue 14), KL
    to bf16 out of domain / in domain: GPTQ 0.260 / 0.129 -> 0.215 / 0.136,
    AWQ + GPTQ 0.221 / 0.135 -> 0.198 / 0.134; with 32 windows GPTQ also
    improved on both texts. 0.2 was 2% better still for GPTQ (0.210 / 0.132)
    but is measured for GPTQ only and at one size, so 0.1 it is.
    """
    return 0.1 if method in GPTQ_METHODS else 0.01
