"""Round-to-nearest (RTN): the data-free baseline every other method must beat.

``W -> (q, scale)`` with scales from the scheme's observer (min-max or the MSE
clipping search) and plain rounding. With the min-max observer this is
exactly what llmcompressor's ``QuantizationModifier(scheme="W4A16")`` writes.
"""

from __future__ import annotations

import torch

from ecoquant.quantize.primitives import QuantizedWeight, choose_qparams, quantize
from ecoquant.quantize.scheme import QuantScheme


def rtn_quantize(w: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize one ``[out, in]`` weight by rounding to the nearest code."""
    scale, zp = choose_qparams(w, scheme)
    return QuantizedWeight(q=quantize(w, scale, zp, scheme), scale=scale, zero_point=zp)
