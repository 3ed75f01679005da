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
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import ecoquant
from ecoquant.energy.meter import (
    EnergyMeter,
    IdleBaseline,
    Measurement,
    idle_corrected_energy_j,
    measure_idle,
)
from ecoquant.errors import EcoquantError
from ecoquant.eval.bootstrap import BootstrapSpec, per_task_scores, recovery_intervals
from ecoquant.eval.backends.base import Backend, ChatRequest, Completion, GenerationSettings
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.economy import describe_variants, prompt_variant, suite_requests
from ecoquant.eval.loaders import BUILTIN_PART_SPECS, load_suite
from ecoquant.eval.tasks import Sample, Suite, Task, score_in_order, suite_scores
from ecoquant.progress import progress_bar

SCHEMA = "ecoquant.eval/1"
"""Version tag of ``results.json``; bump when a field changes meaning."""

Role = Literal["base", "variant"]
BackendKind = Literal["transformers", "openai", "vllm"]

# ------------------------------------------------------------------ config


@dataclass(frozen=True)
class EvalConfig:
    """Everything about a run except which models.

    Attributes:
        suite: ``"builtin"``, ``"doc"``, ``"image"`` or a ``.jsonl`` path (see :func:`load_suite`).
        size: pages/charts per kind for the built-in suite.
        limit: at most this many samples per task (any suite); None for all.
        cache_dir: built-in suite image cache (None: the default cache).
        backend: ``"transformers"`` (models loaded here), ``"openai"`` (models behind ``urls``) or
            ``"vllm"`` (a ``vllm serve --config`` started per model; needs the factory of
            :mod:`ecoquant.serve.vllm_backend`, which ``ecoquant eval --backend vllm`` passes).
        urls: OpenAI-compatible servers: one for all models, or one per model in
            the order base, variants.
        device, dtype, batch_size: for the transformers backend.
        concurrency, timeout_s: for the OpenAI backend.
        generation: sampling settings (greedy by default).
        prompt_variants: names from :data:`ecoquant.eval.economy.PROMPT_VARIANTS`;
            every model runs every variant.
        warmup_requests: requests sent before each model's first window and not measured.
        idle_seconds: idle-power sampling before the first model (only with a real meter).
        max_soft_tokens: the image-token budget per image (transformers: passed to the processor; vllm:
            written into each server's ``mm_processor_kwargs``); None for each checkpoint's default.
        repeats: energy windows per model and prompt variant after warm-up (only with a meter: without
            one there is nothing to measure, so the suite runs once). The first window's answers are
            scored; the energy reported is the mean over the windows, with their spread kept.
    """

    suite: str = "builtin"
    size: int = DEFAULT_SIZE
    limit: int | None = None
    cache_dir: Path | None = None
    backend: BackendKind = "transformers"
    urls: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "bfloat16"
    batch_size: int = 8
    concurrency: int = 8
    timeout_s: float = 600.0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prompt_variants: tuple[str, ...] = ("default",)
    warmup_requests: int = 2
    idle_seconds: float = 5.0
    max_soft_tokens: int | None = None
    repeats: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "prompt_variants", tuple(self.prompt_variants))
        if self.backend not in ("transformers", "openai", "vllm"):
            raise EcoquantError(f"unknown backend {self.backend!r}; use transformers, openai or vllm")
        if self.backend == "openai" and not self.urls:
            raise EcoquantError(
                "the openai backend needs --url (the OpenAI-compatible server, e.g. http://127.0.0.1:8000)"
            )
        if self.backend != "openai" and self.urls:
            raise EcoquantError("--url is only for --backend openai")
        if self.limit is not None and self.limit < 1:
            raise EcoquantError(f"limit must be at least 1, got {self.limit}")
        if not self.prompt_variants:
            raise EcoquantError("give at least one prompt variant")
        if len(set(self.prompt_variants)) != len(self.prompt_variants):
            raise EcoquantError(f"prompt variants repeat: {list(self.prompt_variants)}")
        for name in self.prompt_variants:
            prompt_variant(name)  # unknown names fail here, before any model loads
        if self.max_soft_tokens is not None and self.backend == "openai":
            raise EcoquantError(
                "--max-soft-tokens cannot reach a server someone else started; set it there "
                "(ecoquant serve-config --max-soft-tokens) or use --backend vllm / transformers"
            )
        if self.warmup_requests < 0 or self.idle_seconds < 0:
            raise EcoquantError("warm-up requests and idle seconds cannot be negative")
        if self.repeats < 1:
            raise EcoquantError(f"--repeats must be at least 1, got {self.repeats}")


@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: a short label for the report, where it is, and its role."""

    label: str
    source: str
    role: Role


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
    processor does not take the configured image-token budget.

    Not for the OpenAI backend (its names are served names, not paths); hub ids
    are left for the backend to download.
    """
    from ecoquant.eval.image_budget import check_max_soft_tokens
    from ecoquant.eval.nf4 import underlying_model
    from ecoquant.models.loading import is_hub_id, resolve_model

    if config.backend == "openai":
        return
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
        device=config.device, dtype=config.dtype, batch_size=config.batch_size, max_soft_tokens=config.max_soft_tokens
    )
    if is_nf4_spec(ref.source):
        return load_nf4_backend(ref.source, options)
    return TransformersBackend.load(ref.source, options)


# ------------------------------------------------------------------ record


@dataclass(frozen=True)
class SampleResult:
    task: str
    id: str
    prediction: str
    score: float
    tokens_in: int
    tokens_out: int
    finish_reason: str


@dataclass(frozen=True)
class EnergyResult:
    """A measured window: per-GPU joules (keys are NVML indices as strings, as JSON has them)."""

    time_s: float
    gpu_energy_j: dict[str, float]
    total_j: float
    idle_corrected_j: float | None

    @classmethod
    def from_measurement(cls, m: Measurement, idle: IdleBaseline | None) -> EnergyResult | None:
        if m.gpu_energy_j is None or m.total_energy_j is None:
            return None
        return cls(
            time_s=m.time_s,
            gpu_energy_j={str(g): e for g, e in m.gpu_energy_j.items()},
            total_j=m.total_energy_j,
            idle_corrected_j=idle_corrected_energy_j(m, idle),
        )

    @classmethod
    def mean_of(cls, repeats: Sequence[EnergyResult]) -> EnergyResult:
        """The mean window of repeated windows (per GPU, total, time, above idle): what the table shows."""
        n = len(repeats)
        gpus = repeats[0].gpu_energy_j
        corrected = [r.idle_corrected_j for r in repeats]
        return cls(
            time_s=math.fsum(r.time_s for r in repeats) / n,
            gpu_energy_j={g: math.fsum(r.gpu_energy_j[g] for r in repeats) / n for g in gpus},
            total_j=math.fsum(r.total_j for r in repeats) / n,
            idle_corrected_j=None if None in corrected else math.fsum(c for c in corrected if c is not None) / n,
        )


@dataclass(frozen=True)
class ModelRun:
    """One model with one prompt variant over the whole suite."""

    label: str
    source: str
    role: Role
    prompt_variant: str
    recipe: dict[str, Any] | None
    backend: dict[str, Any]
    wall_time_s: float
    energy: EnergyResult | None
    requests: int
    tokens_in: int
    tokens_out: int
    task_scores: dict[str, float]
    suite_scores: dict[str, float]
    samples: tuple[SampleResult, ...]
    energy_repeats: tuple[EnergyResult, ...] = ()
    """Each measured window (``--repeats``); ``energy`` is their mean. Empty without a meter."""
    recovery_interval: dict[str, list[float] | None] | None = None
    """Bootstrap interval per half and on the mean (``{"doc": [lo, hi], "image": ..., "mean": ...}``;
    see :mod:`ecoquant.eval.bootstrap` and ``RunRecord.intervals``); None for a base run."""

    @property
    def energy_j(self) -> float | None:
        return None if self.energy is None else self.energy.total_j

    @property
    def energy_spread_j(self) -> tuple[float, float] | None:
        """Min and max suite energy over the repeated windows; None without repeats."""
        if not self.energy_repeats:
            return None
        totals = [r.total_j for r in self.energy_repeats]
        return min(totals), max(totals)

    @classmethod
    def from_dict(cls, r: Mapping[str, Any]) -> ModelRun:
        """Rebuild a run from its ``asdict`` form (``results.json``, or a cached evaluation)."""
        return cls(
            **{
                **r,
                "energy": None if r["energy"] is None else EnergyResult(**r["energy"]),
                "samples": tuple(SampleResult(**s) for s in r["samples"]),
                "energy_repeats": tuple(EnergyResult(**e) for e in r.get("energy_repeats", ())),
            }
        )


class BackendFailure(EcoquantError):
    """A model's backend failed (its server did not start, crashed or timed out): that model becomes a
    failed row and the sweep goes on with the next one.

    ``log_tail`` holds the last lines of the server's log; ``log_path`` is where the whole log is kept.
    """

    def __init__(self, message: str, *, stage: str, log_tail: str = "", log_path: Path | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.log_tail = log_tail
        self.log_path = log_path


@dataclass(frozen=True)
class FailedRun:
    """A model that produced no scores, and why (kept in the record so the report shows it)."""

    label: str
    source: str
    role: Role
    stage: str
    """``start`` (never ready), ``generate`` (died or timed out mid-suite)."""
    error: str
    log_tail: str = ""
    log_path: str | None = None

    @classmethod
    def from_failure(cls, ref: ModelRef, exc: BackendFailure) -> FailedRun:
        return cls(
            ref.label, ref.source, ref.role, exc.stage, str(exc), exc.log_tail, None if exc.log_path is None else str(exc.log_path)
        )


@dataclass(frozen=True)
class EnergyInfo:
    """How energy was measured for the whole run."""

    measured: bool
    meter: str
    """What measured it (``"NVML total-energy counter, GPU 0"``) or why nothing did (``"no NVML device"``)."""
    idle_time_s: float | None
    idle_gpu_power_w: dict[str, float] | None
    warmup_requests: int

    @property
    def idle_power_w(self) -> float | None:
        return None if self.idle_gpu_power_w is None else sum(self.idle_gpu_power_w.values())


@dataclass(frozen=True)
class RunRecord:
    """Everything ``results.json`` holds; see the module docstring."""

    schema: str
    created_utc: str
    ecoquant: dict[str, Any]
    suite: dict[str, Any]
    generation: dict[str, Any]
    prompt_variants: list[dict[str, Any]]
    energy: EnergyInfo
    runs: tuple[ModelRun, ...]
    failures: tuple[FailedRun, ...] = ()
    intervals: dict[str, Any] | None = None
    """How each variant's ``recovery_interval`` was drawn (:meth:`BootstrapSpec.to_record`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunRecord:
        """Rebuild a record from ``results.json`` data; a wrong schema is one clear error."""
        if d.get("schema") != SCHEMA:
            raise EcoquantError(f"not an ecoquant eval record (schema {d.get('schema')!r}, expected {SCHEMA!r})")
        try:
            runs = tuple(ModelRun.from_dict(r) for r in d["runs"])
            failures = tuple(FailedRun(**f) for f in d.get("failures", ()))
            return cls(**{**d, "energy": EnergyInfo(**d["energy"]), "runs": runs, "failures": failures})
        except (KeyError, TypeError) as exc:
            raise EcoquantError(f"the eval record is incomplete or has unknown fields ({exc})") from None

    @classmethod
    def load(cls, path: Path | str) -> RunRecord:
        path = Path(path).expanduser()
        if not path.is_file():
            raise EcoquantError(f"no such results file: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EcoquantError(f"{path} is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data)

    def base_run(self, prompt_variant: str) -> ModelRun | None:
        return next((r for r in self.runs if r.role == "base" and r.prompt_variant == prompt_variant), None)


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
) -> ModelRun:
    """Score the first window's completions and assemble the record; energy is the mean over the windows."""
    measurement = measurements[0]
    windows = [e for m in measurements if (e := EnergyResult.from_measurement(m, idle)) is not None]
    scores = score_in_order([task for task, _, _ in items], [c.text for c in completions])
    per_sample = {(s.task, sid): v for s in scores for sid, v in s.per_sample.items()}
    samples = tuple(
        SampleResult(
            task=task.name,
            id=sample.id,
            prediction=c.text,
            score=per_sample[(task.name, sample.id)],
            tokens_in=c.tokens_in,
            tokens_out=c.tokens_out,
            finish_reason=c.finish_reason,
        )
        for (task, sample, _), c in zip(items, completions, strict=True)
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
        samples=samples,
        energy_repeats=tuple(windows) if len(windows) > 1 else (),
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
            runs.append(_model_run(ref, name, backend, items, completions, measurements, idle))
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

    found = recovery_intervals(scores(base), scores(run), halves, spec)
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
    with each variant's recovery interval drawn by ``intervals``."""
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
