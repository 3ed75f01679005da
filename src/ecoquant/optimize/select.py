"""The decision: the cheapest candidate that keeps at least the gate's share of the base's quality.

A pure function over the report's rows, so the rule is stated once and
tested on its own. Cost is the suite's energy (joules, summed over the whole
suite: the challenge's measure) when a meter measured it; without one it is
wall time, and :attr:`Choice.metric_note` says so wherever the choice is
shown. Ties go to the higher mean recovery, then to the earlier candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ecoquant.eval.runner import FailedRun
from ecoquant.optimize.grid import Grid
from ecoquant.report.table import ReportRow

Metric = Literal["energy_j", "wall_time_s"]


@dataclass(frozen=True)
class Standing:
    """One candidate's place in the decision."""

    name: str
    cost: float | None
    mean_recovery: float | None
    recoveries: dict[str, float | None]
    passed: bool
    why: str


@dataclass(frozen=True)
class Choice:
    """The pick (None when no candidate passed), and every candidate's standing, cheapest first."""

    pick: str | None
    metric: Metric
    metric_note: str
    threshold: float
    standings: tuple[Standing, ...]
    base_cost: float | None

    def standing(self, name: str) -> Standing:
        return next(s for s in self.standings if s.name == name)

    def summary(self) -> str:
        """One line for the terminal and the card."""
        unit = "J" if self.metric == "energy_j" else "s"
        if self.pick is None:
            return f"no candidate keeps ≥{self.threshold:.0%} of the base's mean quality; nothing to ship ({self.metric_note})"
        s = self.standing(self.pick)
        text = (
            f"pick: {self.pick}: {s.cost:.2f} {unit} over the suite, mean recovery {s.mean_recovery:.2%} "
            f"(gate {self.threshold:.0%}); {self.metric_note}"
        )
        if self.base_cost is not None and s.cost is not None and s.cost > self.base_cost:
            text += f"; note: it costs more than the bf16 base here ({self.base_cost:.2f} {unit})"
        return text


def choose(rows: Sequence[ReportRow], threshold: float, energy_measured: bool) -> Choice:
    """Apply the gate to every non-base row and pick the cheapest that passes."""
    metric: Metric = "energy_j" if energy_measured else "wall_time_s"
    note = (
        "ranked by energy over the whole suite (NVML)"
        if energy_measured
        else "energy not measured (no NVML device): ranked by wall time over the suite"
    )

    def cost(row: ReportRow) -> float | None:
        return row.energy_j if energy_measured else row.wall_time_s

    standings = []
    for order, row in enumerate(r for r in rows if r.role != "base"):
        c = cost(row)
        if row.mean_recovery is None:
            passed, why = False, "mean recovery n/a (the base scored 0 on a half)"
        elif row.mean_recovery < threshold:
            passed, why = False, f"mean recovery {row.mean_recovery:.2%} < {threshold:.0%}"
        elif c is None:
            passed, why = False, "no cost measured"
        else:
            passed, why = True, f"mean recovery {row.mean_recovery:.2%} ≥ {threshold:.0%}"
        standings.append((order, Standing(row.model, c, row.mean_recovery, dict(row.recoveries), passed, why)))
    ranked = sorted(
        standings,
        key=lambda t: (not t[1].passed, t[1].cost if t[1].cost is not None else float("inf"), -(t[1].mean_recovery or 0), t[0]),
    )
    ordered = tuple(s for _, s in ranked)
    pick = next((s.name for s in ordered if s.passed), None)
    base = next((r for r in rows if r.role == "base"), None)
    return Choice(pick, metric, note, threshold, ordered, None if base is None else cost(base))


def choice_record(choice: Choice, grid: Grid, failures: Sequence[FailedRun] = ()) -> dict[str, Any]:
    """``choice.json``: the rule, the pick and every standing, with each candidate's definition."""
    by_name = {c.name: c for c in grid.candidates}
    return {
        "pick": choice.pick,
        "gate": choice.threshold,
        "metric": choice.metric,
        "metric_note": choice.metric_note,
        "summary": choice.summary(),
        "base_cost": choice.base_cost,
        "standings": [
            {**asdict(s), "candidate": by_name[s.name].to_record() if s.name in by_name else None}
            for s in choice.standings
        ],
        "failed": [asdict(f) for f in failures],
        "grid": grid.source,
    }
