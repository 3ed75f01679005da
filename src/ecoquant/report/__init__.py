"""The eval report: ``results.json`` -> ``report.md`` (table), ``pareto.png`` (the frontier) and, when the
record has modelled energy, ``energy_parts.png`` (where each model's energy goes).

Everything is derived from the :class:`~ecoquant.eval.runner.RunRecord`
alone, so ``ecoquant report results.json`` re-renders exactly what
``ecoquant eval`` wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ecoquant.eval.runner import RunRecord
from ecoquant.report.plot import StagePoint, write_parts_plot, write_plot
from ecoquant.report.table import GATE_RECOVERY, ReportRow, markdown_report, modelled_gpu, report_rows

RESULTS_FILE = "results.json"
TABLE_FILE = "report.md"
PLOT_FILE = "pareto.png"
PARTS_FILE = "energy_parts.png"


@dataclass(frozen=True)
class ReportFiles:
    table: Path
    plot: Path
    parts: Path | None = None
    """``energy_parts.png``; None when no run has modelled energy parts."""


def modelled_parts(rows: Sequence[ReportRow]) -> dict[str, dict[str, float]]:
    """Row name -> modelled energy parts (J), for the rows that have them (``ModelRun.modelled_energy``)."""
    return {
        r.model: {k: float(v) for k, v in r.modelled_energy["parts"].items()}
        for r in rows
        if r.modelled_energy and r.modelled_energy.get("parts")
    }


def render_report(
    record: RunRecord,
    out_dir: Path | str,
    threshold: float = GATE_RECOVERY,
    confidence: float | None = None,
    *,
    pick: str | None = None,
    decision: str | None = None,
    earlier: Sequence[StagePoint] = (),
) -> ReportFiles:
    """Write ``report.md``, ``pareto.png`` and (with modelled parts) ``energy_parts.png`` into ``out_dir``.

    The gate is at ``threshold``, on the lower bound of the ``confidence`` interval when given; ``pick`` is
    starred on the frontier and ``decision`` (the choice's summary line) closes the report; ``earlier``
    are the staged search's subset results, drawn on the frontier beside the decision's rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / TABLE_FILE
    text = markdown_report(record, threshold, confidence)
    if decision:
        text += f"\n## Decision\n\n{decision}\n"
    table.write_text(text, encoding="utf-8")
    rows = report_rows(record, threshold, confidence)
    gpu = modelled_gpu(record)
    plot = write_plot(
        rows,
        out / PLOT_FILE,
        energy_measured=record.energy.measured,
        title=f"{record.suite['name']}: cost vs mean recovery",
        no_energy_reason=record.energy.meter,
        threshold=threshold,
        pick=pick,
        modelled_for=gpu,
        gate_label=None if confidence is None else f"{threshold:.0%} gate on the lower bound of the {confidence:.0%} interval",
        earlier=earlier,
        suite_samples=int(record.suite.get("n_samples") or 0) or None,
    )
    stale = out / PARTS_FILE
    parts = write_parts_plot(modelled_parts(rows), stale, gpu or "the target GPU")
    if parts is None and stale.is_file():
        stale.unlink()  # a re-render of a record without parts must not leave an older picture beside it
    return ReportFiles(table=table, plot=plot, parts=parts)


__all__ = ["PARTS_FILE", "PLOT_FILE", "RESULTS_FILE", "TABLE_FILE", "ReportFiles", "StagePoint", "render_report"]
