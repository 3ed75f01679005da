"""Run a suite on a base model and its variants, one model at a time, and record everything.

:func:`run_eval` is what ``ecoquant eval`` calls. For each model in turn it
loads the backend, sends a few warm-up requests (outside any energy window:
the first requests pay for CUDA context creation, kernel autotuning and
caches, which are not the model's running cost), then for each prompt
variant opens one energy window around the *whole* suite -- the challenge
sums energy over the suite, so that is the unit measured -- and closes the
backend before loading the next model, so only one is ever in memory.

The result is a :class:`RunRecord`: models and their quantization recipes,
the suite, generation settings, prompt variants, per-task and per-half
scores, every prediction with its token counts, wall time, and energy (or
``None`` where there is no meter). It round-trips through ``results.json``
(:meth:`RunRecord.save` / :meth:`RunRecord.load`), which is all the report
needs, so ``ecoquant report results.json`` re-renders without rerunning.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ecoquant
from ecoquant.energy.meter import (
    EnergyMeter,
    IdleBaseline,
    Measurement,
    measure_idle,
)
from ecoquant.errors import EcoquantError
from ecoquant.eval.bootstrap import BootstrapSpec, per_task_scores, recovery_intervals
from ecoquant.eval.backends.base import Backend, ChatRequest, Completion
from ecoquant.eval.config import BackendKind, EvalConfig  # noqa: F401 (importers predate config.py)
from ecoquant.eval.economy import describe_variants, prompt_variant, suite_requests
from ecoquant.eval.loaders import BUILTIN_PART_SPECS, load_suite
from ecoquant.eval.record import (  # noqa: F401 (the record's types are re-exported: importers predate record.py)
    SCHEMA,
    BackendFailure,
    EnergyInfo,
    EnergyResult,
    FailedRun,
    ModelRef,
    ModelRun,
    Role,
    RunRecord,
    SampleResult,
    speculative_summary,
)
from ecoquant.eval.tasks import Sample, Suite, Task, score_in_order, suite_scores
from ecoquant.progress import progress_bar


def model_refs(base: str, variants: Sequence[str]) -> list[ModelRef]:
    """Labels from folder names (or hub ids), made unique with ``#2``, ``#3``..."""
    refs: list[ModelRef] = []
    seen: dict[str, int] = {}
    for source, role in [(base, "base"), *((v, "variant") for v in variants)]:
        from ecoquant.eval.nf4 import NF4_PREFIX, is_nf4_spec, underlying_model

        prefix = NF4_PREFIX if is_nf4_spec(source) else ""
        path = Path(underlying_model(source)).expanduser()
        name = prefix + (path.name if path.exists() and path.name else str(path).rstrip("/"))
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        refs.append(ModelRef(label, str(source), role))  # type: ignore[arg-type]
    return refs


def check_sources(refs: Sequence[ModelRef], config: EvalConfig) -> None:
    """Fail with one line before any work when a local model folder is missing or is not a model, or its image
    processor does not take the configured image-token budget, or ``--assistant`` is not a drafting assistant.

    Not for the OpenAI backend (its names are served names, not paths); hub ids
    are left for the backend to download.
    """
    from ecoquant.eval.image_budget import check_max_soft_tokens
    from ecoquant.eval.nf4 import underlying_model
    from ecoquant.models.loading import is_hub_id, resolve_model

    if config.backend == "openai":
        return
    if config.assistant is not None:
        from ecoquant.eval.speculative import assistant_folder

        assistant_folder(config.assistant)
    for ref in refs:
        source = underlying_model(ref.source)
        if Path(source).expanduser().exists() or not is_hub_id(source):
            check_max_soft_tokens(resolve_model(source), config.max_soft_tokens)


def read_recipe(source: str) -> dict[str, Any] | None:
    """The ``quant_recipe.json`` beside a local checkpoint, if any (None for a base model or hub id).

    An ``nf4:MODEL`` variant has no file; its recipe says what is quantized at load time.
    """
    from ecoquant.eval.nf4 import is_nf4_spec, nf4_model, nf4_recipe

    if is_nf4_spec(source):
        config = Path(nf4_model(source)) / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        return nf4_recipe(source, model_type)
    path = Path(source).expanduser() / "quant_recipe.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EcoquantError(f"{path} is not valid JSON ({exc.msg}); fix or remove it") from None


def limit_suite(suite: Suite, limit: int | None) -> Suite:
    """The first ``limit`` samples of every task (the whole suite for None)."""
    if limit is None:
        return suite
    tasks = tuple(
        Task(t.name, t.suite, t.metric, t.prompt_suffix, t.max_new_tokens, t.samples[:limit]) for t in suite.tasks
    )
    return Suite(suite.name, tasks)


def open_backend(ref: ModelRef, index: int, config: EvalConfig) -> Backend:
    """The backend for model number ``index`` (0 = base): loaded here, or at its server.

    ``vllm`` is not opened here: starting servers is the serving layer's job
    (:func:`ecoquant.serve.vllm_backend.vllm_backend_factory`), which sits above this module.
    """
    if config.backend == "vllm":
        raise EcoquantError("--backend vllm needs the vLLM backend factory (ecoquant.serve.vllm_backend); use `ecoquant eval`")
    if config.backend == "openai":
        from ecoquant.eval.backends.openai_backend import OpenAIBackend

        url = config.urls[0] if len(config.urls) == 1 else config.urls[index]
        return OpenAIBackend(url, ref.source, concurrency=config.concurrency, timeout_s=config.timeout_s)
    from ecoquant.eval.backends.transformers_backend import TransformersBackend, TransformersOptions

    from ecoquant.eval.nf4 import is_nf4_spec, load_nf4_backend

    options = TransformersOptions(
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
        max_soft_tokens=config.max_soft_tokens,
        assistant=config.assistant,
        num_speculative_tokens=config.num_speculative_tokens,
    )
    if is_nf4_spec(ref.source):
        return load_nf4_backend(ref.source, options)
    return TransformersBackend.load(ref.source, options)


def _suite_record(spec: str, suite: Suite, config: EvalConfig) -> dict[str, Any]:
    return {
        "spec": spec,
        "name": suite.name,
        "size": config.size if spec == "builtin" or spec in BUILTIN_PART_SPECS else None,
        "limit": config.limit,
        "n_samples": suite.n_samples,
        "tasks": [
            {
                "name": t.name,
                "suite": t.suite,
                "metric": t.metric,
                "n_samples": len(t.samples),
                "max_new_tokens": t.max_new_tokens,
                "prompt_suffix": t.prompt_suffix,
            }
            for t in suite.tasks
        ],
    }


def _ecoquant_record() -> dict[str, Any]:
    from ecoquant.export.recipe import git_sha

    return {"version": ecoquant.__version__, "git_sha": git_sha()}


# ------------------------------------------------------------------ run


def _model_run(
    ref: ModelRef,
    variant_name: str,
    backend: Backend,
    items: Sequence[tuple[Task, Sample, ChatRequest]],
    completions: Sequence[Completion],
    measurements: Sequence[Measurement],
    idle: IdleBaseline | None,
    max_soft_tokens: int | None = None,
    assistant: tuple[str, int] | None = None,
) -> ModelRun:
    """Score the first window's completions and assemble the record; energy is the mean over the windows.

    ``assistant`` is ``(source, k)`` when the backend decoded speculatively: the run then carries its
    measured acceptance, summed from the per-request counts.
    """
    from ecoquant.eval.modelled import count_images, default_image_budget, split_prompt

    measurement = measurements[0]
    windows = [e for m in measurements if (e := EnergyResult.from_measurement(m, idle)) is not None]
    scores = score_in_order([task for task, _, _ in items], [c.text for c in completions])
    per_sample = {(s.task, sid): v for s in scores for sid, v in s.per_sample.items()}
    budget = max_soft_tokens if max_soft_tokens is not None else default_image_budget(ref.source)
    samples: list[SampleResult] = []
    for (task, sample, request), c in zip(items, completions, strict=True):
        images = count_images(request)
        text_tokens, image_tokens = split_prompt(c.tokens_in, images, c.image_tokens, budget)
        samples.append(
            SampleResult(
                task=task.name,
                id=sample.id,
                prediction=c.text,
                score=per_sample[(task.name, sample.id)],
                tokens_in=c.tokens_in,
                tokens_out=c.tokens_out,
                finish_reason=c.finish_reason,
                text_tokens=text_tokens,
                image_tokens=image_tokens,
                images=images,
                target_steps=c.target_steps,
                drafted_tokens=c.drafted_tokens,
                accepted_tokens=c.accepted_tokens,
            )
        )
    return ModelRun(
        label=ref.label,
        source=ref.source,
        role=ref.role,
        prompt_variant=variant_name,
        recipe=read_recipe(ref.source),
        backend=backend.describe(),
        wall_time_s=measurement.time_s,
        energy=EnergyResult.mean_of(windows) if windows else None,
        requests=len(completions),
        tokens_in=sum(c.tokens_in for c in completions),
        tokens_out=sum(c.tokens_out for c in completions),
        task_scores={s.task: s.score for s in scores},
        suite_scores=suite_scores(scores),
        samples=tuple(samples),
        energy_repeats=tuple(windows) if len(windows) > 1 else (),
        speculative=None if assistant is None else speculative_summary(*assistant, samples),
    )


def _steps(advance: Callable[[str], None], label: str) -> Callable[[int], None]:
    """Adapt the progress bar's one-step ``advance(label)`` to a backend's ``on_done(n)``."""

    def on_done(n: int) -> None:
        for _ in range(n):
            advance(label)

    return on_done


def suite_digest(suite: Suite) -> str:
    """SHA-256 of everything that decides a suite's requests and scores: tasks, prompts, answers, image bytes.

    Two suites with the same digest ask the same questions about the same
    pixels and accept the same answers, so a cached evaluation keyed by it is
    valid; a regenerated or edited suite gets a new digest.
    """
    h = hashlib.sha256()
    for task in suite.tasks:
        h.update(json.dumps([task.name, task.suite, task.metric, task.prompt_suffix, task.max_new_tokens]).encode())
        for sample in task.samples:
            h.update(json.dumps([sample.id, sample.question, sample.answers, sample.choices]).encode())
            for data in sample.image_bytes():
                h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedSuite:
    """The suite loaded once, and every prompt variant's requests built from it."""

    spec: str
    suite: Suite
    requests: Mapping[str, Sequence[tuple[Task, Sample, ChatRequest]]]
    digest: str


def prepare_suite(config: EvalConfig) -> PreparedSuite:
    """Load (or generate) the configured suite and build its requests for each prompt variant."""
    suite = limit_suite(
        load_suite(config.suite, cache_dir=config.cache_dir, size=config.size, limit=config.limit), config.limit
    )
    requests = {
        name: suite_requests(suite, prompt_variant(name), config.generation) for name in config.prompt_variants
    }
    return PreparedSuite(config.suite, suite, requests, suite_digest(suite))


def evaluate_model(
    ref: ModelRef,
    index: int,
    prepared: PreparedSuite,
    config: EvalConfig,
    *,
    meter: EnergyMeter,
    idle: IdleBaseline | None,
    backend_factory: Callable[[ModelRef, int, EvalConfig], Backend] = open_backend,
    advance: Callable[[str], None] = lambda label: None,
) -> list[ModelRun]:
    """One model over the whole suite, one energy window per prompt variant; warm-up first, backend closed last.

    With a meter, each prompt variant's window is repeated ``config.repeats`` times (the first window's
    answers are scored; the others only spend energy, which is their point). Without one there is nothing
    to measure, so the suite runs once and CPU runs stay as fast as before.

    A :class:`BackendFailure` (from the factory or mid-suite) propagates: the
    caller decides whether the sweep goes on.
    """
    settings = config.generation
    runs: list[ModelRun] = []
    backend = backend_factory(ref, index, config)
    try:
        warmup = [r for _, _, r in prepared.requests[config.prompt_variants[0]][: config.warmup_requests]]
        if warmup:
            backend.generate(warmup, settings)
        for name in config.prompt_variants:
            items = prepared.requests[name]
            window = f"{ref.label}/{name}"
            meter.begin_window(window)
            completions = backend.generate([r for _, _, r in items], settings, _steps(advance, f"{ref.label} · {name}"))
            measurements = [meter.end_window(window)]
            for k in range(2, (config.repeats if meter.available else 1) + 1):
                meter.begin_window(f"{window}#{k}")
                backend.generate([r for _, _, r in items], settings)
                measurements.append(meter.end_window(f"{window}#{k}"))
            assistant = None if config.assistant is None else (config.assistant, config.num_speculative_tokens)
            runs.append(
                _model_run(ref, name, backend, items, completions, measurements, idle, config.max_soft_tokens, assistant)
            )
    finally:
        backend.close()
    return runs


def energy_info(meter: EnergyMeter, idle: IdleBaseline | None, config: EvalConfig) -> EnergyInfo:
    """The record's account of how energy was (or was not) measured."""
    return EnergyInfo(
        measured=meter.available,
        meter=meter.description,
        idle_time_s=None if idle is None else idle.time_s,
        idle_gpu_power_w=None if idle is None else {str(g): w for g, w in idle.gpu_power_w.items()},
        warmup_requests=config.warmup_requests,
    )


def run_recovery_interval(record: RunRecord, run: ModelRun, spec: BootstrapSpec) -> dict[str, list[float] | None] | None:
    """``run``'s bootstrap intervals against its prompt variant's base run (None for a base, or without one)."""
    base = record.base_run(run.prompt_variant)
    if run.role == "base" or base is None:
        return None
    halves = {t["name"]: t["suite"] for t in record.suite["tasks"]}

    def scores(r: ModelRun) -> dict[str, dict[str, float]]:
        return per_task_scores([(s.task, s.id, s.score) for s in r.samples])

    try:
        found = recovery_intervals(scores(base), scores(run), halves, spec)
    except (KeyError, ValueError) as exc:  # a hand-edited or mixed record: say which run, in one line
        raise EcoquantError(f"{run.label} and its base were not scored on the same samples ({exc})") from None
    return {k: None if v is None else [v[0], v[1]] for k, v in found.items()}


def with_intervals(record: RunRecord, spec: BootstrapSpec) -> RunRecord:
    """The record with every variant's ``recovery_interval`` drawn by ``spec``, and ``spec`` in ``intervals``."""
    runs = tuple(replace(r, recovery_interval=run_recovery_interval(record, r, spec)) for r in record.runs)
    return replace(record, runs=runs, intervals=spec.to_record())


def build_record(
    config: EvalConfig,
    prepared: PreparedSuite,
    energy: EnergyInfo,
    runs: Sequence[ModelRun],
    failures: Sequence[FailedRun] = (),
    intervals: BootstrapSpec = BootstrapSpec(),
) -> RunRecord:
    """Assemble ``results.json``'s record from finished runs (those of this process or cached ones),
    with each variant's recovery interval drawn by ``intervals``.

    Each run's modelled energy is computed here, for the configured target GPU and concurrency, so a
    cached evaluation gets it too and changing ``--target-gpu`` needs no new evaluation.
    """
    from ecoquant.eval.modelled import run_modelled_energy

    runs = [
        replace(
            r,
            modelled_energy=run_modelled_energy(
                r.source, r.samples, config.target_gpu, config.target_concurrency, r.speculative
            ),
        )
        for r in runs
    ]
    suite_record = _suite_record(config.suite, prepared.suite, config)
    suite_record["sha256"] = prepared.digest
    record = RunRecord(
        schema=SCHEMA,
        created_utc=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        ecoquant=_ecoquant_record(),
        suite=suite_record,
        generation=config.generation.to_record(),
        prompt_variants=describe_variants(config.prompt_variants),
        energy=energy,
        runs=tuple(runs),
        failures=tuple(failures),
    )
    return with_intervals(record, intervals)


def run_eval(
    base: str,
    variants: Sequence[str] = (),
    config: EvalConfig | None = None,
    *,
    meter: EnergyMeter | None = None,
    backend_factory: Callable[[ModelRef, int, EvalConfig], Backend] = open_backend,
    show_progress: bool = True,
    intervals: BootstrapSpec = BootstrapSpec(),
) -> RunRecord:
    """Evaluate ``base`` and each of ``variants`` on the configured suite; see the module docstring.

    ``meter`` defaults to :func:`ecoquant.energy.open_meter` (NVML, or a meter
    that records "no NVML device"); ``backend_factory`` exists so the OpenAI,
    vLLM and transformers paths share everything else. A model whose backend
    fails (:class:`BackendFailure`) becomes a failed row and the others still run.
    """
    from ecoquant.energy.nvml import open_meter

    config = config or EvalConfig()
    refs = model_refs(base, variants)
    if config.backend == "openai" and len(config.urls) not in (1, len(refs)):
        raise EcoquantError(f"{len(config.urls)} --url for {len(refs)} models; pass one for all, or one per model")
    check_sources(refs, config)
    prepared = prepare_suite(config)
    meter = meter if meter is not None else open_meter()
    idle = measure_idle(meter, config.idle_seconds)

    runs: list[ModelRun] = []
    failures: list[FailedRun] = []
    total = len(refs) * len(config.prompt_variants) * prepared.suite.n_samples
    with progress_bar("evaluating", total, show_progress) as advance:
        for index, ref in enumerate(refs):
            try:
                runs += evaluate_model(
                    ref, index, prepared, config, meter=meter, idle=idle, backend_factory=backend_factory, advance=advance
                )
            except BackendFailure as exc:
                failures.append(FailedRun.from_failure(ref, exc))
    return build_record(config, prepared, energy_info(meter, idle, config), runs, failures, intervals)
