"""W8A8 schemes (FP8 and INT8): the primitives against compressed-tensors, the checkpoint format, and
transformers quantizing activations per token when it loads one.

The bit-exact comparison with llmcompressor itself is in test_llmcompressor_parity.py (``-m llmcompressor``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import fake_quantize_tokens
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import SCHEMES, QuantScheme, named_scheme

W8A8 = ("w8a8-fp8", "w8a8-int8")
PRESET = {"w8a8-fp8": "FP8_DYNAMIC", "w8a8-int8": "W8A8"}
FORMAT = {"w8a8-fp8": "float-quantized", "w8a8-int8": "int-quantized"}
CODE = {"w8a8-fp8": torch.float8_e4m3fn, "w8a8-int8": torch.int8}


def weight() -> torch.Tensor:
    """A bf16 weight with an outlier, an all-zero row and a tiny row (scales near bf16's epsilon)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    w[3, 7] = 60.0
    w[5] = 0.0
    w[9] = w[9] * 1e-30
    return w


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so FP8 codes compare with torch.equal (and -0.0 differs from 0.0)."""
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("name", W8A8)
def test_rtn_matches_compressed_tensors_compressor(name: str) -> None:
    """Scales from compressed-tensors' calculate_qparams, codes from its own int/float compressor."""
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight()
    ct_scheme = preset_name_to_scheme(PRESET[name], ["Linear"])
    scale, _ = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), ct_scheme.weights)
    theirs = NaiveQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, ct_scheme)
    ours = rtn_quantize(w, SCHEMES[name])
    assert ours.q.dtype == theirs["weight"].dtype == CODE[name]
    assert torch.equal(bits(ours.q), bits(theirs["weight"]))
    assert ours.scale.dtype == torch.bfloat16 and torch.equal(ours.scale, scale)
    assert float(ours.q[3].float().abs().max()) == SCHEMES[name].qmax  # the outlier lands on the range's end


@pytest.mark.parametrize("name", W8A8)
def test_config_group_is_compressed_tensors_preset(name: str) -> None:
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme(PRESET[name], ["Linear"])
    ours = SCHEMES[name].to_quantization_scheme(["Linear"])
    assert ours.input_activations == preset.input_activations
    assert ours.input_activations.dynamic is True and ours.input_activations.strategy == "token"
    for key in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic"):
        assert getattr(ours.weights, key) == getattr(preset.weights, key), key
    assert ours.format == FORMAT[name]


def test_w4a16_default_and_record_unchanged() -> None:
    assert named_scheme("w4a16") == QuantScheme() == QuantizeConfig().scheme
    assert "type" not in QuantScheme().to_dict() and "act_bits" not in QuantScheme().to_dict()
    assert QuantScheme(**SCHEMES["w8a8-fp8"].to_dict()) == SCHEMES["w8a8-fp8"]
    assert QuantScheme().to_quantization_scheme(["Linear"]).input_activations is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_bits": 8, "group_size": 128, "act_bits": 8}, "one scale per output channel"),
        ({"num_bits": 4, "group_size": None, "act_bits": 8}, "W8A8 takes 8-bit"),
        ({"num_bits": 8, "group_size": None, "type": "float", "observer": "mse"}, "min-max"),
        ({"num_bits": 4, "group_size": None, "type": "float"}, "FP8 E4M3"),
        ({"act_bits": 4}, "act_bits=4"),
    ],
)
def test_bad_schemes_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(EcoquantError, match=message):
        QuantScheme(**kwargs)


def test_fp8_needs_rtn_and_unknown_scheme_is_one_line() -> None:
    with pytest.raises(EcoquantError, match="data-free"):
        QuantizeConfig(method="gptq", scheme=SCHEMES["w8a8-fp8"])
    with pytest.raises(EcoquantError, match="w4a16, w8a8-fp8, w8a8-int8"):
        named_scheme("w8a8")


def test_token_fake_quant_is_per_token() -> None:
    """Each token is scaled by its own absmax: a loud token does not coarsen a quiet one."""
    x = torch.tensor([[0.01, -0.02, 0.005], [100.0, -50.0, 3.0]], dtype=torch.float32)
    fq = fake_quantize_tokens(x, SCHEMES["w8a8-int8"])
    assert torch.allclose(fq[0], x[0], rtol=0.01)  # 0.02 / 127.5 steps: almost exact
    step = 100.0 / 127.5  # the loud token's own scale: its absmax over half the int8 range
    assert torch.allclose(fq[1], torch.round(x[1] / step).clamp(-128, 127) * step)
    assert abs(float(fq[1, 2]) - 3.0) > 0.1  # a quiet value in a loud token is rounded coarsely


@pytest.fixture(scope="module")
def tiny_vlm() -> Path:
    """The shipped trained tiny VLM: trained weights, so "close to bf16" means something (the random
    tiny Gemma-4 is chaotic: even int8 weight-only moves its logits by 17%)."""
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    return tiny_vlm_path()


@pytest.fixture(scope="module")
def w8a8_checkpoints(tiny_vlm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("w8a8")
    return {name: quantize(tiny_vlm, out / name, QuantizeConfig(scheme=SCHEMES[name]), show_progress=False).out for name in W8A8}


@pytest.mark.parametrize("name", W8A8)
def test_checkpoint_layout_and_config(name: str, w8a8_checkpoints: dict[str, Path]) -> None:
    path = w8a8_checkpoints[name]
    tensors = checkpoint_tensors(path)
    scales = [k for k in tensors if k.endswith(".weight_scale")]
    assert len(scales) == len(json.loads((path / "quant_recipe.json").read_text())["modules"]) > 0
    for k in scales:
        module = k.removesuffix(".weight_scale")
        w = tensors[f"{module}.weight"]
        assert w.dtype == CODE[name] and tensors[k].shape == (w.shape[0], 1) and tensors[k].dtype == torch.bfloat16
        assert f"{module}.weight_packed" not in tensors
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == FORMAT[name]
    group = qc["config_groups"]["group_0"]
    assert group["input_activations"] == {
        "num_bits": 8, "type": "float" if name == "w8a8-fp8" else "int", "symmetric": True,
        "group_size": None, "strategy": "token", "dynamic": True,
    }
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    recipe = json.loads((path / "quant_recipe.json").read_text())
    assert recipe["scheme"]["act_bits"] == 8


@pytest.mark.parametrize("name", W8A8)
def test_transformers_quantizes_activations_per_token(name: str, w8a8_checkpoints: dict[str, Path], tiny_vlm: Path) -> None:
    """Loaded as it is, a W8A8 checkpoint's Linears see per-token fake-quantized inputs.

    Three models on the same prompt: the checkpoint as transformers loads it (W8A8), the same weights
    dequantized with bf16 activations (weight-only), and that weight-only model with
    :func:`fake_quantize_tokens` hooked onto every quantized Linear's input. The first and third agree
    (so activations are quantized exactly that way), the first differs from the second (so they really
    are), and all stay close to bf16.
    """
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    path = w8a8_checkpoints[name]
    ids = torch.tensor([[2, 17, 99, 400, 7, 250, 31, 5, 600, 12]])
    modules = [k.removesuffix(".weight_scale") for k in checkpoint_tensors(path) if k.endswith(".weight_scale")]

    def logits(folder: Path, hooked: bool = False, **kwargs: object) -> torch.Tensor:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.bfloat16, **kwargs).eval()
        if hooked:
            named = dict(model.named_modules())
            for m in modules:
                named[m].register_forward_pre_hook(lambda _mod, args: (fake_quantize_tokens(args[0], SCHEMES[name]),))
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    w8a8 = logits(path)
    weight_only = logits(path, quantization_config=CompressedTensorsConfig(dequantize=True))
    replayed = logits(path, hooked=True, quantization_config=CompressedTensorsConfig(dequantize=True))
    bf16 = logits(tiny_vlm)
    assert torch.equal(w8a8, replayed)
    assert (w8a8 - weight_only).abs().max() > 1e-3
    rel = float((w8a8 - bf16).norm() / bf16.norm())
    rel_w8a8 = float((w8a8 - bf16).norm() / bf16.norm())
    rel_weight_only = float((weight_only - bf16).norm() / bf16.norm())
    # Measured: FP8 0.013 (weight-only 0.005), INT8 0.006 (0.0046): quantized activations add error.
    assert rel_weight_only < rel_w8a8 < 0.03, (rel_weight_only, rel_w8a8)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_runs_the_int8_channel_scheme(act_order: bool) -> None:
    """GPTQ with W8A8's weights: an identity Hessian gives RTN's codes, a real one a lower output error."""
    from ecoquant.quantize.gptq import GPTQConfig, accumulate_hessian, gptq_quantize

    scheme = SCHEMES["w8a8-int8"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g) / 8)
    x = x + 0.8 * torch.randn(512, 1, generator=g)  # a shared component: correlated channels, as in LLMs
    x[:, 5] *= 10.0
    w = torch.randn(16, 64, generator=g) * 0.05
    cfg = GPTQConfig(block_size=16, act_order=act_order)
    rtn = rtn_quantize(w, scheme)
    same = gptq_quantize(w, torch.eye(64), scheme, cfg)
    assert torch.equal(same.q, rtn.q) and torch.equal(same.scale, rtn.scale)
    H, _ = accumulate_hessian(None, 0, x)
    got = gptq_quantize(w, H, scheme, cfg)
    assert got.q.dtype == torch.int8 and got.scale.shape == (16, 1)

    def err(qw: object) -> float:
        return float(torch.linalg.norm(x @ (w - qw.dequantize(scheme)).t()))  # type: ignore[attr-defined]

    assert err(got) < 0.75 * err(rtn), (err(got), err(rtn))


def test_cli_writes_and_verifies_a_w8a8_checkpoint_with_a_w8a8_tower(tiny_vlm: Path, tmp_path: Path) -> None:
    """``verify`` reads W8A8 weights (dense copy, activations still quantized) and the tower's modules too."""
    from typer.testing import CliRunner

    from ecoquant.cli import app

    runner = CliRunner()
    out = tmp_path / "q"
    args = ["quantize", str(tiny_vlm), "-o", str(out), "--scheme", "w8a8-fp8", "--vision-scheme", "w8a8-int8", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    v = runner.invoke(app, ["verify", str(out), "--base", str(tiny_vlm), "--json"])
    assert v.exit_code == 0, v.output
    s = json.loads(v.stdout)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert s["modules"] == 37 + len(groups["vision"]["targets"]) and s["with_image"] is True
    assert 0.001 < s["relative_error_mean"] < 0.05  # 8-bit weights: about 2%, never zero
    for bad, line in (
        (["--scheme", "w8a8"], "unknown scheme 'w8a8'"),
        (["--scheme", "w8a8-fp8", "--method", "gptq"], "FP8 weights are data-free"),
        (["--scheme", "w8a8-int8", "--group-size", "128"], "one scale per output channel"),
    ):
        r = runner.invoke(app, ["quantize", str(tiny_vlm), "-o", str(tmp_path / "x"), *bad])
        assert r.exit_code == 2 and r.output.strip().startswith("error:") and line in " ".join(r.output.split()), r.output


def test_serve_config_and_card_name_the_w8a8_scheme(w8a8_checkpoints: dict[str, Path]) -> None:
    from ecoquant.serve.config import ServeConfigOptions
    from ecoquant.serve.write import write_serve_config

    path = w8a8_checkpoints["w8a8-fp8"]
    result = write_serve_config(path, ServeConfigOptions(size=1, limit=1, prompt_variants=("default",)))
    card = result.card_path.read_text() if result.card_path else ""
    assert "W8A8-FP8 (RTN, compressed-tensors)" in card and "FP8 activations quantized per token" in card
    assert "`float-quantized`" in card and "bf16 activations" not in card
