"""A killed calibration resumes from its last finished layer and writes byte for byte what an uninterrupted run writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from calibrate_models import random_batches, save_tiny_gemma3
from ecoquant.api import plan_model
from ecoquant.calibrate.run import calibrate
from ecoquant.calibrate.sequential import StaleWorkError
from ecoquant.export.compressed_tensors import export_checkpoint
from ecoquant.quantize.awq import AWQConfig
from ecoquant.quantize.scheme import QuantScheme

SCHEME = QuantScheme(group_size=32)


class _Killed(Exception):
    """Stands for the process dying right after a layer finished."""


def _kill_after(layer: int) -> Any:
    def hook(i: int, b: int, *_: Any) -> None:
        if i == layer:
            raise _Killed

    return hook


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gemma3(tmp_path_factory.mktemp("g3") / "gemma3", dtype=torch.bfloat16)


@pytest.mark.parametrize("method", ["gptq", "awq", "awq-gptq"])
def test_interrupted_walk_resumes_to_identical_files(model: Path, tmp_path: Path, method: str) -> None:
    plan = plan_model(model, "text-decoder")
    batches = random_batches(2, 24, 512, seed=3)
    kw: dict[str, Any] = dict(method=method, selection=plan.selection, batches=batches, scheme=SCHEME,
                              awq=AWQConfig(grid=6, clip_grid=6))
    whole = calibrate(model, work_dir=tmp_path / "whole", **kw)
    with pytest.raises(_Killed):
        calibrate(model, work_dir=tmp_path / "cut", on_layer_output=_kill_after(1), **kw)
    assert (tmp_path / "cut" / "units" / "layer_0001.json").is_file()  # layer 1 finished before the kill
    assert not (tmp_path / "cut" / "units" / "layer_0002.json").exists()
    resumed = calibrate(model, work_dir=tmp_path / "cut", resume=True, **kw)
    assert resumed.stats["resumed_units"] == ["layer 0", "layer 1"]
    for rel in sorted(set(whole.quantized.values()) | set(whole.replaced.values())):
        assert (whole.work_dir / rel).read_bytes() == (resumed.work_dir / rel).read_bytes(), rel
    for name, result in (("a", whole), ("b", resumed)):
        export_checkpoint(model, tmp_path / name, selection=plan.selection, scheme=SCHEME,
                          quantize_fn=result.quantize_fn, ignore_linears=list(plan.ignore_linears),
                          replace=result.replace)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_a_different_calibration_in_the_work_folder_is_refused(model: Path, tmp_path: Path) -> None:
    plan = plan_model(model, "text-decoder")
    with pytest.raises(_Killed):
        calibrate(model, method="gptq", selection=plan.selection, batches=random_batches(1, 16, 512, seed=1),
                  work_dir=tmp_path / "w", scheme=SCHEME, on_layer_output=_kill_after(0))
    with pytest.raises(StaleWorkError, match="data_sha256") as err:
        calibrate(model, method="gptq", selection=plan.selection, batches=random_batches(1, 16, 512, seed=2),
                  work_dir=tmp_path / "w", scheme=SCHEME, resume=True)
    assert "\n" not in str(err.value)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import ecoquant.calibrate.sequential as seq
    layer = seq.LayerWalk._layer
    def dying(self, i, *args):
        layer(self, i, *args)
        if i == int(os.environ.get("KILL_AFTER_LAYER", "-1")):
            os.kill(os.getpid(), signal.SIGKILL)
    seq.LayerWalk._layer = dying
    from ecoquant.cli import app
    sys.argv = ["ecoquant", *sys.argv[1:]]
    app()
    """
)


@pytest.mark.slow  # over 2 min on 2 cores; .ci/run always runs it
def test_cli_rerun_after_sigkill_resumes_and_matches(tiny_gemma4: Path, tmp_path: Path) -> None:
    """`ecoquant quantize --method gptq` killed by SIGKILL after layer 1; the same command again finishes it."""
    args = [str(tiny_gemma4), "--method", "gptq", "--calib", "corpus", "--calib-samples", "4", "--calib-length", "48",
            "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ecoquant = [sys.executable, "-c", KILLER]
    whole = subprocess.run([*ecoquant, "quantize", *args, "--out", str(tmp_path / "whole")], env=env,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    killed = subprocess.run([*ecoquant, "quantize", *args, "--out", str(out)],
                            env={**env, "KILL_AFTER_LAYER": "1"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    work = tmp_path / ".cut.calib"
    assert sorted(p.name for p in (work / "units").iterdir()) == ["before_layers.json", "layer_0000.json", "layer_0001.json"]
    assert not out.exists()
    again = subprocess.run([*ecoquant, "quantize", *args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not work.exists()  # scratch removed once the checkpoint is written
    a, b = _files(tmp_path / "whole"), _files(out)
    assert a.keys() == b.keys()
    for name in a:
        if name != "quant_recipe.json":  # timings differ
            assert a[name] == b[name], name
