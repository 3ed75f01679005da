"""Optimize candidates that carry a weight scheme (W8A8 INT8 / FP8 besides the default W4A16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import generation_settings
from ecoquant.eval.runner import EvalConfig
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path
from ecoquant.optimize import Candidate, OptimizeConfig
from ecoquant.optimize.grid import grid_from_mapping
from ecoquant.optimize.levers import FAMILY_LEVERS
from ecoquant.optimize.plan import plan_optimize
from ecoquant.optimize.run import Stages, _quantize_job


def test_grid_yaml_takes_a_scheme_axis_and_names_non_default_schemes() -> None:
    grid = grid_from_mapping({"grid": {"method": ["rtn"], "scheme": ["w4a16", "w8a8-int8", "w8a8-fp8"]}})
    assert [c.name for c in grid.candidates] == ["rtn-auto", "rtn-auto-w8a8-int8", "rtn-auto-w8a8-fp8"]
    int8, fp8 = grid.candidates[1], grid.candidates[2]
    # W8A8 is per output channel: the default group size means the scheme's own, as `ecoquant quantize --scheme` does.
    assert (int8.quant_scheme.group_size, int8.quant_scheme.num_bits, int8.quant_scheme.act_bits) == (None, 8, 8)
    assert (fp8.quant_scheme.type, fp8.quant_scheme.observer) == ("float", "minmax")
    assert int8.to_record()["scheme"] == "w8a8-int8"
    gptq = grid_from_mapping({"candidates": [{"method": "gptq", "scheme": "w8a8-int8"}]}).candidates[0]
    assert (gptq.name, gptq.quant_scheme.observer) == ("gptq-auto-w8a8-int8", "hessian")
    sq = grid_from_mapping({"candidates": [{"method": "smoothquant-gptq", "scheme": "w8a8-int8"}]}).candidates[0]
    assert (sq.name, sq.quant_scheme.observer, sq.quant_scheme.act_bits) == ("smoothquant-gptq-auto-w8a8-int8", "hessian", 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"scheme": "w8a8"}, "unknown scheme 'w8a8'; use one of: w4a16, w8a8-fp8, w8a8-int8"),
        ({"scheme": "w8a8-fp8", "method": "gptq"}, "FP8 weights are data-free; use method rtn"),
        ({"scheme": "w8a8-int8", "group_size": 64}, "group"),
        ({"method": "smoothquant"}, "smoothquant smooths 8-bit activations; use it with scheme w8a8-int8"),
        ({"method": "bogus"}, "unknown method 'bogus'; use rtn, gptq, awq, awq-gptq, smoothquant or smoothquant-gptq"),
    ],
)
def test_bad_schemes_are_one_line(spec: dict[str, object], message: str) -> None:
    with pytest.raises(EcoquantError, match=message) as exc:
        grid_from_mapping({"candidates": [spec]})
    assert "\n" not in str(exc.value)


def test_the_checkpoint_key_changes_only_for_non_default_schemes() -> None:
    plain, explicit = Candidate("a"), Candidate("a", scheme="w4a16")
    # The key of a W4A16 candidate is what it was before schemes existed, so existing stores stay valid.
    assert plain.quant_record() == explicit.quant_record()
    assert "scheme_name" not in plain.quant_record() and plain.quant_record()["scheme"]["num_bits"] == 4
    int8, fp8 = Candidate("a", scheme="w8a8-int8"), Candidate("a", scheme="w8a8-fp8")
    assert int8.quant_record()["scheme_name"] == "w8a8-int8"
    assert len({json.dumps(c.quant_record(), sort_keys=True) for c in (plain, int8, fp8)}) == 3


def test_gemma4_levers_include_rtn_w8a8_int8_and_fp8() -> None:
    weights = FAMILY_LEVERS["gemma4"].weights_candidates()
    w8a8 = {(c.method, c.scheme) for c in weights if c.scheme != "w4a16"}
    assert w8a8 == {("rtn", "w8a8-int8"), ("rtn", "w8a8-fp8")}


def test_a_w8a8_candidate_is_quantized_through_the_optimize_path(tmp_path: Path) -> None:
    config = OptimizeConfig(
        out=tmp_path / "o",
        grid=grid_from_mapping({"candidates": [{"method": "rtn", "scheme": "w8a8-int8"}]}),
        eval=EvalConfig(suite="builtin-basic", size=2, generation=generation_settings(max_new_tokens=8), idle_seconds=0.0),
    )
    plan, store, _, _ = plan_optimize(tiny_vlm_path(), config)
    assert [j.label for j in plan.quantize] == ["rtn-auto-w8a8-int8"]
    job = plan.quantize[0]
    _quantize_job(job, plan, store, config, Stages(enabled=False), False)
    assert job.quant_dir is not None
    qc = json.loads((job.quant_dir / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    group = next(iter(qc["config_groups"].values()))
    assert (group["weights"]["num_bits"], group["weights"]["strategy"]) == (8, "channel")
    assert group["input_activations"]["type"] == "int"
