"""GPTQ and AWQ as the layer walk sees them: observe inputs, then quantize one unit.

The algorithms themselves are pure functions over tensors
(:mod:`ecoquant.quantize.gptq`, :mod:`ecoquant.quantize.awq`); this module is
the thin part that knows about modules. The walk hands a :class:`Calibrator`
one :class:`Unit` at a time (a decoder layer, or the Linears that run before
the first one), feeds the session the inputs of the unit's selected Linears
batch by batch (Linears that read the very same tensor, like q/k/v, share one
stream), and gets back an :class:`Outcome`: integer codes per module, tensors
that changed without being quantized (AWQ-folded norms), and statistics for
the recipe. The walk then installs the fake-quantized weights and re-runs the
unit so that the next one sees the quantized model's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.models.topology import ResolvedMapping
from ecoquant.quantize.awq import (
    NORM_WEIGHT_OFFSET,
    AWQConfig,
    apply_clip,
    fold_scales_into_linear,
    fold_scales_into_norm,
    scale_balance_weight,
    search_clip,
    search_scales,
)
from ecoquant.quantize.gptq import GPTQConfig, accumulate_hessian, gptq_quantize
from ecoquant.quantize.primitives import QuantizedWeight
from ecoquant.quantize.refine import dampened, refine
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import ACTIVATION_AWARE, QuantScheme
from ecoquant.quantize.smoothquant import SmoothQuantConfig, smoothing_scales, update_range


@dataclass
class Unit:
    """What is calibrated together.

    Attributes:
        name: for logs and stats (``"layer 3"``, ``"before layers"``).
        prefix: full module name of ``root`` plus a dot (``""`` for the whole model).
        root: the decoder layer (or the model, for Linears before the layers).
        modules: the selected Linears of this unit, by full module name.
        source_dtype: dtype of each tensor in the checkpoint, by full tensor name.
            Quantization rounds against scales in this dtype, as the checkpoint will store them.
        mappings: AWQ smoothings that exist in this unit.
        no_clip: full module names AWQ must not clip.
        total_tokens: tokens over all calibration batches (for subsampling budgets).
        run_batch: the unit's output on batch ``b`` with its current weights
            (None when the unit cannot be run on its own).
    """

    name: str
    prefix: str
    root: nn.Module
    modules: dict[str, nn.Linear]
    source_dtype: Mapping[str, torch.dtype]
    mappings: tuple[ResolvedMapping, ...] = ()
    no_clip: frozenset[str] = frozenset()
    total_tokens: int = 0
    run_batch: Callable[[int], torch.Tensor] | None = None


@dataclass
class Outcome:
    """What a session produced for one unit.

    Attributes:
        quantized: integer codes and scales, by full module name.
        replaced: tensors changed but not quantized (folded norms), by full
            tensor name, in the checkpoint's dtype. The modules already hold them.
        stats: plain-JSON statistics for the recipe.
    """

    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


class Session(Protocol):
    """One unit's calibration: inputs in, outcome out."""

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        """One batch of the input that the Linears ``names`` all read."""

    def finish(self) -> Outcome:
        """Quantize the unit's Linears (and change whatever else the method changes)."""


class Calibrator(Protocol):
    """A calibrated quantization method, one unit at a time."""

    name: str

    def begin(self, unit: Unit) -> Session:
        """Start a unit."""

    def describe(self) -> dict[str, Any]:
        """The method's settings, for the recipe."""


def _weight(unit: Unit, name: str) -> torch.Tensor:
    """A selected Linear's weight in the checkpoint's dtype (lossless when the compute dtype is wider)."""
    module = unit.modules[name]
    return module.weight.detach().to(unit.source_dtype.get(f"{name}.weight", module.weight.dtype))


def _relative_losses(W: torch.Tensor, H: torch.Tensor, *Wqs: torch.Tensor) -> tuple[float, ...]:
    """``tr(D H D^T) / tr(W H W^T)`` for each ``Wq`` (``D = W - Wq``): output error relative to output energy.

    The energy is computed once for all of them (a matmul per wide Linear).
    """
    W32 = W.float()
    H = H.float()
    den = float(((W32 @ H) * W32).sum())
    out = []
    for Wq in Wqs:
        D = W32 - Wq.float()
        out.append(float(((D @ H) * D).sum()) / den if den > 0 else 0.0)
    return tuple(out)


# --- RTN with the hessian observer -----------------------------------------------------


class RTNCalibrator:
    """Round to nearest, with scales chosen by each input channel's calibration energy (the ``hessian`` observer).

    Only ``diag(H)`` is needed (one mean square per input channel), so this is
    the cheapest calibrated method: the walk's forwards and nothing else.
    """

    name = "rtn"

    def __init__(self, scheme: QuantScheme) -> None:
        if scheme.observer not in ACTIVATION_AWARE:
            raise EcoquantError(f"calibrated RTN is for the activation-aware observers, not {scheme.observer!r}")
        self.scheme = scheme

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "observer": self.scheme.observer}

    def begin(self, unit: Unit) -> Session:
        return _RTNSession(unit, self.scheme)


class _RTNSession:
    def __init__(self, unit: Unit, scheme: QuantScheme) -> None:
        self.unit = unit
        self.scheme = scheme
        self.energy: dict[tuple[str, ...], tuple[torch.Tensor, int]] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        total, n = self.energy.get(names, (torch.zeros(x.shape[-1], device=x.device), 0))
        self.energy[names] = (total + x.square().sum(dim=0), n + x.shape[0])

    def finish(self) -> Outcome:
        out = Outcome()
        for names, (total, n) in self.energy.items():
            for name in names:
                out.quantized[name] = rtn_quantize(_weight(self.unit, name), self.scheme, total / max(n, 1))
                out.stats[name] = {"tokens": n}
        _require_all_seen(self.unit, out, "RTN's hessian observer has no input energies")
        return out


def _require_all_seen(unit: Unit, out: Outcome, what: str) -> None:
    missing = set(unit.modules) - set(out.quantized)
    if missing:
        raise EcoquantError(
            f"{sorted(missing)[0]} never ran on the calibration data, so {what} for it; "
            "add it to --ignore (or calibrate with inputs that reach it, e.g. --calib-multimodal)"
        )


# --- GPTQ ----------------------------------------------------------------------------------


def gptq_module(
    W: torch.Tensor, H: torch.Tensor, n: int, scheme: QuantScheme, cfg: GPTQConfig
) -> tuple[QuantizedWeight, dict[str, Any]]:
    """GPTQ (then refinement, when ``cfg.refine_steps``) for one weight, with the recipe's statistics."""
    # RTN by the same observer: the recipe's baseline; its scales are also act-order's static
    # scales (chosen once: the hessian observer's search is the costly part), and what tells
    # whether a later scale pass was kept.
    rtn = rtn_quantize(W, scheme, torch.diag(H))
    qw = gptq_quantize(W, H, scheme, cfg, static_qparams=(rtn.scale, rtn.zero_point))
    stats: dict[str, Any] = {"tokens": n}
    if cfg.scale_passes > 1 and cfg.act_order:
        stats["rescaled"] = not torch.equal(qw.scale, rtn.scale.to(qw.scale.dtype))
    if cfg.refine_steps:
        qw, refined = refine(W, dampened(H, cfg.dampening_frac), qw, scheme, cfg.refine_steps)
        stats["refine"] = refined.to_dict()
    stats["loss"], stats["rtn_loss"] = _relative_losses(W, H, qw.dequantize(scheme), rtn.dequantize(scheme))
    return qw, stats


class GPTQCalibrator:
    """GPTQ per Linear, with Hessians from the unit's real (already quantized upstream) inputs."""

    name = "gptq"

    def __init__(self, scheme: QuantScheme, cfg: GPTQConfig = GPTQConfig()) -> None:
        self.scheme = scheme
        self.cfg = cfg

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "gptq": asdict(self.cfg)}

    def begin(self, unit: Unit) -> Session:
        return _GPTQSession(unit, self.scheme, self.cfg)


class _GPTQSession:
    def __init__(self, unit: Unit, scheme: QuantScheme, cfg: GPTQConfig) -> None:
        self.unit = unit
        self.scheme = scheme
        self.cfg = cfg
        self.hessians: dict[tuple[str, ...], tuple[torch.Tensor | None, int]] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        H, n = self.hessians.get(names, (None, 0))
        self.hessians[names] = accumulate_hessian(H, n, x)

    def finish(self) -> Outcome:
        out = Outcome()
        for names, (H, n) in self.hessians.items():
            assert H is not None
            for name in names:
                out.quantized[name], out.stats[name] = gptq_module(_weight(self.unit, name), H, n, self.scheme, self.cfg)
        _require_all_seen(self.unit, out, "GPTQ has no statistics")
        return out


# --- AWQ -----------------------------------------------------------------------------------


class AWQCalibrator:
    """AWQ: smoothing per the family's mappings, clipping search, then round to nearest.

    Args:
        scheme: the quantization format.
        cfg: the searches' grids.
        max_tokens: activations kept per input stream (evenly spaced over every
            batch); the scale search only needs their statistics, and a wide
            MLP input at 500k tokens would not fit in memory.
        then_gptq: ``awq-gptq``: after smoothing, quantize each Linear by GPTQ
            against the Hessian of its smoothed inputs (``H / (s s^T)``, from
            every calibration token) instead of clipping and rounding to
            nearest. AWQ's clipping is skipped then: GPTQ's error is measured
            against the weight it is given, and a clipped weight is not the
            layer; the scheme's observer (``hessian``) does the clipping.
    """

    def __init__(
        self,
        scheme: QuantScheme,
        cfg: AWQConfig = AWQConfig(),
        max_tokens: int = 16384,
        then_gptq: GPTQConfig | None = None,
    ) -> None:
        if max_tokens < 1:
            raise EcoquantError(f"AWQ max_tokens={max_tokens} must be positive")
        self.scheme = scheme
        self.cfg = cfg
        self.max_tokens = max_tokens
        self.then_gptq = then_gptq
        self.name = "awq" if then_gptq is None else "awq-gptq"

    def describe(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.name, "awq": asdict(self.cfg), "awq_max_tokens": self.max_tokens}
        if self.then_gptq is not None:
            doc["gptq"] = asdict(self.then_gptq)
        return doc

    def begin(self, unit: Unit) -> Session:
        return _AWQSession(unit, self.scheme, self.cfg, self.max_tokens, self.then_gptq)


class SmoothQuantCalibrator:
    """SmoothQuant for W8A8 INT8: smooth what each norm feeds, then round to nearest or run GPTQ.

    The layer walk, the folds (Gemma-3's ``(1 + w)`` included) and GPTQ's
    rescaled Hessian are AWQ's (:class:`_AWQSession`); only the scale rule
    differs: :func:`~ecoquant.quantize.smoothquant.smoothing_scales` from each
    input channel's range over every calibration token, instead of a search
    on the weights' rounding error. Mappings whose producer is a Linear
    (``up -> down``, ``v -> o``) are left out, as in the paper and in
    llmcompressor, and so is AWQ's clipping search (a weight-only tool).

    Args:
        scheme: the quantization format (a W8A8 one; the caller checks).
        cfg: the migration strength.
        max_tokens: activations kept per input stream for the ``hessian`` observer.
        then_gptq: ``smoothquant-gptq``: GPTQ after smoothing instead of rounding to nearest.
    """

    def __init__(
        self,
        scheme: QuantScheme,
        cfg: SmoothQuantConfig = SmoothQuantConfig(),
        max_tokens: int = 16384,
        then_gptq: GPTQConfig | None = None,
    ) -> None:
        if max_tokens < 1:
            raise EcoquantError(f"SmoothQuant max_tokens={max_tokens} must be positive")
        self.scheme = scheme
        self.cfg = cfg
        self.max_tokens = max_tokens
        self.then_gptq = then_gptq
        self.name = "smoothquant" if then_gptq is None else "smoothquant-gptq"

    def describe(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"method": self.name, "smoothquant": asdict(self.cfg)}
        if self.then_gptq is not None:
            doc["gptq"] = asdict(self.then_gptq)
        return doc

    def begin(self, unit: Unit) -> Session:
        norms = tuple(m for m in unit.mappings if not isinstance(m.smooth, nn.Linear))
        unit = replace(unit, mappings=norms)
        return _AWQSession(
            unit, self.scheme, AWQConfig(clip_search=False), self.max_tokens, self.then_gptq, smoothquant=self.cfg
        )


def _evenly(x: torch.Tensor, keep: int) -> torch.Tensor:
    """``keep`` rows of ``x [tokens, ch]``, evenly spaced (deterministic, no RNG)."""
    if x.shape[0] <= keep:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, keep, device=x.device).round().long()
    return x[idx]


class _AWQSession:
    """One unit of AWQ (scales searched on the rounding error) or, given ``smoothquant``, of SmoothQuant."""

    def __init__(
        self,
        unit: Unit,
        scheme: QuantScheme,
        cfg: AWQConfig,
        max_tokens: int,
        then_gptq: GPTQConfig | None,
        smoothquant: SmoothQuantConfig | None = None,
    ) -> None:
        self.unit = unit
        self.smoothquant = smoothquant
        self.ranges: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.scheme = scheme
        self.cfg = cfg
        self.max_tokens = max_tokens
        self.then_gptq = then_gptq
        self.acts: dict[tuple[str, ...], list[torch.Tensor]] = {}
        self.hessians: dict[tuple[str, ...], tuple[torch.Tensor | None, int]] = {}

    def observe(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        total = max(self.unit.total_tokens, x.shape[0])
        keep = max(1, math.ceil(x.shape[0] * self.max_tokens / total))
        self.acts.setdefault(names, []).append(_evenly(x, keep).clone())
        if self.smoothquant is not None:  # SmoothQuant's ranges are over every token, not the kept ones
            self.ranges[names] = update_range(self.ranges.get(names), x)
        if self.then_gptq is not None:
            H, n = self.hessians.get(names, (None, 0))
            self.hessians[names] = accumulate_hessian(H, n, x)

    def _importance(self, stream: tuple[str, ...]) -> torch.Tensor | None:
        """Mean square per input channel of a stream's kept activations, for the ``hessian`` observer."""
        if self.scheme.observer not in ACTIVATION_AWARE:
            return None
        x = torch.cat(self.acts[stream]).to(torch.float32)
        return x.square().mean(dim=0)

    def _stream(self, name: str) -> tuple[str, ...] | None:
        return next((k for k in self.acts if name in k), None)

    def finish(self) -> Outcome:
        out = Outcome()
        unit = self.unit
        ref = unit.run_batch(0) if unit.run_batch is not None and unit.mappings else None
        smoothings: list[dict[str, Any]] = []
        for m in unit.mappings:
            smoothings.append(self._smooth(m, out))
        if smoothings:
            out.stats["smoothing"] = smoothings
        if ref is not None and unit.run_batch is not None and any(s.get("applied") for s in smoothings):
            now = unit.run_batch(0)
            # Smoothing is an identity up to rounding of the folded tensors to the
            # checkpoint dtype: record how far from exact it is.
            out.stats["smoothing_rel_diff"] = float((now - ref).abs().max() / ref.abs().max().clamp(min=1e-30))

        for name in unit.modules:
            stream = self._stream(name)
            if stream is None:
                raise EcoquantError(
                    f"{name} never ran on the calibration data, so smoothing has no activations for it; "
                    "add it to --ignore (or calibrate with inputs that reach it, e.g. --calib-multimodal)"
                )
            W = _weight(unit, name)
            if self.then_gptq is not None:
                H, n = self.hessians[stream]
                assert H is not None
                out.quantized[name], out.stats[name] = gptq_module(W, H, n, self.scheme, self.then_gptq)
                continue
            entry: dict[str, Any] = {}
            if self.cfg.clip_search and name not in unit.no_clip:
                x = torch.cat(self.acts[stream])
                max_val = search_clip(x, W, self.scheme, self.cfg)
                clipped = apply_clip(W, max_val)
                entry["clipped_fraction"] = float((clipped != W).float().mean())
                W = clipped
            out.quantized[name] = rtn_quantize(W, self.scheme, self._importance(stream))
            out.stats[name] = entry
        return out

    def _set(self, module: nn.Module, attr: str, value: torch.Tensor, full: str, out: Outcome) -> None:
        """Install a changed tensor (rounded to the checkpoint dtype) and remember it for export."""
        current = getattr(module, attr)
        current.data = value.to(current.dtype)
        if not (attr == "weight" and full.removesuffix(".weight") in self.unit.modules):
            out.replaced[full] = value.detach().clone()

    def _smooth(self, m: ResolvedMapping, out: Outcome) -> dict[str, Any]:
        unit = self.unit
        smooth_full = unit.prefix + m.smooth_name
        balance_full = tuple(unit.prefix + n for n in m.balance_names)
        info: dict[str, Any] = {"smooth": smooth_full, "balance": list(balance_full), "applied": False}
        if not all(b in unit.modules for b in balance_full):
            info["skipped"] = "not every balance layer is selected for quantization"
            return info
        stream = self._stream(balance_full[0])
        if stream is None or set(stream) != set(balance_full):
            # Smoothing is exact only if the balance layers are all that read the
            # smooth layer's output (among the Linears we see).
            info["skipped"] = f"the balance layers do not read one input of their own (stream: {stream})"
            return info
        x = torch.cat(self.acts[stream])
        weights = [_weight(unit, b) for b in balance_full]
        if self.smoothquant is not None:
            lo, hi = self.ranges[stream]
            s = smoothing_scales(hi - lo, weights, self.smoothquant.alpha).to(x.device)
            info.update({"alpha": self.smoothquant.alpha, "scale_min": float(s.min()), "scale_max": float(s.max())})
        else:
            result = search_scales(x, weights, self.scheme, self.cfg)
            info.update(result.summary())
            if result.ratio is None:
                return info
            s = result.scales.to(x.device)

        smooth = m.smooth
        src = unit.source_dtype
        if isinstance(smooth, nn.Linear):
            w_src = smooth.weight.detach().to(src.get(f"{smooth_full}.weight", smooth.weight.dtype))
            b_src = None
            if smooth.bias is not None:
                b_src = smooth.bias.detach().to(src.get(f"{smooth_full}.bias", smooth.bias.dtype))
            new_w, new_b = fold_scales_into_linear(w_src, b_src, s)
            self._set(smooth, "weight", new_w, f"{smooth_full}.weight", out)
            if new_b is not None:
                self._set(smooth, "bias", new_b, f"{smooth_full}.bias", out)
        else:
            offset = NORM_WEIGHT_OFFSET.get(type(smooth).__name__)
            weight = getattr(smooth, "weight", None)
            if offset is None or not isinstance(weight, torch.Tensor):
                raise EcoquantError(
                    f"cannot fold smoothing scales into {smooth_full} ({type(smooth).__name__}): its weight convention "
                    "is unknown; add the class to ecoquant.quantize.awq.NORM_WEIGHT_OFFSET"
                )
            w_src = weight.detach().to(src.get(f"{smooth_full}.weight", weight.dtype))
            new_w, realised = fold_scales_into_norm(w_src, s, offset=offset)
            # The stored norm's rounding moves some scales (a lot, for Gemma-3's (1 + w)
            # near -1): the balance side must use the ones it really divides by.
            info["scale_moved_max"] = float((realised / s - 1).abs().max())
            s = realised
            self._set(smooth, "weight", new_w, f"{smooth_full}.weight", out)
            if getattr(smooth, "bias", None) is not None:
                b_src = smooth.bias.detach().to(src.get(f"{smooth_full}.bias", smooth.bias.dtype))
                self._set(smooth, "bias", (b_src.float() / s).to(b_src.dtype), f"{smooth_full}.bias", out)
        for b, module in zip(balance_full, m.balance, strict=True):
            module.weight.data = scale_balance_weight(_weight(unit, b), s).to(module.weight.dtype)
        # The balance layers now read x / s.
        self.acts[stream] = [a / s.to(a.dtype) for a in self.acts[stream]]
        if stream in self.hessians:
            H, n = self.hessians[stream]
            assert H is not None
            inv = (1.0 / s).to(H.dtype)
            self.hessians[stream] = (H * inv.unsqueeze(1) * inv.unsqueeze(0), n)
        info["applied"] = True
        return info
