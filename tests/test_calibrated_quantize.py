"""GPTQ and AWQ end to end through the CLI on the tiny Gemma-4: checkpoint, loading, recipe, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ecoquant.cli import app

runner = CliRunner()
CALIB = ["--calib", "corpus", "--calib-samples", "4", "--calib-length", "48", "--no-progress"]


@pytest.fixture(scope="module")
def calibrated(tiny_gemma4: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrated")
    out = {}
    for method in ("gptq", "awq"):
        out[method] = root / method
        result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(out[method]), "--method", method, *CALIB])
        assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_checkpoint_loads_and_runs_image_text(calibrated: dict[str, Path], tiny_image_inputs, method: str) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForImageTextToText

    path = calibrated[method]
    model = AutoModelForImageTextToText.from_pretrained(path)
    inputs = tiny_image_inputs(path)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert bool(torch.isfinite(logits).all())
    recipe = json.loads((path / "quant_recipe.json").read_text())
    assert recipe["method"] == method and recipe["resolved_module_count"] == 37
    calib = recipe["calibration"]
    assert calib["source"] == "corpus" and calib["num_samples"] == 4 and calib["seed"] == 42
    assert len(calib["token_ids_sha256"]) == 64
    assert recipe["method_config"]["stats"]


def test_calibrated_methods_differ_from_rtn(calibrated: dict[str, Path], tiny_gemma4: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    rtn = tmp_path / "rtn"
    assert runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(rtn), "--no-progress"]).exit_code == 0
    name = "model.language_model.layers.4.mlp.down_proj.weight_packed"  # a KV-shared layer
    packed = {}
    for label, path in {"rtn": rtn, **calibrated}.items():
        with safe_open(path / "model.safetensors", "pt") as st:
            packed[label] = st.get_tensor(name)
    assert not torch.equal(packed["gptq"], packed["rtn"])
    assert not torch.equal(packed["awq"], packed["rtn"])


def test_same_input_same_seed_gives_identical_files(calibrated: dict[str, Path], tiny_gemma4: Path, tmp_path: Path) -> None:
    again = tmp_path / "gptq"
    result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(again), "--method", "gptq", *CALIB])
    assert result.exit_code == 0, result.output
    assert (again / "model.safetensors").read_bytes() == (calibrated["gptq"] / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (calibrated["gptq"] / "config.json").read_bytes()
