"""Round-to-nearest (RTN): the data-free baseline every other method must beat.

``W -> (q, scale)`` with scales from the scheme's observer (min-max, the MSE
clipping search, or that search weighted by calibration inputs) and plain rounding. With the min-max observer this is
exactly what llmcompressor's ``QuantizationModifier(scheme="W4A16")`` writes.
"""

from __future__ import annotations

import torch

from ecoquant.quantize.primitives import QuantizedWeight, choose_qparams, grid_qparams, quantize
from ecoquant.quantize.scheme import QuantScheme


def rtn_quantize(w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one ``[out, in]`` weight by rounding to the nearest code.

    ``importance`` (``diag(H)`` of the layer's inputs) feeds the ``hessian``
    observer; RTN with it is still round-to-nearest, only its scales are chosen
    by output error instead of weight error.
    """
    scale, zp = choose_qparams(w, scheme, importance)
    return QuantizedWeight(q=quantize(w, scale, zp, scheme), scale=scale, zero_point=zp)


def rtn_quantize_counting_grid(w: torch.Tensor, scheme: QuantScheme) -> tuple[QuantizedWeight, int, int]:
    """RTN with the grid observer, plus ``(exact_groups, total_groups)`` from the same detection.

    The same result as :func:`rtn_quantize` with ``observer="grid"`` (whose
    :func:`~ecoquant.quantize.primitives.choose_qparams` calls the same
    :func:`~ecoquant.quantize.primitives.grid_qparams`); the detection is the
    observer's costly part (seconds per E4B-sized weight), so the recipe's
    count comes from it rather than from a second pass.
    """
    if scheme.observer != "grid":
        raise ValueError(f"the grid count needs observer='grid', not {scheme.observer!r}")
    scale, zp, exact = grid_qparams(w, scheme)
    return QuantizedWeight(q=quantize(w, scale, zp, scheme), scale=scale, zero_point=zp), int(exact.sum()), exact.numel()
