"""The entry point: calibrate a model folder with GPTQ or AWQ, layer by layer.

>>> from ecoquant.calibrate.run import calibrate
>>> result = calibrate(path, method="gptq", selection=plan.selection, scheme=scheme,
...                    batches=calib.batches, work_dir=tmp)          # doctest: +SKIP
>>> export_checkpoint(path, out, selection=plan.selection, scheme=scheme,
...                   quantize_fn=result.quantize_fn, replace=result.replace, ...)  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from ecoquant.calibrate.capture import Batch
from ecoquant.calibrate.methods import AWQCalibrator, Calibrator, GPTQCalibrator, RTNCalibrator, SmoothQuantCalibrator
from ecoquant.calibrate.result import CalibrationResult
from ecoquant.calibrate.sequential import WALK_FILE, LayerObserver, LayerWalk, build_meta_model
from ecoquant.errors import EcoquantError
from ecoquant.models.loading import load_config, resolve_model
from ecoquant.models.selection import Selection
from ecoquant.models.topology import require_awq_mappings, topology_for
from ecoquant.quantize.awq import AWQConfig
from ecoquant.quantize.defaults import SMOOTHING_METHODS, methods_text
from ecoquant.quantize.gptq import GPTQConfig
from ecoquant.quantize.scheme import QuantScheme
from ecoquant.quantize.smoothquant import SmoothQuantConfig

CalibratedMethod = Literal["rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq"]


def calibration_device(device: str | torch.device) -> torch.device:
    """``device`` parsed (``auto``: CUDA when visible, else CPU), and present on this machine (one clear line otherwise)."""
    from ecoquant.devices import cuda_devices, resolve_device

    return torch.device(resolve_device(str(device), cuda_devices()))


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), read from ``/proc/cpuinfo``.

    Why: there a bf16 matmul runs at about twice float32's rate (309 against
    138 GFLOPS measured on this project's AMD EPYC); elsewhere bf16 is
    emulated and slower than float32. Not Linux, or unreadable: False.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(config: object, device: torch.device) -> torch.dtype:
    """Compute dtype: the checkpoint's on a GPU; float32 on CPU (bf16 matmuls are slow there, and fp32 is exact)."""
    if device.type == "cpu":
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def fast_dtype(config: object, device: torch.device) -> torch.dtype:
    """What ``ecoquant quantize`` calibrates in by default: the checkpoint's dtype on a GPU, and on a CPU
    with native bf16 matmuls when the checkpoint is bf16; float32 otherwise.

    Why not :func:`default_dtype`'s float32 everywhere on CPU: on Gemma-3 270M
    (bench/RESULTS.md, issue 14) bf16 forwards took GPTQ's calibration from
    279 s to 168 s, below llmcompressor's 197 s (which runs bf16 too), with KL
    to bf16 0.1242 against 0.1235. :func:`calibrate` itself keeps float32 on
    CPU, where its results are exact against the reference implementations.
    """
    if device.type != "cpu":
        return default_dtype(config, device)
    checkpoint = default_dtype(config, torch.device("meta"))  # the checkpoint's own dtype
    return torch.bfloat16 if checkpoint == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def make_calibrator(
    method: CalibratedMethod,
    scheme: QuantScheme,
    gptq: GPTQConfig | None = None,
    awq: AWQConfig | None = None,
    awq_max_tokens: int = 16384,
    smoothquant: SmoothQuantConfig | None = None,
) -> Calibrator:
    """The calibrator for a method name (``rtn`` here is RTN with an activation-aware observer)."""
    if method == "rtn":
        return RTNCalibrator(scheme)
    if method == "gptq":
        return GPTQCalibrator(scheme, gptq or GPTQConfig())
    if method == "awq":
        return AWQCalibrator(scheme, awq or AWQConfig(), max_tokens=awq_max_tokens)
    if method == "awq-gptq":
        return AWQCalibrator(scheme, awq or AWQConfig(), max_tokens=awq_max_tokens, then_gptq=gptq or GPTQConfig())
    if method == "smoothquant":
        return SmoothQuantCalibrator(scheme, smoothquant or SmoothQuantConfig(), max_tokens=awq_max_tokens)
    if method == "smoothquant-gptq":
        return SmoothQuantCalibrator(
            scheme, smoothquant or SmoothQuantConfig(), max_tokens=awq_max_tokens, then_gptq=gptq or GPTQConfig()
        )
    raise EcoquantError(f"unknown calibrated method {method!r}; use {methods_text()}")


def calibrate(
    model: str | Path,
    *,
    method: CalibratedMethod | Calibrator,
    selection: Selection | Sequence[str],
    batches: Sequence[Batch],
    work_dir: str | Path,
    scheme: QuantScheme = QuantScheme(),
    gptq: GPTQConfig | None = None,
    awq: AWQConfig | None = None,
    awq_max_tokens: int = 16384,
    smoothquant: SmoothQuantConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 42,
    show_progress: bool = False,
    on_layer_output: LayerObserver | None = None,
    resume: bool = False,
) -> CalibrationResult:
    """Quantize the selected Linears of ``model`` with GPTQ or AWQ on calibration ``batches``.

    Args:
        model: model folder (or hub id) with config.json and safetensors weights.
        method: ``"gptq"``, ``"awq"``, or any :class:`~ecoquant.calibrate.methods.Calibrator`.
        selection: the Linears to quantize (full module names, e.g. ``plan.selection``).
        batches: model inputs, one dict per forward (``input_ids`` at least; image
            samples also carry the processor's pixel tensors), e.g.
            ``load_calibration(...).batches``.
        work_dir: an empty (or new) folder for quantized weights, spooled
            activations and ``result.json``; keep it until the export is written.
        scheme: the quantization format.
        gptq, awq, smoothquant: the algorithms' settings (defaults when None).
        awq_max_tokens: activations AWQ keeps per input stream.
        device: where layers run (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        dtype: compute dtype; default float32 on CPU, the checkpoint's dtype on GPU.
        seed: seeds torch before anything runs (the methods themselves are deterministic).
        show_progress: draw a progress bar on stderr.
        on_layer_output: called with ``(layer, batch, args, kwargs, output)`` for every
            layer run whose output feeds the next layer (for inspection and tests).
        resume: ``work_dir`` may hold a killed run of this same calibration:
            its finished layers are reused (byte for byte the same result as an
            uninterrupted run). A folder holding a different calibration is refused.

    Returns:
        A :class:`CalibrationResult`: ``quantize_fn`` and ``replace`` for
        ``export_checkpoint``, and ``stats`` for the recipe.

    Raises:
        EcoquantError: bad folder, unknown family for AWQ, a selected module that
            calibration never reaches, a non-empty work folder.
    """
    path = resolve_model(model)
    config = load_config(path)
    dev = calibration_device(device)
    compute = dtype or default_dtype(config, dev)
    topology = topology_for(config)
    if isinstance(method, str):
        if method in SMOOTHING_METHODS:
            require_awq_mappings(topology, config)
        calibrator = make_calibrator(method, scheme, gptq, awq, awq_max_tokens, smoothquant)
    else:
        calibrator = method
    names = list(selection.modules if isinstance(selection, Selection) else selection)

    work = Path(work_dir).expanduser()
    if work.exists() and any(work.iterdir()) and not (resume and (work / WALK_FILE).is_file()):
        raise EcoquantError(f"calibration work folder {work} is not empty; pass a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    meta = build_meta_model(config, compute)
    walk = LayerWalk(path, meta, topology, names, calibrator, scheme, dev, compute, work)
    try:
        result = walk.run(batches, show_progress=show_progress, on_layer_output=on_layer_output)
    finally:
        shutil.rmtree(work / "spool", ignore_errors=True)
    result.stats["seed"] = seed
    result.stats["family"] = topology.family
    result.save()
    return result
