"""AWQ: scale the input channels that matter before rounding, then undo the scale for free.

A few input channels of an LLM layer carry activations tens of times larger
than the rest, so the weights that multiply them dominate the output error.
AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization") multiplies
those weight columns by ``s > 1`` before quantizing (their relative rounding
error shrinks by about ``s``) and divides the activations by ``s``. The
division is folded into whatever produced the activations (a norm's weight or
the previous Linear's output rows), so the exported model is still a plain
checkpoint of the same architecture: ``x W^T = (x / s) (W diag(s))^T``.

Worked example: input channels with mean ``|x| = [50, 1]`` and one row
``w = [0.02, 0.9]`` in one int4 group. Min-max gives the scale ``0.9 / 7.5 = 0.12``,
and ``0.02`` rounds to 0: the output loses ``50 * 0.02 = 1.0``. With
``s = [4, 1]`` (then normalised) the first weight becomes ``0.08``, which
rounds to ``0.12``, i.e. ``0.03`` once divided back by 4: the loss is now
``50 * 0.01 = 0.5``, while the second weight's error is unchanged. (Scaling
all of ``s`` by one constant changes nothing, which is why the search may
normalise ``s`` to sit around 1.)

The steps are kept apart so the result can be inspected, cached and written
to the recipe before anything is changed:

1. :func:`search_scales` picks ``s`` on calibration activations and returns an
   :class:`AWQScaleResult` (scales, chosen ratio, RTN and best errors).
2. Folding: :func:`fold_scales_into_norm` / :func:`fold_scales_into_linear`
   on the smooth side and :func:`scale_balance_weight` on each balance layer
   (with the scales the stored norm realises, which rounding may move).
3. :func:`search_clip` then picks per-group clipping on the scaled weights and
   :func:`apply_clip` applies it; ordinary quantization (RTN or GPTQ) follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import check_group_size, choose_qparams, fake_quantize
from ecoquant.quantize.scheme import ACTIVATION_AWARE, QuantScheme

#: What a norm multiplies its normalised input by, as ``offset + weight``.
#: Folding ``1/s`` into the norm must respect the convention of its class.
NORM_WEIGHT_OFFSET: dict[str, float] = {
    # Gemma 1/2/3 store ``w`` and compute ``x_norm * (1 + w)`` (weights initialised to zero).
    "GemmaRMSNorm": 1.0,
    "Gemma2RMSNorm": 1.0,
    "Gemma3RMSNorm": 1.0,
    # Gemma-3n and Gemma-4 went back to a plain ``x_norm * w`` (weights initialised to one).
    # Their scale-free instances (``with_scale=False``, e.g. Gemma-4's ``v_norm``) have
    # no weight at all and cannot absorb a scale: never use them as a smooth layer.
    "Gemma3nRMSNorm": 0.0,
    "Gemma4RMSNorm": 0.0,
    # Llama-style norms multiply by ``w`` directly.
    "LlamaRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    # The vision-language families' text stacks (transformers 5.23: each returns ``self.weight * x``).
    "Qwen2_5_VLRMSNorm": 0.0,
    "Qwen3VLTextRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
}

#: Scales are floored here before normalising, as the AWQ reference does, so
#: a channel that calibration never excited is not scaled down to nothing.
_MIN_SCALE = 1e-4


@dataclass(frozen=True)
class AWQConfig:
    """How the AWQ searches run (the quantization format itself is the :class:`QuantScheme`).

    Attributes:
        grid: ratios ``a`` tried, ``0, 1/grid, ..., (grid-1)/grid``.
        duo_scaling: ``s = mean|x|^a / mean|w|^(1-a)`` (AutoAWQ's default; it
            also shrinks channels whose weights are already large) instead of
            ``s = mean|x|^a`` (the paper).
        clip_search: whether the caller should run :func:`search_clip` (the
            search functions themselves do not read it).
        clip_grid: clipping ratios are ``1 - k / clip_grid``.
        clip_maxshrink: the smallest ratio tried is about ``1 - clip_maxshrink``.
        clip_tokens: at most this many tokens (evenly spaced) feed the clip search.
    """

    grid: int = 20
    duo_scaling: bool = True
    clip_search: bool = True
    clip_grid: int = 20
    clip_maxshrink: float = 0.5
    clip_tokens: int = 512

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1:
            raise EcoquantError(f"AWQ grid={self.grid} / clip_grid={self.clip_grid} must be positive, e.g. 20")
        if not 0.0 <= self.clip_maxshrink < 1.0:
            raise EcoquantError(f"AWQ clip_maxshrink={self.clip_maxshrink} must be in [0, 1), e.g. 0.5")
        if self.clip_tokens < 1:
            raise EcoquantError(f"AWQ clip_tokens={self.clip_tokens} must be positive, e.g. 512")


@dataclass(frozen=True)
class AWQScaleResult:
    """What :func:`search_scales` found for one smooth layer.

    Attributes:
        scales: ``[in]`` float32; multiply the balance weights' input columns
            by it and divide the smooth layer's output by it.
        ratio: the chosen ``a``, or ``None`` when identity scales (plain RTN)
            beat every grid point; ``scales`` is then all ones.
        rtn_error: output error with identity scales, i.e. plain RTN. With
            ``duo_scaling=False`` this equals ``errors[0]`` (``a = 0`` gives
            ``s = 1``); with duo scaling ``a = 0`` means ``s = 1 / mean|w|``.
        best_error: output error of the chosen scales (``<= rtn_error``).
        ratios: the grid that was tried.
        errors: the output error at each ratio of the grid.

    Errors are mean squared errors per output element.
    """

    scales: torch.Tensor
    ratio: float | None
    rtn_error: float
    best_error: float
    ratios: tuple[float, ...]
    errors: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        """Plain-JSON form (no tensors), for the recipe and logs."""
        return {
            "ratio": self.ratio,
            "rtn_error": self.rtn_error,
            "best_error": self.best_error,
            "ratios": list(self.ratios),
            "errors": list(self.errors),
        }


def _weight_magnitude(weights: Sequence[torch.Tensor], scheme: QuantScheme) -> torch.Tensor:
    """Mean over output rows of ``|w|`` relative to its group's max, per input channel.

    Relative to the group max because that is what decides a weight's rounding
    error: a weight that sets its group's scale is represented well whatever its size.
    """
    rel = []
    for w in weights:
        out_f, in_f = w.shape
        gs = scheme.group_size or in_f
        g = w.float().abs().reshape(out_f, in_f // gs, gs)
        g = g / g.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        rel.append(g.reshape(out_f, in_f))
    return torch.cat(rel, dim=0).mean(dim=0)


def _scaled_fake_quant(
    w: torch.Tensor, s: torch.Tensor, scheme: QuantScheme, energy: torch.Tensor | None = None
) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` in float32: the weight the smoothed, quantized model computes with.

    ``W diag(s)`` is rounded to ``w``'s dtype first, as the exported checkpoint stores it.
    ``energy`` (mean square of the unscaled inputs) feeds the ``hessian`` observer;
    the scaled weight reads ``x / s``, whose energy is ``energy / s^2``.
    """
    ws = (w.float() * s).to(w.dtype)
    scale, zp = choose_qparams(ws, scheme, None if energy is None else energy / s.square())
    return fake_quantize(ws, scale, zp, scheme).float() / s


def _linear_error(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> Callable[[Sequence[torch.Tensor]], float]:
    """Mean of ``(x W^T - x Wc^T)^2`` over all balance layers' outputs, for candidate weights ``Wc``.

    With more tokens than input channels the error is computed as
    ``tr(D (x^T x) D^T)`` with ``D = W - Wc``: the Gram matrix is built once
    and each candidate costs ``out * in^2`` instead of ``tokens * in * out``.
    """
    tokens, in_f = x.shape
    total = tokens * sum(w.shape[0] for w in weights)
    w32 = [w.float() for w in weights]
    gram = x.t() @ x if tokens > in_f else None

    def error(cands: Sequence[torch.Tensor]) -> float:
        acc = torch.zeros((), dtype=torch.float64, device=x.device)
        for w, c in zip(w32, cands, strict=True):
            d = w - c
            sq = ((d @ gram) * d).sum() if gram is not None else (x @ d.t()).pow(2).sum()
            acc += sq.double()
        return float(acc) / total

    return error


def _module_error(
    weights: Sequence[torch.Tensor], output_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor]
) -> Callable[[Sequence[torch.Tensor]], float]:
    """Mean squared difference of the caller's module output, candidates against the float weights."""
    ref = output_fn(list(weights)).float()

    def error(cands: Sequence[torch.Tensor]) -> float:
        out = output_fn([c.to(w.dtype) for c, w in zip(cands, weights, strict=True)]).float()
        return float((out - ref).pow(2).mean())

    return error


@torch.no_grad()
def search_scales(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scheme: QuantScheme,
    cfg: AWQConfig,
    output_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor] | None = None,
) -> AWQScaleResult:
    """Grid-search the per-input-channel scales for one smooth layer and its balance layers.

    Args:
        x: ``[..., in]`` inputs of the balance layers (the smooth layer's output).
        weights: the balance Linear weights, each ``[out_i, in]``.
        scheme: how the weights will be quantized (the observer is simulated too).
        cfg: the grid.
        output_fn: maps a list of weights (same order and dtype as ``weights``)
            to the output that should be preserved, e.g. the whole attention or
            MLP block; by default the balance layers' own outputs ``x W_i^T``.
            It is called once with the float weights, then once per candidate.

    For each ratio ``a`` the scales are ``mean|x|^a / mean|w|^(1-a)`` (or
    ``mean|x|^a``), floored at 1e-4 and divided by ``sqrt(max * min)`` so they
    sit around 1. Identity scales (plain RTN) are always a candidate, so the
    result is never worse than RTN on the calibration data.
    """
    if not weights:
        raise EcoquantError("AWQ needs at least one balance layer per smooth layer")
    in_f = x.shape[-1]
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != in_f:
            raise EcoquantError(
                f"balance weight {i} has shape {tuple(w.shape)} but the inputs have {in_f} channels; "
                "every balance layer must read the smooth layer's output"
            )
        check_group_size(f"balance layer {i}", in_f, scheme)
    x32 = x.reshape(-1, in_f).to(device=weights[0].device, dtype=torch.float32)
    x_mag = x32.abs().mean(dim=0)
    energy = x32.square().mean(dim=0) if scheme.observer in ACTIVATION_AWARE else None
    w_mag = _weight_magnitude(weights, scheme).clamp(min=_MIN_SCALE)
    error = _linear_error(x32, weights) if output_fn is None else _module_error(weights, output_fn)

    ones = torch.ones(in_f, dtype=torch.float32, device=x32.device)
    rtn_error = error([_scaled_fake_quant(w, ones, scheme, energy) for w in weights])
    best_error, best_scales, best_ratio = rtn_error, ones, None
    ratios = tuple(k / cfg.grid for k in range(cfg.grid))
    errors = []
    for a in ratios:
        s = x_mag.pow(a) / w_mag.pow(1.0 - a) if cfg.duo_scaling else x_mag.pow(a)
        s = s.clamp(min=_MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        err = error([_scaled_fake_quant(w, s, scheme, energy) for w in weights])
        errors.append(err)
        if err < best_error:
            best_error, best_scales, best_ratio = err, s, a
    return AWQScaleResult(
        scales=best_scales,
        ratio=best_ratio,
        rtn_error=rtn_error,
        best_error=best_error,
        ratios=ratios,
        errors=tuple(errors),
    )


def _subsample_tokens(x: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` rows, evenly spaced: deterministic, and spread over all samples."""
    if x.shape[0] <= limit:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, limit, device=x.device).round().long()
    return x[idx]


@torch.no_grad()
def search_clip(x: torch.Tensor, w: torch.Tensor, scheme: QuantScheme, cfg: AWQConfig) -> torch.Tensor:
    """Per-group max-abs clipping values ``[out, groups]`` (in ``w``'s dtype) that minimise output error.

    ``x [..., in]`` and ``w [out, in]`` must be in the same basis: after
    :func:`search_scales`' scales were applied, pass ``x / s`` and ``W diag(s)``.

    Clipping a group's range to ``p * max|w|`` gives the other weights a finer
    grid at the price of the clipped ones. Unlike the MSE observer (which looks
    at weights only), each group's error here is that of its part of the dot
    product, ``(x_g . (w_g - Q(clip(w_g))))^2`` summed over tokens, computed as
    ``d_g^T (x_g^T x_g) d_g`` with the group's small Gram matrix. ``p = 1`` (no
    clipping) is always tried, so the result is never worse on ``x``. The
    scheme's observer then runs on the clipped weights, as the real
    quantization will. Commonly skipped for q/k projections, whose errors the
    attention softmax amplifies (the caller decides).
    """
    out_f, in_f = w.shape
    if x.shape[-1] != in_f:
        raise EcoquantError(f"clip search: inputs have {x.shape[-1]} channels but the weight has {in_f}")
    check_group_size("the clipped layer", in_f, scheme)
    gs = scheme.group_size or in_f
    ng = in_f // gs
    xs = _subsample_tokens(x.reshape(-1, in_f), cfg.clip_tokens).to(device=w.device, dtype=torch.float32)
    xg = xs.reshape(-1, ng, gs).transpose(0, 1)  # [groups, tokens, gs]
    gram = xg.transpose(1, 2) @ xg  # [groups, gs, gs]
    w32 = w.float().reshape(out_f, ng, gs)
    energy = xs.square().mean(dim=0) if scheme.observer in ACTIVATION_AWARE else None
    org_max = w32.abs().amax(dim=-1)
    best_err = torch.full((out_f, ng), float("inf"), device=w.device)
    best_max = org_max.to(w.dtype)
    for k in range(max(1, int(cfg.clip_maxshrink * cfg.clip_grid))):
        max_val = (org_max * (1.0 - k / cfg.clip_grid)).to(w.dtype)
        clipped = apply_clip(w, max_val)
        scale, zp = choose_qparams(clipped, scheme, energy)
        d = w32 - fake_quantize(clipped, scale, zp, scheme).float().reshape(out_f, ng, gs)
        dg = d.transpose(0, 1)  # [groups, out, gs]
        err = ((dg @ gram) * dg).sum(dim=-1).t()  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``w`` clamped to ``[-max_val, max_val]`` per group; groups are inferred from ``max_val [out, groups]``."""
    out_f, in_f = w.shape
    ng = max_val.shape[-1]
    if max_val.shape != (out_f, ng) or in_f % ng:
        raise EcoquantError(f"clip values {tuple(max_val.shape)} do not fit weight {tuple(w.shape)}")
    mv = max_val.to(w.dtype).unsqueeze(-1)
    return torch.clamp(w.reshape(out_f, ng, in_f // ng), -mv, mv).reshape(out_f, in_f)


def fold_scales_into_norm(
    weight: torch.Tensor, scales: torch.Tensor, *, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A norm weight whose output is divided by ``scales``, and the scales it divides by exactly.

    ``offset + w' = (offset + w) / s``, where ``offset`` is the norm's
    convention (:data:`NORM_WEIGHT_OFFSET`): 1 for Gemma-3's ``(1 + w)``, 0 for
    Gemma-4's and Llama's plain ``w``. ``w'`` is computed in float32 and
    stored in ``weight``'s dtype, and that rounding is why the second result
    exists: with ``offset = 1`` in bf16, a channel whose factor ``(1 + w) / s``
    is small is stored as ``w' ~ -1`` on bf16's grid of step ~0.004 there, so
    the factor the model will compute, ``1 + w'``, can be off by tens of
    percent (measured on Gemma-3 270M's ``pre_feedforward_layernorm`` after
    AWQ: a median 3.6% relative error per channel, against 0.2% in the bf16
    base). The balance layers must then be multiplied by the scales the stored
    norm really realises, ``(offset + w) / (offset + w')`` (float32), not by
    the ones asked for: the fold is then exact up to the balance weights'
    own rounding, which is relative (2^-9 in bf16) and followed by
    quantization anyway.

    A channel that rounding would zero out (``offset + w' = 0`` while
    ``offset + w != 0``) is moved one step of the dtype's grid off zero, on
    its own side. A channel whose factor is already 0 keeps its scale: its
    output is 0 whatever the scale. A scale-free norm (``with_scale=False``)
    has no weight and cannot absorb scales.

    Returns:
        ``(w', realised scales)``: ``w'`` in ``weight``'s dtype, the scales
        ``[in]`` in float32, positive and finite.
    """
    _check_scales(scales, weight.shape[-1], "norm weight")
    factor = offset + weight.float()
    new = (factor / scales.float() - offset).to(weight.dtype)
    lost = (offset + new.float() == 0) & (factor != 0)
    if bool(lost.any()):
        info = torch.finfo(weight.dtype)
        step = abs(offset) * info.eps if offset else info.tiny
        nudged = torch.where(factor > 0, -offset + step, -offset - step).to(weight.dtype)
        new = torch.where(lost, nudged, new)
    realised = offset + new.float()
    scales_out = torch.where(factor == 0, scales.float(), factor / torch.where(realised == 0, 1.0, realised))
    return new, scales_out


def fold_scales_into_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A preceding Linear whose outputs are divided by ``scales`` (output rows and bias).

    Exact only when what lies between it and the balance layers commutes with a
    per-channel scale: nothing (v_proj -> o_proj in plain attention) or an
    elementwise product with another branch (up_proj -> down_proj in a gated
    MLP). A norm in between breaks it: Gemma-4's scale-free ``v_norm``
    renormalises v_proj's output, so v -> o must not be smoothed there.
    """
    _check_scales(scales, weight.shape[0], "preceding Linear's outputs")
    s = scales.float()
    new_w = (weight.float() / s.unsqueeze(1)).to(weight.dtype)
    new_b = None if bias is None else (bias.float() / s).to(bias.dtype)
    return new_w, new_b


def scale_balance_weight(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A balance Linear's weight with its input columns multiplied by ``scales``."""
    _check_scales(scales, weight.shape[-1], "balance weight's inputs")
    return (weight.float() * scales.float()).to(weight.dtype)


def _check_scales(scales: torch.Tensor, size: int, what: str) -> None:
    if scales.shape != (size,):
        raise EcoquantError(f"AWQ scales of shape {tuple(scales.shape)} do not fit the {what} ({size} channels)")
