"""The vision-language families beyond Gemma-4: layout in and out, decoder-only ``auto``, vision geometry, costs.

Each family's fixture is a tiny random checkpoint saved by transformers in the
Hub's layout (:mod:`ecoquant.fixtures.tiny_families`). Fast tests (RTN, pure
arithmetic) run by default; calibrated methods and W8A8 with a quality check
are ``slow``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.energy.costs import CostTerms, VisionCosts, checkpoint_costs
from ecoquant.errors import EcoquantError
from ecoquant.fixtures.tiny_families import FIXTURES, family_fixture_path
from ecoquant.models.families import (
    VLM_FAMILIES,
    DynamicResolution,
    Encoding,
    FixedTokensPanScan,
    ImageSplitting,
    LongestEdgePatches,
)
from ecoquant.models.layout import checkpoint_layout
from ecoquant.models.loading import load_config, meta_model
from ecoquant.models.presets import get_preset
from ecoquant.quantize.scheme import QuantScheme

NAMES = sorted(FIXTURES)
PACKED = ("weight_packed", "weight_scale", "weight_shape")


def _names(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module", params=NAMES)
def rtn_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source fixture, its RTN W4A16 checkpoint under ``auto``), one per family."""
    source = family_fixture_path(request.param)
    out = tmp_path_factory.mktemp(request.param) / "w4a16"
    quantize(source, out, QuantizeConfig(scheme=QuantScheme(group_size=16)), show_progress=False)
    return source, out


def test_fixtures_keep_the_hub_layout() -> None:
    """save_pretrained reverts transformers' mapping: Qwen2.5-VL, Gemma-3 and Mistral-3 keep their original names."""
    renamed = {name for name in NAMES if checkpoint_layout(family_fixture_path(name)).renamed}
    assert renamed == {"tiny-qwen2_5_vl", "tiny-gemma3-mm", "tiny-mistral3"}
    qwen = _names(family_fixture_path("tiny-qwen2_5_vl"))
    assert "visual.blocks.0.attn.qkv.weight" in qwen and "model.layers.0.self_attn.q_proj.weight" in qwen
    # gemma-3-4b-it's index names the SigLIP tower under vision_model (vLLM's gemma3_mm loads only that)
    gemma3 = _names(family_fixture_path("tiny-gemma3-mm"))
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in gemma3
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in gemma3
    assert not any(n.startswith("vision_tower.encoder.") for n in gemma3)


def test_gemma3_fixture_has_the_newline_pieces_vllm_looks_up() -> None:
    """vLLM's gemma3_mm processor reads ``vocab["\\n"]`` .. ``vocab["\\n\\n\\n\\n"]`` (Gemma-3's own vocabulary has
    them); the processor's "\\n\\n" around an image must tokenize to the one piece, as it does on the real model."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(family_fixture_path("tiny-gemma3-mm"))
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    runs = ["\n" * k for k in range(1, 5)]
    assert all(r in vocab and vocab[r] < 640 for r in runs)
    assert len(tokenizer) <= 640  # every id has an embedding row
    ids = tokenizer("a\n\nb\nc", add_special_tokens=False)["input_ids"]
    assert vocab["\n\n"] in ids and vocab["\n"] in ids and tokenizer.decode(ids) == "a\n\nb\nc"
    image = tokenizer(processor.full_image_sequence, add_special_tokens=False)["input_ids"]
    assert image[0] == image[-1] == vocab["\n\n"]


def test_layout_round_trip(rtn_checkpoint: tuple[Path, Path]) -> None:
    """Source names in, the same names out: untouched tensors keep name and bytes, quantized ones are packed
    under their source module name, and the output's layout is the source's."""
    source, out = rtn_checkpoint
    src, dst = _names(source), _names(out)
    layout = checkpoint_layout(source)
    quantized = {n.removesuffix(".weight_packed") for n in dst if n.endswith(".weight_packed")}
    assert quantized, "nothing was quantized"
    expected = {n for n in src if n.removesuffix(".weight") not in quantized}
    expected |= {f"{m}.{suffix}" for m in quantized for suffix in PACKED}
    assert set(dst) == expected
    for name in src:
        if name in dst:
            assert torch.equal(src[name], dst[name]), name
    out_layout = checkpoint_layout(out)  # the output reads back in the same layout, each name to the same tree name
    assert out_layout.renamed == layout.renamed
    assert all(out_layout.tree_name(n) == layout.tree_name(n) for n in dst)
    for module in quantized:  # every packed module is a decoder Linear of the tree
        assert layout.tree_module(module).startswith(VLM_FAMILIES[load_config(source).model_type].decoder)


def test_auto_leaves_the_towers_bf16(rtn_checkpoint: tuple[Path, Path]) -> None:
    """``auto`` quantizes the language stack only; every tower and projector Linear is in ``ignore``, bytes unchanged."""
    source, out = rtn_checkpoint
    config = load_config(source)
    row = VLM_FAMILIES[config.model_type]
    linears = [n for n, m in meta_model(config).named_modules() if isinstance(m, torch.nn.Linear)]
    towers = [n for n in linears if n.startswith(row.towers)]
    decoder = [n for n in linears if n.startswith(row.decoder)]
    assert towers and decoder
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(towers) <= set(qc["ignore"]) and not set(decoder) & set(qc["ignore"])
    layout = checkpoint_layout(out)
    packed = sorted(layout.tree_module(n.removesuffix(".weight_packed")) for n in _names(out) if n.endswith(".weight_packed"))
    assert packed == sorted(decoder)


@pytest.mark.parametrize("model_type", sorted(VLM_FAMILIES))
def test_each_family_has_its_auto_row(model_type: str) -> None:
    """Without its row, ``auto`` would fall back to the text-decoder preset and quantize the towers."""
    preset = get_preset("auto", model_type)
    assert preset.name == f"{model_type}-decoder"
    assert all(any(prefix.replace(".", r"\.") in i for i in preset.ignore) for prefix in VLM_FAMILIES[model_type].towers)


def test_names_matching_neither_layout_are_one_error(tmp_path: Path) -> None:
    source = family_fixture_path("tiny-qwen2_5_vl")
    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    tensors = _names(source)
    tensors = {k.replace("visual.", "vision_encoder.", 1): v for k, v in tensors.items()}
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EcoquantError, match=r"match no module of Qwen2_5_VLForConditionalGeneration.*first: vision_encoder\."):
        quantize(bad, tmp_path / "out", QuantizeConfig(), show_progress=False)


# ----------------------------------------------------------------- vision geometry, by hand


def test_qwen_dynamic_resolution_by_hand() -> None:
    # 1280 x 960 rounds to 1288 x 952 (multiples of 28), 1,226,176 px > 802,816: scaled by
    # beta = sqrt(1,228,800 / 802,816) = 1.2372 and floored to 28s: 1008 x 756 -> 72 x 54 patches.
    geo = DynamicResolution(patch=14, merge=2, min_pixels=3136)
    assert geo.encode(1280, 960, 1024 * 28 * 28) == Encoding((72 * 54,), 72 * 54 // 4)
    # Under the budget: 280 x 280 stays, 20 x 20 patches, 100 tokens.
    assert geo.encode(280, 280, 1024 * 28 * 28) == Encoding((400,), 100)


def test_idefics3_image_splitting_by_hand() -> None:
    # Longest edge 1280 -> rounded up to 3 tiles of 512 = 1536; 1536 x 1152 -> 3 x 3 crops + 1 global.
    geo = ImageSplitting(tile=512, patch=16, scale=4)
    assert geo.encode(1280, 960, 1536) == Encoding((1024,) * 10, 10 * 1024 // 16)
    assert geo.encode(400, 300, 1536) == Encoding((1024,), 64)  # one tile: no global image


def test_gemma3_pan_and_scan_by_hand() -> None:
    geo = FixedTokensPanScan(size=896, patch=14, tokens=256, max_crops=4)
    assert geo.encode(1280, 960, 0) == Encoding((4096,), 256)  # off: one crop
    # on: ratio 1.33 >= 1.2 -> floor(1.33 + 0.5) = 1, at least 2 crops -> 3 crops in all.
    assert geo.encode(1280, 960, 1) == Encoding((4096,) * 3, 768)
    assert geo.encode(1000, 1000, 1) == Encoding((4096,), 256)  # square: no crops


def test_pixtral_longest_edge_by_hand() -> None:
    # 1280 x 960 scaled by 0.8 -> 1024 x 768 -> 74 x 55 patches (ceil); 37 x 28 tokens + one break per row
    # (the break and end tokens are text tokens: separators, no projector work).
    geo = LongestEdgePatches(patch=14, merge=2)
    assert geo.encode(1280, 960, 1024) == Encoding((74 * 55,), 28 * 37, separators=28)


# The shared tiny decoder (tiny_families.TEXT): hidden 64, 4 query heads and 2 KV heads of 16, MLP 128, 2 layers,
# vocabulary 640. Its Linears a layer: q, o 64x64; k, v 64x32; gate, up 64x128; down 128x64 -> 36,864 weights,
# 2 x 36,864 = 73,728 FLOPs a token; the head 64 x 640 -> 2 x 40,960 = 81,920 FLOPs a scored position.
TEXT_LINEAR_WEIGHTS = 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 128 + 128 * 64
HEAD_WEIGHTS = 640 * 64


def _assert_text_terms(terms: CostTerms, extra_per_layer: int) -> None:
    """Decoder FLOPs, head FLOPs and decode bytes of the shared tiny decoder, by hand. ``extra_per_layer``: the
    family's per-layer weights besides the Linears (norms, biases), counted in bytes only (bf16: 2 bytes each)."""
    assert terms.decoder_flops_per_token == 2 * 2 * TEXT_LINEAR_WEIGHTS  # 2 layers x 73,728 = 147,456
    assert sum(terms.head_flops.values()) == 2 * HEAD_WEIGHTS  # 81,920, tied or not: the head is a matmul
    # Decode reads every decoder weight (2 layers, then the final norm of 64) and the whole head or the tied
    # embedding (the same 640 x 64), and one 64-wide row of the embedding; the towers are not read.
    assert terms.decode.decoder == 2 * (2 * (TEXT_LINEAR_WEIGHTS + extra_per_layer) + 64)
    assert terms.decode.head == 2 * HEAD_WEIGHTS
    assert terms.decode.embedding_rows == 2 * 64


def _assert_vision(vision: VisionCosts | None, enc: Encoding, by_hand: float) -> None:
    """One image's vision FLOPs, as ``inspect`` prices an encoding and as the request model prices its soft tokens."""
    assert vision is not None
    assert math.isclose(sum(vision.image_flops(enc).values()), by_hand)
    assert math.isclose(vision.total_flops(enc.soft_tokens), by_hand)


def test_tiny_idefics3_flops_and_bytes_by_hand() -> None:
    """The energy model's terms for the tiny Idefics3 against a hand count (see the fixture's sizes)."""
    terms = checkpoint_costs(family_fixture_path("tiny-idefics3"))
    # Llama decoder: 2 RMS norms of 64 a layer, no biases; the head is its own (untied).
    _assert_text_terms(terms, extra_per_layer=2 * 64)
    # Vision: a 64 x 64 image is one 64-px tile of 8 x 8 = 64 patches (no global image), 64 / 2² = 16 tokens.
    # Per patch: the patch conv 3 x 8 x 8 -> 32 (2 x 6,144); per layer q, k, v, o 32x32 and fc1, fc2 32x64
    # (2 x 8,192). Connector 128 -> 64 per token; attention 4 x 32 x 64² per layer.
    enc = ImageSplitting.from_config(load_config(family_fixture_path("tiny-idefics3"))).encode(64, 64, 64)
    assert enc == Encoding((64,), 16)
    per_patch = 2 * 3 * 8 * 8 * 32 + 2 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    _assert_vision(terms.vision, enc, per_patch * 64 + 2 * 128 * 64 * 16 + 2 * 4 * 32 * 64 * 64)


def test_tiny_qwen2_5_vl_flops_and_bytes_by_hand() -> None:
    """Qwen2.5-VL: q/k/v biases in the decoder, a Conv3d patch embedding over two frames, SwiGLU vision blocks
    with biases, windowed attention in all but ``fullatt_block_indexes``, the merger MLP once per merged token."""
    path = family_fixture_path("tiny-qwen2_5_vl")
    terms = checkpoint_costs(path)
    # Qwen2 decoder: q, k, v biases (64 + 32 + 32) and 2 RMS norms of 64 a layer; the head is its own.
    _assert_text_terms(terms, extra_per_layer=64 + 32 + 32 + 2 * 64)
    # A 112 x 112 image: a multiple of 28 px inside [min_pixels, budget], so 8 x 8 = 64 patches of 14 px,
    # 2 x 2 merged into 16 soft tokens.
    config = load_config(path)
    enc = DynamicResolution.from_config(config).encode(112, 112, VLM_FAMILIES["qwen2_5_vl"].budget.default)
    assert enc == Encoding((64,), 16)
    # Per patch: Conv3d 3 x 2 x 14 x 14 -> 32 (a still image is its frame twice: temporal patch 2), 2 x 37,632;
    # per block qkv 32x96, proj 32x32, gate and up 32x64, down 64x32: 2 x 10,240; its biases are not FLOPs.
    per_patch = 2 * 3 * 2 * 14 * 14 * 32 + 2 * 2 * (32 * 96 + 32 * 32 + 3 * 32 * 64)
    # Per soft token: the merger's MLP on 4 x 32 = 128 features, 128x128 then 128x64: 2 x 24,576.
    per_token = 2 * (128 * 128 + 128 * 64)
    # Attention, width 96 / 3 = 32: block 0 attends within windows of 56 px // 2 // 14 = 2 merged tokens a side,
    # 4 x 4 = 16 patches (the 8 x 8 image is 4 whole windows); block 1 (fullatt_block_indexes) over all 64.
    assert terms.vision is not None and terms.vision.windows == (16, None)
    attention = 4 * 32 * 64 * 16 + 4 * 32 * 64 * 64
    _assert_vision(terms.vision, enc, per_patch * 64 + per_token * 16 + attention)


def test_tiny_qwen3_vl_flops_and_bytes_by_hand() -> None:
    """Qwen3-VL: q/k norms in the decoder, a Conv3d patch embedding of 16-px patches, GELU vision MLPs, the
    merger and one DeepStack merger (``deepstack_visual_indexes`` = [1]) each once per merged token."""
    path = family_fixture_path("tiny-qwen3_vl")
    terms = checkpoint_costs(path)
    # Qwen3 decoder: q_norm and k_norm of 16 (head dim) and 2 RMS norms of 64 a layer, no biases; its own head.
    _assert_text_terms(terms, extra_per_layer=2 * 16 + 2 * 64)
    # A 128 x 128 image: a multiple of 32 px, 8 x 8 = 64 patches of 16 px, 16 soft tokens.
    enc = DynamicResolution.from_config(load_config(path)).encode(128, 128, VLM_FAMILIES["qwen3_vl"].budget.default)
    assert enc == Encoding((64,), 16)
    # Per patch: Conv3d 3 x 2 x 16 x 16 -> 32, 2 x 49,152; per block qkv 32x96, proj 32x32, fc1 32x64,
    # fc2 64x32: 2 x 8,192. (The learned position embedding is interpolated: gathers, not matmuls.)
    per_patch = 2 * 3 * 2 * 16 * 16 * 32 + 2 * 2 * (32 * 96 + 32 * 32 + 2 * 32 * 64)
    # Per soft token: the merger (norm, 128x128, 128x64) and the DeepStack merger of block 1's output (the same
    # shapes, its norm after the 2 x 2 shuffle), each 2 x 24,576.
    per_token = 2 * 2 * (128 * 128 + 128 * 64)
    # Attention: both blocks over all 64 patches, width 32.
    attention = 2 * 4 * 32 * 64 * 64
    _assert_vision(terms.vision, enc, per_patch * 64 + per_token * 16 + attention)


def test_tiny_gemma3_mm_flops_and_bytes_by_hand() -> None:
    """Gemma-3: q/k norms and four norms a layer in the decoder, a tied head, SigLIP with a Conv2d patch embedding,
    the projector a bare Parameter (a matmul, not a Linear) once per pooled soft token."""
    path = family_fixture_path("tiny-gemma3-mm")
    terms = checkpoint_costs(path)
    # Gemma-3 decoder: q_norm, k_norm of 16 and input, post-attention, pre- and post-feedforward norms of 64 a
    # layer; the head is tied (the embedding, read in full).
    _assert_text_terms(terms, extra_per_layer=2 * 16 + 4 * 64)
    # A 64 x 64 image, pan-and-scan off: one crop of (64 / 8)² = 64 patches, average-pooled 4 x 4 into
    # mm_tokens_per_image = 4 soft tokens.
    enc = FixedTokensPanScan.from_config(load_config(path)).encode(64, 64, 0)
    assert enc == Encoding((64,), 4)
    # Per patch: Conv2d 3 x 8 x 8 -> 32, 2 x 6,144; per layer q, k, v, out 32x32, fc1 32x64, fc2 64x32:
    # 2 x 8,192. No attention-pooling head: vision_use_head is false, as in the released configs (the row's
    # `unused` entry prices one nowhere where a config builds it; Gemma-3 never reads its output).
    per_patch = 2 * 3 * 8 * 8 * 32 + 2 * 2 * (4 * 32 * 32 + 2 * 32 * 64)
    # Per soft token: the pooled 32-wide feature times mm_input_projection_weight (32 x 64): 2 x 2,048.
    per_token = 2 * 32 * 64
    attention = 2 * 4 * 32 * 64 * 64  # both layers over the crop's 64 patches
    _assert_vision(terms.vision, enc, per_patch * 64 + per_token * 4 + attention)


def test_tiny_mistral3_flops_and_bytes_by_hand() -> None:
    """Mistral-3: a Mistral decoder with a tied head (the fixture's config), Pixtral with a Conv2d patch embedding
    and SwiGLU layers, the patch merger and projector once per merged token; row-end tokens are not projected."""
    path = family_fixture_path("tiny-mistral3")
    terms = checkpoint_costs(path)
    # Mistral decoder: 2 RMS norms of 64 a layer, no biases; tie_word_embeddings true in this fixture's config.
    _assert_text_terms(terms, extra_per_layer=2 * 64)
    # A 64 x 64 image within longest_edge 64: 8 x 8 = 64 patches, 2 x 2 merged into 4 x 4 = 16 soft tokens,
    # and 4 row ends ([IMG_BREAK] x 3, [IMG_END]): text tokens, no vision work.
    enc = LongestEdgePatches.from_config(load_config(path)).encode(64, 64, 64)
    assert enc == Encoding((64,), 16, separators=4)
    # Per patch: Conv2d 3 x 8 x 8 -> 32 (no bias), 2 x 6,144; per layer q, k, v, o 32x32, gate and up 32x64,
    # down 64x32: 2 x 10,240.
    per_patch = 2 * 3 * 8 * 8 * 32 + 2 * 2 * (4 * 32 * 32 + 3 * 32 * 64)
    # Per soft token: the patch merger's 4 x 32 = 128 -> 32, then linear_1 32 -> 64 and linear_2 64 -> 64.
    per_token = 2 * (128 * 32 + 32 * 64 + 64 * 64)
    attention = 2 * 4 * 32 * 64 * 64  # both layers over the image's 64 patches (head dim 16 x 2 heads)
    _assert_vision(terms.vision, enc, per_patch * 64 + per_token * 16 + attention)


# ----------------------------------------------------------------- calibrated methods (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_gptq_and_w8a8_load_and_stay_close(name: str, tmp_path: Path) -> None:
    """GPTQ W4A16, W8A8 INT8 and FP8 on each family: written in the source layout, loaded by transformers
    (through its own mapping), and close to the base by KL on text."""
    from ecoquant.calibrate.data import CalibrationConfig
    from ecoquant.quality.run import QualityConfig, compare
    from ecoquant.quantize.scheme import SCHEMES

    source = family_fixture_path(name)
    calib = CalibrationConfig(source="corpus", num_samples=4, max_length=64)
    configs = {
        "gptq": QuantizeConfig(method="gptq", scheme=QuantScheme(group_size=16), calibration=calib),
        "int8": QuantizeConfig(scheme=SCHEMES["w8a8-int8"]),
        "fp8": QuantizeConfig(scheme=SCHEMES["w8a8-fp8"]),
    }
    outs = []
    for label, config in configs.items():
        out = tmp_path / label
        quantize(source, out, config, show_progress=False)
        assert checkpoint_layout(out).renamed == checkpoint_layout(source).renamed
        outs.append(out)
    report = compare(source, outs, QualityConfig(window_tokens=64, max_windows=2, device="cpu"))
    text = report.part("text")
    assert len(text.variants) == 3
    for score in text.variants:
        assert 0.0 < score.kl_mean < 0.05, (score.model, score.kl_mean)  # quantized: not identical, and close


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_awq_gptq_end_to_end(name: str, tmp_path: Path) -> None:
    """AWQ smoothing (the family's mapping rows) then GPTQ, W4A16, on each family, kept short (4 windows of 32
    tokens, a 4-point grid): written in the source layout with the towers untouched, the smoothing recorded for
    the decoder's layers, loaded by transformers through its own mapping and close to the base by KL."""
    from ecoquant.calibrate.data import CalibrationConfig
    from ecoquant.quality.run import QualityConfig, compare
    from ecoquant.quantize.awq import AWQConfig

    source = family_fixture_path(name)
    out = tmp_path / "awq-gptq"
    config = QuantizeConfig(method="awq-gptq", scheme=QuantScheme(group_size=16), awq=AWQConfig(grid=4, clip_grid=4),
                            calibration=CalibrationConfig(source="corpus", num_samples=4, max_length=32))
    quantize(source, out, config, show_progress=False)
    assert checkpoint_layout(out).renamed == checkpoint_layout(source).renamed
    src, dst = _names(source), _names(out)
    row = VLM_FAMILIES[load_config(source).model_type]
    layout = checkpoint_layout(source)
    towers = [n for n in src if layout.tree_name(n).startswith(row.towers)]
    assert towers and all(torch.equal(src[n], dst[n]) for n in towers)  # smoothing never reaches a tower
    recipe = json.loads((out / "quant_recipe.json").read_text())
    assert recipe["method"] == "awq-gptq", recipe.get("method")
    searched = [m for unit in recipe["method_config"]["stats"]["units"].values() for m in unit.get("smoothing", ())]
    assert len(searched) >= 2 * load_config(source).get_text_config().num_hidden_layers  # the row's mappings, per layer
    assert all(n.startswith(row.decoder) for m in searched for n in (m["smooth"], *m["balance"]))
    text = compare(source, [out], QualityConfig(window_tokens=64, max_windows=2, device="cpu")).part("text")
    assert 0.0 < text.variants[0].kl_mean < 0.05, text.variants[0].kl_mean


# ----------------------------------------------------------------- AWQ / SmoothQuant rows


@pytest.mark.parametrize("name", NAMES)
def test_smoothing_rows_are_exact_on_each_family(name: str) -> None:
    """Folding random scales through every mapping of the family's topology row leaves the logits unchanged
    (float32), so AWQ and SmoothQuant may use the row; at least two smoothings per layer apply."""
    from transformers import AutoModelForImageTextToText

    from ecoquant.models.topology import decoder_layers, resolve_mappings, topology_for
    from ecoquant.quantize.awq import NORM_WEIGHT_OFFSET, fold_scales_into_linear, fold_scales_into_norm, scale_balance_weight

    model = AutoModelForImageTextToText.from_pretrained(family_fixture_path(name), dtype=torch.float32).eval()
    topology = topology_for(model.config)
    assert topology.awq_mappings, f"{name} has no smoothing row"
    ids = torch.randint(20, 500, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        _, layers = decoder_layers(model, topology)
        applied = 0
        g = torch.Generator().manual_seed(0)
        for layer in layers:
            for m in resolve_mappings(layer, topology.awq_mappings):
                s = torch.exp((torch.rand(m.balance[0].in_features, generator=g) * 2 - 1) * math.log(4.0))
                if isinstance(m.smooth, torch.nn.Linear):
                    w, bias = fold_scales_into_linear(m.smooth.weight, m.smooth.bias, s)
                    m.smooth.weight.copy_(w)
                    if bias is not None:
                        m.smooth.bias.copy_(bias)
                else:
                    folded, s = fold_scales_into_norm(m.smooth.weight, s, offset=NORM_WEIGHT_OFFSET[type(m.smooth).__name__])
                    m.smooth.weight.copy_(folded)
                for lin in m.balance:
                    lin.weight.copy_(scale_balance_weight(lin.weight, s))
                applied += 1
        after = model(input_ids=ids).logits
    assert applied >= 2 * len(layers)
    assert float((after - before).abs().max() / before.abs().max()) < 1e-4


# ----------------------------------------------------------------- levers


@pytest.mark.parametrize("model_type", sorted(VLM_FAMILIES))
def test_each_family_has_its_levers_row(model_type: str) -> None:
    """The image budget is a vLLM serving option under the family's own processor key; W8A8 is a candidate."""
    from ecoquant.optimize.levers import family_levers, serving_levers
    from ecoquant.serve.vllm_features import TESTED_VLLM

    levers = family_levers(model_type)
    row = VLM_FAMILIES[model_type]
    assert {"method": "rtn", "scheme": "w8a8-int8"} in [dict(w) for w in levers.weights]
    assert levers.processor_budgets, f"{model_type} has no image-budget lever"
    served = serving_levers(Path("."), levers, "vllm", TESTED_VLLM).serving
    budgets = [s["mm_processor_kwargs"] for s in served if "mm_processor_kwargs" in s]
    assert budgets == [row.budget.processor_kwargs(v) for v in row.budget.values if v != row.budget.default]
    assert not any("mm_processor_kwargs" in s for s in serving_levers(Path("."), levers, "transformers", TESTED_VLLM).serving)


def test_budget_keys_as_vllm_reads_them() -> None:
    assert VLM_FAMILIES["qwen2_5_vl"].budget.processor_kwargs(200704) == {"max_pixels": 200704}
    assert VLM_FAMILIES["idefics3"].budget.processor_kwargs(1024) == {"size": {"longest_edge": 1024}}
    assert VLM_FAMILIES["gemma3"].budget.processor_kwargs(1) == {"do_pan_and_scan": True}


# ----------------------------------------------------------------- eval on the built-in suite (slow)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_eval_runs_each_family_on_the_builtin_suite(name: str, tmp_path: Path) -> None:
    """``ecoquant eval`` (transformers backend) on the family's base and its RTN W4A16 checkpoint: every request
    is answered, image tokens are counted through the family's processor, and the energy is modelled with a
    vision-encoder share. Scores of random weights mean nothing; the mechanics are checked."""
    import subprocess
    import sys

    source = family_fixture_path(name)
    w4 = tmp_path / "w4a16"
    quantize(source, w4, QuantizeConfig(scheme=QuantScheme(group_size=16)), show_progress=False)
    out = tmp_path / "eval"
    ecoquant = Path(sys.executable).parent / "ecoquant"
    done = subprocess.run(
        [str(ecoquant), "eval", "--base", str(source), "--variant", str(w4), "--suite", "builtin-basic",
         "--limit", "1", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["role"] for r in runs] == ["base", "variant"]
    for run in runs:
        assert run["requests"] == len(run["samples"]) > 0
        assert run["modelled_energy"]["parts"]["vision_encoder"] > 0, run["modelled_energy"]


# ----------------------------------------------------------------- optimize to a submission (memorised eval pages)

#: W4A16 by RTN (group 32: the tiny decoder is 64 wide) and W8A8 INT8 by RTN: data-free, so the grid stays cheap.
SMALL_GRID = {"candidates": [{"method": "rtn", "group_size": 32}, {"method": "rtn", "scheme": "w8a8-int8"}]}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_optimize_grid_to_a_submission_on_memorised_pages(name: str, tmp_path: Path) -> None:
    """``optimize --grid`` (RTN W4A16, RTN W8A8 INT8) on ``builtin-basic`` size 2, through the decision to the
    submission folder. The base is the family's fixture briefly overfit on those very requests (**memorised eval
    pages**, :mod:`ecoquant.fixtures.memorise`): its scores prove the mechanics -- real recoveries, a gate that
    decides, a pick, a submission in the source's layout -- and say nothing of any model's or method's quality."""
    import yaml

    from ecoquant.eval.backends.base import generation_settings
    from ecoquant.eval.runner import EvalConfig, RunRecord
    from ecoquant.fixtures.memorise import CONFIG_KEY
    from ecoquant.optimize import OptimizeConfig, optimize
    from ecoquant.optimize.grid import grid_from_mapping

    source = family_fixture_path(name, memorised=True)
    out = tmp_path / "run"
    eval_config = EvalConfig(suite="builtin-basic", size=2, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0)
    optimize(source, OptimizeConfig(out=out, grid=grid_from_mapping(SMALL_GRID), eval=eval_config), show_progress=False)

    record = RunRecord.load(out / "results.json")
    base = next(r for r in record.runs if r.role == "base")
    assert min(base.suite_scores.values()) >= 0.5, base.suite_scores  # memorised: the base answers its pages
    choice = json.loads((out / "choice.json").read_text())
    standings = {s["name"]: s for s in choice["standings"]}
    assert set(standings) == {"rtn-auto-g32", "rtn-auto-w8a8-int8"}
    assert all(s["mean_recovery"] is not None and s["mean_recovery"] > 0 for s in standings.values()), standings
    assert choice["pick"] is not None, choice["summary"]
    pick = standings[choice["pick"]]
    assert pick["passed"] and pick["mean_recovery"] >= choice["gate"]
    # the rule: no passing candidate is cheaper than the pick (cost: the energy modelled for the target GPU)
    assert all(not s["passed"] or s["cost"] >= pick["cost"] for s in standings.values())

    sub = out / "submission"
    for file in ("model.safetensors", "config.json", "vllm_config.yaml", "README.md", "quant_recipe.json"):
        assert (sub / file).is_file(), file
    assert yaml.safe_load((sub / "vllm_config.yaml").read_text())["model"] == "."
    assert f"| {choice['pick']} |" in (sub / "README.md").read_text()
    config = json.loads((sub / "config.json").read_text())
    assert CONFIG_KEY in config and "quantization_config" in config  # the label travels with the weights
    layout, shipped = checkpoint_layout(source), checkpoint_layout(sub)
    assert shipped.renamed == layout.renamed
    src_names = set(_names(source))
    packed = {n.rsplit(".", 1)[0] for n in _names(sub) if n.endswith((".weight_packed", ".weight_scale"))}
    assert packed and all(f"{m}.weight" in src_names for m in packed)  # quantized under the source's own names


# ----------------------------------------------------------------- the image budget in the transformers backend

#: (smaller, larger) image budget per fixture under its family's own key, within the tiny processors' ranges:
#: Qwen max_pixels (16 and 64 soft tokens' worth), Gemma-3 pan-and-scan off / on (on: the 1024 x 384 image is
#: 2.7 times wider than tall, so 3 crops of at least transformers' 256-px minimum join it), Idefics3 and
#: Mistral-3 size.longest_edge (one 64-px tile or 4 tiles + global; 32 or 64 px).
BUDGETS = {"tiny-qwen2_5_vl": (16 * 28 * 28, 64 * 28 * 28), "tiny-qwen3_vl": (16 * 32 * 32, 64 * 32 * 32),
           "tiny-gemma3-mm": (0, 1), "tiny-idefics3": (64, 128), "tiny-mistral3": (32, 64)}


@pytest.mark.parametrize("name", NAMES)
def test_transformers_backend_honours_the_familys_image_budget(name: str) -> None:
    """``TransformersOptions.image_budget`` reaches the processor under the family row's own key: a smaller
    budget gives the same wide image fewer image tokens, counted from the prompt the model was given."""
    import io

    from PIL import Image

    from ecoquant.eval.backends.base import ChatRequest, ImagePart, Message, TextPart, generation_settings
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions

    buf = io.BytesIO()
    Image.new("RGB", (1024, 384), "white").save(buf, format="PNG")
    request = ChatRequest("r", (Message("user", (ImagePart(buf.getvalue()), TextPart("What is it?"))),), 1)
    counts = []
    for value in BUDGETS[name]:
        backend = TransformersBackend.load(family_fixture_path(name), TransformersOptions(device="cpu", image_budget=value))
        assert backend.describe()["image_budget"] == VLM_FAMILIES[backend.model.config.model_type].budget.processor_kwargs(value)
        counts.append(backend.generate([request], generation_settings())[0].image_tokens)
        backend.close()
    assert 0 < counts[0] < counts[1], counts
    if name == "tiny-gemma3-mm":  # 4 soft tokens per crop (mm_tokens_per_image), the image and its 3 crops
        assert counts == [4, 16]


def test_image_budget_outside_the_familys_key_is_one_line() -> None:
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions

    with pytest.raises(EcoquantError, match=r"do_pan_and_scan takes 0 \(off\) or 1 \(on\)"):
        TransformersBackend.load(family_fixture_path("tiny-gemma3-mm"), TransformersOptions(image_budget=5))
    with pytest.raises(EcoquantError, match=r"max_pixels takes a positive number"):
        TransformersBackend.load(family_fixture_path("tiny-qwen2_5_vl"), TransformersOptions(image_budget=0))


@pytest.mark.parametrize("name", NAMES)
def test_inspect_prices_each_family_as_the_energy_model_does(name: str) -> None:
    """``ecoquant inspect``: bytes per decoded token (the footprint's count) equal the energy model's decode
    bytes (both leave the towers out: they run at prefill), prefill FLOPs and vision FLOPs per image are shown."""
    import re

    from typer.testing import CliRunner

    from ecoquant.cli import app

    result = CliRunner().invoke(app, ["inspect", str(family_fixture_path(name))], terminal_width=200)
    assert result.exit_code == 0, result.output
    size = r"([\d.]+ [KMG]?i?B)"
    footprint = re.search(rf"bytes per decoded token \(batch 1\): {size} = decoder {size} \+ head {size}", result.output)
    model = re.search(rf"decode reads {size} per step \(decoder {size}, head {size}", result.output)
    assert footprint and model, result.output
    assert footprint.groups() == model.groups()
    assert "prefill GFLOPs per prompt token" in result.output
    assert re.search(r"vision GFLOPs per a 1280x960 image at each image budget: \S+: \d", result.output)
