"""Bootstrap intervals on recovery: how sure is "this candidate keeps 85% of the base's quality"?

Why: the 80% gate is applied to a ratio estimated from a few dozen samples,
while the organizers score a suite nobody has seen. A point estimate of 0.83
from 24 samples says little; an interval of [0.71, 0.94] says the gate is a
coin toss. :func:`recovery_intervals` gives that interval.

How (a paired, stratified percentile bootstrap):

* **paired**: each resample draws sample ids, and *both* the base and the
  candidate are scored on those same ids. Base and candidate answer the same
  questions, so their per-sample scores are correlated (a hard page is hard
  for both); resampling them apart would throw that away and widen the
  interval for nothing.
* **stratified by task**: each task is resampled within itself, with its own
  size, because a half's score is the unweighted mean of its task scores
  (:func:`ecoquant.eval.tasks.suite_scores`); resampling across tasks would
  change their weights.
* each resample then computes exactly what the report computes: task score =
  mean of per-sample scores, half score = mean of its task scores, recovery
  = candidate half score / base half score, mean recovery = mean over the
  halves; the interval is the central ``confidence`` share of the resampled
  values (percentiles).

A resample where the base scored 0 on a half has no ratio; such resamples
are left out of that half (and of the mean), and when more than
:data:`MAX_UNDEFINED_SHARE` of them have no ratio the interval is ``None``
(reported as n/a) rather than one built on the lucky remainder.

Worked example: base scores ``[1, 1, 0, 1]``, candidate ``[1, 0, 0, 1]`` on
one task -> recovery 2/3. A resample drawing ids ``(0, 0, 3, 2)`` gives base
3/4, candidate 3/4 -> 1.0; drawing ``(1, 1, 2, 3)`` gives 3/4 vs 1/4 -> 1/3.
Two thousand such draws, seeded, give the interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CONFIDENCE = 0.90
"""The interval shown when none is asked for: 90%, two-sided (5% of resamples below, 5% above)."""

DEFAULT_RESAMPLES = 2000
"""Enough for stable 5th/95th percentiles (about 100 resamples beyond each bound), and milliseconds of numpy."""

DEFAULT_SEED = 0

MAX_UNDEFINED_SHARE = 0.05
"""Above this share of resamples without a ratio (base scored 0), a half's interval is n/a."""

TaskScores = Mapping[str, Mapping[str, float]]
"""Task name -> sample id -> that sample's score in [0, 1]."""

Interval = tuple[float, float]


@dataclass(frozen=True)
class BootstrapSpec:
    """How intervals are drawn; recorded in ``results.json`` so they can be reproduced."""

    confidence: float = DEFAULT_CONFIDENCE
    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ValueError(f"a confidence level is in (0, 1), e.g. 0.9; got {self.confidence}")
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {self.resamples}")

    def to_record(self) -> dict[str, object]:
        return {
            "confidence": self.confidence,
            "resamples": self.resamples,
            "seed": self.seed,
            "method": "paired percentile bootstrap over sample ids, stratified by task",
        }


def _resampled_half_scores(
    base: TaskScores, candidate: TaskScores, halves: Mapping[str, str], spec: BootstrapSpec
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Half -> (base scores, candidate scores), one value per resample, both from the same drawn ids."""
    rng = np.random.default_rng(spec.seed)
    per_half: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for task in sorted(halves):  # a fixed order, so the same seed draws the same ids whatever the mapping order
        ids = sorted(base[task])
        if sorted(candidate[task]) != ids:
            raise ValueError(f"task {task!r}: base and candidate were scored on different samples")
        b = np.array([base[task][i] for i in ids], dtype=np.float64)
        c = np.array([candidate[task][i] for i in ids], dtype=np.float64)
        draw = rng.integers(0, len(ids), size=(spec.resamples, len(ids)))
        per_half.setdefault(halves[task], []).append((b[draw].mean(axis=1), c[draw].mean(axis=1)))
    return {
        half: (np.mean([b for b, _ in tasks], axis=0), np.mean([c for _, c in tasks], axis=0))
        for half, tasks in per_half.items()
    }


def _interval(values: np.ndarray, confidence: float) -> Interval | None:
    defined = values[np.isfinite(values)]
    if defined.size == 0 or defined.size < (1 - MAX_UNDEFINED_SHARE) * values.size:
        return None
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(defined, [tail, 100 - tail])
    return float(lo), float(hi)


def recovery_intervals(
    base: TaskScores,
    candidate: TaskScores,
    halves: Mapping[str, str],
    spec: BootstrapSpec = BootstrapSpec(),
) -> dict[str, Interval | None]:
    """Intervals on each half's recovery and on the mean recovery; see the module docstring.

    ``halves`` maps each task to its half (``"doc"``/``"image"``); the result
    has one key per half present plus ``"mean"``. A half whose ratio is mostly
    undefined (base scored 0) is None, and so is the mean then.
    """
    resampled = _resampled_half_scores(base, candidate, halves, spec)
    ratios: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for half, (b, c) in resampled.items():
            ratios[half] = np.where(b > 0, c / np.where(b > 0, b, 1.0), np.nan)
    out: dict[str, Interval | None] = {half: _interval(r, spec.confidence) for half, r in ratios.items()}
    out["mean"] = (
        None
        if not ratios or any(v is None for v in out.values())
        else _interval(np.mean(list(ratios.values()), axis=0), spec.confidence)
    )
    return out


def per_task_scores(samples: Sequence[tuple[str, str, float]]) -> dict[str, dict[str, float]]:
    """``(task, sample id, score)`` triples -> :data:`TaskScores`."""
    out: dict[str, dict[str, float]] = {}
    for task, sample_id, score in samples:
        out.setdefault(task, {})[sample_id] = score
    return out
