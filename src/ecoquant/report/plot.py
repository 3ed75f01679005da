"""The report's figure: suite energy (or wall time) against mean recovery, Pareto front marked.

Without an energy meter the x axis is wall time and its label says so,
including why energy is missing: the plot must not look like an energy plot
when it is not one. Rows whose mean recovery is n/a cannot be placed and are
named in a note under the axes.

Uses matplotlib's object API with the Agg canvas (no pyplot), so plotting
from a server thread or a test never touches global figure state.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ecoquant.report.pareto import pareto_front
from ecoquant.report.table import GATE_RECOVERY, ReportRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def x_axis(
    rows: Sequence[ReportRow], energy_measured: bool, no_energy_reason: str = ""
) -> tuple[list[float | None], str]:
    """The cost of each row and the axis label: joules when measured, else wall seconds."""
    if energy_measured:
        return [r.energy_j for r in rows], "energy over the suite (J)"
    why = f" ({no_energy_reason})" if no_energy_reason else ""
    return [r.wall_time_s for r in rows], f"wall time over the suite (s) — energy not measured{why}"


def pareto_figure(
    rows: Sequence[ReportRow],
    energy_measured: bool,
    title: str = "",
    no_energy_reason: str = "",
    threshold: float = GATE_RECOVERY,
) -> Figure:
    """Cost vs mean recovery (%) with the front drawn as a step line and ringed points."""
    costs, xlabel = x_axis(rows, energy_measured, no_energy_reason)
    placed = [i for i, r in enumerate(rows) if r.mean_recovery is not None and costs[i] is not None]
    points = [(float(costs[i]), float(rows[i].mean_recovery) * 100) for i in placed]  # type: ignore[arg-type]
    front = [placed[k] for k in pareto_front(points)]

    # Imported here: matplotlib is slow to import and the CLI loads this module for every command.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (x, y) in zip(placed, points, strict=True):
        base = rows[i].role == "base"
        ax.scatter([x], [y], s=60, marker="s" if base else "o", color="tab:gray" if base else "tab:blue", zorder=3)
        ax.annotate(rows[i].model, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if front:
        fx = [float(costs[i]) for i in front]  # type: ignore[arg-type]
        fy = [float(rows[i].mean_recovery) * 100 for i in front]  # type: ignore[arg-type]
        ax.step(fx, fy, where="post", color="tab:green", linewidth=1.5, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="tab:green", linewidths=1.5, zorder=4)
    ax.axhline(threshold * 100, color="tab:red", linestyle="--", linewidth=1, label=f"{threshold:.0%} gate")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean recovery vs base (%)")
    missing = [rows[i].model for i in range(len(rows)) if i not in placed]
    heading = title or "cost vs quality kept"
    if missing:
        # In the title, where constrained layout makes room, so it never overlaps the axis label.
        note = textwrap.fill("not placed (mean recovery n/a): " + ", ".join(missing), width=80)
        heading += "\n" + note
    ax.set_title(heading, fontsize=10 if missing else None)
    if not points:
        ax.text(
            0.5,
            0.65,
            "no model to place: every mean recovery is n/a",
            transform=ax.transAxes,
            ha="center",
            color="tab:red",
        )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if points:
        ys = [y for _, y in points] + [threshold * 100]
        pad = max(2.0, (max(ys) - min(ys)) * 0.1)
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
    return fig


def write_plot(
    rows: Sequence[ReportRow],
    path: Path | str,
    energy_measured: bool,
    title: str = "",
    no_energy_reason: str = "",
    threshold: float = GATE_RECOVERY,
) -> Path:
    """Render :func:`pareto_figure` to a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pareto_figure(rows, energy_measured, title, no_energy_reason, threshold).savefig(path, dpi=120)
    return path
