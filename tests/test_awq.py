"""AWQ: folding is exact, the search never loses to RTN, and wins on outlier channels."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

from ecoquant.errors import EcoquantError
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
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import QuantScheme

OUTLIERS = [2, 30, 47]


def _acts(tokens: int = 512, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    """Activations with a few input channels 50x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_f, generator=g)
    x[:, OUTLIERS] *= 50.0
    return x


def _weights(in_f: int = 64, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(48, in_f, generator=g) * 0.05, torch.randn(32, in_f, generator=g) * 0.05]


def _sq_err(x: torch.Tensor, w: torch.Tensor, x_q: torch.Tensor, w_q: torch.Tensor) -> float:
    return float((x.double() @ w.double().t() - x_q.double() @ w_q.double().t()).pow(2).sum())


def _rtn(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    return rtn_quantize(w, scheme).dequantize(scheme).float()


@pytest.mark.parametrize(
    "scheme", [QuantScheme(group_size=32), QuantScheme(group_size=None), QuantScheme(group_size=16, symmetric=False)]
)
def test_awq_scales_and_clip_beat_rtn_on_outlier_channels(scheme: QuantScheme) -> None:
    x, ws = _acts(), _weights()
    cfg = AWQConfig()
    res = search_scales(x, ws, scheme, cfg)
    s = res.scales
    assert s.shape == (64,) and s.dtype == torch.float32
    assert s[OUTLIERS].min() > s.median()  # the salient channels were scaled up
    x_s = x / s
    scaled = [scale_balance_weight(w, s) for w in ws]
    clipped = [apply_clip(w, search_clip(x_s, w, scheme, cfg)) for w in scaled]

    rtn_err = sum(_sq_err(x, w, x, _rtn(w, scheme)) for w in ws)
    scales_err = sum(_sq_err(x, w, x_s, _rtn(ws_, scheme)) for w, ws_ in zip(ws, scaled, strict=True))
    awq_err = sum(_sq_err(x, w, x_s, _rtn(wc, scheme)) for w, wc in zip(ws, clipped, strict=True))
    assert scales_err < 0.8 * rtn_err, (scales_err, rtn_err)
    assert awq_err <= scales_err * (1 + 1e-6)
    assert awq_err < 0.7 * rtn_err, (awq_err, rtn_err)
    # The search's own bookkeeping agrees with the measurement above.
    total = x.shape[0] * sum(w.shape[0] for w in ws)
    assert res.best_error == pytest.approx(scales_err / total, rel=1e-3)


@pytest.mark.parametrize("tokens", [512, 40], ids=["gram", "direct"])
def test_ratio_zero_is_plain_rtn(tokens: int) -> None:
    x, ws = _acts(tokens), _weights()
    scheme = QuantScheme(group_size=32)
    expect = sum(_sq_err(x, w, x, _rtn(w, scheme)) for w in ws) / (tokens * 80)
    paper = search_scales(x, ws, scheme, AWQConfig(duo_scaling=False, grid=10))
    assert paper.errors[0] == paper.rtn_error  # a = 0 gives s = 1 exactly
    assert paper.rtn_error == pytest.approx(expect, rel=1e-4)
    duo = search_scales(x, ws, scheme, AWQConfig(grid=10))
    assert duo.rtn_error == pytest.approx(expect, rel=1e-4)
    for res in (paper, duo):
        assert len(res.errors) == len(res.ratios) == 10
        assert res.best_error == min(res.rtn_error, *res.errors)
        assert res.ratio is not None and res.best_error < res.rtn_error
        json.dumps(res.summary())


def test_identity_wins_when_no_scale_helps() -> None:
    # Every row spans exactly [-8, 7] steps of 0.01 and sits on that grid: asymmetric
    # RTN is lossless, so any scaling can only add error and the search keeps s = 1.
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-8, 8, (16, 32), generator=g).float()
    w[:, 0], w[:, 1] = -8.0, 7.0
    w = w * 0.01
    scheme = QuantScheme(group_size=None, symmetric=False)
    res = search_scales(torch.randn(64, 32, generator=g), [w], scheme, AWQConfig(grid=5))
    assert res.rtn_error < 1e-12
    assert res.ratio is None and torch.equal(res.scales, torch.ones(32))
    assert res.best_error == res.rtn_error < min(res.errors)


def test_output_fn_sees_candidates_and_matches_the_default_objective() -> None:
    x, ws = _acts(256), _weights()
    scheme = QuantScheme(group_size=32)
    cfg = AWQConfig(grid=8)
    calls: list[list[tuple[int, ...]]] = []

    def concat_outputs(cands: Sequence[torch.Tensor]) -> torch.Tensor:
        calls.append([tuple(c.shape) for c in cands])
        return torch.cat([x @ c.t() for c in cands], dim=1)

    own = search_scales(x, ws, scheme, cfg, output_fn=concat_outputs)
    default = search_scales(x, ws, scheme, cfg)
    assert len(calls) == 1 + 1 + cfg.grid  # reference, RTN, then each ratio
    assert all(shapes == [(48, 64), (32, 64)] for shapes in calls)
    assert own.ratio == default.ratio
    assert torch.equal(own.scales, default.scales)
    for a, b in zip(own.errors, default.errors, strict=True):
        assert a == pytest.approx(b, rel=1e-3)

    # A gated MLP as the block: gate and up are the balance layers of the norm before it.
    down = torch.randn(64, 48, generator=torch.Generator().manual_seed(5)) * 0.05
    gate_up = [ws[0], torch.randn(48, 64, generator=torch.Generator().manual_seed(6)) * 0.05]

    def mlp(cands: Sequence[torch.Tensor]) -> torch.Tensor:
        return (torch.nn.functional.gelu(x @ cands[0].t()) * (x @ cands[1].t())) @ down.t()

    res = search_scales(x, gate_up, scheme, cfg, output_fn=mlp)
    assert res.best_error < res.rtn_error


def test_clip_search_never_hurts_and_respects_its_range() -> None:
    x = _acts(2000, 64, seed=3)
    w = _weights(seed=4)[0]
    w[:, 10] *= 6.0  # a weight outlier worth clipping
    scheme = QuantScheme(group_size=16)
    cfg = AWQConfig(clip_grid=10, clip_maxshrink=0.5, clip_tokens=300)
    max_val = search_clip(x, w, scheme, cfg)
    org = w.abs().reshape(48, 4, 16).amax(-1)
    assert max_val.shape == (48, 4) and max_val.dtype == w.dtype
    assert (max_val <= org).all() and (max_val >= 0.55 * org - 1e-7).all()
    assert (max_val < org).any()
    clipped = apply_clip(w, max_val)
    assert torch.equal(clipped.abs().reshape(48, 4, 16).amax(-1), max_val)
    inside = w.abs() <= max_val.repeat_interleave(16, dim=1)
    assert torch.equal(clipped[inside], w[inside])
    # Per group, on the tokens it searched, clipping is never worse than not clipping.
    xs = x[torch.linspace(0, 1999, 300).round().long()]

    def group_err(wq: torch.Tensor) -> torch.Tensor:
        d = (w - wq).reshape(48, 4, 16)
        return torch.einsum("tgi,ogi->otg", xs.reshape(-1, 4, 16), d).pow(2).sum(1)

    assert (group_err(_rtn(clipped, scheme)) <= group_err(_rtn(w, scheme)) * (1 + 1e-5) + 1e-6).all()
    assert _sq_err(x, w, x, _rtn(clipped, scheme)) < _sq_err(x, w, x, _rtn(w, scheme))


@pytest.mark.parametrize("norm_cls", [Gemma3RMSNorm, Gemma4RMSNorm])
def test_folding_into_a_norm_leaves_the_float_function_unchanged(norm_cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    norm = norm_cls(64)
    weight = norm.weight
    assert isinstance(weight, torch.nn.Parameter)
    with torch.no_grad():
        weight.copy_(torch.randn(64) * 0.3 + (0.0 if norm_cls is Gemma3RMSNorm else 1.0))
    qkv = [torch.nn.Linear(64, 24, bias=False), torch.nn.Linear(64, 16, bias=False)]
    x = torch.randn(5, 7, 64)
    before = [lin(norm(x)) for lin in qkv]
    s = torch.rand(64) * 4 + 0.25
    with torch.no_grad():
        folded, s = fold_scales_into_norm(weight, s, offset=NORM_WEIGHT_OFFSET[norm_cls.__name__])
        weight.copy_(folded)
        for lin in qkv:
            lin.weight.copy_(scale_balance_weight(lin.weight, s))
    for lin, ref in zip(qkv, before, strict=True):
        assert torch.allclose(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_folding_into_a_bf16_gemma3_norm_returns_the_scales_it_realises() -> None:
    """Gemma-3's ``(1 + w)`` in bf16 cannot hold a small factor: the balance side must use the realised scales."""
    torch.manual_seed(4)
    w = (torch.rand(256) * 3).to(torch.bfloat16)  # factors 1 + w in [1, 4]
    s = torch.rand(256) * 60 + 20  # factor / s in ~[0.016, 0.2]: w' sits near -1, on a grid of step 2^-8
    s[0] = 1e6  # rounds to w' = -1 exactly: must be moved off zero
    w[1] = -1.0  # a dead channel (factor 0) keeps its scale
    folded, realised = fold_scales_into_norm(w, s, offset=1.0)
    factor = 1 + w.float()
    assert folded.dtype == torch.bfloat16 and realised.dtype == torch.float32
    assert torch.isfinite(realised).all() and (realised > 0).all()
    assert realised[1] == s[1] and float(1 + folded[0].float()) > 0
    # With the realised scales the fold is exact in float32 ...
    assert torch.allclose((1 + folded.float()) * realised, factor, rtol=1e-6, atol=0)
    # ... with the scales asked for it would be off by several percent on some channels.
    asked = ((1 + folded.float()) * s - factor).abs()[2:] / factor[2:]
    assert asked.max() > 0.05


def test_folding_up_into_down_leaves_the_gated_mlp_unchanged() -> None:
    torch.manual_seed(1)
    gate, up, down = torch.nn.Linear(32, 48), torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)
    x = torch.randn(9, 32)

    def mlp() -> torch.Tensor:
        return down(torch.nn.functional.gelu(gate(x), approximate="tanh") * up(x))

    before = mlp()
    s = torch.rand(48) * 4 + 0.25
    with torch.no_grad():
        w, b = fold_scales_into_linear(up.weight, up.bias, s)
        up.weight.copy_(w)
        assert b is not None
        up.bias.copy_(b)
        down.weight.copy_(scale_balance_weight(down.weight, s))
    assert torch.allclose(mlp(), before, rtol=1e-5, atol=1e-5)


def test_gemma4_scale_free_v_norm_breaks_v_to_o_folding() -> None:
    """Why the v -> o mapping is left out for Gemma-4: its v_norm renormalises each head."""
    torch.manual_seed(2)
    v_proj, o_proj = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(16, 32, bias=False)
    v_norm = Gemma4RMSNorm(8, with_scale=False)
    x = torch.randn(4, 32)

    def block() -> torch.Tensor:
        return o_proj(v_norm(v_proj(x).view(4, 2, 8)).view(4, 16))

    before = block()
    s = torch.rand(16) * 4 + 0.25
    with torch.no_grad():
        w, _ = fold_scales_into_linear(v_proj.weight, None, s)
        v_proj.weight.copy_(w)
        o_proj.weight.copy_(scale_balance_weight(o_proj.weight, s))
    assert not torch.allclose(block(), before, rtol=1e-3, atol=1e-3)


def test_bf16_tensors_and_tiny_shapes() -> None:
    torch.manual_seed(3)
    x = torch.randn(20, 8, dtype=torch.bfloat16)
    w = torch.nn.Linear(8, 6).weight.detach().to(torch.bfloat16)
    scheme = QuantScheme(group_size=8)
    res = search_scales(x, [w], scheme, AWQConfig(grid=4))
    assert res.scales.dtype == torch.float32 and res.best_error <= res.rtn_error
    mv = search_clip(x, scale_balance_weight(w, res.scales), scheme, AWQConfig(clip_grid=4))
    assert mv.shape == (6, 1) and mv.dtype == torch.bfloat16
    folded, realised = fold_scales_into_norm(torch.ones(8, dtype=torch.bfloat16), res.scales, offset=0.0)
    assert folded.dtype == torch.bfloat16 and realised.dtype == torch.float32


def test_bad_inputs_raise_one_line_errors() -> None:
    with pytest.raises(EcoquantError, match="grid"):
        AWQConfig(grid=0)
    with pytest.raises(EcoquantError, match="clip_maxshrink"):
        AWQConfig(clip_maxshrink=1.0)
    scheme = QuantScheme(group_size=8)
    with pytest.raises(EcoquantError, match="channels"):
        search_scales(torch.randn(4, 16), [torch.randn(3, 8)], scheme, AWQConfig())
    with pytest.raises(EcoquantError, match="at least one"):
        search_scales(torch.randn(4, 16), [], scheme, AWQConfig())
    with pytest.raises(EcoquantError, match="do not fit"):
        fold_scales_into_norm(torch.ones(8), torch.ones(4), offset=0.0)
    with pytest.raises(EcoquantError, match="do not fit"):
        apply_clip(torch.randn(4, 16), torch.ones(3, 2))
