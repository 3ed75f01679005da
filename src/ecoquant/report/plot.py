"""The report's figures: the frontier (suite energy against mean recovery) and each candidate's energy parts.

The frontier's x axis is measured energy when NVML measured it, else energy
*modelled for the target GPU* -- and its label says which -- else (neither)
wall time, labelled with why energy is missing: the plot must not look like
a measured-energy plot when it is not one. Mean recovery carries its
bootstrap interval as an error bar (and measured energy its min..max spread
over the repeated windows); the gate is a dashed line and the pick, when
there is one, a star. Rows whose mean recovery is n/a cannot be placed and
are named in the title.

After a staged search the frontier shows every candidate of every stage, not
only the finalists: the stage-1 weights and stage-2 serving candidates ran on
a subset of the suite, so they are drawn hollow, each stage with its own
marker, labelled "(subset)" and named as subset results in the legend. Their
joules cover fewer samples than the final ones, so with such points the x axis
is energy *per sample* (each point's joules over the samples it ran): the
same ranking for the finalists, and comparable across stages. The Pareto front
stays the final, whole-suite one the decision is made on.

The parts figure stacks each model's modelled energy by where it goes
(prefill text, prefill image, vision encoder, decode, idle), so one can see
*why* a candidate is cheaper; it is drawn only when the record has them.

Uses matplotlib's object API with the Agg canvas (no pyplot), so plotting
from a server thread or a test never touches global figure state.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ecoquant.report.pareto import pareto_front
from ecoquant.report.table import GATE_RECOVERY, ReportRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure


STAGE_MARKERS: Mapping[str, tuple[str, str]] = {
    # stage name -> (marker, legend name); squares stay the base's, filled circles a plain grid's candidates.
    "weights": ("o", "stage 1 weights"),
    "serving": ("^", "stage 2 serving"),
    "final": ("D", "stage 3 final"),
}
"""How each stage of the staged search is drawn (see :mod:`ecoquant.optimize.stages`)."""


@dataclass(frozen=True)
class StagePoint:
    """One candidate's result in an earlier stage of the staged search, on a subset of the suite."""

    name: str
    stage: str
    mean_recovery: float | None
    cost: float | None
    """Over the stage's samples: joules (measured or modelled, as the final rows), else wall seconds."""
    samples: int
    interval: tuple[float, float] | None = None


@dataclass(frozen=True)
class PlotPoint:
    """One marker of the frontier: what is drawn, where, and under which legend entry."""

    name: str
    label: str
    """The text beside the marker (``(subset)`` added for a subset result)."""
    series: str
    marker: str
    hollow: bool
    x: float
    y: float
    """Mean recovery in percent."""
    yerr: tuple[float, float]
    xerr: tuple[float, float]
    role: str
    """``base``, ``variant`` (a decision row) or ``subset`` (an earlier stage's result)."""


PARTS_ORDER: tuple[str, ...] = ("prefill_text", "prefill_image", "vision_encoder", "decode", "draft", "idle")
"""The energy model's parts, bottom to top (``ModelledEnergy.parts``); other keys are stacked after them."""


def x_axis(
    rows: Sequence[ReportRow], energy_measured: bool, no_energy_reason: str = "", modelled_for: str | None = None
) -> tuple[list[float | None], str]:
    """The cost of each row and the axis label: measured joules, else modelled joules, else wall seconds."""
    if energy_measured:
        return [r.energy_j for r in rows], "energy over the suite (J), measured by NVML"
    if any(r.modelled_energy_j is not None for r in rows):
        gpu = modelled_for or "the target GPU"
        return [r.modelled_energy_j for r in rows], f"energy over the suite (J), modelled for {gpu} — not measured"
    why = f" ({no_energy_reason})" if no_energy_reason else ""
    return [r.wall_time_s for r in rows], f"wall time over the suite (s) — energy not measured{why}"


def _error_bars(
    rows: Sequence[ReportRow], placed: Sequence[int], energy_measured: bool, costs: Sequence[float | None]
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Per placed row: (y below, y above) in points of recovery and (x left, x right) in joules."""
    ys, xs = [], []
    for i in placed:
        r = rows[i]
        mean = float(r.mean_recovery) * 100  # type: ignore[arg-type]
        bounds = None if r.recovery_interval is None else r.recovery_interval.get("mean")
        ys.append((0.0, 0.0) if bounds is None else (max(mean - bounds[0] * 100, 0.0), max(bounds[1] * 100 - mean, 0.0)))
        spread = r.energy_spread_j if energy_measured else None
        x = float(costs[i])  # type: ignore[arg-type]
        xs.append((0.0, 0.0) if spread is None else (max(x - spread[0], 0.0), max(spread[1] - x, 0.0)))
    return ys, xs


def plot_points(
    rows: Sequence[ReportRow],
    energy_measured: bool,
    no_energy_reason: str = "",
    modelled_for: str | None = None,
    *,
    earlier: Sequence[StagePoint] = (),
    suite_samples: int | None = None,
) -> tuple[list[PlotPoint], str, list[str]]:
    """What the frontier draws: the points, the x-axis label, and the names that cannot be placed.

    A pure function of the data (see the module docstring), so tests check what is drawn, not pixels.
    """
    costs, xlabel = x_axis(rows, energy_measured, no_energy_reason, modelled_for)
    per_sample = bool(earlier) and bool(suite_samples)
    scale = 1.0 / suite_samples if per_sample and suite_samples else 1.0
    if per_sample:
        xlabel = xlabel.replace("over the suite", "per sample") + " (subset points: over their own samples)"
    placed = [i for i, r in enumerate(rows) if r.mean_recovery is not None and costs[i] is not None]
    yerr, xerr = _error_bars(rows, placed, energy_measured, costs)
    final_marker, final_series = STAGE_MARKERS["final"] if earlier else ("o", "candidates")
    if earlier and suite_samples:
        final_series += f" (whole suite, {suite_samples} samples)"
    points = []
    for i, ye, xe in zip(placed, yerr, xerr, strict=True):
        r, base = rows[i], rows[i].role == "base"
        points.append(PlotPoint(
            name=r.model, label=r.model, series="bf16 base" if base else final_series, marker="s" if base else final_marker,
            hollow=False, x=float(costs[i]) * scale, y=float(r.mean_recovery) * 100,  # type: ignore[arg-type]
            yerr=ye, xerr=(xe[0] * scale, xe[1] * scale), role="base" if base else "variant",
        ))
    missing = [rows[i].model for i in range(len(rows)) if i not in placed]
    for p in earlier:
        if p.mean_recovery is None or p.cost is None or p.samples < 1:
            missing.append(f"{p.name} (stage {p.stage})")
            continue
        marker, series = STAGE_MARKERS.get(p.stage, ("x", p.stage))
        mean = p.mean_recovery * 100
        ye = (0.0, 0.0) if p.interval is None else (max(mean - p.interval[0] * 100, 0.0), max(p.interval[1] * 100 - mean, 0.0))
        points.append(PlotPoint(
            name=p.name, label=f"{p.name} (subset)", series=f"{series} (subset, {p.samples} samples)", marker=marker,
            hollow=True, x=p.cost / p.samples if per_sample else p.cost, y=mean, yerr=ye, xerr=(0.0, 0.0), role="subset",
        ))
    return points, xlabel, missing


def pareto_figure(
    rows: Sequence[ReportRow],
    energy_measured: bool,
    title: str = "",
    no_energy_reason: str = "",
    threshold: float = GATE_RECOVERY,
    *,
    pick: str | None = None,
    modelled_for: str | None = None,
    gate_label: str | None = None,
    earlier: Sequence[StagePoint] = (),
    suite_samples: int | None = None,
) -> Figure:
    """Cost vs mean recovery (%) with its interval, the front as a step line and ringed points, the pick starred.

    ``earlier``: the staged search's subset results (``suite_samples``: the decision rows' samples),
    drawn hollow with a marker per stage.
    """
    points, xlabel, missing = plot_points(
        rows, energy_measured, no_energy_reason, modelled_for, earlier=earlier, suite_samples=suite_samples
    )
    decided = [p for p in points if p.role != "subset"]
    front = [decided[k] for k in pareto_front([(p.x, p.y) for p in decided])]

    # Imported here: matplotlib is slow to import and the CLI loads this module for every command.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5 if earlier else 7.5, 5.5 if earlier else 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"base": "tab:gray", "variant": "tab:blue", "subset": "tab:purple"}
    labelled: set[str] = set()
    for p in points:
        color = colors[p.role]
        if any(p.yerr) or any(p.xerr):
            ax.errorbar([p.x], [p.y], yerr=[[p.yerr[0]], [p.yerr[1]]], xerr=[[p.xerr[0]], [p.xerr[1]]], fmt="none",
                        ecolor=color, alpha=0.4 if p.hollow else 0.6, capsize=3, zorder=2)
        ax.scatter([p.x], [p.y], s=60, marker=p.marker, zorder=3, label=None if p.series in labelled else p.series,
                   **({"facecolors": "none", "edgecolors": color} if p.hollow else {"color": color}))
        labelled.add(p.series)
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(6, -11) if p.hollow else (6, 6), fontsize=7 if p.hollow else 8,
                    color="dimgray" if p.hollow else "black")
        if p.name == pick and p.role == "variant":
            ax.scatter([p.x], [p.y], s=320, marker="*", color="gold", edgecolors="black", zorder=5, label=f"pick: {pick}")
    if front:
        fx, fy = [p.x for p in front], [p.y for p in front]
        ax.step(fx, fy, where="post", color="tab:green", linewidth=1.5, label="Pareto front", zorder=2)
        ax.scatter(fx, fy, s=180, facecolors="none", edgecolors="tab:green", linewidths=1.5, zorder=4)
    ax.axhline(threshold * 100, color="tab:red", linestyle="--", linewidth=1, label=gate_label or f"{threshold:.0%} gate")
    ax.set_xlabel(xlabel, fontsize=9 if earlier else None)
    ax.set_ylabel("mean recovery vs base (%), bars: bootstrap interval")
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
    ax.legend(loc="lower right", fontsize=7 if earlier else 8)
    if points:
        ys = [p.y for p in points] + [threshold * 100]
        ys += [p.y - p.yerr[0] for p in points] + [p.y + p.yerr[1] for p in points]
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
    *,
    pick: str | None = None,
    modelled_for: str | None = None,
    gate_label: str | None = None,
    earlier: Sequence[StagePoint] = (),
    suite_samples: int | None = None,
) -> Path:
    """Render :func:`pareto_figure` to a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = pareto_figure(
        rows, energy_measured, title, no_energy_reason, threshold, pick=pick, modelled_for=modelled_for,
        gate_label=gate_label, earlier=earlier, suite_samples=suite_samples,
    )
    fig.savefig(path, dpi=120)
    return path


def parts_figure(parts: Mapping[str, Mapping[str, float]], gpu: str, title: str = "") -> Figure:
    """A stacked bar per model of its modelled suite energy by part (J), labelled as modelled for ``gpu``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(parts)
    keys = [k for k in PARTS_ORDER if any(k in p for p in parts.values())]
    keys += sorted({k for p in parts.values() for k in p} - set(keys))
    keys = [k for k in keys if k != "draft" or any(p.get(k) for p in parts.values())]  # no assistant: no draft bar
    fig = Figure(figsize=(max(6.0, 1.1 * len(names) + 3), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bottom = [0.0] * len(names)
    for key in keys:
        heights = [float(parts[n].get(key, 0.0)) for n in names]
        ax.bar(names, heights, bottom=bottom, label=key)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel(f"energy over the suite (J), modelled for {gpu} — not measured")
    ax.set_title(title or f"where each model's energy goes (modelled for {gpu})", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return fig


def write_parts_plot(parts: Mapping[str, Mapping[str, float]], path: Path | str, gpu: str, title: str = "") -> Path | None:
    """Render :func:`parts_figure` to a PNG file; None (and no file) when there are no parts to draw."""
    if not parts:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts_figure(parts, gpu, title).savefig(path, dpi=120)
    return path
