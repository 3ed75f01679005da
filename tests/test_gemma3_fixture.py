"""Gemma-3 270M from the PyPI GGUF: name mapping, config, and the converted folder against the GGUF itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from ecoquant.errors import EcoquantError
from ecoquant.fixtures.gemma3_gguf import (
    NORM_OFFSET,
    TENSOR_NAMES,
    gemma3_config_dict,
    gguf_metadata,
    hf_tensor_name,
)


def test_tensor_names_map_to_transformers() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.17.ffn_norm.weight") == "model.layers.17.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    with pytest.raises(EcoquantError, match="no Gemma-3 transformers name"):
        hf_tensor_name("blk.0.ssm_conv.weight")
    with pytest.raises(EcoquantError):
        hf_tensor_name("output.weight")  # Gemma ties the output to the embedding; an untied one is not Gemma-3


def test_config_from_metadata_alternates_five_local_one_global() -> None:
    meta = {
        "general.architecture": "gemma3",
        "gemma3.context_length": 32768,
        "gemma3.embedding_length": 640,
        "gemma3.block_count": 12,
        "gemma3.feed_forward_length": 2048,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.sliding_window": 512,
        "gemma3.attention.layer_norm_rms_epsilon": float(np.float32(1e-6)),
        "gemma3.rope.freq_base": 1_000_000.0,
        "tokenizer.ggml.tokens": ["a"] * 100,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
    }
    cfg = gemma3_config_dict(meta)
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert cfg["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert cfg["rope_parameters"]["sliding_attention"]["rope_theta"] == 1e4
    assert cfg["rms_norm_eps"] == 1e-6
    assert cfg["vocab_size"] == 100 and cfg["tie_word_embeddings"] is True
    with pytest.raises(EcoquantError, match="expected 'gemma3'"):
        gemma3_config_dict({**meta, "general.architecture": "llama"})


def test_folder_is_a_complete_bf16_checkpoint(gemma3_270m: Path) -> None:
    from transformers import AutoConfig

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (gemma3_270m / name).is_file(), name
    config = AutoConfig.from_pretrained(gemma3_270m)
    assert type(config).__name__ == "Gemma3TextConfig"
    assert config.architectures == ["Gemma3ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (640, 18, 262144)
    with safe_open(str(gemma3_270m / "model.safetensors"), framework="pt") as f:
        header = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert len(header) == 2 + 18 * len(TENSOR_NAMES)
    assert {dtype for dtype, _ in header.values()} == {"BF16"}
    assert "lm_head.weight" not in header  # tied to the embedding
    assert header["model.embed_tokens.weight"][1] == [262144, 640]
    assert header["model.layers.0.self_attn.q_proj.weight"][1] == [1024, 640]
    assert json.loads((gemma3_270m / "generation_config.json").read_text())["eos_token_id"] == [1, 106]


def test_weights_are_the_ggufs_dequantized_with_norms_unshifted(gemma3_270m: Path, gemma3_gguf: tuple[Path, object]) -> None:
    from gguf.quants import dequantize

    _, reader = gemma3_gguf
    by_name = {t.name: t for t in reader.tensors}  # type: ignore[attr-defined]
    with safe_open(str(gemma3_270m / "model.safetensors"), framework="pt") as f:
        for gguf_name in ("blk.4.ffn_down.weight", "blk.4.attn_q.weight", "blk.4.attn_v.weight", "blk.4.attn_output.weight"):
            t = by_name[gguf_name]
            ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type)).reshape(tuple(reversed(t.shape.tolist()))))
            ours = f.get_tensor(hf_tensor_name(gguf_name)).float()
            torch.testing.assert_close(ours, ref.to(torch.bfloat16).float(), rtol=0, atol=0)
        for gguf_name in ("output_norm.weight", "blk.4.post_ffw_norm.weight", "blk.4.attn_q_norm.weight"):
            stored = torch.from_numpy(np.array(by_name[gguf_name].data, dtype=np.float32))
            ours = f.get_tensor(hf_tensor_name(gguf_name)).float()
            torch.testing.assert_close(ours, (stored - NORM_OFFSET).to(torch.bfloat16).float(), rtol=0, atol=0)
    meta = gguf_metadata(reader)
    assert meta["general.architecture"] == "gemma3"


@pytest.mark.slow
def test_norm_offset_is_what_makes_the_model_work(gemma3_270m: Path) -> None:
    """Undoing llama.cpp's +1 is right: with it re-applied, the model no longer predicts obvious text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma3_270m)
    model = AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.bfloat16).eval()
    ids = tok("one, two, three, four, five, six, seven, eight,", return_tensors="pt")["input_ids"]

    def nll() -> float:
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]))

    good = nll()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(NORM_OFFSET)
    assert good < 1.5, good  # a counting sequence is easy for a working model
    assert nll() > good + 2.0


def test_cli_prints_the_cached_folder(gemma3_270m: Path) -> None:
    from ecoquant.cli import app

    result = CliRunner().invoke(app, ["fixtures", "gemma3-270m"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(gemma3_270m)
