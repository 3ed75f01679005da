"""ecoquant's Python API: everything the CLI does, as typed functions.

>>> from ecoquant.api import QuantizeConfig, quantize
>>> quantize("google/gemma-4-E4B-it", "out/e4b-w4a16", QuantizeConfig(method="rtn"))  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from torch import Tensor

from ecoquant.errors import EcoquantError
from ecoquant.export.compressed_tensors import QuantizeFn, export_checkpoint
from ecoquant.export.finite import NonFiniteWeightsError, allow_nonfinite
from ecoquant.export.recipe import build_recipe, hash_model_files
from ecoquant.models.loading import resolve_model
from ecoquant.plan import (  # noqa: F401 - plan_model, plan_footprint: part of this API since the start
    ModelPlan,
    TableBits,
    check_components,
    check_plan,
    plan_footprint,
    plan_model,
    plan_tables,
    plan_token_bytes,
    require_unquantized,
)
from ecoquant.progress import progress_bar
from ecoquant.quantize.primitives import QuantizedWeight
from ecoquant.calibrate.data import CORPUS_SOURCE, DEFAULT_SOURCE, CalibrationConfig, calibration_warnings
from ecoquant.quantize.awq import AWQConfig
from ecoquant.quantize.defaults import (  # noqa: F401 - part of this API
    GPTQ_METHODS,
    METHODS,
    SMOOTHING_METHODS,
    SMOOTHQUANT_METHODS,
    default_dampening,
    method_scheme_problem,
    default_observer,
    default_scale_passes,
    methods_text,
)
from ecoquant.quantize.gptq import GPTQConfig
from ecoquant.models.components import component_schemes, plan_components
from ecoquant.models.topology import require_awq_mappings, topology_for
from ecoquant.quantize.rtn import rtn_quantize, rtn_quantize_counting_grid
from ecoquant.quantize.scheme import ACTIVATION_AWARE, QuantScheme
from ecoquant.quantize.smoothquant import SmoothQuantConfig

Method = Literal["rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq"]


def _existing_parent(out: Path) -> Path:
    """Calibration scratch goes beside the output (same disk), in a folder that exists."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def _unk_id(path: Path) -> int | None:
    """The tokenizer's unknown-token id, if it has one (None when there is no tokenizer to ask)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path).unk_token_id
    except (OSError, ValueError):
        return None


def _load_calibration(path: Path, config: CalibrationConfig, console: Console | None) -> Any:
    """Calibration samples; the hub default falls back to the shipped corpus when offline."""
    from ecoquant.calibrate.data import load_calibration

    try:
        return load_calibration(path, config)
    except EcoquantError as exc:
        if config.source != DEFAULT_SOURCE:
            raise
        if console is not None:
            console.print(f"[yellow]warning:[/] {exc}; calibrating on the shipped corpus instead", highlight=False)
        return load_calibration(path, replace(config, source=CORPUS_SOURCE))


@dataclass(frozen=True)
class QuantizeConfig:
    """What ``ecoquant quantize`` does.

    Attributes:
        method: ``rtn`` (data-free), ``gptq`` or ``awq`` (calibrated, layer by layer).
        scheme: bits, group size, symmetry and observer; weight type and activation bits for W8A8
            (``ecoquant.quantize.scheme.SCHEMES`` names the three: ``w4a16``, the default,
            ``w8a8-fp8`` and ``w8a8-int8``).
        preset: a named module selection, or ``auto`` (by model type).
        targets: replaces the preset's targets when non-empty.
        ignore: added to the preset's ignore list.
        overwrite: replace an existing output folder.
        calibration: samples for gptq/awq (the seed's Open-Platypus default falls
            back to the shipped offline corpus, with a warning, when the hub is unreachable).
        gptq, awq: the algorithms' settings.
        device: where calibration runs layer by layer: ``auto`` (the default: CUDA when one is visible and
            the largest layer's estimated calibration memory fits its free memory, else the CPU, with a line
            saying why), ``cpu``, ``cuda`` or ``cuda:N`` (refused before any work when it would not fit).
        compute_dtype: the calibration forwards' dtype: ``auto`` (the
            checkpoint's dtype on GPU, and on CPUs with native bf16 matmuls,
            AVX512-BF16 or AMX, when the checkpoint is bf16: there the layer
            forwards run about twice as fast; float32 on other CPUs), ``float32``
            (exact against the reference implementations) or ``bfloat16``. The
            GPTQ solve and the Hessians are float32 either way.
        embeddings: ``bf16``, ``int4`` or ``int8`` for the token tables (embeddings and, on Gemma-4 E,
            the Per-Layer-Embedding table); None takes the preset's. Quantized tables untie the head.
        lm_head: ``bf16``, ``int4`` or ``int8`` for the output head (written untied when quantized);
            None takes the preset's.
        allow_nonfinite: quantize source tensors holding NaN or inf instead of refusing them;
            each such tensor and its counts go into the recipe's ``nonfinite_weights``.
        vision_scheme, audio_scheme: a scheme of their own for the vision / audio tower with its
            embedder (None: bf16, as the presets keep them), each written as its own config group,
            always by RTN (calibration walks decoder layers only). Example: decoder W4A16 with the
            vision tower W8A8 (``SCHEMES["w8a8-int8"]``). Refused, with vLLM's reason, where vLLM
            would build the towers in bf16 (:mod:`ecoquant.models.components`).

    Tables and the head are always RTN (symmetric, the scheme's group size):
    they are read by row (embeddings) or once per token (the head), and the
    layer-sequential calibration walks decoder layers only.

    The grid observer is RTN's only. It exists to copy weights that are already
    int4 (QAT ``q4_0``) into the checkpoint unchanged, and on those there is no
    rounding error for calibration to compensate; what GPTQ and AWQ would do
    instead is move the weights off their grid (AWQ scales input channels
    before quantizing, GPTQ re-derives later groups' scales from weights its
    error feedback has updated), so the observer would silently fall back to
    min-max and the recipe's count of exact groups would not describe the
    weights written.
    """

    method: Method = "rtn"
    scheme: QuantScheme = field(default_factory=QuantScheme)
    preset: str = "auto"
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    overwrite: bool = False
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    device: str = "auto"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    embeddings: TableBits | None = None
    lm_head: TableBits | None = None
    allow_nonfinite: bool = False
    vision_scheme: QuantScheme | None = None
    audio_scheme: QuantScheme | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise EcoquantError(f"unknown method {self.method!r}; use {methods_text()}")
        if self.calibrated:
            from ecoquant.calibrate.run import calibration_device

            calibration_device(self.device)  # a bad --device fails before any work, not after hashing
        else:
            from ecoquant.devices import check_device_name

            check_device_name(self.device)  # data-free methods never read it, but a typo is still a typo
        if problem := method_scheme_problem(self.method, self.scheme, flags=True):
            raise EcoquantError(problem)
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise EcoquantError(f"unknown compute dtype {self.compute_dtype!r}; use auto, float32 or bfloat16")
        if self.gptq.refine_steps and self.method not in GPTQ_METHODS:
            raise EcoquantError(f"--refine-steps refines GPTQ's result; use it with a GPTQ method ({', '.join(GPTQ_METHODS)}), not {self.method}")
        if self.gptq.scale_passes > 1 and self.method not in GPTQ_METHODS:
            raise EcoquantError(f"--scale-passes re-runs GPTQ; use it with a GPTQ method ({', '.join(GPTQ_METHODS)}), not {self.method}")
        if self.gptq.scale_passes > 1 and not self.gptq.act_order:
            raise EcoquantError("--scale-passes works on act-order's static groups; drop --no-act-order "
                                "(in column order each group's scale is already chosen from the updated weights)")

    @property
    def calibrated(self) -> bool:
        """Whether the method reads calibration data (RTN does with an activation-aware observer)."""
        return self.method != "rtn" or self.scheme.observer in ACTIVATION_AWARE


@dataclass(frozen=True)
class QuantizeResult:
    """Where the checkpoint went and what it cost."""

    out: Path
    modules: int
    source_bytes: int
    output_bytes: int
    seconds: float
    recipe: dict[str, Any]
    device: str | None = None
    """Where calibration ran (None: data-free RTN, nothing calibrated)."""


def _counting_grid_groups(scheme: QuantScheme, counts: dict[str, int]) -> QuantizeFn:
    """RTN's per-module function with the grid observer, adding each weight's exact and total groups to ``counts``.

    The recipe says how many groups were found on a grid, because a source that
    is only partly on one (or not a QAT checkpoint at all) is quantized by
    min-max where it is not, silently otherwise.
    """

    def counted(name: str, weight: Tensor) -> QuantizedWeight:
        qw, exact, total = rtn_quantize_counting_grid(weight, scheme)
        counts["exact_groups"] += exact
        counts["groups"] += total
        return qw

    return counted


def _calibrate_resumable(
    path: Path, plan: ModelPlan, config: QuantizeConfig, batches: Any, work: Path, console: Console, show_progress: bool
) -> Any:
    """Calibrate in ``work``, resuming a killed run of the same calibration found there.

    A folder left by a different calibration (another method, scheme, data or
    source) is ecoquant's own scratch for this output: it is replaced, with a line saying so.
    """
    import torch

    from ecoquant.calibrate.run import calibrate, calibration_device, fast_dtype
    from ecoquant.calibrate.sequential import WALK_FILE, StaleWorkError
    from ecoquant.models.loading import load_config

    def run() -> Any:
        return calibrate(
            path,
            method=config.method,  # type: ignore[arg-type]
            selection=plan.selection,
            batches=batches,
            work_dir=work,
            scheme=config.scheme,
            gptq=config.gptq,
            awq=config.awq,
            smoothquant=config.smoothquant,
            device=config.device,
            dtype=fast_dtype(load_config(path), calibration_device(config.device))
            if config.compute_dtype == "auto" else getattr(torch, config.compute_dtype),
            seed=config.calibration.seed,
            show_progress=show_progress,
            resume=True,
        )

    if work.exists() and not (work / WALK_FILE).is_file():
        shutil.rmtree(work)  # killed before it recorded anything: nothing to resume
    elif work.exists() and show_progress:
        done = len(list((work / "units").glob("*.json"))) if (work / "units").is_dir() else 0
        console.print(f"resuming the calibration in {work} ({done} units already done)", highlight=False)
    try:
        return run()
    except StaleWorkError as exc:
        if show_progress:
            console.print(f"[yellow]warning:[/] {exc}; starting it afresh", highlight=False)
        shutil.rmtree(work)
        return run()


def quantize(
    model: str | Path, out: str | Path, config: QuantizeConfig = QuantizeConfig(), show_progress: bool = True
) -> QuantizeResult:
    """Quantize ``model`` (folder or hub id) into a compressed-tensors checkpoint at ``out``."""
    t_start = time.perf_counter()
    out = Path(out).expanduser().resolve()
    if out.exists() and not config.overwrite:
        raise EcoquantError(f"{out} already exists; choose another --out or pass --overwrite")
    path = resolve_model(model)
    require_unquantized(path)
    plan = plan_model(path, config.preset, config.targets, config.ignore)
    warnings = check_plan(plan, config.scheme)
    tables = plan_tables(
        plan, config.scheme, config.embeddings or plan.preset.embeddings, config.lm_head or plan.preset.lm_head
    )
    components = plan_components(
        plan.model, plan.config, {"vision": config.vision_scheme, "audio": config.audio_scheme}, frozenset(plan.selection.modules)
    )
    towers = component_schemes(components)
    check_components(plan, components)
    if config.method in SMOOTHING_METHODS:  # before hashing the source and loading calibration data
        require_awq_mappings(topology_for(plan.config), plan.config)
    console = Console(stderr=True, soft_wrap=True)  # log lines stay whole off a terminal
    if show_progress:
        for w in warnings:
            console.print(f"[yellow]warning:[/] {w}", highlight=False)
    choice = None
    if config.calibrated:  # before any work: a calibration that cannot fit the GPU is refused or moved now
        from ecoquant.calibrate.memory import plan_calibration_device

        choice = plan_calibration_device(
            plan, asked=config.device, method=config.method, num_samples=config.calibration.num_samples,
            max_length=config.calibration.max_length, compute_dtype=config.compute_dtype,
        )
        if show_progress or choice.fell_back:
            console.print(("[yellow]warning:[/] " if choice.fell_back else "") + choice.note, highlight=False)
        config = replace(config, device=choice.device)
    timings: dict[str, float] = {"plan": time.perf_counter() - t_start}

    t = time.perf_counter()
    source_hash = hash_model_files(path)
    timings["hash_source"] = time.perf_counter() - t

    scheme = config.scheme
    grid_counts = {"groups": 0, "exact_groups": 0} if scheme.observer == "grid" else None
    # Calibration keeps its finished layers here (beside the output, same disk) until the
    # checkpoint is written: a killed run, rerun with the same command, resumes from them.
    work = _existing_parent(out) / f".{out.name}.calib"
    guard = ExitStack()
    nonfinite = guard.enter_context(allow_nonfinite()) if config.allow_nonfinite else None
    try:
        if not config.calibrated:
            quantize_fn: Any = lambda name, weight: rtn_quantize(weight, scheme)  # noqa: E731
            replaced: Any = None
            calibration_block = method_config = None
            if grid_counts is not None:
                quantize_fn = _counting_grid_groups(scheme, grid_counts)
        else:
            t = time.perf_counter()
            calib = _load_calibration(path, config.calibration, console if show_progress else None)
            timings["calibration_data"] = time.perf_counter() - t
            for w in calibration_warnings(calib, _unk_id(path)):  # before the calibration itself
                warnings.append(w)
                if show_progress:
                    console.print(f"[yellow]warning:[/] {w}", highlight=False)
            t = time.perf_counter()
            result = _calibrate_resumable(path, plan, config, calib.batches, work, console, show_progress)
            timings["calibrate"] = time.perf_counter() - t
            quantize_fn, replaced = result.quantize_fn, result.replace
            calibration_block = calib.describe()
            settings: dict[str, Any] = {}
            if config.method in GPTQ_METHODS:
                settings.update(asdict(config.gptq))
            if config.method in SMOOTHQUANT_METHODS:
                settings.update(asdict(config.smoothquant))
            if config.method in ("awq", "awq-gptq"):
                settings.update(asdict(config.awq))
            method_config = {"settings": settings, "device": config.device, "device_choice": choice.note if choice else None,
                             "stats": result.stats}
        if towers:  # tower Linears are RTN with their component's scheme, whatever the decoder's method
            decoder_fn = quantize_fn
            quantize_fn = lambda name, weight: rtn_quantize(weight, towers[name]) if name in towers else decoder_fn(name, weight)  # noqa: E731
        recipe_holder: dict[str, Any] = {}

        def recipe(sizes: dict[str, int]) -> dict[str, Any]:
            timings["quantize_and_write"] = time.perf_counter() - t_write
            timings["total"] = time.perf_counter() - t_start
            recipe_holder.update(
                build_recipe(
                    source_id=str(model),
                    source_path=path,
                    source_hash=source_hash,
                    method=config.method,
                    method_config=method_config,
                    scheme=scheme.to_dict(),
                    preset=plan.preset.name,
                    targets=list(config.targets or plan.preset.targets),
                    ignore=[*plan.preset.ignore, *config.ignore],
                    modules=list(plan.selection.modules),
                    calibration=calibration_block,
                    timings_s=timings,
                    footprint=sizes,
                    format=scheme.format,
                )
            )
            recipe_holder["warnings"] = warnings
            recipe_holder["token_tables"] = {
                "embeddings": {m: sch.to_dict() for m, sch in tables.tables.items()},
                "lm_head": None
                if tables.head is None
                else {"untied_from": tables.head.source, "scheme": None if tables.head.scheme is None else tables.head.scheme.to_dict()},
            }
            recipe_holder["bytes_per_token"] = plan_token_bytes(plan, scheme, tables).to_record()
            if nonfinite is not None:
                recipe_holder["nonfinite_weights"] = dict(sorted(nonfinite.items()))
            if components:
                recipe_holder["components"] = {
                    c.name: {"scheme": c.scheme.to_dict(), "method": "rtn", "modules": len(c.modules)} for c in components
                }
            if grid_counts is not None:
                n, m = grid_counts["groups"], grid_counts["exact_groups"]
                recipe_holder["grid_observer"] = {"groups": n, "exact_groups": m, "share_exact": m / n if n else 0.0}
            return recipe_holder

        t_write = time.perf_counter()
        with progress_bar(f"{config.method} {scheme.label} export", len(plan.selection), show_progress) as advance:
            sizes = export_checkpoint(
                path,
                out,
                selection=plan.selection,
                scheme=scheme,
                quantize_fn=quantize_fn,
                ignore_linears=list(plan.ignore_linears),
                replace=replaced,
                recipe=recipe,
                overwrite=config.overwrite,
                on_module=advance,
                tables=tables.tables,
                head=tables.head,
                components=components,
            )
    except NonFiniteWeightsError:
        shutil.rmtree(work, ignore_errors=True)  # layers calibrated on damaged weights are nothing to resume
        raise
    except BaseException:
        if (work / "units").is_dir() and any((work / "units").iterdir()):
            console.print(f"calibration so far kept in {work}: rerun the same command to resume", highlight=False)
        raise
    finally:
        guard.close()
    shutil.rmtree(work, ignore_errors=True)
    return QuantizeResult(
        out=out,
        modules=sizes["quantized_modules"],
        source_bytes=sizes["source_bytes"],
        output_bytes=sizes["output_bytes"],
        seconds=time.perf_counter() - t_start,
        recipe=recipe_holder,
        device=config.device if config.calibrated else None,
    )
