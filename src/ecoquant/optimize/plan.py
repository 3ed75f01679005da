"""The plan of an ``optimize`` run: its settings, the base and candidate jobs with their keys, what is cached.

:func:`plan_optimize` resolves the model, builds the grid and every key
(:mod:`ecoquant.optimize.store` says what a key holds), and looks up what
``DIR`` already has; ``--dry-run`` prints it and stops. Nothing is written
but ``DIR`` itself and its source-hash cache.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ecoquant.calibrate.data import CalibrationConfig
from ecoquant.errors import EcoquantError
from ecoquant.eval.image_budget import check_max_soft_tokens
from ecoquant.eval.runner import EvalConfig, PreparedSuite, prepare_suite
from ecoquant.optimize.grid import Candidate, Grid, default_grid
from ecoquant.optimize.levers import FamilyLevers
from ecoquant.optimize.store import Store, digest
from ecoquant.quantize.scheme import ACTIVATION_AWARE
from ecoquant.report.table import GATE_RECOVERY, check_confidence, check_threshold
from ecoquant.serve.vllm_features import TESTED_VLLM, version_tuple

KEY_VERSION = 1
"""Part of every key: bump it when what a key stands for changes, so old results are not reused."""

SHORT_SUFFIX = "+short"


def serving_suffix(candidate: Candidate) -> str:
    """The folder suffix of a candidate whose files differ from its checkpoint's: ``+short``, ``+cap16``, both, or ''."""
    suffix = SHORT_SUFFIX if candidate.response == "short" else ""
    return suffix + ("" if candidate.answer_cap is None else f"+cap{candidate.answer_cap}")

BackendKind = Literal["transformers", "vllm"]
Keep = Literal["pick", "all"]


@dataclass(frozen=True)
class SearchConfig:
    """The staged search's bounds (:mod:`ecoquant.optimize.stages`; used when no grid is given).

    Attributes:
        budget: at most this many candidate evaluations over all stages (the base's, one per suite
            setting, are not counted); None: no bound.
        subset: samples per task in stages 1 and 2 (the first ones of each task, in the suite's own
            seeded order); stage 3 runs the whole suite.
        keep: weights candidates that go on to stage 2 (the best by mean recovery per joule).
        finalists: candidates that go on to stage 3.
        levers: the levers to pull; None for the model family's entry in
            :data:`~ecoquant.optimize.levers.FAMILY_LEVERS`.
        calibration: GPTQ/AWQ calibration as given; None for
            :func:`~ecoquant.calibrate.sizing.sized_calibration` of the model, with ``calib_samples``
            and ``calib_length`` (``--calib-samples``, ``--calib-length``) overriding its size.
        assistant: the drafting assistant stage 2's MTP lever uses (folder or hub id); None: found
            beside the model (:func:`~ecoquant.optimize.levers.find_assistant`) unless ``discover_assistant``
            is False. Only families whose levers have an MTP entry use it.
        discover_assistant: look for an assistant when none is given (``--no-assistant`` turns it off).
    """

    budget: int | None = None
    subset: int = 2
    keep: int = 2
    finalists: int = 2
    levers: FamilyLevers | None = None
    calibration: CalibrationConfig | None = None
    calib_samples: int | None = None
    calib_length: int | None = None
    assistant: str | None = None
    discover_assistant: bool = True

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget < 1:
            raise EcoquantError(f"--budget must be at least 1 evaluation, got {self.budget}")
        for name in ("subset", "keep", "finalists"):
            if getattr(self, name) < 1:
                raise EcoquantError(f"search {name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``ecoquant optimize`` decides besides the model.

    Attributes:
        out: the working folder (checkpoints, evaluations, results, submission).
        grid: the candidates; None for :func:`~ecoquant.optimize.grid.default_grid` of the model's family.
        gate: minimum mean recovery, in (0, 1] (the challenge's 0.8).
        gate_confidence: gate on the lower bound of this bootstrap interval on mean recovery, in (0, 1)
            (None: on the point estimate); the intervals shown are drawn at this level (default 90%).
        backend: ``transformers`` (models loaded here) or ``vllm`` (each served by ``vllm serve --config``).
        eval: suite, generation, warm-up and backend settings (its ``backend`` is set from ``backend``).
        quant_device: where GPTQ/AWQ calibrate: ``auto`` (CUDA when visible and the calibration fits, else
            the CPU; :func:`ecoquant.calibrate.memory.plan_calibration_device`), ``cpu``, ``cuda``, ``cuda:N``.
        keep: ``all`` keeps every checkpoint; ``pick`` deletes the losers' after the decision.
        gpus: NVML indices; one: everything runs here on it; more than one: a Ray instance on this machine with
            just those GPUs runs the jobs, one GPU each, each metered alone (:func:`ecoquant.optimize.jobs.open_local`).
        repo_id: the submission's ``vllm_config.yaml`` names this as ``model`` (default: ``.``, the folder itself).
        vllm_python, vllm_args, server_timeout_s: for ``--backend vllm``.
        allow_nonfinite: quantize source weights holding NaN or inf (recorded in each recipe) instead of refusing.
        search: the staged search's bounds, used when ``grid`` is None.
        cluster: a Ray cluster's address (``auto``: the one started on this machine) to run every
            quantization and evaluation on, one GPU (or CPU) each (:mod:`ecoquant.optimize.jobs`); None: here.
        cluster_retries: how often Ray re-places a job whose node or worker died before the run gives up
            on it (the next run re-runs it; finished jobs are kept).
        target_vllm: the vLLM version the submission will be served with (``--target-vllm``): levers
            needing a feature this version is known to lack are left out
            (:mod:`ecoquant.serve.vllm_features`), and the submission states the lowest version its pick needs.
    """

    out: Path
    grid: Grid | None = None
    gate: float = GATE_RECOVERY
    gate_confidence: float | None = None
    backend: BackendKind = "transformers"
    eval: EvalConfig = field(default_factory=EvalConfig)
    quant_device: str = "auto"
    keep: Keep = "all"
    gpus: tuple[int, ...] = ()
    repo_id: str | None = None
    vllm_python: Path | None = None
    vllm_args: tuple[str, ...] = ()
    server_timeout_s: float = 900.0
    allow_nonfinite: bool = False
    search: SearchConfig = field(default_factory=SearchConfig)
    cluster: str | None = None
    cluster_retries: int = 1
    target_vllm: str = TESTED_VLLM

    def __post_init__(self) -> None:
        if not version_tuple(self.target_vllm):
            raise EcoquantError(f"--target-vllm takes a version such as {TESTED_VLLM}, not {self.target_vllm!r}")
        object.__setattr__(self, "out", Path(self.out).expanduser())
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "vllm_args", tuple(self.vllm_args))
        check_threshold(self.gate)
        check_confidence(self.gate_confidence)
        if self.backend not in ("transformers", "vllm"):
            raise EcoquantError(f"unknown backend {self.backend!r} for optimize; use transformers or vllm")
        if self.keep not in ("pick", "all"):
            raise EcoquantError(f"--keep takes pick or all, not {self.keep!r}")
        if len(set(self.gpus)) != len(self.gpus):
            raise EcoquantError(f"--gpus repeats a GPU: {list(self.gpus)}")
        if self.cluster is not None and self.gpus:
            raise EcoquantError("--cluster and --gpus do not go together: on a cluster Ray gives each job its GPU")
        if self.cluster_retries < 0:
            raise EcoquantError(f"--cluster-retries must be 0 or more, got {self.cluster_retries}")
        object.__setattr__(self, "eval", replace(self.eval, backend=self.backend, prompt_variants=("default",)))


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Job:
    """One model to evaluate: the base or a candidate, with its keys and folders."""

    label: str
    role: Literal["base", "variant"]
    candidate: Candidate | None
    quant_key: str | None
    quant_dir: Path | None
    folder: Path
    """What is served: the source, the checkpoint, or its response variant."""
    eval_key: str
    eval_material: Mapping[str, Any]


@dataclass(frozen=True)
class Plan:
    """What :func:`optimize` will do, and what ``DIR`` already holds."""

    model: Path
    model_type: str | None
    grid: Grid
    jobs: tuple[Job, ...]
    quantize: tuple[Job, ...]
    """One job per distinct quantization still to write (evaluations that need it are not cached)."""
    cached_evals: frozenset[str]
    cached_checkpoints: frozenset[str]
    disk_needed_bytes: int
    energy_measured: bool
    vllm_notes: tuple[str, ...] = ()
    """Candidates left out for ``--target-vllm`` and why, and features not checked on it."""

    def rows(self) -> list[dict[str, Any]]:
        """The plan as table rows (``--dry-run``)."""
        out = []
        for job in self.jobs:
            c = job.candidate
            out.append(
                {
                    "name": job.label,
                    "method": "bf16 base" if c is None else c.method,
                    "preset": "" if c is None else c.preset,
                    "scheme": "" if c is None else c.scheme_label,
                    "response": "default" if c is None else c.response,
                    "image budget": "" if c is None or c.max_soft_tokens is None else str(c.max_soft_tokens),
                    "serving": "" if c is None or not c.serving else json.dumps(dict(c.serving)),
                    "draft": "" if c is None or c.assistant is None else f"k={c.num_speculative_tokens}",
                    "checkpoint": "source"
                    if c is None
                    else ("cached" if job.quant_key in self.cached_checkpoints else "to quantize"),
                    "evaluation": "cached" if job.eval_key in self.cached_evals else "to run",
                }
            )
        return out


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def quant_material(source_sha: str, candidate: Candidate, grid: Grid) -> dict[str, Any]:
    """What decides a candidate's checkpoint."""
    calibrated = candidate.method != "rtn" or candidate.quant_scheme.observer in ACTIVATION_AWARE
    return {
        "v": KEY_VERSION,
        "source": source_sha,
        **candidate.quant_record(),
        "calibration": asdict(grid.calibration) if calibrated else None,
    }


def eval_material(
    model_key: str,
    candidate: Candidate | None,
    prepared: PreparedSuite,
    config: OptimizeConfig,
    energy_measured: bool,
    assistant_key: str | None = None,
) -> dict[str, Any]:
    """What decides an evaluation's result (``assistant_key``: the drafting assistant's content hash, if any)."""
    e = config.eval
    drafter = model_drafter(candidate, e)
    backend: dict[str, Any] = {"kind": config.backend}
    if config.backend == "transformers":
        backend |= {"device": e.device, "dtype": e.dtype, "batch_size": e.batch_size}
    else:
        backend |= {"vllm_args": list(config.vllm_args), "concurrency": e.concurrency}
    return {
        "v": KEY_VERSION,
        "model": model_key,
        "response": "default" if candidate is None else candidate.response,
        "max_soft_tokens": None if candidate is None else candidate.max_soft_tokens,
        "serving": {} if candidate is None else dict(candidate.serving),
        **({} if candidate is None or candidate.answer_cap is None else {"answer_cap": candidate.answer_cap}),
        # absent without an assistant, so older keys stay valid
        **({} if drafter is None else {"assistant": assistant_key or drafter[0], "num_speculative_tokens": drafter[1]}),
        "suite": {"spec": e.suite, "size": e.size, "limit": e.limit, "sha256": prepared.digest},
        "generation": e.generation.to_record(),
        "prompt_variant": "default",
        "warmup_requests": e.warmup_requests,
        "backend": backend,
        "energy_measured": energy_measured,
        # repeated windows change a measured result only; without a meter the suite runs once whatever --repeats says
        **({"repeats": e.repeats} if energy_measured else {}),
    }


def fit_grid(grid: Grid, model_type: str | None, target_vllm: str) -> tuple[Grid, tuple[str, ...]]:
    """``grid`` without the candidates ``target_vllm`` is known to lack a feature of, and what was said about it."""
    from ecoquant.optimize.levers import fit_vllm, require_family

    require_family(model_type, target_vllm)
    fit = fit_vllm(grid.candidates, model_type, target_vllm)
    if not fit.kept:
        raise EcoquantError(f"no candidate of the grid can be served by vLLM {target_vllm}: {fit.left_out[0][1]}")
    return (replace(grid, candidates=fit.kept) if fit.left_out else grid), tuple(fit.lines())


def model_drafter(candidate: Candidate | None, e: EvalConfig) -> tuple[str, int] | None:
    """``(assistant, k)`` a model decodes with: the candidate's own, else the evaluation's (which the base
    gets too: how the demo measures the bf16 target's acceptance), else None."""
    if candidate is not None and candidate.assistant is not None:
        return candidate.assistant, int(candidate.num_speculative_tokens or 1)
    return None if e.assistant is None else (e.assistant, e.num_speculative_tokens)


def _check_grid(grid: Grid, config: OptimizeConfig, model_type: str | None = None) -> None:
    from ecoquant.optimize.levers import drafter_fits

    drafted = [c.name for c in grid.candidates if c.assistant is not None]
    unfit = [name for name in drafted if not drafter_fits(next(c for c in grid.candidates if c.name == name), model_type)]
    if unfit:
        raise EcoquantError(
            f"candidates {', '.join(unfit)} quantize the token tables, which vLLM's drafters cannot read "
            "(they take embed_tokens.weight directly); drop their assistant or use a preset with bf16 tables"
        )
    if config.backend != "transformers" and drafted:
        raise EcoquantError(
            f"candidates {', '.join(drafted)} decode with an assistant, whose acceptance is measured with "
            "--backend transformers (assisted generation); use it, or drop their assistant:"
        )
    if config.backend != "vllm" and grid.needs_vllm():
        raise EcoquantError(
            f"candidates {', '.join(grid.needs_vllm())} set vLLM serving options, which only a vLLM server honours; "
            "use --backend vllm or remove their serving:"
        )


def plan_optimize(
    model: str | Path, config: OptimizeConfig, *, prepared: PreparedSuite | None = None, energy_measured: bool | None = None
) -> tuple[Plan, Store, PreparedSuite, dict[str, Any]]:
    """Resolve the model, build the grid and every key, and look up what ``DIR`` holds.

    Returns the plan, the store, the prepared suite and the source's hashes.
    """
    from ecoquant.plan import plan_footprint, plan_model, plan_tables
    from ecoquant.models.loading import resolve_model

    from ecoquant.plan import require_unquantized

    path = resolve_model(model)
    require_unquantized(path)  # the base must be the bf16 source the candidates are made from
    model_type = _model_type(path)
    grid, notes = fit_grid(config.grid or default_grid(model_type), model_type, config.target_vllm)
    _check_grid(grid, config, model_type)
    for c in grid.candidates:
        try:
            check_max_soft_tokens(path, c.max_soft_tokens)
        except EcoquantError as exc:
            raise EcoquantError(f"candidate {c.name}: {exc}") from None
    prepared = prepared or prepare_suite(config.eval)
    store = Store(config.out)  # only once the inputs are known good: a bad one leaves no empty folder behind
    source_hash = store.source_hash(path)
    if energy_measured is None:
        energy_measured = _meter_available(config)
    base_key = digest({"v": KEY_VERSION, "base": source_hash["sha256"]})
    drafters = {d[0] for c in (None, *grid.candidates) if (d := model_drafter(c, config.eval)) is not None}
    assistant_keys = {a: assistant_key(a) for a in sorted(drafters)}
    base_drafter_key = None if config.eval.assistant is None else assistant_keys[config.eval.assistant]
    jobs = [
        Job(
            path.name,
            "base",
            None,
            None,
            None,
            path,
            digest(m := eval_material(base_key, None, prepared, config, energy_measured, base_drafter_key)),
            m,
        )
    ]
    for c in grid.candidates:
        qkey = digest(quant_material(source_hash["sha256"], c, grid))
        qdir = store.checkpoint_dir(f"{c.method}-{c.preset}", qkey)
        folder = qdir.with_name(qdir.name + serving_suffix(c))
        a_key = None if (d := model_drafter(c, config.eval)) is None else assistant_keys[d[0]]
        material = eval_material(qkey + serving_suffix(c), c, prepared, config, energy_measured, a_key)
        jobs.append(Job(c.name, "variant", c, qkey, qdir, folder, digest(material), material))
    cached_evals = frozenset(j.eval_key for j in jobs if store.load_eval(j.label, j.eval_key) is not None)
    cached_ckpts = frozenset(
        j.quant_key for j in jobs if j.quant_dir is not None and store.checkpoint_done(j.quant_dir, j.quant_key or "")
    )
    to_quantize: dict[str, Job] = {}
    for j in jobs:
        if j.quant_key and j.eval_key not in cached_evals and j.quant_key not in cached_ckpts:
            to_quantize.setdefault(j.quant_key, j)
    disk = 0
    for j in to_quantize.values():
        assert j.candidate is not None
        model_plan = plan_model(path, j.candidate.preset)
        head = j.candidate.lm_head or model_plan.preset.lm_head
        tables = plan_tables(model_plan, j.candidate.quant_scheme, model_plan.preset.embeddings, head)  # type: ignore[arg-type]
        disk += plan_footprint(model_plan, j.candidate.quant_scheme, tables).after_bytes
    plan = Plan(
        path, model_type, grid, tuple(jobs), tuple(to_quantize.values()), cached_evals, cached_ckpts, disk, energy_measured,
        notes,
    )
    return plan, store, prepared, source_hash


def assistant_key(assistant: str) -> str:
    """What identifies an assistant in an evaluation's key: its files' SHA-256 when it is a local folder
    (a retrained assistant at the same path is a new evaluation), else the hub id as given."""
    from ecoquant.export.recipe import hash_model_files

    path = Path(assistant).expanduser()
    if path.is_dir():
        return str(hash_model_files(path)["sha256"])
    return assistant


def _meter_available(config: OptimizeConfig) -> bool:
    from ecoquant.energy.nvml import NvmlMeter, open_meter

    meter = open_meter(list(config.gpus) or None)
    available = meter.available
    if isinstance(meter, NvmlMeter):
        meter.close()
    return available


def calibration_device_note(model: Path, candidates: Sequence[Candidate], calibration: CalibrationConfig, asked: str) -> str | None:
    """Where the calibrated candidates would calibrate here (the dry run's line); None when none calibrates.

    The hungriest candidate decides what is shown: the one whose estimated
    calibration memory is largest (AWQ + GPTQ keeps activations and Hessians).
    """
    from ecoquant.calibrate.memory import plan_calibration_device
    from ecoquant.devices import cuda_devices
    from ecoquant.plan import plan_model

    gpus = cuda_devices()
    choices = []
    for method, preset in sorted({(c.method, c.preset) for c in candidates if c.method != "rtn" or c.quant_scheme.observer in ACTIVATION_AWARE}):
        try:
            choices.append(plan_calibration_device(
                plan_model(model, preset), asked=asked, method=method, num_samples=calibration.num_samples,
                max_length=calibration.max_length, cuda=gpus,
            ))
        except EcoquantError as exc:  # an explicit cuda that would not fit: the run would refuse with this line
            return f"the run would refuse: {exc}"
    if not choices:
        return None
    return max(choices, key=lambda ch: ch.need_bytes or 0).note
