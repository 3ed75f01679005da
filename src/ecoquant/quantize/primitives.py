"""The primitives every algorithm shares: choose scales, quantize, dequantize.

RTN, GPTQ and AWQ all end in the same three steps, so they live here once:

* :func:`minmax_qparams` / :func:`mse_qparams` choose a scale (and zero point)
  per group of ``group_size`` input channels;
* :func:`quantize` maps weights to integer codes;
* :func:`dequantize` maps codes back.

Layouts follow compressed-tensors: a weight ``W`` is ``[out, in]``; scales and
zero points are ``[out, in // group_size]`` (``[out, 1]`` per channel).

Arithmetic is done in the dtype of the tensors passed in, on purpose: for a
bf16 weight, compressed-tensors (and therefore llmcompressor) computes the
scale as ``absmax / 7.5`` in bf16 and divides in bf16, and ecoquant's min-max
RTN must give the very same integers. Callers that want float32 precision
(GPTQ) pass float32 tensors.

Worked example (int4 symmetric, one group ``[0.3, -1.5, 0.75]``): the absolute
max is 1.5, the scale is ``1.5 / 7.5 = 0.2`` (half the 15-step signed range),
codes are ``round([1.5, -7.5, 3.75]) = [2, -8, 4]`` (round-half-to-even), and
dequantized weights are ``[0.4, -1.6, 0.8]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.scheme import MARLIN_GROUP_SIZES, QuantScheme


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and their scales for one Linear weight.

    Attributes:
        q: int8 codes in ``[qmin, qmax]``, shape ``[out, in]``.
        scale: ``[out, groups]`` in the weight's dtype.
        zero_point: int8 ``[out, groups]``, or ``None`` when symmetric.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def dequantize(self, scheme: QuantScheme, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight these codes stand for."""
        w = dequantize(self.q, self.scale, self.zero_point, scheme)
        return w if dtype is None else w.to(dtype)


def check_group_size(name: str, in_features: int, scheme: QuantScheme) -> None:
    """Refuse a group size that does not divide a layer's input size, naming what would."""
    gs = scheme.group_size
    if gs is None or in_features % gs == 0:
        return
    valid = [g for g in MARLIN_GROUP_SIZES if g is None or in_features % g == 0]
    shown = ", ".join("-1 (per channel)" if g is None else str(g) for g in valid)
    raise EcoquantError(
        f"group size {gs} does not divide the input size {in_features} of {name}; "
        f"choose one of: {shown}, or add {name} to --ignore"
    )


def _grouped(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, groups, group_size]``."""
    out_f, in_f = w.shape
    gs = in_f if scheme.group_size is None else scheme.group_size
    if in_f % gs:
        raise EcoquantError(f"group size {gs} does not divide input size {in_f}")
    return w.reshape(out_f, in_f // gs, gs)


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point that map ``[wmin, wmax]`` onto the integer range.

    Zero is always kept representable (the range is widened to include it);
    a zero scale (an all-zero group) becomes the dtype's epsilon so that
    quantizing never divides by zero. Same rules as compressed-tensors.
    """
    zero = torch.zeros((), dtype=wmin.dtype, device=wmin.device)
    wmin = torch.minimum(wmin, zero)
    wmax = torch.maximum(wmax, zero)
    steps = torch.tensor(float(scheme.qmax - scheme.qmin), dtype=wmin.dtype, device=wmin.device)
    if scheme.symmetric:
        scale = torch.maximum(wmin.abs(), wmax) / (steps / 2)
        zp = None
    else:
        scale = (wmax - wmin) / steps
    eps = torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype, device=scale.device)
    scale = torch.where(scale == 0, eps, scale)
    if not scheme.symmetric:
        zp = torch.clamp(scheme.qmin - wmin / scale, scheme.qmin, scheme.qmax).round().to(torch.int8)
    return scale, zp


def minmax_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales from each group's min and max: what llmcompressor's W4A16 preset computes."""
    g = _grouped(w, scheme)
    return qparams_from_range(g.amin(dim=-1), g.amax(dim=-1), scheme)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes (int8) for ``w``: ``clamp(round(w / scale) + zp)``."""
    g = _grouped(w, scheme)
    x = g / scale.unsqueeze(-1)
    if zero_point is not None:
        x = x + zero_point.unsqueeze(-1).to(x.dtype)
    return torch.clamp(x, scheme.qmin, scheme.qmax).round().to(torch.int8).reshape(w.shape)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Weights (in the scale's dtype) that the codes stand for: ``(q - zp) * scale``."""
    g = _grouped(q, scheme).to(scale.dtype)
    if zero_point is not None:
        g = g - zero_point.unsqueeze(-1).to(scale.dtype)
    return (g * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Quantize then dequantize: the weight the quantized model will compute with."""
    return dequantize(quantize(w, scale, zero_point, scheme), scale, zero_point, scheme)


def mse_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group clipping search: try shrinking each group's range, keep the best.

    Min-max scales waste most of the 16 levels on a single outlier; clipping
    the range to ``p * [min, max]`` for ``p`` from 1 down to ``1 - maxshrink``
    trades a large error on that one weight for a finer grid on all others.
    Each group keeps the ``p`` with the lowest ``sum |w - fq(w)| ** norm``
    (ties keep the larger ``p``, so ``p = 1`` wins when nothing helps and the
    result is never worse than min-max). Candidate scales are computed in
    ``w``'s dtype (what will be stored); the search itself runs in float32,
    which is exact for the error and several times faster than bf16 on CPUs.
    """
    g = _grouped(w, scheme)
    gmin, gmax = g.amin(dim=-1), g.amax(dim=-1)
    g32 = g.float()
    best_err = torch.full(gmin.shape, float("inf"), device=w.device)
    best_scale, best_zp = qparams_from_range(gmin, gmax, scheme)
    for i in range(scheme.mse_grid):
        p = 1.0 - scheme.mse_maxshrink * i / scheme.mse_grid
        scale, zp = qparams_from_range(gmin * p, gmax * p, scheme)
        s32 = scale.float().unsqueeze(-1)
        x = g32 / s32
        if zp is not None:
            zp32 = zp.float().unsqueeze(-1)
            x.add_(zp32).round_().clamp_(scheme.qmin, scheme.qmax).sub_(zp32)
        else:
            x.round_().clamp_(scheme.qmin, scheme.qmax)
        x.mul_(s32).sub_(g32)
        err = (x.square_() if scheme.mse_norm == 2.0 else x.abs_().pow_(scheme.mse_norm)).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None and best_zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def choose_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales by the scheme's observer."""
    return mse_qparams(w, scheme) if scheme.observer == "mse" else minmax_qparams(w, scheme)
