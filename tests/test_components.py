"""A scheme per component: decoder W4A16 with the vision tower in W8A8, in one checkpoint, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import checkpoint_tensors
from torch import nn

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.errors import EcoquantError
from ecoquant.models.components import plan_components
from ecoquant.quantize.scheme import SCHEMES, QuantScheme


@pytest.fixture(scope="module")
def tiny_vlm() -> Path:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    return tiny_vlm_path()


@pytest.fixture(scope="module")
def mixed(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The decoder W4A16 with the vision tower bf16 (as today) and with it W8A8-INT8."""
    out = tmp_path_factory.mktemp("components")
    return {
        "w4a16": quantize(tiny_vlm, out / "w4a16", QuantizeConfig(), show_progress=False).out,
        "vision-int8": quantize(
            tiny_vlm, out / "vision-int8", QuantizeConfig(vision_scheme=SCHEMES["w8a8-int8"]), show_progress=False
        ).out,
    }


def test_the_tiny_vlm_vision_tower_is_one_vllm_quantizes(tiny_vlm: Path) -> None:
    """Its vision hidden / intermediate sizes (128 / 256) are multiples of 64, so vLLM takes a quantized
    tower from it: the refusal below is not what the shipped model hits."""
    config = json.loads((tiny_vlm / "config.json").read_text())["vision_config"]
    assert config["hidden_size"] % 64 == 0 and config["intermediate_size"] % 64 == 0


def test_mixed_checkpoint_has_a_group_per_component(mixed: dict[str, Path]) -> None:
    path = mixed["vision-int8"]
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = qc["config_groups"]
    assert groups["group_0"]["format"] == "pack-quantized" and groups["group_0"]["input_activations"] is None
    vision = groups["vision"]
    assert vision["format"] == "int-quantized" and vision["input_activations"]["strategy"] == "token"
    assert all(t.startswith(("model.vision_tower.", "model.embed_vision.")) for t in vision["targets"])
    # vLLM runs transformers' patch embedder, which reads its Linear's bf16 weight: it stays bf16.
    assert "model.vision_tower.patch_embedder.input_proj" in qc["ignore"]
    kept = [i for i in qc["ignore"] if i.startswith(("model.vision_tower.", "model.embed_vision."))]
    assert kept == ["model.vision_tower.patch_embedder.input_proj"]
    assert any(i.startswith("model.audio_tower.") for i in qc["ignore"])  # the audio tower stays bf16
    tensors = checkpoint_tensors(path)
    for module in vision["targets"]:
        assert tensors[f"{module}.weight"].dtype == torch.int8 and tensors[f"{module}.weight_scale"].shape[1] == 1
    # The decoder is exactly the W4A16 checkpoint's.
    plain = checkpoint_tensors(mixed["w4a16"])
    for name, value in plain.items():
        if "vision" not in name:
            assert torch.equal(value, tensors[name]), name
    recipe = json.loads((path / "quant_recipe.json").read_text())
    assert recipe["components"]["vision"]["modules"] == len(vision["targets"])


def test_mixed_checkpoint_runs_in_transformers_with_the_tower_quantized(
    mixed: dict[str, Path], tiny_vlm: Path, tiny_image_inputs: Callable[[Path], dict[str, torch.Tensor]]
) -> None:
    """Image prompt logits: the W8A8 tower changes them (activations and weights really quantized), and
    both variants stay close to bf16."""
    from transformers import AutoModelForImageTextToText

    inputs = tiny_image_inputs(tiny_vlm)

    def logits(path: Path) -> tuple[torch.Tensor, nn.Module]:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            return model(**inputs).logits.float(), model

    bf16, _ = logits(tiny_vlm)
    w4a16, _ = logits(mixed["w4a16"])
    tower, model = logits(mixed["vision-int8"])
    proj = dict(model.named_modules())["model.vision_tower.encoder.layers.0.mlp.up_proj.linear"]
    assert proj.quantization_scheme.input_activations.strategy == "token"
    assert (tower - w4a16).abs().max() > 1e-3
    for got in (w4a16, tower):
        assert float((got - bf16).norm() / bf16.norm()) < 0.05


def vision_model(hidden: int, intermediate: int) -> tuple[nn.Module, SimpleNamespace]:
    model = nn.Module()
    model.model = nn.Module()
    model.model.vision_tower = nn.Module()
    model.model.vision_tower.proj = nn.Linear(hidden, intermediate)
    config = SimpleNamespace(model_type="gemma4", vision_config=SimpleNamespace(hidden_size=hidden, intermediate_size=intermediate))
    return model, config


def test_towers_vllm_would_build_in_bf16_are_refused_with_the_reason() -> None:
    model, config = vision_model(1152, 4304)
    with pytest.raises(EcoquantError, match=r"multiples of 64 \(here 1152 and 4304; vllm/model_executor/models/gemma4_mm.py"):
        plan_components(model, config, {"vision": SCHEMES["w8a8-int8"]})
    model, config = vision_model(768, 3072)  # E4B's sizes
    (spec,) = plan_components(model, config, {"vision": SCHEMES["w8a8-int8"], "audio": None})
    assert spec.modules == ("model.vision_tower.proj",)


def test_other_refusals_are_one_line(tiny_vlm: Path, tmp_path: Path) -> None:
    model, config = vision_model(768, 3072)
    config.model_type = "gemma3_text"
    with pytest.raises(EcoquantError, match="knows the towers of gemma4"):
        plan_components(model, config, {"vision": SCHEMES["w8a8-int8"]})
    with pytest.raises(EcoquantError, match="group size 256 does not divide the input size 128"):
        quantize(tiny_vlm, tmp_path / "x", QuantizeConfig(vision_scheme=QuantScheme(group_size=256)), show_progress=False)
    assert not (tmp_path / "x").exists()


def test_generate_runs_a_w8a8_tower_once_decompressed(
    mixed: dict[str, Path], tiny_vlm: Path, tiny_image_inputs: Callable[[Path], dict[str, torch.Tensor]]
) -> None:
    """``generate`` runs the tower before the top-level forward that would decompress it; eval,
    quality and verify therefore decompress at load (:func:`ecoquant.models.dense.decompress_now`)."""
    from transformers import AutoModelForImageTextToText

    from ecoquant.models.dense import decompress_now

    inputs = tiny_image_inputs(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(mixed["vision-int8"], dtype=torch.bfloat16).eval()
    with pytest.raises(RuntimeError, match="same dtype"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # transformers alone: the int8 weight, undecompressed
    model = decompress_now(AutoModelForImageTextToText.from_pretrained(mixed["vision-int8"], dtype=torch.bfloat16)).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 2
