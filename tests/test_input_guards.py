"""Inputs that would mislead without an error: degenerate calibration tokens, and a source already quantized.

Both were found by trying ecoquant as a new user would: a tokenizer that maps
the calibration text to ``<unk>`` calibrated "successfully" into a GPTQ no
closer to the base than RTN, and ``ecoquant quantize`` on its own W4A16 output
"wrote ... 37 modules, 6.73 MiB -> 6.73 MiB" with a recipe claiming 37
quantized modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ecoquant.api import QuantizeConfig, quantize
from ecoquant.calibrate.data import CalibrationConfig, token_warnings
from ecoquant.cli import app
from ecoquant.data.corpus import load_corpus
from ecoquant.errors import EcoquantError
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path


def test_natural_text_raises_no_warning() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm_path())
    text = "\n\n".join(load_corpus().calibration)[:60_000]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    assert ids.numel() > 10_000
    assert token_warnings(ids, tokenizer.unk_token_id) == []


@pytest.mark.parametrize(
    ("ids", "unk", "needle"),
    [
        (torch.full((4096,), 7), None, "token id 7 is 100%"),
        (torch.cat([torch.full((2000,), 3), torch.arange(100, 2100)]), 3, "are the unknown token"),
        (torch.arange(64).repeat(64), None, "only 64 distinct ids in 4096"),
    ],
)
def test_degenerate_token_ids_are_named(ids: torch.Tensor, unk: int | None, needle: str) -> None:
    found = token_warnings(ids, unk)
    assert any(needle in w for w in found), found


def test_gptq_on_degenerate_calibration_warns_before_the_work_and_records_it(tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text("the the the the the the the the\n" * 400)
    config = QuantizeConfig(method="gptq", calibration=CalibrationConfig(source=str(calib), num_samples=4, max_length=64))
    result = quantize(tiny_vlm_path(), tmp_path / "out", config, show_progress=False)
    assert any("calibration data looks degenerate" in w for w in result.recipe["warnings"]), result.recipe["warnings"]


def test_an_already_quantized_source_is_refused_before_any_work(tmp_path: Path) -> None:
    first = quantize(tiny_vlm_path(), tmp_path / "w4", QuantizeConfig(), show_progress=False).out
    with pytest.raises(EcoquantError, match=r"is already quantized \(compressed-tensors, format pack-quantized\)"):
        quantize(first, tmp_path / "again", QuantizeConfig(), show_progress=False)
    result = CliRunner().invoke(app, ["quantize", str(first), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "already quantized" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cli").exists() and not (tmp_path / "again").exists()
    result = CliRunner().invoke(app, ["optimize", str(first), "--out", str(tmp_path / "opt"), "--dry-run"])
    assert result.exit_code == 2 and "already quantized" in result.output
    assert json.loads((first / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
