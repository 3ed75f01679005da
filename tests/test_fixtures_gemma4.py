"""The Gemma-4 fixtures: the tiny checkpoint, the E4B shape twin, their cache and CLI commands."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.gemma4.modeling_gemma4 import Gemma4AudioModel, Gemma4RMSNorm, Gemma4VisionModel
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.fixtures.cache import CACHE_ENV, build_atomically, cached_fixture_dir
from ecoquant.fixtures.e4b_twin import build_e4b_twin, describe, e4b_config, write_e4b_twin
from ecoquant.fixtures.tiny_gemma4 import (
    CHAT_TEMPLATE,
    TINY,
    build_tiny_gemma4,
    special_token_id,
    tiny_gemma4_path,
)


def _digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _image(seed: int, size: tuple[int, int] = (96, 128)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return tiny_gemma4_path()


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path) -> nn.Module:
    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tiny_processor(tiny_dir: Path):
    return AutoProcessor.from_pretrained(tiny_dir)


# --- the cache helper --------------------------------------------------------------------------


def test_cached_fixture_dir_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    calls: list[Path] = []

    def build(folder: Path) -> None:
        calls.append(folder)
        assert folder.is_dir() and not any(folder.iterdir())
        (folder / "data.txt").write_text("payload")

    first = cached_fixture_dir("thing", "v1", build)
    second = cached_fixture_dir("thing", "v1", build)
    assert first == second == tmp_path / "cache" / "thing-v1"
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, then renamed into place
    assert (first / "data.txt").read_text() == "payload"
    assert cached_fixture_dir("thing", "v2", build) != first and len(calls) == 2


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached_fixture_dir("thing", "v1", broken)
    assert list(tmp_path.iterdir()) == []


def test_cache_rejects_unsafe_names_and_existing_targets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name"):
        cached_fixture_dir("../escape", "v1", lambda folder: None)
    with pytest.raises(ValueError, match="key"):
        cached_fixture_dir("thing", "a/b", lambda folder: None)
    (tmp_path / "taken").mkdir()
    with pytest.raises(EcoquantError, match="already exists"):
        build_atomically(tmp_path / "taken", lambda folder: None)


# --- the tiny checkpoint -----------------------------------------------------------------------


def test_tiny_build_is_byte_identical_across_processes(tmp_path: Path) -> None:
    here = build_tiny_gemma4(tmp_path / "here")
    script = "import sys; from ecoquant.fixtures.tiny_gemma4 import build_tiny_gemma4; build_tiny_gemma4(sys.argv[1])"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True, capture_output=True)
    files = _digests(here)
    assert files == _digests(tmp_path / "there")
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
    }
    assert set(files) == expected
    size_mb = (here / "model.safetensors").stat().st_size / 1e6
    assert 5 < size_mb < 20, f"tiny checkpoint is {size_mb:.1f} MB"


def test_build_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(EcoquantError, match="not empty"):
        build_tiny_gemma4(tmp_path)


def test_tiny_has_every_gemma4_e_module_type(tiny_dir: Path, tiny_model: nn.Module) -> None:
    inner = tiny_model.model
    assert isinstance(inner.vision_tower, Gemma4VisionModel)
    assert isinstance(inner.audio_tower, Gemma4AudioModel)
    assert inner.embed_vision is not None and inner.embed_audio is not None
    text = inner.language_model
    assert isinstance(text.per_layer_model_projection, nn.Linear)
    for layer in text.layers:
        assert isinstance(layer.per_layer_input_gate, nn.Linear)
        assert isinstance(layer.per_layer_projection, nn.Linear)
    # Tied lm_head: one tensor in memory, none stored in the file.
    assert tiny_model.lm_head.weight.data_ptr() == text.embed_tokens.weight.data_ptr()
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert not [n for n in names if n.startswith("lm_head")]
        assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
        assert all(torch.isfinite(f.get_tensor(n).float()).all() for n in names)
    assert {p.dtype for p in tiny_model.parameters()} == {torch.bfloat16}


def test_tiny_kv_sharing_covers_both_attention_types(tiny_dir: Path, tiny_model: nn.Module) -> None:
    text_config = tiny_model.config.text_config
    modes = text_config.kv_sharing_modes
    shared = [i for i, mode in enumerate(modes) if mode == "reuse"]
    assert shared == list(range(TINY.num_hidden_layers - TINY.num_kv_shared_layers, TINY.num_hidden_layers))
    shared_types = {text_config.layer_types[i] for i in shared}
    assert shared_types == {"sliding_attention", "full_attention"}
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for i, layer in enumerate(tiny_model.model.language_model.layers):
        attn = layer.self_attn
        stored = f"model.language_model.layers.{i}.self_attn.k_proj.weight" in names
        if i in shared:
            assert attn.is_kv_shared_layer and not hasattr(attn, "k_proj") and not hasattr(attn, "v_proj")
            assert not stored
        else:
            assert isinstance(attn.k_proj, nn.Linear) and isinstance(attn.v_proj, nn.Linear) and stored
    # Full-attention layers use the wider head, as E4B's do.
    assert {layer.self_attn.head_dim for layer in tiny_model.model.language_model.layers} == {64, 128}


def test_tiny_text_linears_fit_int4_group128_and_marlin(tiny_model: nn.Module) -> None:
    linears = {
        name: module
        for name, module in tiny_model.named_modules()
        if isinstance(module, nn.Linear) and (name.startswith("model.language_model") or name == "lm_head")
    }
    assert len(linears) > 40
    bad = {
        name: (m.in_features, m.out_features)
        for name, m in linears.items()
        if m.in_features % 128 or m.out_features % 64
    }
    assert bad == {}


def test_tiny_norm_scales_are_not_all_ones(tiny_model: nn.Module) -> None:
    scales = torch.cat(
        [m.weight.float() for m in tiny_model.modules() if isinstance(m, Gemma4RMSNorm) and m.with_scale]
    )
    assert scales.min() > 0
    assert scales.std() > 0.2 and (scales - 1).abs().max() > 0.5


def test_chat_template_renders_gemma4_turns(tiny_processor) -> None:
    messages = [
        {"role": "system", "content": "You read charts."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is shown? "}]},
        {"role": "assistant", "content": "A bar chart."},
        {"role": "user", "content": "Which bar is tallest?"},
    ]
    rendered = tiny_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<bos><|turn>system\nYou read charts.<turn|>\n"
        "<|turn>user\n<|image|>What is shown?<turn|>\n"
        "<|turn>model\nA bar chart.<turn|>\n"
        "<|turn>user\nWhich bar is tallest?<turn|>\n"
        "<|turn>model\n"
    )
    without_prompt = tiny_processor.apply_chat_template(messages[:1], tokenize=False)
    assert without_prompt == "<bos><|turn>system\nYou read charts.<turn|>\n"
    with pytest.raises(Exception, match="roles must be"):
        tiny_processor.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    assert tiny_processor.chat_template == CHAT_TEMPLATE


def test_tokenizer_carries_gemma4_special_tokens(tiny_processor) -> None:
    tok = tiny_processor.tokenizer
    assert len(tok) == TINY.vocab_size
    for token in ("<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio|>", "<|video|>", "<|think|>"):
        assert tok.convert_tokens_to_ids(token) == special_token_id(token)
        assert tok.encode(token, add_special_tokens=False) == [special_token_id(token)]
    assert (tok.image_token, tok.boi_token, tok.eoi_token) == ("<|image|>", "<|image>", "<image|>")
    assert (tok.audio_token, tok.boa_token, tok.eoa_token) == ("<|audio|>", "<|audio>", "<audio|>")
    text = "The total is 42.50 dollars — naïve café, 東京"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # learned merges, not one token per byte


def test_config_token_ids_point_at_the_tokenizer(tiny_model: nn.Module, tiny_processor) -> None:
    config, tok = tiny_model.config, tiny_processor.tokenizer
    assert config.image_token_id == tok.image_token_id
    assert config.boi_token_id == tok.convert_tokens_to_ids(tok.boi_token)
    assert config.eoi_token_id == tok.convert_tokens_to_ids(tok.eoi_token)
    assert config.audio_token_id == tok.audio_token_id
    assert config.boa_token_id == tok.convert_tokens_to_ids(tok.boa_token)
    assert config.eoa_token_index == tok.convert_tokens_to_ids(tok.eoa_token)
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video|>")
    assert tiny_model.generation_config.eos_token_id == [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<turn|>"),
        tok.convert_tokens_to_ids("<|tool_response>"),
    ]


def _image_prompt(processor, image: Image.Image) -> dict[str, torch.Tensor]:
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}
    ]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def test_image_text_prompt_loads_and_generates(tiny_model: nn.Module, tiny_processor) -> None:
    inputs = _image_prompt(tiny_processor, _image(0))
    ids = inputs["input_ids"][0].tolist()
    image_id = special_token_id("<|image|>")
    # 96x128 px is scaled to the largest multiple of 16 px (2x2 pooled 8-px patches) within
    # 70 * 4 patches: 112x144 px = 14x18 patches = 252 patches = 63 soft tokens.
    soft_tokens = ids.count(image_id)
    assert soft_tokens == 63
    first = ids.index(image_id)
    assert ids[first - 1] == special_token_id("<|image>")
    assert ids[first + soft_tokens] == special_token_id("<image|>")
    assert ids[0] == special_token_id("<bos>")

    with torch.no_grad():
        logits = tiny_model(**inputs).logits
        other = tiny_model(**_image_prompt(tiny_processor, _image(1))).logits
    assert logits.shape == (1, len(ids), TINY.vocab_size)
    assert torch.isfinite(logits).all()
    # The image reaches the language model: a different picture changes the next-token logits.
    assert not torch.equal(logits[0, -1], other[0, -1])

    generated = tiny_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, len(ids) + 4)
    assert generated[0, : len(ids)].tolist() == ids


def test_audio_text_prompt_runs(tiny_model: nn.Module, tiny_processor) -> None:
    tone = (0.3 * np.sin(np.arange(16_000) * 2 * np.pi * 440 / 16_000)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": tone}, {"type": "text", "text": "What?"}]}]
    inputs = tiny_processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(special_token_id("<|audio|>")) > 0
    assert inputs["input_features"].shape[-1] == 128
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
    assert torch.isfinite(logits).all()


# --- the E4B shape twin ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin() -> nn.Module:
    return build_e4b_twin()


def test_e4b_config_matches_the_published_shape() -> None:
    config = e4b_config()
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (42, 2560, 10_240)
    assert (text.num_attention_heads, text.num_key_value_heads) == (8, 2)
    assert (text.vocab_size, text.hidden_size_per_layer_input, text.num_kv_shared_layers) == (262_144, 256, 18)
    assert text.layer_types.count("full_attention") == 7 and text.layer_types[-1] == "full_attention"
    head_dims = {text.per_layer_config[i].head_dim for i in range(42)}
    assert head_dims == {256, 512}
    assert text.final_logit_softcapping == 30.0 and text.sliding_window == 512
    assert config.vision_config.hidden_size == 768 and config.audio_config.hidden_size == 1024


def test_e4b_twin_is_weightless_with_18_kv_shared_layers(twin: nn.Module) -> None:
    params = list(twin.parameters())
    assert {p.device.type for p in params} == {"meta"}
    assert {p.dtype for p in params} == {torch.bfloat16}
    layers = twin.model.language_model.layers
    assert len(layers) == 42
    shared = [i for i, layer in enumerate(layers) if layer.self_attn.is_kv_shared_layer]
    assert shared == list(range(24, 42))
    for i in shared:
        assert not hasattr(layers[i].self_attn, "k_proj") and not hasattr(layers[i].self_attn, "v_proj")
    types = twin.config.text_config.layer_types
    assert {types[i] for i in shared} == {"sliding_attention", "full_attention"}
    k_projs = [n for n, _ in twin.named_modules() if n.startswith("model.language_model") and n.endswith("k_proj")]
    assert len(k_projs) == 24


def test_e4b_twin_parameter_count_and_footprint(twin: nn.Module) -> None:
    text = twin.config.text_config
    V, H, I, L, P = (
        text.vocab_size,
        text.hidden_size,
        text.intermediate_size,
        text.num_hidden_layers,
        text.hidden_size_per_layer_input,
    )
    # Matrices of the language model, from the config alone.
    expected = V * H + V * L * P + H * L * P  # embedding, PLE table, per_layer_model_projection
    for i in range(L):
        hd = text.per_layer_config[i].head_dim
        q_and_o = 2 * H * text.num_attention_heads * hd
        k_and_v = 0 if i >= L - text.num_kv_shared_layers else 2 * H * text.num_key_value_heads * hd
        expected += q_and_o + k_and_v + 3 * H * I + 2 * H * P
    lm = twin.model.language_model
    counted = sum(
        p.numel() for m in lm.modules() if isinstance(m, (nn.Linear, nn.Embedding)) for p in m.parameters(recurse=False)
    )
    assert counted == expected
    shape = describe(twin)
    assert (shape.num_layers, shape.kv_shared_layers) == (42, 18)
    assert shape.parameter_bytes == 2 * shape.num_parameters
    # "8B params" on the model card, "~16 GiB bf16" in the seed (it is 15.9e9 bytes = 14.8 GiB).
    assert 7.8e9 < shape.num_parameters < 8.1e9
    assert 15.5e9 < shape.parameter_bytes < 16.2e9


def test_write_e4b_twin_is_a_config_only_folder(tmp_path: Path) -> None:
    folder = write_e4b_twin(tmp_path / "e4b")
    assert [f.name for f in folder.iterdir()] == ["config.json"]
    loaded = AutoConfig.from_pretrained(folder).to_dict()
    expected = e4b_config().to_dict()
    loaded.pop("_name_or_path"), expected.pop("_name_or_path")
    assert loaded == expected
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma4ForConditionalGeneration"]


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_tiny_gemma4_prints_the_cached_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["fixtures", "tiny-gemma4"], env={CACHE_ENV: str(tmp_path)})
    assert result.exit_code == 0, result.output
    folder = Path(result.stdout.strip())
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    assert _digests(folder) == _digests(tiny_gemma4_path())


def test_cli_tiny_gemma4_out_must_be_new(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["fixtures", "tiny-gemma4", "--out", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert Path(ok.stdout.strip()) == tmp_path / "m" and (tmp_path / "m" / "config.json").is_file()
    again = runner.invoke(app, ["fixtures", "tiny-gemma4", "--out", str(tmp_path / "m")])
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output


def test_cli_e4b_twin(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["fixtures", "e4b-twin", "--out", str(tmp_path / "twin")])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == tmp_path / "twin"
    assert [f.name for f in (tmp_path / "twin").iterdir()] == ["config.json"]
    assert "42 layers (18 KV-shared)" in result.output
