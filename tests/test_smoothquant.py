"""SmoothQuant for W8A8 INT8: the scale rule against a slow reference, the fold into Gemma's norms, the methods."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calibrate_models import random_batches, save_tiny_gemma3
from ecoquant.api import QuantizeConfig, plan_model, quantize
from ecoquant.calibrate.data import CalibrationConfig
from ecoquant.calibrate.run import calibrate
from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import fake_quantize, fake_quantize_tokens, minmax_qparams
from ecoquant.quantize.scheme import SCHEMES
from ecoquant.quantize.smoothquant import MIN_SCALE, SmoothQuantConfig, smoothing_scales, update_range

INT8 = SCHEMES["w8a8-int8"]


def _reference_scales(act_range: list[float], weights: list[list[list[float]]], alpha: float) -> list[float]:
    """The rule written out channel by channel, as the SmoothQuant paper and llmcompressor 0.14 state it."""
    out = []
    for j, a in enumerate(act_range):
        w = 2.0 * max(abs(row[j]) for weight in weights for row in weight)
        if a == 0:
            s = 1.0  # ecoquant's one departure: a channel that never moved is left alone
        elif w == 0:
            s = a
        else:
            s = a**alpha / w ** (1.0 - alpha)
        out.append(max(s, MIN_SCALE))
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    channels=st.integers(1, 6),
    alpha=st.sampled_from([0.0, 0.25, 0.5, 0.8, 1.0]),
    data=st.data(),
)
def test_scales_match_the_channel_by_channel_reference(channels: int, alpha: float, data: st.DataObject) -> None:
    value = st.one_of(st.just(0.0), st.floats(-50, 50, allow_nan=False, width=32))
    act = [abs(data.draw(value)) for _ in range(channels)]
    weights = [
        [[data.draw(value) for _ in range(channels)] for _ in range(data.draw(st.integers(1, 3)))]
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    got = smoothing_scales(torch.tensor(act), [torch.tensor(w) for w in weights], alpha)
    want = torch.tensor(_reference_scales(act, weights, alpha))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_worked_example_from_the_docstring() -> None:
    s = smoothing_scales(torch.tensor([60.0, 1.0]), [torch.tensor([[0.1, -0.1]])], 0.5)
    torch.testing.assert_close(s, torch.tensor([math.sqrt(300.0), math.sqrt(5.0)]))
    torch.testing.assert_close(torch.tensor([60.0, 1.0]) / s, torch.tensor([0.2, 0.2]) * s)


def test_ranges_accumulate_over_batches() -> None:
    a = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    b = torch.tensor([[[-4.0, 5.0]]])
    lo, hi = update_range(update_range(None, a), b)
    assert lo.tolist() == [-4.0, -2.0] and hi.tolist() == [3.0, 5.0]


def test_smoothing_lowers_the_w8a8_error_on_an_outlier_channel() -> None:
    """The reason it exists: one loud channel coarsens every token's int8 grid; smoothing spreads it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 60.0
    w = torch.randn(32, 64, generator=g) * 0.05
    ref = x @ w.t()

    def w8a8(xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        scale, zp = minmax_qparams(ws, INT8)
        return fake_quantize_tokens(xs, INT8) @ fake_quantize(ws, scale, zp, INT8).t()

    lo, hi = update_range(None, x)
    s = smoothing_scales(hi - lo, [w], 0.5)
    plain = float((w8a8(x, w) - ref).norm())
    smooth = float((w8a8(x / s, w * s) - ref).norm())
    assert smooth < 0.5 * plain, (smooth, plain)


def test_strength_outside_0_1_is_refused() -> None:
    with pytest.raises(EcoquantError, match="must be in"):
        SmoothQuantConfig(alpha=1.5)


# --- the calibrated methods ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("g3") / "gemma3")


def test_norms_only_folded_into_gemma3s_one_plus_w_norms(gemma3: Path, tmp_path: Path) -> None:
    """Layer 0's input norm ends as ``(1 + w) / s - 1`` with ``s`` from the norm's output ranges; nothing else moves."""
    from transformers import AutoModelForCausalLM

    plan = plan_model(gemma3, "text-decoder")
    batches = random_batches(2, 24, 512, seed=5)
    model = AutoModelForCausalLM.from_pretrained(gemma3, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        getattr(layer, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, update_range(seen.get(n), o)))
        for n in ("input_layernorm", "pre_feedforward_layernorm")
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    result = calibrate(gemma3, method="smoothquant", selection=plan.selection, batches=batches,
                       work_dir=tmp_path / "work", scheme=INT8)
    replaced = dict(result.replace)
    # Only the norms feeding q/k/v and gate/up: no up -> down, no v -> o (Linear producers).
    assert {n.split(".", 3)[-1] for n in replaced} == {"input_layernorm.weight", "pre_feedforward_layernorm.weight"}
    lo, hi = seen["input_layernorm"]
    attn = layer.self_attn
    s = smoothing_scales(hi - lo, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], 0.5)
    want = (1.0 + layer.input_layernorm.weight.float()) / s - 1.0
    torch.testing.assert_close(replaced["model.layers.0.input_layernorm.weight"].float(), want, rtol=1e-5, atol=1e-6)
    for i in range(3):  # smoothing alone changes no layer output (float32 model)
        assert result.stats["units"][f"layer {i}"]["smoothing_rel_diff"] < 1e-5
    smoothings = result.stats["units"]["layer 0"]["smoothing"]
    assert all(sm["applied"] and sm["alpha"] == 0.5 for sm in smoothings)


@pytest.fixture(scope="module")
def tiny_vlm() -> Path:
    """The shipped trained tiny Gemma-4 VLM (Gemma-4's plain ``w`` norms; a real tokenizer for the corpus)."""
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    return tiny_vlm_path()


def test_smoothquant_gptq_checkpoint_loads_and_records_its_settings(tiny_vlm: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    calib = CalibrationConfig(source="corpus", num_samples=4, max_length=64)
    out = quantize(tiny_vlm, tmp_path / "q", QuantizeConfig(method="smoothquant-gptq", scheme=INT8, calibration=calib,
                                                         smoothquant=SmoothQuantConfig(alpha=0.6)), show_progress=False).out
    recipe = json.loads((out / "quant_recipe.json").read_text())
    assert recipe["method"] == "smoothquant-gptq"
    settings_ = recipe["method_config"]["settings"]
    assert settings_["alpha"] == 0.6 and "dampening_frac" in settings_  # GPTQ's settings beside it
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = next(iter(cfg["config_groups"].values()))
    assert group["input_activations"]["dynamic"] is True and group["weights"]["type"] == "int"
    assert recipe["method_config"]["stats"]["units"]["layer 0"]["smoothing"][0]["applied"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    quant = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    ids = random_batches(1, 16, 256, seed=9)[0]["input_ids"]
    with torch.no_grad():
        a, b = base(input_ids=ids).logits, quant(input_ids=ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0.0 < rel < 0.1, rel


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "smoothquant"}, "use it with --scheme w8a8-int8"),
        ({"method": "smoothquant-gptq", "scheme": SCHEMES["w8a8-fp8"]}, "FP8 weights are data-free"),
    ],
)
def test_wrong_scheme_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(EcoquantError, match=message):
        QuantizeConfig(**kwargs)


def test_cli_smoothquant_and_its_refusals(tiny_vlm: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ecoquant.cli import app

    runner = CliRunner()
    out = tmp_path / "sq"
    args = ["quantize", str(tiny_vlm), "-o", str(out), "--scheme", "w8a8-int8", "--method", "smoothquant",
            "--calib", "corpus", "--calib-samples", "2", "--calib-length", "64", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "quant_recipe.json").read_text())["method"] == "smoothquant"
    for bad, line in (
        (["--method", "smoothquant"], "use it with --scheme w8a8-int8"),
        (["--method", "gptq", "--smoothing-strength", "0.5"], "--smoothing-strength is SmoothQuant's"),
        (["--scheme", "w8a8-int8", "--method", "smoothquant", "--smoothing-strength", "2"], "must be in [0, 1]"),
    ):
        r = runner.invoke(app, ["quantize", str(tiny_vlm), "-o", str(tmp_path / "x"), *bad])
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and line in " ".join(r.output.split()), r.output
