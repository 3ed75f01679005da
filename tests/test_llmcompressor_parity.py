"""ecoquant's min-max RTN against llmcompressor 0.14's QuantizationModifier: W4A16, FP8_DYNAMIC and W8A8.

llmcompressor pins its own transformers, so it runs in its own throw-away uv
environment (``uv run --isolated``), from the reference script in
``bench/external``. Needs the package registry (PyPI) and a few minutes the
first time; marked ``llmcompressor``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.models.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
LLMCOMPRESSOR = ["--with", "llmcompressor==0.14.0.1", "--with", "torch==2.13.0", "--with", "torchvision==0.28.0"]

pytestmark = pytest.mark.llmcompressor


def run_llmcompressor(src: Path, out: Path, ignore: tuple[str, ...], scheme: str = "W4A16") -> None:
    uv = shutil.which("uv")
    assert uv, "uv is needed to build llmcompressor's environment"
    cmd = [uv, "run", "--isolated", "--no-project", *LLMCOMPRESSOR, "python",
           str(REPO / "bench/external/llmcompressor_oneshot.py"), str(src), str(out), "--scheme", scheme]
    for pattern in ignore:
        cmd += ["--ignore", pattern]
    subprocess.run(cmd, check=True, timeout=1800, capture_output=True)


def test_rtn_minmax_is_bit_exact_with_llmcompressor(tiny_gemma4: Path, tmp_path: Path) -> None:
    preset = get_preset("gemma4-e")
    run_llmcompressor(tiny_gemma4, tmp_path / "llmc", preset.ignore)
    quantize(tiny_gemma4, tmp_path / "ours", QuantizeConfig(preset="gemma4-e"), show_progress=False)
    theirs, ours = checkpoint_tensors(tmp_path / "llmc"), checkpoint_tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    packed = [k for k in ours if k.endswith(".weight_packed")]
    assert len(packed) == 37
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    qc_theirs = json.loads((tmp_path / "llmc/config.json").read_text())["quantization_config"]
    qc_ours = json.loads((tmp_path / "ours/config.json").read_text())["quantization_config"]
    assert sorted(qc_theirs["ignore"]) == sorted(qc_ours["ignore"])
    for key in ("num_bits", "group_size", "symmetric", "strategy", "type"):
        assert qc_theirs["config_groups"]["group_0"]["weights"][key] == qc_ours["config_groups"]["group_0"]["weights"][key]
    assert qc_theirs["format"] == qc_ours["format"] == "pack-quantized"


@pytest.mark.parametrize(("ours_name", "preset", "fmt"), [("w8a8-fp8", "FP8_DYNAMIC", "float-quantized"), ("w8a8-int8", "W8A8", "int-quantized")])
def test_w8a8_rtn_is_bit_exact_with_llmcompressor(tiny_gemma4: Path, tmp_path: Path, ours_name: str, preset: str, fmt: str) -> None:
    """Same tensors (FP8 / int8 codes compared byte for byte, bf16 scales) and the same config group."""
    from ecoquant.quantize.scheme import SCHEMES

    ignore = get_preset("gemma4-e").ignore
    run_llmcompressor(tiny_gemma4, tmp_path / "llmc", ignore, preset)
    quantize(tiny_gemma4, tmp_path / "ours", QuantizeConfig(preset="gemma4-e", scheme=SCHEMES[ours_name]), show_progress=False)
    theirs, ours = checkpoint_tensors(tmp_path / "llmc"), checkpoint_tensors(tmp_path / "ours")
    assert set(theirs) == set(ours)
    scales = [k for k in ours if k.endswith(".weight_scale")]
    assert len(scales) == 37
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), theirs[name].reshape(-1).view(torch.uint8)), name
    qc_theirs = json.loads((tmp_path / "llmc/config.json").read_text())["quantization_config"]
    qc_ours = json.loads((tmp_path / "ours/config.json").read_text())["quantization_config"]
    assert qc_theirs["format"] == qc_ours["format"] == fmt
    assert sorted(qc_theirs["ignore"]) == sorted(qc_ours["ignore"])
    g_theirs, g_ours = qc_theirs["config_groups"]["group_0"], qc_ours["config_groups"]["group_0"]
    # llmcompressor's compressed-tensors writes unset fields as null; ours leaves them out.
    def set_fields(args: dict) -> dict:
        return {k: v for k, v in args.items() if v not in (None, {})}

    assert set_fields(g_theirs["input_activations"]) == set_fields(g_ours["input_activations"])
    for key in ("num_bits", "group_size", "symmetric", "strategy", "type", "dynamic"):
        assert g_theirs["weights"][key] == g_ours["weights"][key], key
