"""The activation-aware scale search (``hessian`` observer) and refinement after GPTQ, against slow references."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from ecoquant.errors import EcoquantError
from ecoquant.quantize.gptq import GPTQConfig, gptq_quantize
from ecoquant.quantize.primitives import choose_qparams, fake_quantize, minmax_qparams, mse_qparams
from ecoquant.quantize.refine import dampened, output_loss, refine
from ecoquant.quantize.rtn import rtn_quantize
from ecoquant.quantize.scheme import QuantScheme

HESSIAN = QuantScheme(group_size=32, observer="hessian")


def _problem(out_f: int, in_f: int, seed: int, loud: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a correlated input Hessian with a few loud channels, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, in_f, generator=gen) @ (torch.eye(in_f) + 0.2 * torch.randn(in_f, in_f, generator=gen))
    X[:, :loud] *= 15.0
    W = torch.randn(out_f, in_f, generator=gen) * 0.02
    W[:, loud : 2 * loud] *= 6.0  # outlier weights on quiet inputs: what plain weight MSE clips wrongly
    return W, 2 * X.t() @ X / X.shape[0]


def _loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    return float(output_loss(W, Wq, H).sum())


# --- the hessian observer ---------------------------------------------------------------------------


def test_weighted_search_with_unit_importance_is_the_plain_search() -> None:
    W, _ = _problem(16, 64, seed=0)
    plain = mse_qparams(W, replace(HESSIAN, observer="mse"))
    ones = mse_qparams(W, HESSIAN, torch.ones(64))
    assert torch.equal(plain[0], ones[0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_in_row_slices_is_the_search_on_the_whole_weight(symmetric: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ecoquant.quantize.primitives as primitives

    W, H = _problem(40, 64, seed=3)
    scheme = replace(HESSIAN, symmetric=symmetric)
    whole = mse_qparams(W, scheme, torch.diag(H))
    monkeypatch.setattr(primitives, "_SEARCH_CHUNK", 64 * 7)  # slices of 7 rows, the last one short
    sliced = mse_qparams(W, scheme, torch.diag(H))
    assert torch.equal(whole[0], sliced[0]) and whole[0].shape == (40, scheme.groups_for(64))
    if symmetric:
        assert whole[1] is None and sliced[1] is None
    else:
        assert whole[1] is not None and sliced[1] is not None and torch.equal(whole[1], sliced[1])


def test_each_group_keeps_the_ratio_with_the_lowest_weighted_error() -> None:
    """Brute force: every clipping ratio tried, per group, with the weighted error summed by hand."""
    W, H = _problem(6, 64, seed=1)
    a = torch.diag(H)
    scale, _ = choose_qparams(W, HESSIAN, a)
    for r, g in itertools.product(range(6), range(2)):
        w, aw = W[r, g * 32 : (g + 1) * 32], a[g * 32 : (g + 1) * 32]
        best, best_scale = float("inf"), None
        for i in range(HESSIAN.mse_grid):
            p = 1.0 - HESSIAN.mse_maxshrink * i / HESSIAN.mse_grid
            s = float(w.abs().max()) * p / 7.5
            err = float((aw * (w - (w / s).round().clamp(-8, 7) * s) ** 2).sum())
            if err < best * (1 - 1e-6):
                best, best_scale = err, s
        assert float(scale[r, g]) == pytest.approx(best_scale, rel=1e-5), (r, g)


def test_rtn_with_the_hessian_observer_has_lower_output_error_than_minmax_and_mse() -> None:
    W, H = _problem(64, 256, seed=2)
    errors = {}
    for observer in ("minmax", "mse", "hessian"):
        scheme = replace(HESSIAN, observer=observer)
        errors[observer] = _loss(W, rtn_quantize(W, scheme, torch.diag(H)).dequantize(scheme), H)
    assert errors["hessian"] < errors["minmax"]
    assert errors["hessian"] < errors["mse"]


def test_gptq_takes_its_static_scales_from_the_weighted_search() -> None:
    W, H = _problem(32, 128, seed=3)
    qw = gptq_quantize(W, H, HESSIAN, GPTQConfig())
    want, _ = mse_qparams(W, HESSIAN, torch.diag(H))
    assert torch.equal(qw.scale, want)
    plain = gptq_quantize(W, H, replace(HESSIAN, observer="minmax"), GPTQConfig())
    assert _loss(W, qw.dequantize(HESSIAN), H) < _loss(W, plain.dequantize(HESSIAN), H)


def test_gptq_column_order_groups_use_the_weighted_search_too() -> None:
    W, H = _problem(16, 128, seed=4)
    qw = gptq_quantize(W, H, HESSIAN, GPTQConfig(act_order=False))
    minmax = gptq_quantize(W, H, replace(HESSIAN, observer="minmax"), GPTQConfig(act_order=False))
    assert not torch.equal(qw.scale, minmax.scale)
    assert _loss(W, qw.dequantize(HESSIAN), H) < _loss(W, minmax.dequantize(HESSIAN), H)


def test_the_hessian_observer_without_inputs_is_a_one_line_error() -> None:
    W, _ = _problem(4, 32, seed=5)
    with pytest.raises(EcoquantError, match="needs calibration data") as err:
        rtn_quantize(W, HESSIAN)
    assert "\n" not in str(err.value)
    with pytest.raises(EcoquantError, match="expected"):
        mse_qparams(W, HESSIAN, torch.ones(7))


# --- refinement after GPTQ ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [QuantScheme(group_size=32), QuantScheme(group_size=32, symmetric=False),
                                    QuantScheme(group_size=None)])
def test_refine_never_raises_the_error_and_keeps_the_format(scheme: QuantScheme) -> None:
    W, H = _problem(24, 96, seed=6)
    Hd = dampened(H, 0.01)
    start = gptq_quantize(W, H, scheme, GPTQConfig())
    got, stats = refine(W, Hd, start, scheme, steps=6)
    before, after = _loss(W, start.dequantize(scheme), Hd), _loss(W, got.dequantize(scheme), Hd)
    assert after < before  # correlated inputs: GPTQ's one pass leaves room
    assert stats.loss < stats.start_loss and stats.codes_changed > 0
    assert got.q.dtype == torch.int8 and int(got.q.min()) >= scheme.qmin and int(got.q.max()) <= scheme.qmax
    assert got.scale.shape == start.scale.shape and got.scale.dtype == start.scale.dtype
    assert (got.scale > 0).all()
    if start.zero_point is not None:
        assert torch.equal(got.zero_point, start.zero_point)
    # Nothing passed in was changed.
    assert torch.equal(start.q, gptq_quantize(W, H, scheme, GPTQConfig()).q)


def test_refine_with_zero_steps_returns_the_start() -> None:
    W, H = _problem(8, 64, seed=7)
    start = gptq_quantize(W, H, HESSIAN, GPTQConfig())
    got, stats = refine(W, dampened(H, 0.01), start, HESSIAN, steps=0)
    assert torch.equal(got.q, start.q) and torch.equal(got.scale, start.scale)
    assert stats.codes_changed == 0 and stats.loss == stats.start_loss


def test_after_a_converged_sweep_no_single_code_move_lowers_the_error() -> None:
    """The slow obvious reference for the coordinate step: try every +-1 move of every code."""
    scheme = QuantScheme(group_size=16)
    W, H = _problem(3, 32, seed=8, loud=2)
    Hd = dampened(H, 0.01)
    start = rtn_quantize(W, scheme)
    got, _ = refine(W, Hd, start, scheme, steps=50)
    base = output_loss(W, got.dequantize(scheme), Hd)
    for r, j in itertools.product(range(3), range(32)):
        for k in (-1, 1):
            q = got.q.clone()
            if not scheme.qmin <= int(q[r, j]) + k <= scheme.qmax:
                continue
            q[r, j] += k
            moved = output_loss(W, fake_quantize_codes(q, got.scale, scheme), Hd)
            assert float(moved[r]) >= float(base[r]) * (1 - 1e-5), (r, j, k)


def fake_quantize_codes(q: torch.Tensor, scale: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    from ecoquant.quantize.primitives import dequantize

    return dequantize(q, scale, None, scheme)


def test_scale_solve_matches_least_squares_per_row() -> None:
    """With codes fixed, one refine step's scales are what lstsq gives on each row's explicit design matrix."""
    scheme = QuantScheme(group_size=16)
    W, H = _problem(4, 48, seed=9)
    Hd = dampened(H, 0.01)
    start = rtn_quantize(W, replace(scheme, observer="minmax"))
    from ecoquant.quantize.refine import _solve_scales, _State

    scale = start.scale.clone()
    _solve_scales(_State(W, Hd, start.q, scale, None, scheme, 16))
    L = torch.linalg.cholesky(Hd.double())
    for r in range(4):
        design = torch.zeros(48, 3, dtype=torch.float64)
        for g in range(3):
            design[g * 16 : (g + 1) * 16, g] = start.q[r, g * 16 : (g + 1) * 16].double()
        # min_s || (w - design s)^T L ||^2  ==  lstsq on L^T design, L^T w
        want = torch.linalg.lstsq(L.t() @ design, L.t() @ W[r].double().unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(scale[r].double(), want, rtol=1e-4, atol=1e-7)


def test_refine_bad_input_is_one_line() -> None:
    W, H = _problem(4, 32, seed=10)
    start = rtn_quantize(W, QuantScheme(group_size=32))
    with pytest.raises(EcoquantError, match="do not fit"):
        refine(W, H[:16, :16], start, QuantScheme(group_size=32), steps=1)
    with pytest.raises(EcoquantError, match=">= 0"):
        refine(W, H, start, QuantScheme(group_size=32), steps=-1)
    with pytest.raises(EcoquantError, match="refine_steps"):
        GPTQConfig(refine_steps=-2)
    assert minmax_qparams(W, QuantScheme(group_size=32))[0].shape == (4, 1)
    assert torch.isfinite(fake_quantize(W, start.scale, None, QuantScheme(group_size=32))).all()


# --- through the CLI ------------------------------------------------------------------------------------

CALIB = ["--calib", "corpus", "--calib-samples", "4", "--calib-length", "48", "--no-progress"]


def test_cli_rtn_with_the_hessian_observer_calibrates_and_records_it(tiny_gemma4, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from ecoquant.cli import app

    runner = CliRunner()
    out = tmp_path / "rtn-h"
    result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(out), "--observer", "hessian", *CALIB])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "quant_recipe.json").read_text())
    assert recipe["method"] == "rtn" and recipe["scheme"]["observer"] == "hessian"
    assert recipe["calibration"]["num_samples"] == 4
    assert recipe["method_config"]["stats"]["method"] == "rtn"
    assert not (tmp_path / ".rtn-h.calib").exists()
    minmax = tmp_path / "rtn-m"
    assert runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(minmax), "--no-progress"]).exit_code == 0
    assert (out / "model.safetensors").read_bytes() != (minmax / "model.safetensors").read_bytes()


@pytest.mark.slow  # over 2 min on 2 cores; .ci/run always runs it
def test_cli_awq_gptq_and_refine_steps_run_and_refuse_what_does_not_fit(tiny_gemma4, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from ecoquant.cli import app

    runner = CliRunner()
    out = tmp_path / "ag"
    args = ["quantize", str(tiny_gemma4), "--out", str(out), "--method", "awq-gptq", "--observer", "hessian",
            "--refine-steps", "2", *CALIB]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "quant_recipe.json").read_text())
    assert recipe["method"] == "awq-gptq" and recipe["method_config"]["settings"]["refine_steps"] == 2
    units = recipe["method_config"]["stats"]["units"]
    refined = [s for u in units.values() for s in u.values() if isinstance(s, dict) and "refine" in s]
    assert refined and all(s["refine"]["loss"] <= s["refine"]["start_loss"] for s in refined)
    assert all(s["loss"] <= s["rtn_loss"] for s in refined)
    bad = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "x"), "--refine-steps", "2",
                              "--no-progress"])
    assert bad.exit_code == 2 and "--refine-steps refines GPTQ" in bad.output and "Traceback" not in bad.output
    two = tmp_path / "g2"
    result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(two), "--method", "gptq", "--observer",
                                 "hessian", "--scale-passes", "2", *CALIB])
    assert result.exit_code == 0, result.output
    recipe = json.loads((two / "quant_recipe.json").read_text())
    assert recipe["method_config"]["settings"]["scale_passes"] == 2
    kept = [s["rescaled"] for u in recipe["method_config"]["stats"]["units"].values() for s in u.values()
            if isinstance(s, dict) and "rescaled" in s]
    assert kept and all(isinstance(k, bool) for k in kept)
    for extra, says in ((["--scale-passes", "2"], "--scale-passes re-runs GPTQ"),
                        (["--method", "gptq", "--no-act-order", "--scale-passes", "2"], "static groups")):
        bad = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "x"), *extra, "--no-progress"])
        assert bad.exit_code == 2 and says in bad.output and "Traceback" not in bad.output, bad.output


def test_cli_calib_dtype_runs_the_walk_in_bf16_and_refuses_unknown_names(tiny_gemma4, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from ecoquant.cli import app

    runner = CliRunner()
    outs = {}
    for dtype in ("bfloat16", "float32", "auto"):
        out = tmp_path / dtype
        result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(out), "--method", "gptq",
                                     "--calib-dtype", dtype, *CALIB])
        assert result.exit_code == 0, result.output
        outs[dtype] = out
    stats = {d: json.loads((o / "quant_recipe.json").read_text())["method_config"]["stats"] for d, o in outs.items()}
    assert stats["bfloat16"]["compute_dtype"] == "bfloat16" and stats["float32"]["compute_dtype"] == "float32"
    # auto: bf16 where this CPU multiplies bf16 natively (the fixture is a bf16 checkpoint), else float32.
    from ecoquant.calibrate.run import cpu_has_native_bf16

    assert stats["auto"]["compute_dtype"] == ("bfloat16" if cpu_has_native_bf16() else "float32")
    # The forwards' rounding reaches the Hessians, so the codes differ.
    assert (outs["bfloat16"] / "model.safetensors").read_bytes() != (outs["float32"] / "model.safetensors").read_bytes()
    bad = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "x"), "--method", "gptq",
                              "--calib-dtype", "fp8", *CALIB])
    assert bad.exit_code == 2 and "unknown compute dtype 'fp8'" in bad.output and "Traceback" not in bad.output


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ecoquant.calibrate.run import cpu_has_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags : amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_gptq_methods_default_to_the_hessian_observer_and_two_scale_passes(tiny_gemma4, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from ecoquant.api import default_dampening, default_observer, default_scale_passes
    from ecoquant.cli import app

    assert [default_observer(m) for m in ("rtn", "gptq", "awq", "awq-gptq")] == ["minmax", "hessian", "minmax", "hessian"]
    assert default_scale_passes("gptq", act_order=True) == 2 and default_scale_passes("gptq", act_order=False) == 1
    assert default_scale_passes("awq", act_order=True) == 1
    assert default_dampening("gptq") == default_dampening("awq-gptq") == 0.1
    runner = CliRunner()
    seen = {}
    for name, extra in (("default", []), ("explicit", ["--observer", "minmax", "--scale-passes", "1", "--dampening", "0.01"])):
        out = tmp_path / name
        result = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(out), "--method", "gptq", *extra, *CALIB])
        assert result.exit_code == 0, result.output
        recipe = json.loads((out / "quant_recipe.json").read_text())
        settings = recipe["method_config"]["settings"]
        seen[name] = (recipe["scheme"]["observer"], settings["scale_passes"], settings["dampening_frac"])
    assert seen == {"default": ("hessian", 2, 0.1), "explicit": ("minmax", 1, 0.01)}
    bad = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "rtn"), "--dampening", "0.1"])
    assert bad.exit_code == 2 and "--dampening is GPTQ's" in bad.output and "Traceback" not in bad.output
    assert not (tmp_path / "rtn").exists()
