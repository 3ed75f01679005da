"""``auto`` devices: CUDA when one is visible, else the CPU; a calibration that would not fit the GPU is
moved to the CPU (auto) or refused before any work (explicit cuda), never left to die halfway.

CUDA is mocked: the decisions are pure functions of the probe's answer, and the probe itself is checked
with torch.cuda's functions replaced.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ecoquant.calibrate.memory import (
    HEADROOM_BYTES,
    HEADROOM_FACTOR,
    LayerShapes,
    estimate_calibration_memory,
    layer_shapes,
    plan_calibration_device,
)
from ecoquant.calibrate.run import calibration_device
from ecoquant.devices import GIB, CudaDevice, choose_calibration_device, cuda_devices, resolve_device
from ecoquant.errors import EcoquantError

L4 = CudaDevice(0, "NVIDIA L4", int(22.5 * GIB), 22 * GIB)
TINY_GPU = CudaDevice(0, "tiny test GPU", 64 * 1024**2, 1024**2)  # 1 MiB free: nothing fits


def test_auto_is_cuda_when_a_device_is_visible_and_cpu_otherwise() -> None:
    assert resolve_device("auto", [L4]) == "cuda"
    assert resolve_device("auto", []) == "cpu"
    assert resolve_device("cpu", [L4]) == "cpu"
    assert resolve_device("cuda:0", [L4]) == "cuda:0"


@pytest.mark.parametrize(
    ("asked", "gpus", "match"),
    [("cuda", [], "CUDA is not available"), ("cuda:1", [L4], "only 1 CUDA device"), ("mps", [L4], "unknown device")],
)
def test_impossible_devices_are_one_line(asked: str, gpus: list[CudaDevice], match: str) -> None:
    with pytest.raises(EcoquantError, match=match):
        resolve_device(asked, gpus)


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, present: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if present else 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (20 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Mocked GPU")


def test_the_probe_and_calibration_device_follow_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, present=True)
    assert cuda_devices() == (CudaDevice(0, "Mocked GPU", 24 * GIB, 20 * GIB),)
    assert calibration_device("auto") == torch.device("cuda")
    _fake_cuda(monkeypatch, present=False)
    assert cuda_devices() == ()
    assert calibration_device("auto") == torch.device("cpu")


def test_a_calibration_that_fits_runs_on_the_gpu() -> None:
    choice = choose_calibration_device("auto", 10 * GIB, [L4])
    assert (choice.device, choice.fell_back) == ("cuda", False)
    assert "NVIDIA L4" in choice.note and "10.0 GiB" in choice.note


def test_auto_falls_back_to_cpu_with_one_line_when_free_memory_is_short() -> None:
    choice = choose_calibration_device("auto", 30 * GIB, [L4], "parts")
    assert (choice.device, choice.fell_back) == ("cpu", True)
    assert "\n" not in choice.note
    assert "30.0 GiB" in choice.note and "22.0 GiB free" in choice.note


def test_explicit_cuda_that_does_not_fit_is_refused_with_the_number() -> None:
    with pytest.raises(EcoquantError, match=r"needs about 30\.0 GiB.*has 22\.0 GiB free"):
        choose_calibration_device("cuda", 30 * GIB, [L4])


def test_cpu_never_asks_about_memory() -> None:
    choice = choose_calibration_device("cpu", 10**15, [L4])
    assert choice.device == "cpu" and not choice.fell_back


def test_estimate_counts_weights_activations_hessians_and_solve() -> None:
    shapes = LayerShapes(layer_params=1000, linears=((6, 8), (8, 6)), hidden_size=8, intermediate_size=6)
    gptq = estimate_calibration_memory(shapes, tokens=100, batch_tokens=10, method="gptq", dtype_bytes=2)
    assert gptq.layer_weights == 2000
    assert gptq.activations == 100 * 8 * 2 + 3 * 10 * 6 * 4
    assert gptq.statistics == (8 * 8 + 6 * 6) * 4
    assert gptq.solve == max(3 * 6 * 8 * 4 + 64 * 4, 3 * 8 * 6 * 4 + 36 * 4)
    assert gptq.total == int(gptq.counted * HEADROOM_FACTOR) + HEADROOM_BYTES
    awq = estimate_calibration_memory(shapes, tokens=100, batch_tokens=10, method="awq", dtype_bytes=2, awq_max_tokens=50)
    assert awq.statistics == 50 * (8 + 6) * 4 and awq.solve == 0
    # more tokens, more memory: the estimate grows with the calibration
    big = estimate_calibration_memory(shapes, tokens=10**6, batch_tokens=10, method="gptq", dtype_bytes=2)
    assert big.total > gptq.total


def test_e4b_shaped_layers_read_from_the_meta_model() -> None:
    from ecoquant.fixtures.e4b_twin import e4b_twin_path
    from ecoquant.models.topology import decoder_layers, topology_for
    from ecoquant.plan import plan_model

    plan = plan_model(e4b_twin_path())
    path, layers = decoder_layers(plan.model, topology_for(plan.config))
    shapes = layer_shapes(plan.model, layers, path, plan.selection.modules, plan.config.get_text_config())
    assert len(shapes) == 42
    assert all(s.hidden_size == 2560 and s.intermediate_size == 10240 for s in shapes)
    assert (2560, 10240) in shapes[0].linears  # down_proj: 10240 inputs
    assert shapes[0].shared_kv_width > 0  # E4B shares K/V
    # the seed's 256 x 2048 GPTQ does not fit a 10 GiB GPU, and fits an L4
    assert plan_calibration_device(plan, asked="auto", method="gptq", num_samples=256, max_length=2048,
                                   cuda=[CudaDevice(0, "small", 12 * GIB, 10 * GIB)]).device == "cpu"
    assert plan_calibration_device(plan, asked="auto", method="gptq", num_samples=256, max_length=2048,
                                   cuda=[L4]).device == "cuda"


def test_quantize_refuses_before_any_work_and_auto_records_the_cpu(
    tiny_gemma4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ecoquant.devices

    monkeypatch.setattr(ecoquant.devices, "cuda_devices", lambda: (TINY_GPU,))
    from ecoquant.cli import app

    calib = ["--method", "gptq", "--calib", "corpus", "--calib-samples", "2", "--calib-length", "32", "--no-progress"]
    runner = CliRunner()
    refused = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "c"), "--device", "cuda", *calib])
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith("error: calibrating on cuda needs about"), refused.output
    assert not any(tmp_path.iterdir())  # nothing was written: refused before any work

    done = runner.invoke(app, ["quantize", str(tiny_gemma4), "--out", str(tmp_path / "a"), *calib])
    assert done.exit_code == 0, done.output
    assert "calibrating on cpu: one layer's calibration needs about" in done.output  # the one line, also with --no-progress
    assert "calibrated on cpu" in done.output  # the summary line
    recipe = json.loads((tmp_path / "a" / "quant_recipe.json").read_text())
    assert recipe["method_config"]["device"] == "cpu"
    assert "tiny test GPU" in recipe["method_config"]["device_choice"]
