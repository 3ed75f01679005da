"""The CLI: bad input gets one clear line and exit code 2; inspect on the E4B twin; the selection preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoquant.api import plan_footprint, plan_model
from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.models.loading import meta_model
from ecoquant.models.selection import select_modules
from ecoquant.quantize.scheme import QuantScheme

runner = CliRunner()


def one_line_error(args: list[str], match: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and text.startswith("error:"), text
    assert match in " ".join(text.split()), text


@pytest.fixture(scope="module")
def twin() -> Path:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    return e4b_twin_path()


def test_cli_import_leaves_heavy_libraries_to_the_commands() -> None:
    # ``ecoquant --help`` and typos must answer at once: torch, transformers and
    # matplotlib (seconds to import) load only inside the commands that use them.
    code = "import sys, ecoquant.cli.commands; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for heavy in ("torch", "transformers", "matplotlib"):
        assert f"'{heavy}'" not in loaded, heavy


def test_missing_path(tmp_path: Path) -> None:
    one_line_error(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "no such folder")


def test_empty_model_argument(tmp_path: Path) -> None:
    one_line_error(["quantize", "", "--out", str(tmp_path / "o")], "MODEL is empty")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    one_line_error(["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "o")], "has no config.json")


def test_hub_id_offline(tmp_path: Path) -> None:
    one_line_error(["quantize", "google/gemma-4-E4B-it", "--out", str(tmp_path / "o")], "cannot download")


def test_preset_matching_nothing(tiny_gemma4: Path, tmp_path: Path) -> None:
    one_line_error(["quantize", str(tiny_gemma4), "--out", str(tmp_path / "o"), "--ignore", "re:.*nonexistent.*"],
                   "matches no module")
    one_line_error(["quantize", str(tiny_gemma4), "--out", str(tmp_path / "o"), "--preset", "llama"], "unknown preset")
    assert not (tmp_path / "o").exists()


def test_invalid_group_sizes(tiny_gemma4: Path, tmp_path: Path) -> None:
    one_line_error(["quantize", str(tiny_gemma4), "--out", str(tmp_path / "o"), "--group-size", "100"],
                   "group size 100 is invalid")
    # 512 is a valid size in general but does not divide layers whose input is 256 wide.
    one_line_error(["quantize", str(tiny_gemma4), "--out", str(tmp_path / "o"), "--group-size", "512"],
                   "does not divide the input size 256 of model.language_model")
    assert list(tmp_path.iterdir()) == []


def test_invalid_calibration_options(tiny_gemma4: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    one_line_error(["quantize", str(tiny_gemma4), "--out", out, "--method", "awq", "--device", "nonsense"],
                   "unknown device 'nonsense'")
    one_line_error(["quantize", str(tiny_gemma4), "--out", out, "--method", "rtn", "--device", "bogus"],
                   "unknown device 'bogus'")  # RTN never reads it, but it is still refused
    one_line_error(["quantize", str(tiny_gemma4), "--out", out, "--method", "gptq", "--calib", ""],
                   "the calibration source is empty")
    assert list(tmp_path.iterdir()) == []


def test_awq_on_a_family_without_mappings_fails_before_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from calibrate_models import save_tiny_gemma3

    from ecoquant.models import topology

    model = save_tiny_gemma3(tmp_path / "model")
    monkeypatch.delitem(topology.TOPOLOGIES, "gemma3_text")  # a family ecoquant has no AWQ row for
    # The missing calibration file would be the error if the check came after loading calibration data.
    one_line_error(["quantize", str(model), "--out", str(tmp_path / "o"), "--method", "awq",
                    "--calib", str(tmp_path / "missing.json")], "no smoothing mappings (AWQ, SmoothQuant) are known")
    assert not (tmp_path / "o").exists()


def test_quality_wrong_folder_is_one_line(tmp_path: Path) -> None:
    one_line_error(["quality", str(tmp_path / "missing")], "no such folder")


def test_existing_output(tiny_gemma4: Path, tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    one_line_error(["quantize", str(tiny_gemma4), "--out", str(tmp_path / "o")], "already exists")


def test_verify_rejects_unquantized(tiny_gemma4: Path) -> None:
    one_line_error(["verify", str(tiny_gemma4), "--base", str(tiny_gemma4)], "not a quantized checkpoint")


def test_gemma4_e_preset_selects_the_seeds_259_modules(twin: Path) -> None:
    from ecoquant.models.loading import load_config
    from ecoquant.models.presets import get_preset

    model = meta_model(load_config(twin))
    preset = get_preset("gemma4-e")
    sel = select_modules(model, preset.targets, preset.ignore)
    assert len(sel) == 259
    kinds = [m.rsplit(".", 1)[-1] for m in sel.modules]
    for proj in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert kinds.count(proj) == 42
    assert kinds.count("k_proj") == kinds.count("v_proj") == 24
    assert "model.language_model.per_layer_model_projection" in sel
    assert not any("vision" in m or "audio" in m or "per_layer_input_gate" in m or m.endswith("per_layer_projection")
                   for m in sel.modules)
    mlpo = select_modules(model, get_preset("gemma4-e-mlpo").targets, preset.ignore)
    assert len(mlpo) == 42 * 4


def test_empty_selection_is_an_error(twin: Path) -> None:
    from ecoquant.models.loading import load_config

    with pytest.raises(EcoquantError, match="select no Linear"):
        select_modules(meta_model(load_config(twin)), ["lm_head"], ["lm_head"])


def test_inspect_twin_reports_footprint(twin: Path) -> None:
    result = runner.invoke(app, ["inspect", str(twin), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["module_count"] == 259 and info["quantized"] is False
    gib = 1024**3
    # The seed card: ~16 GB bf16 -> ~9.5 GiB W4A16 (14.79 GiB = 15.88 GB before).
    assert 14.5 * gib < info["before_bytes"] < 16.1 * gib
    assert 9.0 * gib < info["after_bytes"] < 9.7 * gib
    fp = plan_footprint(plan_model(twin), QuantScheme(group_size=32))
    assert fp.after_bytes > info["after_bytes"]  # smaller groups, more scales


def test_inspect_and_verify_on_a_quantized_checkpoint(tiny_gemma4: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["inspect", str(out), "--json"])
    data = json.loads(info.stdout)
    assert data["quantized"] is True and data["module_count"] == 37
    assert data["before_bytes"] > data["after_bytes"]
    v = runner.invoke(app, ["verify", str(out), "--base", str(tiny_gemma4), "--json"])
    assert v.exit_code == 0, v.output
    s = json.loads(v.stdout)
    assert s["modules"] == 37 and s["with_image"] is True
    # int4 with group 128 on Gaussian-like weights: ~10% relative error, never zero, never huge.
    assert 0.02 < s["relative_error_mean"] < 0.2
    assert s["logits_max_abs_diff"] > 0


def test_inspect_prints_the_energy_models_cost_terms(twin: Path) -> None:
    from ecoquant.cli.quantize import out_console, render_cost_terms

    result = runner.invoke(app, ["inspect", str(twin), "--json", "--lm-head", "int4"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    terms = info["cost_terms"]
    # the plan's bytes per decode step are the footprint's (one machinery), FLOPs are the module tree's
    assert terms["decode_bytes_per_token"] == info["bytes_per_token"]
    assert list(terms["vision_flops_per_image"]) == ["70", "140", "280", "560", "1120"]
    vision = list(terms["vision_flops_per_image"].values())
    assert vision == sorted(vision) and vision[-1] > 16 * vision[1]  # patches grow with the budget, attention as their square
    assert terms["head_flops_per_position"] == 2 * 262_144 * 2560
    with out_console.capture() as captured:
        render_cost_terms(terms)
    text = captured.get()
    assert "decode reads" in text and "prefill GFLOPs per prompt token: decoder 7.780 (bf16)" in text
    assert "1120: 8,054.5" in text


def test_demo_with_an_empty_out_is_one_line_and_writes_nothing(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """An unset shell variable (``--out ""``) must not turn the current folder into the demo's store."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--out", ""])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --out is empty; pass the folder to write into"
    assert list(tmp_path.iterdir()) == []
