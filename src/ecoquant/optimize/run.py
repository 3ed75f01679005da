"""``ecoquant optimize``: quantize a grid of candidates, evaluate base and candidates, pick, write the upload.

The user's question is which variant to ship: the one that keeps at least
the gate's share (80%) of the base's mean quality and spends the least
energy over the whole suite, served as the organizers serve it. This module
answers it by driving the layers below it -- :func:`ecoquant.api.quantize`,
:func:`ecoquant.eval.runner.evaluate_model`, the report, the serving config
and card -- which know nothing about it:

1. **plan** (:mod:`ecoquant.optimize.plan`): the grid, each candidate's keys,
   what ``DIR`` already holds (:mod:`ecoquant.optimize.store`);
2. **quantize** each distinct quantization once (a response variant reuses
   its weights through hard links and carries its own chat template);
3. **evaluate** the base and every candidate on the suite, each model in its
   own energy window (``--backend vllm``: its own ``vllm serve --config``);
   with ``--cluster``, or ``gpus`` naming more than one GPU, each quantization
   and evaluation is a Ray task instead, one GPU each
   (:mod:`ecoquant.optimize.jobs`): Ray is the only scheduler;
4. **decide** with :func:`ecoquant.optimize.select.choose`;
5. **ship**: ``DIR/submission/`` (:mod:`ecoquant.optimize.submission`).

Every finished quantization and evaluation is on disk under its key before
the next starts, so an interrupted run, rerun with the same arguments,
redoes only what had not finished.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ecoquant.errors import EcoquantError
from ecoquant.eval.bootstrap import DEFAULT_CONFIDENCE, BootstrapSpec
from ecoquant.eval.backends.base import Backend
from ecoquant.eval.runner import (
    BackendFailure,
    EnergyInfo,
    EvalConfig,
    FailedRun,
    ModelRef,
    ModelRun,
    PreparedSuite,
    RunRecord,
    build_record,
    evaluate_model,
    open_backend,
)
from ecoquant.optimize.fleet import fleet_energy
from ecoquant.optimize.plan import Job, OptimizeConfig, Plan, plan_optimize, serving_suffix
from ecoquant.optimize.select import Choice, choice_record, choose
from ecoquant.optimize.store import SERVERS, Store, link_or_copy, write_json_atomic
from ecoquant.progress import is_verbose, progress_bar, quiet
from ecoquant.report import RESULTS_FILE, StagePoint, render_report
from ecoquant.report.table import modelled_gpu, report_rows

CHOICE_FILE = "choice.json"


# ------------------------------------------------------------------ progress


class Stages:
    """One line per stage and per candidate step, with the time spent.

    On a terminal (or with ``--verbose``) each step also gets a line when it starts, and the quantize
    and evaluate progress show within; off a terminal only the line that ends it, with its time, so
    the log reads as the decision (:mod:`ecoquant.progress`).
    """

    def __init__(self, console: Console | None = None, enabled: bool = True) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.starts = self.console.is_terminal or is_verbose()

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)

    @contextmanager
    def stage(self, who: str, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        if self.starts:
            self.line(f"optimize: {who}: {what} ...")
        try:
            with quiet():  # the step's own bars: this line has its time
                yield
        except BaseException:
            self.line(f"optimize: {who}: {what} stopped after {time.perf_counter() - t0:.1f} s")
            raise
        self.line(f"optimize: {who}: {what} done in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------ quantize


def _quantize_job(job: Job, plan: Plan, store: Store, config: OptimizeConfig, stages: Stages, show: bool) -> None:
    from ecoquant.api import QuantizeConfig, plan_model, quantize
    from ecoquant.calibrate.memory import plan_calibration_device
    from ecoquant.quantize.gptq import GPTQConfig

    c = job.candidate
    assert c is not None and job.quant_dir is not None and job.quant_key is not None
    t0 = time.perf_counter()
    qconfig = QuantizeConfig(
        method=c.method,
        scheme=c.quant_scheme,
        preset=c.preset,
        overwrite=True,
        calibration=plan.grid.calibration,
        gptq=GPTQConfig(scale_passes=c.passes, dampening_frac=c.damp),
        device=config.quant_device,
        allow_nonfinite=config.allow_nonfinite,
        lm_head=c.lm_head,  # type: ignore[arg-type]
    )
    where = ""
    if qconfig.calibrated:  # the stage line says where it calibrates; a fall-back to the CPU gets its own line
        choice = plan_calibration_device(
            plan_model(plan.model, c.preset), asked=config.quant_device, method=c.method,
            num_samples=qconfig.calibration.num_samples, max_length=qconfig.calibration.max_length,
        )
        if choice.fell_back:
            stages.line(f"optimize: {c.name}: {choice.note}")
            qconfig = replace(qconfig, device=choice.device)
        # otherwise quantize() is asked what optimize was asked, reaches the same device, and its line gives the
        # true reason (handing it the resolved device made it say "asked for" where nobody asked)
        where = f", on {choice.device}"
    with stages.stage(c.name, f"quantize ({c.method}, preset {c.preset}, {c.scheme_label}{where})"):
        quantize(plan.model, job.quant_dir, qconfig, show_progress=show)
        seconds = time.perf_counter() - t0
        store.mark_checkpoint(
            job.quant_dir, job.quant_key, {"candidate": c.quant_record(), "recipe": "quant_recipe.json", "seconds": seconds}
        )


def _serving_variant(job: Job, store: Store) -> None:
    """A folder of the checkpoint's files hard-linked, with the response-economy chat template
    and/or the answer cap (``max_new_tokens`` in ``generation_config.json``) the candidate ships."""
    from ecoquant.serve.chat_template import write_short_answer_template

    c = job.candidate
    assert c is not None and job.quant_dir is not None and job.quant_key is not None
    key = job.quant_key + serving_suffix(c)
    if store.checkpoint_done(job.folder, key):
        return
    tmp = job.folder.with_name(f".{job.folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in job.quant_dir.iterdir():
        if f.is_file() and not f.name.startswith("."):
            link_or_copy(f, tmp / f.name)
    if c.response == "short":
        write_short_answer_template(tmp)
    if c.answer_cap is not None:
        write_answer_cap(tmp, c.answer_cap)
    store.mark_checkpoint(tmp, key, {"from": job.quant_dir.name, "response": c.response, "answer_cap": c.answer_cap})
    shutil.rmtree(job.folder, ignore_errors=True)
    tmp.rename(job.folder)


def write_answer_cap(folder: Path, cap: int) -> None:
    """Set ``max_new_tokens`` in ``folder/generation_config.json`` (vLLM's default for requests without ``max_tokens``)."""
    import json

    path = folder / "generation_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data["max_new_tokens"] = cap
    if path.is_file():
        path.unlink()  # a hard link to the checkpoint's file: replace it, never write through it
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def capped(generation: Any, cap: int) -> Any:
    """The generation settings a request without ``max_tokens`` gets from a shipped cap: each task's cap lowered to it."""
    current = generation.max_new_tokens
    return replace(generation, max_new_tokens=cap if current is None else min(current, cap))


# ------------------------------------------------------------------ evaluate


def job_eval_config(job: Job, config: OptimizeConfig) -> EvalConfig:
    """The evaluation settings of one job: its image budget, its answer cap applied to each task's cap, and its drafting assistant."""
    budget = None if job.candidate is None else job.candidate.max_soft_tokens
    job_eval = replace(config.eval, max_soft_tokens=budget)
    if job.candidate is not None and job.candidate.answer_cap is not None:
        job_eval = replace(job_eval, generation=capped(job_eval.generation, job.candidate.answer_cap))
    if job.candidate is not None and job.candidate.assistant is not None:
        k = job.candidate.num_speculative_tokens
        job_eval = replace(job_eval, assistant=job.candidate.assistant, num_speculative_tokens=k)
    return job_eval


MeterFactory = Callable[[Sequence[int] | None], Any]
BackendFactory = Callable[[ModelRef, int, EvalConfig], Backend]


@dataclass(frozen=True)
class OptimizeResult:
    """What :func:`optimize` did and decided."""

    plan: Plan
    record: RunRecord
    choice: Choice
    submission: Path | None
    quantized: tuple[str, ...]
    """Candidates whose checkpoint was written by this run (the others were reused)."""
    evaluated: tuple[str, ...]
    """Models evaluated by this run (the others' results were reused)."""
    results: Path


def _open_meter(gpus: Sequence[int] | None) -> Any:
    from ecoquant.energy.nvml import open_meter

    return open_meter(gpus)


def _vllm_factory(config: OptimizeConfig, plan: Plan, store: Store, gpu: int | None) -> BackendFactory:
    from ecoquant.serve.config import ServeConfigOptions
    from ecoquant.serve.vllm_backend import VllmServerOptions, vllm_backend_factory

    e = config.eval
    options = VllmServerOptions(
        log_dir=store.root / SERVERS,
        serve_config=ServeConfigOptions(
            suite=e.suite, size=e.size, limit=e.limit, prompt_variants=("default",), cache_dir=e.cache_dir
        ),
        serving={j.label: dict(j.candidate.serving) for j in plan.jobs if j.candidate is not None},
        vllm_python=config.vllm_python,
        vllm_args=config.vllm_args,
        gpu=gpu,
        ready_timeout_s=config.server_timeout_s,
    )
    return vllm_backend_factory(options)


def backend_for(
    config: OptimizeConfig, plan: Plan, store: Store, gpu: int | None, injected: BackendFactory | None
) -> BackendFactory:
    """How each model of a run is opened: ``injected`` (tests), else the configured backend on ``gpu`` (None: the
    process's own device, which in a Ray task is the GPU Ray gave it)."""
    if injected is not None:
        return injected
    if config.backend == "vllm":
        return _vllm_factory(config, plan, store, gpu)
    return _transformers_factory(config, gpu)


def _evaluate_here(
    jobs: Sequence[Job],
    plan: Plan,
    store: Store,
    prepared: PreparedSuite,
    config: OptimizeConfig,
    stages: Stages,
    meter_factory: MeterFactory,
    backend_factory: BackendFactory | None,
    show: bool,
) -> tuple[list[str], dict[str, FailedRun], EnergyInfo | None]:
    """Evaluate ``jobs`` one after the other in this process, on ``--gpus``'s one GPU or the default device,
    saving each result under its key as it finishes (several GPUs go through Ray: :mod:`ecoquant.optimize.jobs`)."""
    from ecoquant.energy.meter import measure_idle
    from ecoquant.eval.runner import energy_info

    gpu = config.gpus[0] if config.gpus else None
    meter = meter_factory(None if gpu is None else [gpu])
    evaluated: list[str] = []
    failures: dict[str, FailedRun] = {}
    index = {j.label: i for i, j in enumerate(plan.jobs)}
    factory = backend_for(config, plan, store, gpu, backend_factory)
    where = "" if gpu is None else f" on GPU {gpu}"
    try:
        idle = measure_idle(meter, config.eval.idle_seconds)
        info = energy_info(meter, idle, config.eval)
        for job in jobs:
            ref = ModelRef(job.label, str(job.folder), job.role)
            t0 = time.perf_counter()
            with stages.stage(job.label, f"evaluate ({config.backend}{where}, {prepared.suite.n_samples} samples)"):
                try:
                    with progress_bar(job.label, prepared.suite.n_samples, show) as advance:
                        runs = evaluate_model(
                            ref, index[job.label], prepared, job_eval_config(job, config), meter=meter, idle=idle,
                            backend_factory=factory, advance=advance,
                        )
                except BackendFailure as exc:
                    failures[job.label] = FailedRun.from_failure(ref, exc)
                except EcoquantError as exc:  # this model cannot be loaded here (e.g. a scheme mix transformers refuses)
                    failures[job.label] = FailedRun(job.label, str(job.folder), job.role, "load", str(exc))
            if job.label in failures:
                stages.line(f"optimize: {job.label}: FAILED: {failures[job.label].error.splitlines()[0]}")
                continue
            payload = {
                "seconds": time.perf_counter() - t0,  # loading included: what the dry run's estimate needs
                "runs": [asdict(r) for r in runs],
                "gpu": gpu,
                "meter": meter.description,
                "energy": asdict(info),
            }
            store.save_eval(job.label, job.eval_key, job.eval_material, payload)
            evaluated.append(job.label)
    finally:
        if hasattr(meter, "close"):
            meter.close()
    return evaluated, failures, info


# ------------------------------------------------------------------ the whole job


@dataclass(frozen=True)
class Runner:
    """How one ``optimize`` call quantizes and evaluates: progress, meter, backend (shared by every stage)."""

    stages: Stages
    show: bool
    energy_measured: bool
    meter_factory: MeterFactory
    backend_factory: BackendFactory | None
    cluster: Any = None
    """``--cluster``, or ``--gpus`` with several GPUs: the :class:`~ecoquant.optimize.jobs.ClusterSession` the jobs
    run on; None: here, one after the other."""

    def close(self) -> None:
        """Stop what :func:`open_runner` started (``--gpus``'s local Ray instance)."""
        if self.cluster is not None:
            self.cluster.close()


@dataclass(frozen=True)
class GridRun:
    """One grid's candidates quantized and evaluated (with the base) under one evaluation setting."""

    plan: Plan
    store: Store
    record: RunRecord
    quantized: tuple[str, ...]
    evaluated: tuple[str, ...]

    where: Mapping[str, Any] | None = None
    """``--cluster``: each evaluated model's node and GPU model (:class:`~ecoquant.optimize.fleet.Where`)."""

    def rows(self, config: OptimizeConfig) -> list[Any]:
        return report_rows(self.record, config.gate, config.gate_confidence)

    def ranked(self, config: OptimizeConfig, energy_measured: bool) -> tuple[list[Any], bool, Any]:
        """The rows the choice ranks, by measured energy or not, and the fleet's note (:func:`~ecoquant.optimize.fleet.ranked`)."""
        from ecoquant.optimize.fleet import ranked

        return ranked(self.rows(config), self.where or {}, modelled_gpu(self.record), energy_measured)


def open_runner(
    config: OptimizeConfig,
    *,
    show_progress: bool | None = None,
    console: Console | None = None,
    meter_factory: MeterFactory = _open_meter,
    backend_factory: BackendFactory | None = None,
) -> Runner:
    """Check the meter and backend once, before any work (a missing vLLM, GPU or Ray is one line).

    ``--cluster`` joins that Ray cluster; ``--gpus`` with more than one GPU starts a Ray instance on this machine
    with just those GPUs: either way Ray places every job. :meth:`Runner.close` stops what this started.
    """
    console = console or Console(stderr=True)
    show = console.is_terminal if show_progress is None else show_progress
    stages = Stages(console, enabled=show_progress is not False)
    probe = meter_factory(list(config.gpus) or None)
    energy_measured = bool(probe.available)
    if hasattr(probe, "close"):
        probe.close()
    if config.gpus and not energy_measured:
        raise EcoquantError(f"--gpus {','.join(map(str, config.gpus))} needs NVIDIA GPUs with NVML; none answered here")
    if config.backend == "vllm" and backend_factory is None:
        from ecoquant.serve.launch import require_vllm

        require_vllm(config.vllm_python)  # before any quantization: one line if vLLM is missing
    cluster = None
    if config.cluster is not None:
        from ecoquant.optimize.jobs import open_cluster

        cluster = open_cluster(config, stages, meter_factory, backend_factory)
        energy_measured = cluster.energy_measured
    elif len(config.gpus) > 1:
        from ecoquant.optimize.jobs import open_local

        cluster = open_local(config, stages, meter_factory, backend_factory)
        energy_measured = cluster.energy_measured
    return Runner(stages, show, energy_measured, meter_factory, backend_factory, cluster)


def run_grid(model: str | Path, config: OptimizeConfig, runner: Runner) -> GridRun:
    """Quantize what ``config.grid`` needs and evaluate base and candidates, reusing what the store holds."""
    stages, show = runner.stages, runner.show
    # not a stage: a bad input here is one error line, with no progress lines around it
    plan, store, prepared, _ = plan_optimize(model, config, energy_measured=runner.energy_measured)
    cached = len(plan.cached_evals)
    for note in plan.vllm_notes:
        stages.line(f"optimize: {note}")
    stages.line(
        f"optimize: {len(plan.jobs) - 1} candidates + base; {cached} evaluations and "
        f"{len(plan.cached_checkpoints)} checkpoints reused from {store.root}"
    )

    quantized = [] if runner.cluster is None else runner.cluster.quantize(plan, store, config, stages, show)
    for job in plan.quantize if runner.cluster is None else ():
        _quantize_job(job, plan, store, config, stages, show)
        quantized.append(job.label)
    for job in plan.jobs:
        if job.candidate is not None and serving_suffix(job.candidate) and job.eval_key not in plan.cached_evals:
            _serving_variant(job, store)

    todo = [j for j in plan.jobs if j.eval_key not in plan.cached_evals]
    if runner.cluster is None:
        evaluated, failures, info = _evaluate_here(
            todo, plan, store, prepared, config, stages, runner.meter_factory, runner.backend_factory, show
        )
    else:
        evaluated, failures, info = runner.cluster.evaluate(todo, plan, store, prepared, config, stages)

    runs: list[ModelRun] = []
    stored: list[tuple[EnergyInfo, str | None]] = []
    for job in plan.jobs:
        data = store.load_eval(job.label, job.eval_key)
        if data is None:
            continue
        runs += [ModelRun.from_dict(r) for r in data["runs"]]
        placed = data.get("placement")
        stored.append((EnergyInfo(**data["energy"]), None if placed is None else f"{placed['host']}/{placed['node_id'][:6]}"))
    energy = info or fleet_energy(stored)
    assert energy is not None or not runs
    record = build_record(
        config.eval,
        prepared,
        energy or EnergyInfo(False, "nothing evaluated", None, None, config.eval.warmup_requests),
        runs,
        [failures[j.label] for j in plan.jobs if j.label in failures],
        BootstrapSpec(config.gate_confidence or DEFAULT_CONFIDENCE),
    )
    where = None if runner.cluster is None else runner.cluster.wheres(store, plan.jobs)
    return GridRun(plan, store, record, tuple(quantized), tuple(evaluated), where)


def decide(
    run: GridRun,
    config: OptimizeConfig,
    runner: Runner,
    search: dict[str, Any] | None = None,
    earlier: Sequence[StagePoint] = (),
) -> OptimizeResult:
    """Write results, report and ``choice.json`` for ``run``, pick, and write the submission folder.

    ``search``: the staged search's record (stages, budget, what each stage kept), added to ``choice.json``;
    ``earlier``: its subset results, drawn on the frontier beside the decision's rows.
    """
    plan, store, record = run.plan, run.store, run.record
    results = record.save(store.root / RESULTS_FILE)
    rows, measured, fleet = run.ranked(config, runner.energy_measured)
    choice = choose(rows, config.gate, measured, confidence=config.gate_confidence, modelled_for=modelled_gpu(record))
    if fleet is not None:
        choice = replace(choice, metric_note=fleet.note())
    render_report(
        record, store.root, config.gate, config.gate_confidence, pick=choice.pick, decision=choice.summary(),
        earlier=earlier,
    )
    extra = {} if search is None else {"search": search}
    write_json_atomic(store.root / CHOICE_FILE, choice_record(choice, plan.grid, record.failures) | extra)
    runner.stages.line(f"optimize: {choice.summary()}")

    submission = None
    if choice.pick is not None:
        from ecoquant.optimize.submission import write_submission

        pick = next(j for j in plan.jobs if j.label == choice.pick)
        with runner.stages.stage(pick.label, "write the submission folder"):
            submission = write_submission(store, pick, plan, record, choice, config)
    if config.keep == "pick":
        _discard_losers(plan, store, choice)
    return OptimizeResult(plan, record, choice, submission, run.quantized, run.evaluated, results)


def _transformers_factory(config: OptimizeConfig, gpu: int | None) -> BackendFactory:
    if gpu is None:
        return open_backend
    device_config = replace(config.eval, device=f"cuda:{gpu}")
    return lambda ref, index, _config: open_backend(ref, index, device_config)


def _discard_losers(plan: Plan, store: Store, choice: Choice) -> None:
    """``--keep pick``: delete every checkpoint folder the pick does not use (evaluations stay)."""
    pick = next((j for j in plan.jobs if j.label == choice.pick), None)
    keep = set() if pick is None or pick.quant_dir is None else {pick.quant_dir, pick.folder}
    for job in plan.jobs:
        for folder in {job.quant_dir, job.folder} - {None}:
            if job.candidate is not None and folder not in keep and folder is not None and folder.exists():
                store.discard(folder)
