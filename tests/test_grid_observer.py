"""The grid observer: weights already on a symmetric int4 grid (QAT q4_0) come out of the checkpoint as they went in.

The bound asserted for grid groups, elementwise: ``|w_hat - w| <= 6u |w|`` with
``u = 2**-8`` (bf16's unit roundoff). A grid weight is stored as
``w = bf16(d * c)`` (one rounding, ``u``); the observer's least-squares step
averages weights each off by at most ``u``, so it is within ``u`` of ``d``,
rounding it to bf16 adds ``u`` and taking a bf16 neighbour instead adds at
most one ulp (``2u``); dequantizing rounds ``scale * c`` once more (``u``).
So "equal to bf16 rounding" means the same codes and weights within a few
bf16 ulps (measured: at most one ulp, 0.2% relative overall), and bit for bit
when the step is itself a bf16 number. Min-max re-rounds the same weights
with ``max|w| / 7.5`` and is off by several percent (measured: 6.7%).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ecoquant.api import QuantizeConfig, plan_model, quantize
from ecoquant.cli import app
from ecoquant.errors import EcoquantError
from ecoquant.quantize.primitives import (
    choose_qparams,
    fake_quantize,
    grid_group_counts,
    grid_qparams,
    minmax_qparams,
    quantize as quantize_codes,
)
from ecoquant.quantize.rtn import rtn_quantize, rtn_quantize_counting_grid
from ecoquant.quantize.scheme import QuantScheme

U = 2.0**-8  # bf16 unit roundoff
BOUND = 6 * U  # elementwise relative bound, derived in the module docstring


def _grid_weight(
    out_f: int, in_f: int, group_size: int | None, seed: int, step_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bf16 weight, most of whose groups are ``step * code`` (q4_0 stores the step as fp16).

    Returns the weight, the codes ``[out, groups, gs]`` and the bool mask of groups on a grid.
    A quarter of the groups are plain Gaussian (on no grid); one in eight of the grid groups
    uses only codes in [-3, 3], so its largest code is not the range's end.
    """
    gs = in_f if group_size is None else group_size
    groups = in_f // gs
    gen = torch.Generator().manual_seed(seed)
    steps = torch.exp(torch.empty(out_f, groups).uniform_(-7.0, -2.0, generator=gen)).to(step_dtype).float()
    codes = torch.randint(-8, 8, (out_f, groups, gs), generator=gen).float()
    small = torch.rand(out_f, groups, generator=gen) < 0.125
    codes = torch.where(small.unsqueeze(-1), codes.clamp(-3, 3), codes)
    on_grid = torch.rand(out_f, groups, generator=gen) >= 0.25
    noise = torch.randn(out_f, groups, gs, generator=gen) * steps.unsqueeze(-1) * 3
    w = torch.where(on_grid.unsqueeze(-1), steps.unsqueeze(-1) * codes, noise)
    return w.reshape(out_f, in_f).to(torch.bfloat16), codes, on_grid


def _rel_errors(w_hat: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Relative Frobenius error, and the largest elementwise ``|w_hat - w| / |w|`` (over nonzero w)."""
    w_hat, w = w_hat.float(), w.float()
    e = (w_hat - w).abs()
    nz = w != 0
    return float(e.norm() / w.norm()), float((e[nz] / w[nz].abs()).max())


def test_grid_groups_reproduced_to_bf16_rounding_minmax_elsewhere() -> None:
    scheme = QuantScheme(group_size=32, observer="grid")
    w, codes, on_grid = _grid_weight(64, 512, 32, seed=0)
    scale, zp, exact = grid_qparams(w, scheme)
    assert zp is None and scale.dtype == torch.bfloat16
    assert torch.equal(exact, on_grid)  # every grid group found, no Gaussian group taken for one
    mm_scale, _ = minmax_qparams(w, scheme)
    assert torch.equal(scale[~on_grid], mm_scale[~on_grid])
    # The checkpoint holds the very codes the grid was made of.
    q = quantize_codes(w, scale, None, scheme).reshape(codes.shape).float()
    assert torch.equal(q[on_grid], codes[on_grid])

    g = w.reshape(64, 16, 32)
    grid_hat = fake_quantize(w, scale, None, scheme).reshape(64, 16, 32)
    mm_hat = fake_quantize(w, mm_scale, None, scheme).reshape(64, 16, 32)
    grid_fro, grid_max = _rel_errors(grid_hat[on_grid], g[on_grid])
    mm_fro, mm_max = _rel_errors(mm_hat[on_grid], g[on_grid])
    print(f"\ngrid groups, relative Frobenius error: grid {grid_fro:.5f} (max elementwise {grid_max:.5f}), "
          f"minmax {mm_fro:.5f} (max elementwise {mm_max:.5f})")
    err = (grid_hat[on_grid].float() - g[on_grid].float()).abs()
    assert bool((err <= BOUND * g[on_grid].float().abs()).all()), grid_max
    assert grid_fro < U  # below one bf16 rounding overall (measured: about u / 2)
    assert mm_fro > 10 * grid_fro and mm_fro > 0.03


def test_bf16_steps_are_reproduced_bit_exactly() -> None:
    """When the step itself is a bf16 number, nothing is lost: scales are the steps, weights identical."""
    scheme = QuantScheme(group_size=32, observer="grid")
    w, _, on_grid = _grid_weight(32, 256, 32, seed=1, step_dtype=torch.bfloat16)
    scale, _, exact = grid_qparams(w, scheme)
    assert torch.equal(exact, on_grid)
    w_hat = fake_quantize(w, scale, None, scheme).reshape(32, 8, 32)
    assert torch.equal(w_hat[on_grid], w.reshape(32, 8, 32)[on_grid])


def test_gaussian_weights_are_on_no_grid_and_get_minmax() -> None:
    for group_size in (32, 128, None):
        scheme = QuantScheme(group_size=group_size, observer="grid")
        w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
        scale, _, exact = grid_qparams(w, scheme)
        assert not bool(exact.any())
        assert torch.equal(scale, minmax_qparams(w, scheme)[0])
        assert grid_group_counts(w, scheme) == (0, exact.numel())


def test_worked_example_and_zero_group() -> None:
    scheme = QuantScheme(group_size=8, observer="grid")
    w = torch.tensor([[0.25, -0.5, 0.125, 0, 0, 0, 0, 0], [0.0] * 8], dtype=torch.bfloat16)
    scale, _, exact = grid_qparams(w, scheme)
    assert exact.tolist() == [[True], [True]]  # an all-zero group is reproduced by any scale
    assert float(scale[0, 0]) == 0.125
    assert quantize_codes(w, scale, None, scheme)[0, :3].tolist() == [2, -4, 1]
    assert torch.equal(scale[1], minmax_qparams(w, scheme)[0][1])  # the zero group keeps min-max's epsilon
    assert torch.equal(fake_quantize(w, scale, None, scheme), w)
    mm = fake_quantize(w, minmax_qparams(w, scheme)[0], None, scheme)
    assert not torch.equal(mm, w)


def test_choose_qparams_and_rtn_use_the_grid_observer() -> None:
    scheme = QuantScheme(group_size=32, observer="grid")
    w, _, _ = _grid_weight(16, 128, 32, seed=3)
    scale, _, exact = grid_qparams(w, scheme)
    assert torch.equal(choose_qparams(w, scheme)[0], scale)
    assert torch.equal(rtn_quantize(w, scheme).scale, scale)
    assert grid_group_counts(w, scheme) == (int(exact.sum()), 16 * 4)
    # the recipe's count comes from the same detection as the codes: same weight, same counts
    counted, n_exact, n_total = rtn_quantize_counting_grid(w, scheme)
    plain = rtn_quantize(w, scheme)
    assert torch.equal(counted.q, plain.q) and torch.equal(counted.scale, plain.scale)
    assert (n_exact, n_total) == grid_group_counts(w, scheme)


def _slow_grid(w: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group, in Python floats: try every step +-max|w|/k, keep the largest that fits, refine it.

    The refinement: least squares, rounded to bf16, then whichever of that and its two bf16
    neighbours dequantizes (bf16 arithmetic, as the checkpoint will) closest to the group.
    """
    out_f, in_f = w.shape
    gs = scheme.group_size or in_f
    u = torch.finfo(w.dtype).eps / 2
    scales, _ = minmax_qparams(w, scheme)
    scales = scales.clone()
    exact = torch.zeros(out_f, in_f // gs, dtype=torch.bool)
    for r in range(out_f):
        for g in range(in_f // gs):
            group = w[r, g * gs : (g + 1) * gs]
            vals = [float(v) for v in group]
            amax = max(abs(v) for v in vals)
            if amax == 0:
                exact[r, g] = True
                continue
            for k in range(1, -scheme.qmin + 1):
                for sign in (1, -1):
                    step = sign * amax / k
                    codes = [round(v / step) for v in vals]
                    if all(
                        scheme.qmin <= c <= scheme.qmax and abs(v / step - c) <= (2 * abs(c) + 1) * u
                        for v, c in zip(vals, codes)
                    ):
                        break
                else:
                    continue
                refined = torch.tensor(sum(c * v for c, v in zip(codes, vals)) / sum(c * c for c in codes),
                                       dtype=w.dtype)
                candidates = [refined, *(torch.nextafter(refined, torch.tensor(d, dtype=w.dtype))
                                         for d in (-math.inf, math.inf))]
                errors = [
                    float(((group / s).round().clamp(scheme.qmin, scheme.qmax) * s).float().sub(group.float()).square().sum())
                    for s in candidates
                ]
                scales[r, g] = candidates[min(range(3), key=lambda i: (errors[i], i))]
                exact[r, g] = True
                break
    return scales, exact


@pytest.mark.parametrize("group_size", [32, 64, None])
def test_vectorized_matches_slow_reference(group_size: int | None) -> None:
    scheme = QuantScheme(group_size=group_size, observer="grid")
    w, _, _ = _grid_weight(24, 256, group_size, seed=4)
    w[0, :] = 0  # an all-zero group (row, for per-channel)
    scale, _, exact = grid_qparams(w, scheme)
    ref_scale, ref_exact = _slow_grid(w, scheme)
    assert torch.equal(exact, ref_exact)
    # The reference's least squares runs in float64, the vectorized one in float32: a step lying on a
    # bf16 rounding boundary may round to the neighbouring bf16 number (and the neighbour search start
    # from there), so scales may end one bf16 ulp apart, rarely.
    diff = (scale.float() - ref_scale.float()).abs()
    ulp = ref_scale.float().abs() * 2 * U
    assert bool((diff <= ulp).all())
    assert float((diff == 0).float().mean()) >= 0.99


def test_scheme_and_config_refuse_what_the_grid_observer_cannot_do() -> None:
    with pytest.raises(EcoquantError, match="symmetric") as exc:
        QuantScheme(observer="grid", symmetric=False)
    assert "\n" not in str(exc.value)
    with pytest.raises(EcoquantError, match="unknown observer 'percentile'; use 'minmax', 'mse', 'hessian' or 'grid'"):
        QuantScheme(observer="percentile")  # type: ignore[arg-type]
    for method in ("gptq", "awq"):
        with pytest.raises(EcoquantError, match="--method rtn only") as exc:
            QuantizeConfig(method=method, scheme=QuantScheme(observer="grid"))  # type: ignore[arg-type]
        assert "\n" not in str(exc.value)


def test_cli_lists_and_accepts_the_grid_observer(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = " ".join(runner.invoke(app, ["quantize", "--help"]).output.replace("│", " ").split())
    assert "Scale choice: minmax, mse (per-group clipping search), hessian" in help_text and "or grid (keep" in help_text
    result = runner.invoke(app, ["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                 "--observer", "grid", "--method", "gptq"])
    assert result.exit_code == 2 and "--method rtn only" in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
                                 "--observer", "grid", "--asymmetric"])
    assert result.exit_code == 2 and "symmetric" in result.output, result.output


# ---------------------------------------------------------------- end to end on the trained tiny VLM


def _q4_0(w: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``quantize_row_q4_0_ref`` then dequantize, in bf16: blocks of 32, ``d = max / -8`` (fp16)."""
    out_f, in_f = w.shape
    x = w.float().reshape(out_f, in_f // 32, 32)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d = x.gather(-1, idx) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.floor(x * inv + 8.5), max=15) - 8
    return (d.half().float() * q).reshape(out_f, in_f).to(torch.bfloat16)


@pytest.fixture(scope="module")
def snapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of the trained tiny VLM whose selected Linear weights are put on a q4_0 grid; all else unchanged."""
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    src = tiny_vlm_path()
    dst = tmp_path_factory.mktemp("qat") / "tiny-vlm-q4_0"
    shutil.copytree(src, dst)
    modules = plan_model(src, "auto").selection.modules
    tensors = load_file(src / "model.safetensors")
    with safe_open(src / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    grid = {m: _q4_0(tensors[f"{m}.weight"]) for m in modules}
    assert all(tensors[f"{m}.weight"].dtype == torch.bfloat16 for m in modules)
    save_file({**tensors, **{f"{m}.weight": w for m, w in grid.items()}}, dst / "model.safetensors", metadata=metadata)
    written = load_file(dst / "model.safetensors")
    assert written.keys() == tensors.keys()
    assert all(torch.equal(written[k], v) for k, v in tensors.items() if k.removesuffix(".weight") not in grid)
    return dst, grid


def _decompressed(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The weights transformers computes with, decompressed by compressed-tensors."""
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the checkpoint has a quantization_config": we add dequantize=True to it
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def test_q4_0_model_is_reproduced_end_to_end(snapped: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    src, grid = snapped
    names = list(grid)
    errors: dict[str, tuple[float, float]] = {}
    for observer in ("grid", "minmax"):
        out = tmp_path / observer
        quantize(src, out, QuantizeConfig(scheme=QuantScheme(group_size=32, observer=observer)), show_progress=False)
        loaded = _decompressed(out, names)
        w_hat = torch.cat([loaded[n].flatten() for n in names])
        w = torch.cat([grid[n].flatten() for n in names])
        errors[observer] = _rel_errors(w_hat, w)
        recipe = json.loads((out / "quant_recipe.json").read_text())
        if observer == "grid":
            # q4_0 made from bf16 weights has steps max/-8, which are bf16 numbers themselves: the observer
            # finds them exactly, so the weights come back bit for bit (the BOUND case is the fp16-step test).
            assert torch.equal(w_hat, w), errors
            groups = sum(t.numel() // 32 for t in grid.values())
            assert recipe["grid_observer"] == {"groups": groups, "exact_groups": groups, "share_exact": 1.0}
            # Blocks whose largest weight is positive need q4_0's negative step; about half of them.
            scales = torch.cat([t.flatten() for k, t in checkpoint_tensors(out).items() if k.endswith(".weight_scale")])
            assert 0.4 < float((scales < 0).float().mean()) < 0.6
        else:
            assert "grid_observer" not in recipe
    print(f"\nq4_0 tiny VLM, relative Frobenius error (max elementwise): grid {errors['grid'][0]:.5f} "
          f"({errors['grid'][1]:.5f}), minmax {errors['minmax'][0]:.5f} ({errors['minmax'][1]:.5f})")
    assert errors["grid"][0] < U
    assert errors["minmax"][0] > 10 * errors["grid"][0] and errors["minmax"][0] > 0.03


def test_unsnapped_model_is_almost_never_on_a_grid(tmp_path: Path) -> None:
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    out = tmp_path / "grid"
    quantize(tiny_vlm_path(), out, QuantizeConfig(scheme=QuantScheme(group_size=32, observer="grid")), show_progress=False)
    share = json.loads((out / "quant_recipe.json").read_text())["grid_observer"]
    print(f"\ntrained tiny VLM (not on a grid): {share}")
    assert share["groups"] > 0 and share["share_exact"] < 0.01
