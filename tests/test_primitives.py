"""Primitives: bit-exact against compressed-tensors, and against a slow obvious reference."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import (
    check_group_size,
    dequantize,
    fake_quantize,
    minmax_qparams,
    mse_qparams,
    quantize,
)
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import QuantScheme


def _weight(out_f: int = 64, in_f: int = 256, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, 7] *= 25  # an outlier input channel, as real LLM weights have
    return w.to(dtype)


def _slow_reference(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element, the textbook symmetric min-max group quantizer (in w's dtype)."""
    out_f, in_f = w.shape
    gs = scheme.group_size or in_f
    q = torch.empty(out_f, in_f, dtype=torch.int8)
    scales = torch.empty(out_f, in_f // gs, dtype=w.dtype)
    for r in range(out_f):
        for g in range(in_f // gs):
            group = w[r, g * gs : (g + 1) * gs]
            amax = torch.maximum(group.max().clamp(min=0), -group.min().clamp(max=0))
            s = amax / torch.tensor(7.5, dtype=w.dtype)
            if s == 0:
                s = torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype)
            scales[r, g] = s
            for c in range(gs):
                v = (group[c] / s).float().item()
                q[r, g * gs + c] = int(max(-8, min(7, round(v))))  # Python round: half to even
    return q, scales


@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_minmax_matches_slow_reference(group_size: int | None) -> None:
    scheme = QuantScheme(group_size=group_size)
    w = _weight(8, 256)
    qw = rtn_quantize(w, scheme)
    q_ref, s_ref = _slow_reference(w, scheme)
    assert torch.equal(qw.scale, s_ref)
    assert torch.equal(qw.q, q_ref)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_bit_exact_against_compressed_tensors(symmetric: bool, group_size: int | None) -> None:
    scheme = QuantScheme(group_size=group_size, symmetric=symmetric)
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=symmetric, strategy=scheme.strategy, group_size=group_size
    )
    w = _weight()
    g = w.reshape(w.shape[0], scheme.groups_for(w.shape[1]), -1)
    ct_scale, ct_zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    scale, zp = minmax_qparams(w, scheme)
    assert torch.equal(scale, ct_scale)
    if symmetric:
        assert zp is None
    else:
        assert zp is not None and torch.equal(zp, ct_zp.to(torch.int8))
    ct_q = ct_quantize(w, ct_scale, ct_zp, args, dtype=torch.int8)
    assert torch.equal(quantize(w, scale, zp, scheme), ct_q)


def test_dequantize_inverts_codes_and_error_is_bounded() -> None:
    scheme = QuantScheme(group_size=64)
    w = _weight(dtype=torch.float32)
    scale, zp = minmax_qparams(w, scheme)
    q = quantize(w, scale, zp, scheme)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert torch.equal(quantize(dequantize(q, scale, zp, scheme), scale, zp, scheme), q)
    err = (fake_quantize(w, scale, zp, scheme) - w).abs()
    # Round-to-nearest: every weight is within half a step of its group's grid.
    step = scale.repeat_interleave(64, dim=1)
    assert bool((err <= step / 2 + 1e-7).all())


def test_worked_example_from_docstring() -> None:
    scheme = QuantScheme(group_size=None)
    w = torch.tensor([[0.3, -1.5, 0.75] + [0.0] * 5])
    scale, zp = minmax_qparams(w, scheme)
    q = quantize(w, scale, zp, scheme)
    assert torch.allclose(scale, torch.tensor([[0.2]]))
    assert q[0, :3].tolist() == [2, -8, 4]


def test_mse_observer_lowers_reconstruction_error() -> None:
    w = _weight(256, 512, dtype=torch.bfloat16, seed=3)
    errs = {}
    for observer in ("minmax", "mse"):
        scheme = QuantScheme(observer=observer)
        qw = rtn_quantize(w, scheme)
        errs[observer] = (qw.dequantize(scheme).float() - w.float()).pow(2).mean().item()
    assert errs["mse"] < 0.97 * errs["minmax"], errs


def test_mse_never_worse_per_group() -> None:
    scheme = QuantScheme(observer="mse", group_size=32, mse_grid=20)
    w = _weight(16, 128, dtype=torch.float32, seed=5)
    for qparams in (minmax_qparams, mse_qparams):
        s, z = qparams(w, scheme)
        e = (fake_quantize(w, s, z, scheme) - w).pow(2).reshape(16, 4, 32).sum(-1)
        if qparams is minmax_qparams:
            e_minmax = e
    assert bool((e <= e_minmax + 1e-12).all())


def test_zero_group_gets_eps_scale_not_nan() -> None:
    scheme = QuantScheme(group_size=32)
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    qw = rtn_quantize(w, scheme)
    assert bool(torch.isfinite(qw.scale).all()) and int(qw.q.abs().max()) == 0


def test_group_size_error_names_layer_and_choices() -> None:
    with pytest.raises(EcoquantError, match=r"model.layers.0.mlp.down_proj.*32, 64, -1"):
        check_group_size("model.layers.0.mlp.down_proj", 320, QuantScheme(group_size=128))
    check_group_size("x", 256, QuantScheme(group_size=128))


def test_scheme_rejects_bad_values() -> None:
    with pytest.raises(EcoquantError):
        QuantScheme(group_size=100)
    with pytest.raises(EcoquantError):
        QuantScheme(num_bits=16)


def test_fp8_signed_zeros_are_compressed_tensors_bytes() -> None:
    """A weight stored as -0.0 gets the FP8 code 0x00 (compressed-tensors adds a +0 zero point);
    a tiny negative weight still rounds to -0 (0x80) in both. Compared as bytes, not values."""
    from ecoquant.quantize.scheme import SCHEMES

    scheme = SCHEMES["w8a8-fp8"]
    row = [1.0, -0.0, 0.0, -1e-7, 1e-7, -0.5, -0.0, 0.25]
    w = torch.tensor([row, [-x for x in row]], dtype=torch.bfloat16)
    scale, zp = minmax_qparams(w, scheme)
    ours = quantize(w, scale, zp, scheme)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    theirs = ct_quantize(w, scale, torch.zeros_like(scale, dtype=torch.float8_e4m3fn), args, dtype=torch.float8_e4m3fn)
    assert ours.view(torch.uint8).tolist() == theirs.view(torch.uint8).tolist()
    codes = ours.view(torch.uint8)
    assert codes[0, 1] == codes[0, 2] == codes[1, 2] == codes[0, 6] == 0x00  # -0.0 and +0.0 weights
    assert codes[0, 3] == 0x80 and codes[0, 4] == 0x00  # -1e-7 and 1e-7 round to -0 and +0
