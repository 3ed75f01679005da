"""SmoothQuant: move activation outliers into the weights before activations are quantized to 8 bits.

W8A8 quantizes each Linear's input per token at run time. A few input
channels of an LLM layer carry values tens of times larger than the rest on
every token, so a per-token scale set by them leaves the other channels a
handful of int8 levels. SmoothQuant (Xiao et al. 2023, "SmoothQuant:
Accurate and Efficient Post-Training Quantization for Large Language
Models") divides input channel ``j`` by ``s_j`` and multiplies weight column
``j`` by it, ``x W^T = (x / s) (W diag(s))^T``, with

    s_j = range(x_j)^alpha / range(W_j)^(1 - alpha)

so that part of each activation outlier moves into the weights, which are
quantized per output channel and absorb it better. The division is folded
into the norm that produced ``x`` (the fold AWQ uses,
:func:`ecoquant.quantize.awq.fold_scales_into_norm`, which keeps Gemma-3's
``(1 + w)`` norms exact), so the checkpoint is the same architecture.

The ranges follow llmcompressor 0.14's ``SmoothQuantModifier`` so the two
choose the same scales from the same statistics: an activation channel's
range is ``max - min`` over every calibration token, a weight column's is
``2 * max |W_j|`` over all balance Linears, the strength defaults to 0.5 and
scales are floored at ``1e-5``. One deliberate difference: a channel whose
activations never moved (range 0) keeps ``s = 1``. llmcompressor gives it the
floor, which multiplies the norm's factor by 10^5; an input that does reach
that channel later would then be amplified by as much.

Only norms are smoothed (llmcompressor's mappings and the paper's choice:
the inputs of q/k/v and of the MLP's gate/up). The worked example: channel
ranges ``[60, 1]``, weight ranges ``[0.2, 0.2]``, alpha 0.5 give
``s = [sqrt(60 / 0.2), sqrt(1 / 0.2)] = [17.3, 2.24]``; the activation
ranges become ``[3.46, 0.45]`` (the outlier now 7.7x the other channel, not
60x) and the weight ranges ``[3.46, 0.45]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ecoquant.errors import EcoquantError

#: Scales are floored here (llmcompressor's ``MINIMUM_SMOOTHING_SCALE``), so no division by ~0.
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """How strongly outliers migrate to the weights.

    Attributes:
        alpha: the migration strength in ``[0, 1]``: 0 leaves activations as
            they are (``s = 1 / range(W)``), 1 moves all of their range into
            the weights. 0.5 is the paper's and llmcompressor's default.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise EcoquantError(f"SmoothQuant strength {self.alpha} must be in [0, 1], e.g. 0.5")


def update_range(
    seen: tuple[torch.Tensor, torch.Tensor] | None, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(min, max)`` over ``seen`` and the tokens of ``x [..., channels]`` (float32)."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    lo, hi = flat.amin(dim=0), flat.amax(dim=0)
    if seen is None:
        return lo, hi
    return torch.minimum(seen[0], lo), torch.maximum(seen[1], hi)


def smoothing_scales(act_range: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s [in]`` (float32): divide the activations by it, multiply the balance weights' columns by it.

    Args:
        act_range: ``max - min`` of each input channel over the calibration tokens.
        weights: the balance Linears' weights ``[out_i, in]``, all reading these activations.
        alpha: migration strength.
    """
    if not weights:
        raise EcoquantError("SmoothQuant needs at least one balance Linear")
    for w in weights:
        if w.ndim != 2 or w.shape[1] != act_range.shape[0]:
            raise EcoquantError(
                f"SmoothQuant: weight {tuple(w.shape)} does not read {act_range.shape[0]} input channels"
            )
    a = act_range.float()
    w_range = 2.0 * torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = a.pow(alpha) / w_range.pow(1.0 - alpha)
    s = torch.where(w_range > 0, s, a)
    s = torch.where(a > 0, s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE)
