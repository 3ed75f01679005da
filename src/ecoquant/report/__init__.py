"""The eval report: ``results.json`` -> ``report.md`` (table) and ``pareto.png`` (plot).

Everything is derived from the :class:`~ecoquant.eval.runner.RunRecord`
alone, so ``ecoquant report results.json`` re-renders exactly what
``ecoquant eval`` wrote.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ecoquant.eval.runner import RunRecord
from ecoquant.report.plot import write_plot
from ecoquant.report.table import GATE_RECOVERY, markdown_report, report_rows

RESULTS_FILE = "results.json"
TABLE_FILE = "report.md"
PLOT_FILE = "pareto.png"


@dataclass(frozen=True)
class ReportFiles:
    table: Path
    plot: Path


def render_report(record: RunRecord, out_dir: Path | str, threshold: float = GATE_RECOVERY) -> ReportFiles:
    """Write ``report.md`` and ``pareto.png`` for a record into ``out_dir`` (gate at ``threshold``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE_FILE
    table.write_text(markdown_report(record, threshold), encoding="utf-8")
    plot = write_plot(
        report_rows(record, threshold),
        out / PLOT_FILE,
        energy_measured=record.energy.measured,
        title=f"{record.suite['name']}: cost vs mean recovery",
        no_energy_reason=record.energy.meter,
        threshold=threshold,
    )
    return ReportFiles(table=table, plot=plot)


__all__ = ["PLOT_FILE", "RESULTS_FILE", "TABLE_FILE", "ReportFiles", "render_report"]
