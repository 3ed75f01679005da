"""The AWQ mapping table is checked on real models: every row is an exact identity, the tempting wrong rows are not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from calibrate_models import random_batches, save_tiny_gemma3, save_tiny_llama
from ecoquant.errors import EcoquantError
from ecoquant.fixtures.tiny_gemma4 import tiny_gemma4_path
from ecoquant.models.loading import load_config, meta_model
from ecoquant.models.topology import (
    GENERIC,
    AWQMapping,
    ResolvedMapping,
    decoder_layers,
    require_awq_mappings,
    resolve_mappings,
    topology_for,
)
from ecoquant.quantize.awq import (
    NORM_WEIGHT_OFFSET,
    fold_scales_into_linear,
    fold_scales_into_norm,
    scale_balance_weight,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topology")
    return {
        "gemma4": tiny_gemma4_path(),
        "gemma3": save_tiny_gemma3(root / "gemma3"),
        "llama": save_tiny_llama(root / "llama"),
    }


def _load(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = load_config(path)
    auto = AutoModelForImageTextToText if config.model_type == "gemma4" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _fold(m: ResolvedMapping, s: torch.Tensor) -> None:
    """Apply one smoothing with scales ``s`` using the AWQ folding helpers."""
    with torch.no_grad():
        if isinstance(m.smooth, nn.Linear):
            w, b = fold_scales_into_linear(m.smooth.weight, m.smooth.bias, s)
            m.smooth.weight.copy_(w)
            if b is not None:
                m.smooth.bias.copy_(b)
        else:
            offset = NORM_WEIGHT_OFFSET[type(m.smooth).__name__]
            folded, s = fold_scales_into_norm(m.smooth.weight, s, offset=offset)
            m.smooth.weight.copy_(folded)
        for lin in m.balance:
            lin.weight.copy_(scale_balance_weight(lin.weight, s))


def _scales(n: int, seed: int) -> torch.Tensor:
    """Positive scales spread over [1/4, 4], as AWQ's search may produce."""
    g = torch.Generator().manual_seed(seed)
    return torch.exp((torch.rand(n, generator=g) * 2 - 1) * torch.log(torch.tensor(4.0)))


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("family", ["gemma4", "gemma3", "llama"])
def test_every_table_mapping_leaves_outputs_unchanged(models: dict[str, Path], family: str) -> None:
    """Fold random scales through every mapping of every layer: the float model's logits do not move."""
    model = _load(models[family])
    topology = topology_for(model.config)
    assert topology.awq_mappings, f"{family} must have a table row"
    batch = random_batches(1, 40, 500, seed=3)[0]
    before = _logits(model, batch)
    _, layers = decoder_layers(model, topology)
    applied = 0
    for i, layer in enumerate(layers):
        for j, m in enumerate(resolve_mappings(layer, topology.awq_mappings)):
            _fold(m, _scales(m.balance[0].in_features, seed=100 * i + j))
            applied += 1
    after = _logits(model, batch)
    assert applied >= 2 * len(layers)
    assert _rel_diff(after, before) < 1e-4


def test_gemma_post_attention_norm_is_not_the_mlp_input(models: dict[str, Path]) -> None:
    """The Llama default (post_attention_layernorm -> gate/up) is wrong for Gemma's sandwich norms."""
    model = _load(models["gemma4"])
    batch = random_batches(1, 40, 500, seed=3)[0]
    before = _logits(model, batch)
    _, layers = decoder_layers(model, topology_for(model.config))
    wrong = AWQMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    (m,) = resolve_mappings(layers[1], (wrong,))
    _fold(m, _scales(m.balance[0].in_features, seed=7))
    assert _rel_diff(_logits(model, batch), before) > 1e-2


def _fold_v_o(attn: nn.Module, s: torch.Tensor) -> None:
    """v rows / s, o columns * s, repeated over the query heads that share each KV head."""
    with torch.no_grad():
        attn.v_proj.weight.div_(s.unsqueeze(1))
        n_rep = attn.o_proj.in_features // attn.v_proj.out_features
        head_dim = attn.head_dim
        per_head = s.reshape(-1, head_dim)  # [kv_heads, head_dim]
        o_scale = per_head.repeat_interleave(n_rep, dim=0).reshape(-1)
        attn.o_proj.weight.mul_(o_scale)


def test_v_to_o_smoothing_is_broken_by_gemma4_v_norm(models: dict[str, Path]) -> None:
    """The same v -> o fold is exact on Gemma-3 (no v_norm) and changes Gemma-4 (scale-free v_norm)."""
    results = {}
    for family in ("gemma3", "gemma4"):
        model = _load(models[family])
        batch = random_batches(1, 40, 500, seed=5)[0]
        before = _logits(model, batch)
        _, layers = decoder_layers(model, topology_for(model.config))
        attn = layers[0].self_attn
        _fold_v_o(attn, _scales(attn.v_proj.out_features, seed=11))
        results[family] = _rel_diff(_logits(model, batch), before)
    assert results["gemma3"] < 1e-4
    assert results["gemma4"] > 1e-2


def test_kv_shared_layers_smooth_only_q(models: dict[str, Path]) -> None:
    """Gemma-4 KV-shared layers have no k/v: the attention mapping keeps q alone, and there is no v -> o."""
    config = load_config(models["gemma4"])
    model = meta_model(config)
    topology = topology_for(config)
    _, layers = decoder_layers(model, topology)
    modes = config.get_text_config().kv_sharing_modes
    for i, layer in enumerate(layers):
        resolved = {m.smooth_name: m.balance_names for m in resolve_mappings(layer, topology.awq_mappings)}
        expected_attn = ("self_attn.q_proj",) if modes[i] == "reuse" else (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        assert resolved == {
            "input_layernorm": expected_attn,
            "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
            "mlp.up_proj": ("mlp.down_proj",),
        }


def test_v_to_o_needs_matching_widths(models: dict[str, Path]) -> None:
    """Grouped-query attention (Gemma-3 here) drops v -> o; multi-head Llama keeps it."""
    for family, expect in (("gemma3", False), ("llama", True)):
        config = load_config(models[family])
        topology = topology_for(config)
        _, layers = decoder_layers(meta_model(config), topology)
        names = [m.smooth_name for m in resolve_mappings(layers[0], topology.awq_mappings)]
        assert ("self_attn.v_proj" in names) is expect


def test_layer_paths_and_unknown_families(models: dict[str, Path]) -> None:
    config = load_config(models["gemma4"])
    path, layers = decoder_layers(meta_model(config), topology_for(config))
    assert path == "model.language_model.layers" and len(layers) == 6
    config3 = load_config(models["gemma3"])
    assert decoder_layers(meta_model(config3), topology_for(config3))[0] == "model.layers"
    with pytest.raises(EcoquantError, match=r"no smoothing mappings \(AWQ, SmoothQuant\)"):
        require_awq_mappings(GENERIC, config)
    with pytest.raises(EcoquantError, match="cannot find the decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)), GENERIC)
