"""vLLM compatibility rules: fused siblings share one status; Marlin shape and group-size warnings."""

from __future__ import annotations

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.export.vllm_compat import check_fused_siblings, marlin_warnings
from ecoquant.models.selection import Selection
from ecoquant.quantize.scheme import QuantScheme

LINEARS = {
    "m.layers.0.self_attn.q_proj": (256, 256),
    "m.layers.0.self_attn.k_proj": (256, 64),
    "m.layers.0.self_attn.v_proj": (256, 64),
    "m.layers.0.mlp.gate_proj": (256, 512),
    "m.layers.0.mlp.up_proj": (256, 512),
    "m.layers.0.mlp.down_proj": (512, 256),
    # A KV-shared layer: q_proj alone is a consistent group.
    "m.layers.1.self_attn.q_proj": (256, 256),
    "m.layers.1.mlp.down_proj": (200, 256),
}


def sel(*names: str) -> Selection:
    return Selection(modules=names, targets=(), ignore=())


def test_split_qkv_is_refused_with_the_layer_named() -> None:
    with pytest.raises(EcoquantError, match=r"m.layers.0.self_attn: q_proj quantized but k_proj, v_proj not"):
        check_fused_siblings(sel("m.layers.0.self_attn.q_proj"), LINEARS)


def test_split_gate_up_is_refused() -> None:
    with pytest.raises(EcoquantError, match="gate_proj quantized but up_proj not"):
        check_fused_siblings(sel("m.layers.0.mlp.gate_proj"), LINEARS)


def test_consistent_groups_pass() -> None:
    check_fused_siblings(sel(*LINEARS), LINEARS)
    check_fused_siblings(sel("m.layers.0.mlp.down_proj", "m.layers.1.self_attn.q_proj"), LINEARS)


def test_marlin_warnings() -> None:
    assert marlin_warnings(sel("m.layers.0.mlp.down_proj"), LINEARS, QuantScheme()) == []
    found = marlin_warnings(sel("m.layers.1.mlp.down_proj"), LINEARS, QuantScheme(group_size=None))
    assert len(found) == 1 and "m.layers.*.mlp.down_proj (in 200, out 256)" in found[0]
    assert any("group size 256" in w for w in marlin_warnings(sel(), LINEARS, QuantScheme(group_size=256)))
