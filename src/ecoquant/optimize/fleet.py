"""Ranking candidates that ran on different GPU models: pure functions over the report's rows.

Measured joules are comparable only between runs on the same GPU model: an
H100 and an L4 spend different energy on the same checkpoint, so on a mixed
cluster "cheapest measured" would rank by where Ray happened to place a job.
The roofline (:mod:`ecoquant.energy.roofline`) models every candidate's
energy for one target GPU, whatever it ran on, so that is what a mixed
search ranks by. The model is off by some factor on each node (clocks,
kernels, idle draw); where a node measured energy, each of its candidates'
modelled figures is scaled by that node's measured / modelled ratio (the
median over the node's runs), so a node whose runs the model underestimates
does not look cheap. The ratio is measured on the node's own GPU, so it is
an assumption, stated wherever the choice is shown, that it carries over to
the target GPU. Without any measurement (a CPU cluster, labels only) the
figures are the plain modelled ones, and the note says that too.

With one GPU model everywhere nothing changes: measured energy ranks, as on
one machine.

The record's one account of how energy was measured (:func:`fleet_energy`)
lists every meter the evaluations used, since on Ray each ran on its own GPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ecoquant.eval.record import EnergyInfo
from ecoquant.report.table import ReportRow


@dataclass(frozen=True)
class Where:
    """Where one model was evaluated: its node (as progress names it) and GPU model (None: no GPU)."""

    node: str
    gpu_model: str | None


@dataclass(frozen=True)
class FleetRanking:
    """How a search that ran on several nodes ranks: per node ratio, and the sentence that says so."""

    gpu_models: tuple[str, ...]
    ratios: Mapping[str, float | None]
    """Per node: median measured / modelled over its runs; None where it measured nothing."""
    target: str

    @property
    def mixed(self) -> bool:
        return len(self.gpu_models) > 1

    def note(self) -> str:
        """What the ranking used, for the summary line, ``choice.json``, the report and the card."""
        ratios = [f"{node} x{r:.2f}" for node, r in sorted(self.ratios.items()) if r is not None]
        unmeasured = sorted(node for node, r in self.ratios.items() if r is None)
        how = f"calibrated per node by its measured / modelled ratio ({', '.join(ratios)}; assumed to carry over to {self.target})"
        if not ratios:
            how = "not calibrated (no node measured energy)"
        elif unmeasured:
            how += f"; not calibrated on {', '.join(unmeasured)} (no measured energy there)"
        return (
            f"candidates ran on different GPU models ({', '.join(self.gpu_models)}), so measured energies are not "
            f"compared: ranked by energy modelled for {self.target} (roofline, docs/energy.md), {how}"
        )


def fleet_ranking(rows: Sequence[ReportRow], where: Mapping[str, Where], target: str) -> FleetRanking:
    """The GPU models ``rows`` ran on and each node's measured / modelled ratio."""
    models = sorted({w.gpu_model or "no GPU" for label, w in where.items() if any(r.model == label for r in rows)})
    per_node: dict[str, list[float]] = {}
    for row in rows:
        w = where.get(row.model)
        if w is None:
            continue
        ratios = per_node.setdefault(w.node, [])
        if row.energy_j is not None and row.modelled_energy_j:
            ratios.append(row.energy_j / row.modelled_energy_j)
    return FleetRanking(
        tuple(models), {n: statistics.median(v) if v else None for n, v in per_node.items()}, target
    )


def calibrated_rows(rows: Sequence[ReportRow], where: Mapping[str, Where], ranking: FleetRanking) -> list[ReportRow]:
    """``rows`` with each modelled energy scaled by its node's ratio (1 where unknown), for ranking a mixed fleet."""
    out = []
    for row in rows:
        w = where.get(row.model)
        ratio = None if w is None else ranking.ratios.get(w.node)
        if row.modelled_energy_j is None or ratio is None:
            out.append(row)
        else:
            out.append(replace(row, modelled_energy_j=row.modelled_energy_j * ratio))
    return out


def ranked(
    rows: Sequence[ReportRow], where: Mapping[str, Where], target: str | None, energy_measured: bool
) -> tuple[list[ReportRow], bool, FleetRanking | None]:
    """The rows to rank, whether by measured energy, and the fleet's account where GPU models differ (else None)."""
    fleet = fleet_ranking(rows, where, target or "the target GPU") if where else None
    if fleet is None or not fleet.mixed:
        return list(rows), energy_measured, None
    return calibrated_rows(rows, where, fleet), False, fleet


def fleet_energy(stored: Sequence[tuple[EnergyInfo, str | None]]) -> EnergyInfo | None:
    """The record's energy account from each stored evaluation's (its meter, idle power; its node or None).

    One meter for all: that one. Several (Ray gave each evaluation its own GPU): each is named, measured only if
    every one measured, and the idle power kept per GPU, keyed ``node GPU`` where more than one node ran them
    (GPU 0 of two nodes are two GPUs).
    """
    if not stored:
        return None
    first = stored[0][0]
    meters = sorted({info.meter for info, _ in stored})
    if len(meters) == 1:
        return first
    several_nodes = len({node for _, node in stored}) > 1
    idle: dict[str, float] = {}
    for info, node in stored:
        for gpu, watts in (info.idle_gpu_power_w or {}).items():
            idle[f"{node} GPU {gpu}" if several_nodes else gpu] = watts
    return replace(
        first,
        measured=all(info.measured for info, _ in stored),
        meter=f"one GPU per evaluation: {'; '.join(meters)}",
        idle_gpu_power_w=idle or None,
    )
