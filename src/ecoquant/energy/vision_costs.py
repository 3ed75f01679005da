"""The vision encoder's cost per image, in FLOPs, from the module tree and the family's image geometry.

Split from :mod:`ecoquant.energy.costs` (which assembles a checkpoint's whole cost terms): the tower's
Linears and patch-embedding convolution run once per patch, the projector's Linears (and any bare matmul
weight its family row names) once per soft token, and attention once per sequence (a tile, crop or window),
so the cost is a function of how the processor encodes an image at a budget. Modules the family's forward
never reads (the row's ``unused``) are priced nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import nn

from ecoquant.energy.gpus import Precision
from ecoquant.errors import EcoquantError
from ecoquant.models.families import Encoding, VlmFamily, window_patches

REFERENCE_IMAGE = (1280, 960)
"""Width and height (pixels) of the image ``inspect`` prices for families whose vision work depends on the
image (an ASSUMPTION: a 4:3 page or photo; the request model prices each image's own soft tokens)."""


@dataclass(frozen=True)
class VisionCosts:
    """The vision encoder's cost per image, as a function of the image-token budget."""

    per_patch: Mapping[Precision, float]
    """Linear FLOPs per patch, by precision."""
    per_soft_token: Mapping[Precision, float]
    """Projection FLOPs per soft token, by precision."""
    attention_widths: tuple[int, ...]
    """Query width of each encoder layer: ``4 x width x patches²`` FLOPs per image and layer."""
    pooling: int
    """``k``: one soft token is ``k x k`` patches."""
    budgets: tuple[int, ...]
    default_budget: int | None
    sequence: int | None = None
    """Patches attended together (a tile or crop); None: the whole image is one sequence."""
    windows: tuple[int | None, ...] = ()
    """Per encoder layer, the patches a windowed layer attends within (None or absent: the whole sequence)."""
    patches_per_token: float | None = None
    """Patches behind one soft token where that is not ``k²`` (``merge²``, ``scale²``, a crop's patches / its tokens)."""
    reference: Mapping[int, Encoding] | None = None
    """Budget -> how :data:`REFERENCE_IMAGE` is encoded at it, for families whose vision work depends on the image."""

    def patches(self, soft_tokens: float) -> float:
        """Patches behind ``soft_tokens`` soft tokens: ``k²`` each (at most; an image's aspect ratio may leave fewer)."""
        return soft_tokens * (self.patches_per_token if self.patches_per_token is not None else self.pooling**2)

    def flops_at(self, soft_tokens: float) -> dict[Precision, float]:
        """FLOPs per image that becomes ``soft_tokens`` soft tokens, by precision (attention in bf16)."""
        n = self.patches(soft_tokens)
        seq = n if self.sequence is None else float(self.sequence)
        count = 1.0 if self.sequence is None or not n else n / seq
        return self._flops(n, soft_tokens, [seq] * max(1, round(count)) if n else [])

    def image_flops(self, encoding: Encoding) -> dict[Precision, float]:
        """FLOPs of one image encoded as ``encoding`` (its sequences and soft tokens), by precision."""
        return self._flops(float(encoding.patches), float(encoding.soft_tokens), [float(s) for s in encoding.sequences])

    def _flops(self, patches: float, soft_tokens: float, sequences: list[float]) -> dict[Precision, float]:
        """Linears once per patch and per soft token; attention ``4 x width x n x min(n, window)`` per sequence."""
        out: dict[Precision, float] = {}
        for p, f in self.per_patch.items():
            out[p] = out.get(p, 0.0) + f * patches
        for p, f in self.per_soft_token.items():
            out[p] = out.get(p, 0.0) + f * soft_tokens
        attention = 0.0
        for i, w in enumerate(self.attention_widths):
            window = self.windows[i] if i < len(self.windows) else None
            attention += sum(4.0 * w * s * (s if window is None else min(s, window)) for s in sequences)
        out["bf16"] = out.get("bf16", 0.0) + attention
        return out

    def total_flops(self, soft_tokens: float) -> float:
        return sum(self.flops_at(soft_tokens).values())


def _patch_conv_flops(name: str, conv: nn.modules.conv._ConvNd) -> float:
    """A tower's patch-embedding convolution: its stride is its kernel, so it has one output per patch, and
    that output costs ``2 x`` the weight's elements (in channels x kernel x out channels, as a Linear)."""
    if tuple(conv.stride) != tuple(conv.kernel_size):
        raise EcoquantError(f"ecoquant prices only patch-embedding convolutions (stride = kernel); {name} is not one")
    return 2.0 * conv.weight.numel()


def tower_flops(
    model: nn.Module,
    precisions: Mapping[str, Precision],
    tower: tuple[str, ...],
    projector: tuple[str, ...],
    unused: tuple[str, ...] = (),
) -> tuple[dict[Precision, float], dict[Precision, float]]:
    """Linear and patch-convolution FLOPs by precision: of the tower (once per patch) and of the projector (once
    per soft token); modules under ``unused`` are skipped. The projector is matched first: Qwen's merger sits
    inside its tower's prefix. Convolutions run in bf16 (compressed-tensors quantizes Linears only)."""
    per_patch: dict[Precision, float] = {}
    per_soft: dict[Precision, float] = {}
    for name, m in model.named_modules():
        table = per_soft if name.startswith(projector) else per_patch if name.startswith(tower) else None
        if table is None or (unused and name.startswith(unused)):
            continue
        if isinstance(m, nn.Linear):
            precision, flops = precisions[name], 2.0 * m.in_features * m.out_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            precision, flops = "bf16", _patch_conv_flops(name, m)
        else:
            continue
        table[precision] = table.get(precision, 0.0) + flops
    return per_patch, per_soft


def vlm_vision_costs(model: nn.Module, row: VlmFamily, config: Any, precisions: Mapping[str, Precision]) -> VisionCosts:
    """A vision-language family's encoder: tower Linears per patch, projector Linears per soft token,
    attention per sequence (windowed where the row says), patches per token from the row's geometry."""
    per_patch, per_soft = tower_flops(model, precisions, row.vision, row.projector, row.unused)
    for name in row.projector_matmuls:  # a bare weight Parameter: never a Linear, so never quantized
        per_soft["bf16"] = per_soft.get("bf16", 0.0) + 2.0 * model.get_parameter(name).numel()
    layers = model.get_submodule(row.vision_layers)
    widths = tuple(layer.get_submodule(row.vision_query).out_features * row.query_share for layer in layers)  # type: ignore[union-attr]
    full = set(getattr(config.vision_config, row.window_layers_key, None) or ()) if row.window_layers_key else None
    window = window_patches(config, row.window_key) if row.window_key else None
    windows = tuple(None if full is None or i in full else window for i in range(len(widths)))
    geometry = row.geometry.from_config(config)
    return VisionCosts(
        MappingProxyType(per_patch), MappingProxyType(per_soft), widths, 1, row.budget.values, row.budget.default,
        sequence=geometry.sequence, windows=windows, patches_per_token=geometry.patches_per_token,
        reference=MappingProxyType({b: geometry.encode(*REFERENCE_IMAGE, b) for b in row.budget.values}),
    )


