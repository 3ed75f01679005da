"""The eval record: what ``results.json`` holds, and how it round-trips.

Kept apart from :mod:`ecoquant.eval.runner` (which produces it) because the
report, optimize's store, the model card and the decision read records
without running anything: they need these types, not the runner's backends.
``ecoquant.eval.runner`` re-exports every name here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ecoquant.energy.meter import IdleBaseline, Measurement, idle_corrected_energy_j
from ecoquant.errors import EcoquantError

SCHEMA = "ecoquant.eval/1"
"""Version tag of ``results.json``; bump when a field changes meaning."""

Role = Literal["base", "variant"]

@dataclass(frozen=True)
class ModelRef:
    """A model to evaluate: a short label for the report, where it is, and its role."""

    label: str
    source: str
    role: Role


@dataclass(frozen=True)
class SampleResult:
    """One request's answer, score and token counts.

    ``tokens_in`` is the whole prompt; ``text_tokens`` + ``image_tokens`` split it and ``images`` counts its
    images (see :mod:`ecoquant.eval.modelled` for how). None where not known: a record from before the
    split, or image tokens a server did not report and no budget could estimate.
    """

    task: str
    id: str
    prediction: str
    score: float
    tokens_in: int
    tokens_out: int
    finish_reason: str
    text_tokens: int | None = None
    image_tokens: int | None = None
    images: int | None = None
    target_steps: int | None = None
    """With an assistant (speculative decoding): the target's decode passes that verified drafts; None without."""
    drafted_tokens: int | None = None
    """With an assistant: the tokens it proposed for this request; None without."""
    accepted_tokens: int | None = None
    """With an assistant: the proposed tokens the target kept; None without."""


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
    modelled_energy: dict[str, Any] | None = None
    """``{"gpu", "total_j", "parts"}``: the roofline's joules for this suite (MODELLED for that GPU, never
    measured; :mod:`ecoquant.energy.roofline`), or None where the model could not be modelled."""
    speculative: dict[str, Any] | None = None
    """With an assistant, the acceptance measured over the suite (:func:`speculative_summary`); None without."""

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


def speculative_summary(
    assistant: str, num_speculative_tokens: int, samples: Sequence[SampleResult]
) -> dict[str, Any]:
    """A run's measured acceptance, summed over its requests, in vLLM's conventions.

    ``mean_accepted_per_step`` = accepted / target steps (0..k; one more is the tokens each target step
    yields, the "acceptance length"); ``acceptance_rate`` = accepted / drafted (0..1). Sums over the
    suite rather than a mean of per-request ratios: a long answer has more steps, and weighs more in
    the energy, than a one-token one. A ratio with a zero denominator is 0.0 (nothing was drafted).
    """
    steps = sum(s.target_steps or 0 for s in samples)
    drafted = sum(s.drafted_tokens or 0 for s in samples)
    accepted = sum(s.accepted_tokens or 0 for s in samples)
    return {
        "assistant": assistant,
        "num_speculative_tokens": num_speculative_tokens,
        "mean_accepted_per_step": accepted / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "target_steps": steps,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
    }


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


