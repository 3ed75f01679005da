"""The decision: the cheapest candidate that keeps at least the gate's share of the base's quality.

A pure function over the report's rows, so the rule is stated once and
tested on its own.

**Cost** is the suite's energy in joules (summed over the whole suite: the
challenge's measure): measured by NVML when a meter measured it, else
*modelled for the target GPU* (:attr:`ReportRow.modelled_energy_j`, the
roofline of :mod:`ecoquant.energy.roofline`). Never CPU wall time: on a
2-core CPU it ranks candidates by run order and noise, not by what a GPU
would spend (wall time stays in the table). With neither figure the cost is
unknown: the pick is then the passing candidate with the highest mean
recovery, and :attr:`Choice.metric_note` says so wherever the choice is shown.

**Ties**: GPU energy varies from run to run by a few percent, so with
repeated windows (``--repeats``) a passing candidate whose mean energy lies
within the cheapest passing one's spread (min..max of its windows) ties with
it, and ties go to the higher mean recovery (then to the cheaper, then to the
earlier candidate). Without a spread only equal costs tie.

**Gate**: mean recovery ≥ threshold, or with a gate confidence ``P`` the
lower bound of the ``P`` bootstrap interval on mean recovery ≥ threshold.
The pick's *margin* is that value minus the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from ecoquant.eval.bootstrap import DEFAULT_CONFIDENCE
from ecoquant.eval.runner import FailedRun
from ecoquant.optimize.grid import Grid
from ecoquant.report.table import ReportRow, gate_rule, gated_value

Metric = Literal["energy_j", "modelled_energy_j", "none"]


def row_cost(row: ReportRow, energy_measured: bool) -> float | None:
    """A row's cost in joules: measured energy when NVML measured it, else the modelled energy. Never wall time."""
    return row.energy_j if energy_measured else row.modelled_energy_j


def ranking_metric(rows: Sequence[ReportRow], energy_measured: bool) -> Metric:
    """What the candidates are ranked by: measured energy, modelled energy, or nothing (cost unknown)."""
    if energy_measured:
        return "energy_j"
    return "modelled_energy_j" if any(r.modelled_energy_j is not None for r in rows) else "none"


def metric_note(metric: Metric, modelled_for: str | None = None, repeats: bool = False) -> str:
    """The sentence that goes wherever the choice is shown: what the ranking used, and what it did not."""
    if metric == "energy_j":
        ties = (
            "; mean of the repeated windows, a candidate within the cheapest one's min..max spread ties with it"
            " and ties go to the higher mean recovery"
            if repeats
            else ""
        )
        return f"ranked by energy over the whole suite, measured by NVML{ties}"
    if metric == "modelled_energy_j":
        gpu = modelled_for or "the target GPU"
        return (
            f"energy not measured (no NVML device): ranked by energy modelled for {gpu} (roofline, docs/energy.md),"
            " not by CPU wall time"
        )
    return (
        "energy not measured (no NVML device) and not modelled: cost unknown, so the pick is the passing candidate"
        " with the highest mean recovery; CPU wall time is not used to rank"
    )


@dataclass(frozen=True)
class Standing:
    """One candidate's place in the decision.

    ``cost`` is in joules (measured, else modelled; None when unknown); ``gated`` is what the gate compared
    (mean recovery, or the interval's lower bound); ``tied`` marks a candidate tied with the cheapest.
    """

    name: str
    cost: float | None
    mean_recovery: float | None
    recoveries: dict[str, float | None]
    passed: bool
    why: str
    spread: tuple[float, float] | None = None
    interval: dict[str, tuple[float, float] | None] | None = None
    gated: float | None = None
    tied: bool = False
    tie_rule: str | None = None
    """For a tied candidate: how the tie was broken, e.g. ``tied on energy within the cheapest's spread;
    equal recovery, lower energy wins`` (only the rule that actually decided)."""
    energy_j: float | None = None
    """Measured suite energy (mean of the windows), when measured."""
    modelled_energy_j: float | None = None
    """Modelled suite energy for the target GPU, when modelled."""

    @property
    def measured_over_modelled(self) -> float | None:
        """How far the model is off where both exist (1.0: exact)."""
        if self.energy_j is None or not self.modelled_energy_j:
            return None
        return self.energy_j / self.modelled_energy_j


@dataclass(frozen=True)
class Choice:
    """The pick (None when no candidate passed), and every candidate's standing, cheapest first."""

    pick: str | None
    metric: Metric
    metric_note: str
    threshold: float
    standings: tuple[Standing, ...]
    base_cost: float | None
    confidence: float | None = None
    """Gate on the lower bound of this interval (None: on the mean)."""
    interval_confidence: float = DEFAULT_CONFIDENCE
    """The level of the intervals shown."""
    modelled_for: str | None = None

    def standing(self, name: str) -> Standing:
        return next(s for s in self.standings if s.name == name)

    @property
    def margin(self) -> float | None:
        """The pick's gated value minus the threshold (e.g. +0.06: six points above the gate)."""
        if self.pick is None:
            return None
        gated = self.standing(self.pick).gated
        return None if gated is None else gated - self.threshold

    @property
    def cost_label(self) -> str:
        """How the cost column is to be read, e.g. ``J, modelled for L4``."""
        if self.metric == "energy_j":
            return "J, measured"
        if self.metric == "modelled_energy_j":
            return f"J, modelled for {self.modelled_for or 'the target GPU'}"
        return "unknown"

    def summary(self) -> str:
        """One line for the terminal, ``choice.json`` and the card."""
        rule = gate_rule(self.threshold, self.confidence).removeprefix("gate = ")
        if self.pick is None:
            return f"no candidate keeps {rule}; nothing to ship ({self.metric_note})"
        s = self.standing(self.pick)
        cost = "" if s.cost is None else f"{s.cost:.2f} J over the suite ({self.cost_label.removeprefix('J, ')}), "
        bounds = None if s.interval is None else s.interval.get("mean")
        interval = "" if bounds is None else f" ({self.interval_confidence:.0%} interval {bounds[0]:.2%}–{bounds[1]:.2%})"
        margin = self.margin
        on = "its mean" if self.confidence is None else f"the lower bound of its {self.confidence:.0%} interval"
        text = (
            f"pick: {self.pick}: {cost}mean recovery {s.mean_recovery:.2%}{interval}, "
            + ("" if margin is None else f"margin {margin * 100:+.1f} points over the {self.threshold:.0%} gate on {on}; ")
            + self.metric_note
        )
        if self.base_cost is not None and s.cost is not None and s.cost > self.base_cost:
            text += f"; note: it costs more than the bf16 base here ({self.base_cost:.2f} J)"
        return text


def _standing(row: ReportRow, threshold: float, energy_measured: bool, confidence: float | None, metric: Metric) -> Standing:
    cost = row_cost(row, energy_measured)
    gated = gated_value(row.mean_recovery, row.recovery_interval, confidence)
    what = "mean recovery" if confidence is None else f"lower bound of the {confidence:.0%} interval"
    if row.mean_recovery is None:
        passed, why = False, "mean recovery n/a (the base scored 0 on a half)"
    elif gated is None:
        passed, why = False, f"no {confidence:.0%} interval on mean recovery (too many resamples without a ratio)"
    elif gated < threshold:
        passed, why = False, f"{what} {gated:.2%} < {threshold:.0%}"
    elif cost is None and metric != "none":
        passed, why = False, "no energy measured or modelled for it"
    else:
        passed, why = True, f"{what} {gated:.2%} ≥ {threshold:.0%}"
    return Standing(
        row.model,
        cost,
        row.mean_recovery,
        dict(row.recoveries),
        passed,
        why,
        spread=row.energy_spread_j if energy_measured else None,
        interval=None if row.recovery_interval is None else dict(row.recovery_interval),
        gated=gated,
        energy_j=row.energy_j if energy_measured else None,
        modelled_energy_j=row.modelled_energy_j,
    )


def choose(
    rows: Sequence[ReportRow],
    threshold: float,
    energy_measured: bool,
    *,
    confidence: float | None = None,
    modelled_for: str | None = None,
    interval_confidence: float | None = None,
) -> Choice:
    """Apply the gate to every non-base row and pick the cheapest that passes (see the module docstring).

    ``confidence``: gate on the lower bound of that interval; ``modelled_for``: the GPU the modelled energy is
    for (named in the note); ``interval_confidence``: the level of the rows' intervals (default: ``confidence``,
    else 90%).
    """
    metric = ranking_metric(rows, energy_measured)
    inf = float("inf")
    standings = [_standing(r, threshold, energy_measured, confidence, metric) for r in rows if r.role != "base"]
    order = {s.name: i for i, s in enumerate(standings)}

    def rank(s: Standing) -> tuple[Any, ...]:
        cost = inf if metric == "none" or s.cost is None else s.cost
        return (not s.passed, cost, -(s.mean_recovery or 0.0), order[s.name])

    ranked = sorted(standings, key=rank)
    passing = [s for s in ranked if s.passed]
    pick = None
    if passing:
        cheapest = passing[0]
        if metric == "none" or cheapest.cost is None:
            tied = [cheapest]
        else:
            ceiling = cheapest.cost if cheapest.spread is None else max(cheapest.cost, cheapest.spread[1])
            tied = [s for s in passing if s.cost is not None and s.cost <= ceiling]
        def tie_key(s: Standing) -> tuple[float, float, int]:
            return (s.mean_recovery or 0.0, -(s.cost or 0.0), -order[s.name])

        by_key = sorted(tied, key=tie_key, reverse=True)
        best = by_key[0]
        pick = best.name
        rules: dict[str, str] = {}
        if len(tied) > 1:
            how = "within the cheapest's spread" if cheapest.spread is not None else "equal energy"
            rules[best.name] = f"tied on energy ({how}) with {', '.join(s.name for s in by_key[1:])}; {tie_breaker(best, by_key[1])}"
            for s in by_key[1:]:
                rules[s.name] = f"tied on energy ({how}) with the pick; {tie_breaker(best, s)}"
        ranked = [replace(s, tied=s.name in rules, tie_rule=rules.get(s.name)) for s in ranked]
    repeats = any(s.spread is not None for s in standings)
    base = next((r for r in rows if r.role == "base"), None)
    return Choice(
        pick,
        metric,
        metric_note(metric, modelled_for, repeats),
        threshold,
        tuple(ranked),
        None if base is None or metric == "none" else row_cost(base, energy_measured),
        confidence,
        interval_confidence if interval_confidence is not None else (confidence or DEFAULT_CONFIDENCE),
        modelled_for,
    )


def tie_breaker(winner: Standing, loser: Standing) -> str:
    """The rule that put ``winner`` above ``loser`` in a tie on energy: only the one that decided.

    The order is :func:`choose`'s: higher mean recovery, then lower cost, then the earlier candidate.
    """
    if (winner.mean_recovery or 0.0) != (loser.mean_recovery or 0.0):
        return "higher recovery wins"
    if (winner.cost or 0.0) != (loser.cost or 0.0):
        return "equal recovery; lower energy wins"
    return "equal recovery and energy; the earlier candidate in the grid wins"


def choice_record(choice: Choice, grid: Grid, failures: Sequence[FailedRun] = ()) -> dict[str, Any]:
    """``choice.json``: the rule, the pick and every standing, with each candidate's definition."""
    by_name = {c.name: c for c in grid.candidates}
    return {
        "pick": choice.pick,
        "gate": choice.threshold,
        "gate_confidence": choice.confidence,
        "interval_confidence": choice.interval_confidence,
        "margin": choice.margin,
        "metric": choice.metric,
        "cost_unit": choice.cost_label,
        "modelled_for": choice.modelled_for,
        "metric_note": choice.metric_note,
        "summary": choice.summary(),
        "base_cost": choice.base_cost,
        "standings": [
            {
                **asdict(s),
                "measured_over_modelled": s.measured_over_modelled,
                "candidate": by_name[s.name].to_record() if s.name in by_name else None,
            }
            for s in choice.standings
        ],
        "failed": [asdict(f) for f in failures],
        "grid": grid.source,
    }
