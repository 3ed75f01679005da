"""The primitives every algorithm shares: choose scales, quantize, dequantize.

RTN, GPTQ and AWQ all end in the same three steps, so they live here once:

* :func:`minmax_qparams` / :func:`mse_qparams` (plain, or weighted by each
  input channel's calibration energy: the ``hessian`` observer) /
  :func:`grid_qparams` choose a scale (and zero point) per group of
  ``group_size`` input channels;
* :func:`quantize` maps weights to integer codes;
* :func:`dequantize` maps codes back.

Layouts follow compressed-tensors: a weight ``W`` is ``[out, in]``; scales and
zero points are ``[out, in // group_size]`` (``[out, 1]`` per channel).

Arithmetic is done in the dtype of the tensors passed in, on purpose: for a
bf16 weight, compressed-tensors (and therefore llmcompressor) computes the
scale as ``absmax / 7.5`` in bf16 and divides in bf16, and ecoquant's min-max
RTN must give the very same integers. Callers that want float32 precision
(GPTQ) pass float32 tensors.

FP8 (``type="float"``) takes the same path with a code range of +-448 and a
cast instead of ``round``: the scale is ``absmax / 448`` per output channel,
as compressed-tensors computes it for llmcompressor's ``FP8_DYNAMIC``.

Worked example (int4 symmetric, one group ``[0.3, -1.5, 0.75]``): the absolute
max is 1.5, the scale is ``1.5 / 7.5 = 0.2`` (half the 15-step signed range),
codes are ``round([1.5, -7.5, 3.75]) = [2, -8, 4]`` (round-half-to-even), and
dequantized weights are ``[0.4, -1.6, 0.8]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.scheme import MARLIN_GROUP_SIZES, QuantScheme


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and their scales for one Linear weight.

    Attributes:
        q: codes in ``[qmin, qmax]``, shape ``[out, in]``: int8, or float8_e4m3fn for FP8 weights.
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
    """Codes for ``w``: int8 ``clamp(round(w / scale) + zp)``, or for FP8 the cast of ``clamp(w / scale + 0)``
    to float8_e4m3fn (round to the nearest FP8 number, ties to even: the rounding is the cast's).

    Byte for byte what compressed-tensors writes, signed zeros included.
    """
    g = _grouped(w, scheme)
    x = g / scale.unsqueeze(-1)
    # compressed-tensors adds a zero point also for symmetric schemes (a zero
    # tensor), and -0.0 + 0.0 is +0.0 in IEEE arithmetic: a weight stored as -0.0
    # becomes the FP8 code 0x00, not 0x80. Adding +0 here writes the same bytes
    # (a tiny negative weight still rounds to -0, 0x80, in both).
    zp = torch.zeros((), dtype=x.dtype, device=x.device) if zero_point is None else zero_point.unsqueeze(-1).to(x.dtype)
    x = x + zp
    x = torch.clamp(x, scheme.qmin, scheme.qmax)
    if scheme.type == "float":
        return x.to(torch.float8_e4m3fn).reshape(w.shape)
    return x.round().to(torch.int8).reshape(w.shape)


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


def mse_qparams(
    w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group clipping search: try shrinking each group's range, keep the best.

    Min-max scales waste most of the 16 levels on a single outlier; clipping
    the range to ``p * [min, max]`` for ``p`` from 1 down to ``1 - maxshrink``
    trades a large error on that one weight for a finer grid on all others.
    Each group keeps the ``p`` with the lowest ``sum_j a_j |w_j - fq(w_j)| ** norm``
    (ties keep the larger ``p``, so ``p = 1`` wins when nothing helps and the
    result is never worse than min-max). Candidate scales are computed in
    ``w``'s dtype (what will be stored); the search itself runs in float32,
    which is exact for the error and several times faster than bf16 on CPUs.

    ``importance`` (``[in]``, one non-negative weight ``a_j`` per input
    channel; all ones when None) is what makes the search activation-aware:
    with ``a = diag(H)``, the mean squared input of each channel on
    calibration data, the sum is the layer's output error ``E||x (w - fq(w))||^2``
    without the cross terms between channels. Plain weight MSE treats an
    outlier weight on a silent input like one on a loud input; clipping the
    latter is what made the unweighted search *raise* perplexity on Gemma-3
    270M (bench/RESULTS.md). The full quadratic form within a group would add
    the cross terms at ``group_size`` times the cost; the diagonal keeps the
    search as cheap as the unweighted one.

    Rows are searched in slices of about ``_SEARCH_CHUNK`` weights, which is
    the same result (rows are independent) and several times faster: each
    candidate then makes its passes over a slice that stays in cache
    (``bench/solve_kernels.py`` on 2 cores: 5.1 s -> 1.0 s for E4B's
    ``[2560, 10240]``, 0.13 s -> 0.05 s for Gemma-3's ``[640, 2048]``).
    """
    if importance is not None and importance.shape != (w.shape[1],):
        raise EcoquantError(f"importance has shape {tuple(importance.shape)}, expected ({w.shape[1]},)")
    rows = max(1, _SEARCH_CHUNK // max(1, w.shape[1]))
    if w.shape[0] <= rows:
        return _mse_search(w, scheme, importance)
    parts = [_mse_search(w[i : i + rows], scheme, importance) for i in range(0, w.shape[0], rows)]
    scale = torch.cat([s for s, _ in parts])
    zps = [z for _, z in parts]
    return scale, None if zps[0] is None else torch.cat([z for z in zps if z is not None])


#: Weights per slice of :func:`mse_qparams`'s search (4 MB in float32: a slice and its temporaries stay in cache).
_SEARCH_CHUNK = 1 << 20


def _mse_search(
    w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`mse_qparams` on a slice of rows."""
    g = _grouped(w, scheme)
    gmin, gmax = g.amin(dim=-1), g.amax(dim=-1)
    g32 = g.float()
    weight = None
    if importance is not None:
        weight = importance.to(device=w.device, dtype=torch.float32).reshape(1, *g.shape[1:])
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
        x = x.square_() if scheme.mse_norm == 2.0 else x.abs_().pow_(scheme.mse_norm)
        if weight is not None:
            x.mul_(weight)
        err = x.sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None and best_zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def grid_tolerance(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far (in steps) a stored weight may sit from its integer code and still be on the grid.

    A weight stored in ``dtype`` is ``step * c`` rounded once (relative error at
    most ``u``, the dtype's unit roundoff); the candidate step is the group's
    stored max over an integer, rounded once too. Their ratio is therefore off
    by up to ``2u|c|`` steps; one more ``u`` keeps the bound's edge from being
    decided by float32 arithmetic. For bf16 (``u = 2**-8``) a code of -8 may be
    off by 0.066 steps and a zero must be (nearly) zero: a weight of a group on
    no grid lands that close to an integer with probability ``2 (2|c| + 1) u``,
    under 1/7 even for the largest code, so a group of 32 on no grid passes
    with probability below ``7 ** -31`` (none of the trained tiny VLM's
    116,736 groups does).
    """
    u = torch.finfo(dtype).eps / 2
    return codes.abs().mul_(2 * u).add_(u)


def grid_qparams(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, None, torch.Tensor]:
    """Each group's own step when its weights already sit on a symmetric integer grid; min-max elsewhere.

    Why: a QAT ``q4_0`` checkpoint (Google's ``-qat-q4_0-unquantized``) stores
    bf16 weights ``w = d * q`` with integer ``q`` in ``[-8, 7]`` and one step
    ``d`` per 32 inputs. Min-max scales them by ``max|w| / 7.5``, which is never
    ``d`` (for a group whose largest code is -8 it is ``8d / 7.5``), so every
    weight is rounded again onto a different grid and a few percent of error is
    added to weights that had none. With the group's own step the int4
    checkpoint holds exactly the trained codes.

    How, per group (search, then result):

    1. If the grid's largest code in magnitude is ``k``, its step is
       ``max|w| / k``, so the candidates are ``max|w| / k`` for
       ``k = 1 .. |qmin|``. A candidate fits when every weight is within
       :func:`grid_tolerance` of an integer code and the codes lie in
       ``[qmin, qmax]`` for the step or for its negative. The sign matters
       because the range is lopsided: ``q4_0`` sets ``d = max / -8``, so a
       block whose largest weight is positive has codes ``[-7, 8]`` for
       ``|d|`` and needs the negative step (codes ``[-8, 7]``, exactly what
       llama.cpp stores); a positive step is used whenever it fits. The
       largest fitting step wins (a grid of step ``d`` whose codes are all
       even also fits ``2d``, and either reproduces the weights).
    2. The step is refined by least squares over the group's codes
       (``sum(c * w) / sum(c * c)``, which averages out the rounding of the one
       weight the candidate came from) and rounded to ``w``'s dtype, like
       every other scale; of that number and its two neighbours in the dtype,
       the one whose dequantized weights are closest to ``w`` is kept (ties
       keep the rounded one). So a step that is itself a bf16 number is
       found exactly and the weights come back bit for bit.

    Worked example (bf16, group ``[0.25, -0.5, 0.125]``): ``k = 1, 2, 3``
    leave non-integers, ``k = 4`` gives step 0.125 and codes ``[2, -4, 1]``:
    exact; min-max would have used ``0.5 / 7.5 = 0.0667`` and codes
    ``[4, -8, 2]`` that dequantize to ``[0.267, -0.533, 0.133]``.

    The search runs in float32 (float64 for float64 weights), as the MSE
    observer's does; the neighbour choice dequantizes in ``w``'s dtype, as the
    checkpoint will. All-zero groups keep min-max's epsilon scale and count as
    exact (their codes are zero). A negative scale is read as written:
    compressed-tensors dequantizes by ``q * scale`` (tested through
    transformers). Symmetric schemes only (:class:`QuantScheme` refuses the others).

    Returns:
        ``(scale, None, exact)``: scales ``[out, groups]`` in ``w``'s dtype
        (negative where the grid needs it), no zero point, and a bool
        ``[out, groups]`` mask of the groups found on a grid.
    """
    if not scheme.symmetric:
        raise EcoquantError("the grid observer recovers symmetric grids only; use a symmetric scheme")
    g = _grouped(w, scheme)
    g32 = g.to(torch.promote_types(w.dtype, torch.float32))
    amax = g32.abs().amax(dim=-1)
    minmax_scale, _ = minmax_qparams(w, scheme)
    zero = amax == 0
    found = zero.clone()
    step = torch.zeros_like(amax)
    for k in range(1, -scheme.qmin + 1):  # largest step first
        if bool(found.all()):
            break
        x = g32 / (amax / k).unsqueeze(-1)
        c = x.round()
        off = (x - c).abs_().sub_(grid_tolerance(c, w.dtype)).amax(dim=-1)  # <= 0: every weight on the grid
        # |x| <= k <= |qmin|, so only code qmax + 1 (or its negative) can leave the range.
        fits_up = c.amax(dim=-1) <= scheme.qmax
        fits_down = c.amin(dim=-1) >= -scheme.qmax
        new = (off <= 0) & (fits_up | fits_down) & ~found
        if bool(new.any()):
            least_squares = (c * g32).sum(dim=-1) / c.square().sum(dim=-1)
            step = torch.where(new, torch.where(fits_up, least_squares, -least_squares), step)
            found |= new
    refine = found & ~zero
    scale = torch.where(refine, step.to(w.dtype), minmax_scale)
    if not bool(refine.any()):
        return scale, None, found

    def error(s: torch.Tensor) -> torch.Tensor:
        return (_grouped(fake_quantize(w, s, None, scheme), scheme).to(g32.dtype) - g32).square().sum(dim=-1)

    best = error(scale)
    for direction in (-math.inf, math.inf):
        neighbour = torch.where(refine, torch.nextafter(scale, torch.full_like(scale, direction)), scale)
        err = error(neighbour)
        better = err < best
        scale, best = torch.where(better, neighbour, scale), torch.where(better, err, best)
    return scale, None, found


def grid_group_counts(w: torch.Tensor, scheme: QuantScheme) -> tuple[int, int]:
    """``(exact_groups, total_groups)`` of one weight under the grid observer, for the recipe."""
    exact = grid_qparams(w, scheme)[2]
    return int(exact.sum()), exact.numel()


def choose_qparams(
    w: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales by the scheme's observer.

    ``importance`` (``[in]``: each input channel's mean squared activation,
    ``diag(H)``) is read by the ``hessian`` observer only, which cannot run
    without it; the other observers are data-free and ignore it.
    """
    if scheme.observer == "hessian":
        if importance is None:
            raise EcoquantError(
                "the hessian observer weighs weights by their inputs and needs calibration data; "
                "use --method gptq or awq, or --method rtn with --calib"
            )
        return mse_qparams(w, scheme, importance)
    if scheme.observer == "mse":
        return mse_qparams(w, scheme)
    if scheme.observer == "grid":
        scale, zp, _ = grid_qparams(w, scheme)
        return scale, zp
    return minmax_qparams(w, scheme)


def fake_quantize_tokens(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Dynamic per-token activation quantization, then dequantization: what a W8A8 Linear's input becomes.

    Each row of ``x`` (one token's features, the last dimension) gets its own
    scale, ``absmax / 127.5`` for int8 or ``absmax / 448`` for FP8 (the
    weights' min-max rule, with a token as the channel), computed at run time
    from that token alone: nothing is calibrated. This is compressed-tensors'
    fake quantization for ``strategy: token, dynamic: true``, so it is what
    transformers computes when it loads a W8A8 checkpoint. (vLLM's int8
    kernels divide by 127 instead of 127.5, a difference of under 0.4% of one
    step.)
    """
    rows = x.reshape(-1, x.shape[-1])
    token = replace(scheme, group_size=None, observer="minmax")
    scale, zp = minmax_qparams(rows, token)
    return fake_quantize(rows, scale, zp, token).reshape(x.shape)
