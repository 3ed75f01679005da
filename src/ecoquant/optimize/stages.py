"""The default search: three stages in place of a product, within a budget of evaluations.

A product of every lever (weights formats x module sets x heads x image
budgets x responses x answer caps x kv-cache formats) is days of GPU time on
E4B: each weights candidate is tens of minutes of quantization, each
evaluation a vLLM server start. Most of it is wasted: a serving lever
changes a candidate's energy by about the same share whatever its weights,
so the levers only need trying on the weights worth shipping. Hence:

1. **weights**: every weights candidate of the family
   (:data:`~ecoquant.optimize.levers.FAMILY_LEVERS`) on a subset of the suite
   (the first ``subset`` samples of each task, in the suite's seeded order);
2. **serving**: each serving lever alone (response, answer cap, image budget,
   kv-cache format) on the ``keep`` best weights by mean recovery per joule,
   among those that clear the gate on the subset (all of them if none
   does), on the same subset; for a family with a drafting assistant, the
   MTP lever too: each of those weights drafting ``probe_k`` tokens first,
   then at most two more k chosen from the acceptance that probe measured
   (:class:`~ecoquant.optimize.levers.MtpLever`);
3. **final**: the ``finalists`` cheapest candidates that clear the gate on
   the subset, on the whole suite (with ``--repeats`` energy windows where
   NVML measures); :func:`ecoquant.optimize.select.choose` picks among them
   and the submission is written, as for a grid.

``budget`` bounds the candidate evaluations of all three stages together:
stage 3 keeps its finalists, stage 1 takes what is left in the order the
family lists its weights candidates, stage 2 the rest (the best weights'
levers first). Every evaluation is keyed in the store
(:mod:`ecoquant.optimize.store`), so a run stopped anywhere resumes where
it stopped: a rerun replays finished stages from their stored results and
makes the same choices from them.

The search logic (:func:`search`) is a pure driver over an ``evaluate``
callable, so tests replay results without models; :func:`staged_optimize`
plugs in the real quantize-and-evaluate of :mod:`ecoquant.optimize.run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecoquant.calibrate.data import CalibrationConfig
from ecoquant.optimize.grid import Candidate, Grid
from ecoquant.errors import EcoquantError
from ecoquant.optimize.levers import (
    FamilyLevers,
    ServingLevers,
    VllmFit,
    check_assistant,
    family_levers,
    find_assistant,
    fit_vllm,
    require_family,
    serving_levers,
)
from ecoquant.optimize.plan import OptimizeConfig, SearchConfig
from ecoquant.optimize.run import GridRun, OptimizeResult, Runner, decide, run_grid
from ecoquant.optimize.select import row_cost

if TYPE_CHECKING:
    from ecoquant.report.plot import StagePoint

STAGES: tuple[str, ...] = ("weights", "serving", "final")


@dataclass(frozen=True)
class Outcome:
    """One candidate's result in one stage: what the search ranks by."""

    name: str
    mean_recovery: float | None
    cost: float | None
    """Joules over the stage's suite (measured, else modelled for the target GPU); None when unknown."""
    interval: tuple[float, float] | None = None
    """The bootstrap interval on mean recovery, where the record has one."""
    mean_accepted_per_step: float | None = None
    """With an assistant: drafts the target accepted per verification step, measured (None without)."""
    parts: dict[str, float] | None = None
    """The modelled energy's parts (``decode``, ``draft``...), where the cost is modelled; None otherwise."""
    samples: int | None = None
    """Samples the stage's suite held (its cost covers these)."""

    def passes(self, gate: float) -> bool:
        return self.mean_recovery is not None and self.mean_recovery >= gate

    def per_joule(self) -> float:
        """Mean recovery per joule (recovery alone when the cost is unknown)."""
        rec = self.mean_recovery or 0.0
        return rec if not self.cost else rec / self.cost


Evaluate = Callable[[str, Sequence[Candidate], bool], Mapping[str, Outcome]]
"""``evaluate(stage, candidates, whole_suite)`` -> each candidate's outcome, by name."""


@dataclass(frozen=True)
class StagePlan:
    """How many evaluations each stage may spend (before the stage-1 results decide which)."""

    weights: int
    serving: int
    final: int

    @property
    def total(self) -> int:
        return self.weights + self.serving + self.final


def plan_stages(n_weights: int, levers: ServingLevers, search: SearchConfig) -> StagePlan:
    """The evaluation counts of the three stages within ``search.budget`` (see the module docstring)."""
    final = search.finalists
    serving = min(search.keep, n_weights) * levers.count()
    weights = n_weights
    if search.budget is not None:
        final = min(final, max(search.budget - 1, 1)) if search.budget > 1 else 0
        weights = max(min(n_weights, search.budget - final), 1)
        final = min(final, search.budget - weights)
        serving = max(min(serving, search.budget - weights - final), 0)
    return StagePlan(weights, serving, final)


@dataclass(frozen=True)
class SearchResult:
    """What each stage evaluated and kept, and the finalists."""

    plan: StagePlan
    stages: dict[str, dict[str, Outcome]]
    kept: tuple[str, ...]
    """Weights candidates that went on to stage 2."""
    finalists: tuple[Candidate, ...]

    def to_record(self, gate: float) -> dict[str, Any]:
        """``choice.json``'s ``search`` block."""
        return {
            "stages": {
                name: {o.name: asdict(o) | {"passes_gate_on_subset": o.passes(gate)} for o in outs.values()}
                for name, outs in self.stages.items()
            },
            "allotted": asdict(self.plan),
            "evaluations": sum(len(v) for v in self.stages.values()),
            "kept_for_serving": list(self.kept),
            "finalists": [c.name for c in self.finalists],
        }


def _cheapest_passing(outcomes: Sequence[Outcome], gate: float, n: int) -> list[Outcome]:
    """The ``n`` cheapest passing (by cost, then higher recovery); topped up by the highest recovery if too few pass."""
    passing = sorted(
        (o for o in outcomes if o.passes(gate)),
        key=lambda o: (o.cost if o.cost is not None else math.inf, -(o.mean_recovery or 0.0)),
    )
    rest = sorted((o for o in outcomes if not o.passes(gate)), key=lambda o: -(o.mean_recovery or -1.0))
    return (passing + rest)[:n]


def _best_per_joule(outcomes: Sequence[Outcome], gate: float, n: int) -> list[Outcome]:
    """The ``n`` best by mean recovery per joule among those passing (all of them if none passes)."""
    pool = [o for o in outcomes if o.passes(gate)] or list(outcomes)
    return sorted(pool, key=lambda o: -o.per_joule())[:n]


def search(
    weights: Sequence[Candidate], levers: ServingLevers, config: SearchConfig, gate: float, evaluate: Evaluate
) -> SearchResult:
    """Run the three stages (see the module docstring); ``evaluate`` does the work and keeps it."""
    plan = plan_stages(len(weights), levers, config)
    first = list(weights)[: plan.weights]
    by_name = {c.name: c for c in first}
    s1 = dict(evaluate("weights", first, False))
    kept = _best_per_joule([s1[c.name] for c in first if c.name in s1], gate, min(config.keep, len(first)))
    variants: list[Candidate] = []
    for o in kept:
        for v in levers.variants(by_name[o.name]):
            if v.name not in by_name:
                variants.append(v)
                by_name[v.name] = v
    probes = [p for o in kept for p in levers.mtp_probes(by_name[o.name]) if p.name not in by_name]
    variants = (variants + probes)[: plan.serving]
    by_name |= {v.name: v for v in variants}
    s2 = dict(evaluate("serving", variants, False)) if variants else {}
    drafted = _after_probes([v for v in variants if v.assistant is not None], s2, levers, by_name)
    drafted = drafted[: max(plan.serving - len(variants), 0)]
    by_name |= {v.name: v for v in drafted}
    if drafted:
        s2 |= dict(evaluate("serving", drafted, False))
    pool = [*s1.values(), *s2.values()]
    finalists = tuple(by_name[o.name] for o in _cheapest_passing(pool, gate, plan.final))
    s3 = dict(evaluate("final", finalists, True)) if finalists else {}
    stages = {"weights": s1, "serving": s2, "final": s3}
    return SearchResult(plan, stages, tuple(o.name for o in kept), finalists)


def _after_probes(
    probes: Sequence[Candidate], outcomes: Mapping[str, Outcome], levers: ServingLevers, known: Mapping[str, Candidate]
) -> list[Candidate]:
    """The MTP variants with the k each probe's measured acceptance chooses (:meth:`MtpLever.ks_after`)."""
    if levers.mtp is None:
        return []
    out: list[Candidate] = []
    for p in probes:
        measured = outcomes.get(p.name)
        if measured is None or measured.mean_accepted_per_step is None:
            continue
        plain = replace(p, assistant=None, num_speculative_tokens=None)
        for k in levers.mtp.ks_after(measured.mean_accepted_per_step):
            v = levers.drafted(plain, k)
            if v.name not in known and v.name not in {c.name for c in out}:
                out.append(v)
    return out


# ------------------------------------------------------------------ the real thing


@dataclass(frozen=True)
class SearchSpace:
    """What the staged search may try for one model: its family's levers as this target vLLM can take them."""

    levers: FamilyLevers
    serving: ServingLevers
    weights: tuple[Candidate, ...]
    """The family's weights candidates the target vLLM is not known to lack a feature of."""
    fit: VllmFit
    """The weights candidates' fit to the target vLLM (what was left out, what is unchecked)."""

    def notes(self) -> list[str]:
        """Every lever left out and why, and the features not checked on the target (dry run, progress)."""
        return self.fit.lines() + [f"left out: {why}" for why in self.serving.left_out]


def search_space(model: str | Path, path: Path, model_type: str | None, config: OptimizeConfig) -> SearchSpace:
    """The levers for ``path`` (``model`` as given names the assistant's published sibling), fitted to
    ``config.target_vllm``; one line when no weights candidate is left."""
    require_family(model_type, config.target_vllm)
    levers = config.search.levers or family_levers(model_type)
    assistant = config.search.assistant
    if assistant is not None:
        assistant = check_assistant(assistant)
    elif config.search.discover_assistant:
        assistant = find_assistant(str(model), levers)
    serving = serving_levers(path, levers, config.backend, config.target_vllm, assistant, model_type)
    fit = fit_vllm(levers.weights_candidates(), model_type, config.target_vllm)
    if not fit.kept:
        raise EcoquantError(
            f"no weights candidate can be served by vLLM {config.target_vllm}: " + "; ".join(w for _, w in fit.left_out[:1])
        )
    return SearchSpace(levers, serving, fit.kept, fit)


def search_calibration(model: Path, search: SearchConfig) -> CalibrationConfig:
    """The search's calibration: as given, else sized to the model (samples and length overridable)."""
    from ecoquant.calibrate.sizing import sized_calibration

    if search.calibration is not None:
        return search.calibration
    return sized_calibration(model, samples=search.calib_samples, length=search.calib_length)


def stage_config(config: OptimizeConfig, grid: Grid, whole_suite: bool) -> OptimizeConfig:
    """The optimize settings for one stage: its grid, and the subset of the suite unless it is the last."""
    e = config.eval
    if not whole_suite:
        limit = config.search.subset if e.limit is None else min(e.limit, config.search.subset)
        e = replace(e, limit=limit, repeats=1)
    return replace(config, grid=grid, eval=e, keep="all")


def staged_optimize(model: str | Path, config: OptimizeConfig, runner: Runner) -> OptimizeResult:
    """:func:`search` with the real quantize-and-evaluate, then the decision on stage 3's whole-suite results."""
    from ecoquant.models.loading import resolve_model
    from ecoquant.optimize.plan import _model_type

    from ecoquant.eval.runner import prepare_suite

    path = resolve_model(model)
    prepare_suite(config.eval)  # a bad --suite is one line before stage 1 starts, not after it
    model_type = _model_type(path)
    space = search_space(model, path, model_type, config)
    serving, weights = space.serving, space.weights
    for note in space.notes():
        runner.stages.line(f"optimize: {note}")
    calibration = search_calibration(path, config.search)
    last: dict[str, tuple[GridRun, OptimizeConfig]] = {}

    def evaluate(stage: str, candidates: Sequence[Candidate], whole: bool) -> dict[str, Outcome]:
        grid = Grid(tuple(candidates), calibration, f"staged search, stage {STAGES.index(stage) + 1} ({stage})")
        stage_cfg = stage_config(config, grid, whole)
        with runner.stages.stage(f"stage {STAGES.index(stage) + 1}", f"{stage}: {len(candidates)} candidates"):
            run = run_grid(path, stage_cfg, runner)
        last[stage] = (run, stage_cfg)
        accepted = {r.label: r.speculative for r in run.record.runs if r.speculative}
        out = {}
        samples = int(run.record.suite.get("n_samples") or 0) or None
        rows, measured, _ = run.ranked(stage_cfg, runner.energy_measured)
        for row in rows:
            if row.role == "base":
                continue
            interval = (row.recovery_interval or {}).get("mean")
            speculative = accepted.get(row.model) or {}
            out[row.model] = Outcome(
                row.model,
                row.mean_recovery,
                row_cost(row, measured),
                interval,
                mean_accepted_per_step=speculative.get("mean_accepted_per_step"),
                parts=None if measured else (row.modelled_energy or {}).get("parts"),
                samples=samples,
            )
        return out

    result = search(weights, serving, config.search, config.gate, evaluate)
    # a budget of one leaves nothing for stage 3: then the decision is on what stage 1 saw
    decided = "final" if "final" in last else "weights"
    final, final_config = last[decided]
    return decide(final, replace(final_config, keep=config.keep), runner, search=result.to_record(config.gate),
                  earlier=stage_points(result, exclude=decided))


def stage_points(result: SearchResult, exclude: str) -> list[StagePoint]:
    """Every subset result of the search, for the frontier (``exclude``: the stage the decision's rows are)."""
    from ecoquant.report.plot import StagePoint

    return [
        StagePoint(o.name, stage, o.mean_recovery, o.cost, o.samples or 0, o.interval)
        for stage, outcomes in result.stages.items()
        if stage != exclude
        for o in outcomes.values()
    ]


# ------------------------------------------------------------------ the dry run


@dataclass(frozen=True)
class StagePreview:
    """One stage as the dry run shows it."""

    name: str
    evaluations: int
    samples: int
    """Samples per evaluation."""
    quantizations: int
    cached: int
    """Evaluations the store already holds (stage 1 only: later stages depend on its results)."""
    what: str


@dataclass(frozen=True)
class SearchPreview:
    """What ``optimize --dry-run`` prints for the staged search."""

    stages: tuple[StagePreview, ...]
    calibration: CalibrationConfig
    levers_note: str
    seconds: float | None
    """The estimate; None when the store has no measured times yet."""
    basis: str
    device_note: str | None = None
    """Where stage 1's calibrated candidates would calibrate here, and why (None: none calibrates)."""
    notes: tuple[str, ...] = ()
    """Levers left out (target vLLM, backend, no assistant) and why; features not checked on the target."""
    assistant: str | None = None
    """The assistant the MTP lever drafts with (given or found), if the lever is on."""

    @property
    def evaluations(self) -> int:
        return sum(s.evaluations for s in self.stages)


def measured_times(root: Path) -> tuple[float | None, dict[str, float]]:
    """From a store: median seconds per request of its evaluations, and median quantize seconds per method."""
    import json
    import statistics

    per_request: list[float] = []
    for f in sorted((root / "evals").glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            requests = sum(int(r["requests"]) for r in data["runs"])
            if data.get("seconds") and requests:
                per_request.append(float(data["seconds"]) / requests)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    by_method: dict[str, list[float]] = {}
    for f in sorted((root / "checkpoints").glob("*/.ecoquant-key.json")):
        try:
            material = json.loads(f.read_text(encoding="utf-8"))["material"]
            by_method.setdefault(material["candidate"]["method"], []).append(float(material["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return (
        statistics.median(per_request) if per_request else None,
        {m: statistics.median(v) for m, v in by_method.items()},
    )


def preview(model: str | Path, config: OptimizeConfig) -> SearchPreview:
    """The stages, their evaluation counts and an estimate of the time, without running anything."""
    from ecoquant.eval.runner import prepare_suite
    from ecoquant.models.loading import resolve_model
    from ecoquant.optimize.plan import _model_type, calibration_device_note, plan_optimize

    path = resolve_model(model)
    space = search_space(model, path, _model_type(path), config)
    levers, serving, weights = space.levers, space.serving, space.weights
    calibration = search_calibration(path, config.search)
    counts = plan_stages(len(weights), serving, config.search)
    first = Grid(tuple(weights[: counts.weights]), calibration, "staged search, stage 1")
    plan1, store, prepared1, _ = plan_optimize(path, stage_config(config, first, False), energy_measured=False)
    whole = prepare_suite(config.eval)
    n_sub, n_all = prepared1.suite.n_samples, whole.suite.n_samples
    cached1 = sum(1 for j in plan1.jobs if j.candidate is not None and j.eval_key in plan1.cached_evals)
    stages = (
        StagePreview("1 weights", counts.weights, n_sub, len(plan1.quantize), cached1,
                     ", ".join(c.name for c in first.candidates)),
        StagePreview("2 serving", counts.serving, n_sub, 0, 0,
                     f"each lever alone on the best {config.search.keep} by recovery per joule: "
                     + describe_levers(serving)),
        StagePreview("3 final", counts.final, n_all, 0, 0,
                     f"the {config.search.finalists} cheapest passing the gate, whole suite"
                     + (f", {config.eval.repeats} energy windows each where NVML measures" if config.eval.repeats > 1 else "")),
    )
    device_note = calibration_device_note(path, first.candidates, calibration, config.quant_device)
    per_request, quant = measured_times(store.root)
    if per_request is None:
        return SearchPreview(
            stages, calibration, levers.note, None, "no measured times in this folder yet",
            device_note=device_note, notes=tuple(space.notes()), assistant=serving.assistant,
        )
    seconds = per_request * (
        (counts.weights - cached1 + (1 if not plan1.cached_evals else 0)) * n_sub
        + counts.serving * n_sub
        + (counts.final + 1) * n_all
    )
    unknown = [j.candidate.method for j in plan1.quantize if j.candidate is not None and j.candidate.method not in quant]
    seconds += sum(quant.get(j.candidate.method, 0.0) for j in plan1.quantize if j.candidate is not None)
    basis = f"measured in this folder: {per_request:.2f} s per request" + (
        f"; quantization times of {', '.join(sorted(quant))}" if quant else ""
    ) + (f"; no measured time for quantizing {', '.join(sorted(set(unknown)))} (not counted)" if unknown else "")
    return SearchPreview(
        stages, calibration, levers.note, seconds, basis,
        device_note=device_note, notes=tuple(space.notes()), assistant=serving.assistant,
    )


def describe_levers(levers: ServingLevers) -> str:
    parts = [f"response {r}" for r in levers.responses]
    parts += [f"answer cap {n}" for n in levers.answer_caps]
    parts += [f"image budget {b}" for b in levers.image_budgets]
    parts += [", ".join(f"{k} {v}" for k, v in s.items()) for s in levers.serving]
    if levers.mtp is not None and levers.assistant is not None:
        parts.append(
            f"MTP with {levers.assistant}: k={levers.mtp.probe_k} first, then up to 2 more k chosen by its measured acceptance"
        )
    return "; ".join(parts) or "none"
