"""``optimize --gpus 0,1``: a Ray instance this process starts places the jobs, one GPU each (``-m ray``).

This machine has no GPU: Ray takes ``num_gpus`` as given and hands each
task one of the listed ids in ``CUDA_VISIBLE_DEVICES``; torch then finds no
CUDA and runs on the CPU. NVML measures nothing here, so the user's NVML
check (``--gpus`` without NVML is one line, tests/test_optimize.py) is met
the way the other optimize tests meet it: a fake meter is injected
(``meter_factory``), and in each task it reads its GPU from
``CUDA_VISIBLE_DEVICES`` as the NVML meter does. So what is tested is
Ray's placement and ecoquant's bookkeeping: each evaluation metered on the
GPU Ray gave it, with that GPU's idle power, and the placements recorded as
``--cluster`` records them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Read when ray is imported (here, before optimize imports it): Ray binds 127.0.0.1, as optimize asks (see test_cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded 2-core machine starts nodes slowly
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

ray = pytest.importorskip("ray")

import gpu_fakes  # noqa: E402
from gpu_fakes import WATTS, FakeGpuMeter, slow_backend  # noqa: E402

from ecoquant.eval.runner import EvalConfig  # noqa: E402
from ecoquant.fixtures.tiny_vlm import tiny_vlm_path  # noqa: E402
from ecoquant.optimize import OptimizeConfig, optimize  # noqa: E402
from ecoquant.optimize.grid import grid_from_mapping  # noqa: E402
from ecoquant.optimize.store import read_json  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The workers cannot import this folder's modules by name: send the fakes' code along with them.
ray.cloudpickle.register_pickle_by_value(gpu_fakes)
CUDA_VISIBLE_AT_IMPORT = os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpus_run_on_a_local_ray_each_evaluation_metered_on_its_own_gpu(tmp_path: Path) -> None:
    assert not ray.is_initialized()
    grid = grid_from_mapping({"candidates": [{"method": "rtn", "group_size": g} for g in (128, 64, 32)]})
    config = OptimizeConfig(
        out=tmp_path / "o",
        grid=grid,
        gpus=(3, 5),  # not 0,1: the ids a task gets are the listed ones, not Ray's own 0..n-1
        eval=EvalConfig(suite="builtin-basic", size=1, limit=1, idle_seconds=0.2, warmup_requests=0),
    )
    result = optimize(tiny_vlm_path(), config, show_progress=False, meter_factory=FakeGpuMeter, backend_factory=slow_backend)
    assert not ray.is_initialized()  # the instance it started is stopped
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == CUDA_VISIBLE_AT_IMPORT  # only Ray's processes saw the list

    evals = {read_json(f)["runs"][0]["label"]: read_json(f) for f in (tmp_path / "o" / "evals").glob("*.json")}
    assert set(evals) == {r.label for r in result.record.runs} and len(evals) == 4
    gpus = {}
    for label, data in evals.items():
        placed = data["placement"]
        assert len(placed["gpu_ids"]) == 1, label  # one GPU per evaluation
        gpu = placed["gpu_ids"][0]
        gpus[label] = gpu
        assert placed["gpu_model"] == "Fake L4"
        # metered on that GPU alone, less that GPU's own idle power (measured once, before any job)
        assert data["meter"] == f"fake NVML, GPU {gpu}"
        assert data["energy"]["idle_gpu_power_w"] == {str(gpu): pytest.approx(WATTS)}
        assert list(data["runs"][0]["energy"]["gpu_energy_j"]) == [str(gpu)]
    assert set(gpus.values()) == {3, 5}  # both GPUs did work
    spans = sorted((d["placement"]["started"], d["placement"]["started"] + d["placement"]["seconds"]) for d in evals.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # two evaluations ran at once
    checkpoints = [read_json(f) for f in (tmp_path / "o" / "checkpoints").glob("*/.ecoquant-key.json")]
    assert len(checkpoints) == 3  # the quantizations ran as Ray tasks too
    assert result.record.energy.measured and result.record.energy.meter.startswith("one GPU per evaluation: ")
    assert result.record.energy.idle_gpu_power_w == {"3": pytest.approx(WATTS), "5": pytest.approx(WATTS)}
    assert result.choice.metric == "energy_j"  # (no pick: the fake backend's "x" scores nothing, the base too)
    assert "different GPU models" not in result.choice.metric_note  # one GPU model: measured energy ranks
