"""Bar and line charts with value, comparison and multiple-choice questions.

These stand in for ChartQA (relaxed accuracy) and AI2D-style multiple choice
when the real datasets cannot be downloaded. A chart is generated as a
:class:`ChartSpec` -- the data, its labels and the questions whose answers are
computed from that data -- from a ``random.Random`` seeded by kind and index
only, then drawn with matplotlib's Agg canvas (object API, no pyplot state) at
448 x 336 px. Values are printed on the bars and points, as in most ChartQA
charts, so the questions are answerable by reading, and the data are drawn so
that every comparison is unambiguous (distinct values, a visible gap between
the largest and the next).
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ecoquant.eval.builtin.documents import Question
from ecoquant.eval.tasks import CHOICE_LETTERS

ChartKind = Literal["bar", "line"]

WIDTH_PX, HEIGHT_PX, DPI = 448, 336, 100
BAR_COLOR = "#4c72b0"
"""Bars are drawn in this one colour (and nothing else is), so tests can measure them in the PNG."""
LINE_COLORS = ("#c44e52", "#55a868")

# Titles, axis labels and category names for the charts; index % len picks one.
_BAR_THEMES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("Units sold by region", "Region", "Units", ("North", "South", "East", "West", "Central")),
    ("Books borrowed per month", "Month", "Books", ("Jan", "Feb", "Mar", "Apr", "May")),
    ("Fruit harvest", "Fruit", "Tonnes", ("Apples", "Pears", "Plums", "Cherries", "Grapes")),
    ("Visitors per day", "Day", "Visitors", ("Mon", "Tue", "Wed", "Thu", "Fri")),
)
_LINE_THEMES: tuple[tuple[str, str, tuple[str, str]], ...] = (
    ("Energy output", "GWh", ("Solar", "Wind")),
    ("Average price", "USD", ("Tea", "Coffee")),
    ("Club members", "Members", ("Chess club", "Drama club")),
    ("Annual rainfall", "mm", ("Northtown", "Southport")),
)
YEARS = ("2019", "2020", "2021", "2022", "2023")
_SEED_BASE: dict[str, int] = {"bar": 40_000, "line": 50_000}


@dataclass(frozen=True)
class Series:
    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice question; ``answer`` is the letter of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class ChartSpec:
    """One chart's data, labels and questions. ``x_values`` are categories (bar) or years (line)."""

    id: str
    kind: ChartKind
    title: str
    x_label: str
    y_label: str
    x_values: tuple[str, ...]
    series: tuple[Series, ...]
    questions: tuple[Question, ...]
    choice_questions: tuple[ChoiceQuestion, ...]


def _choice_question(rng: random.Random, question: str, right: str, others: list[str], n: int = 4) -> ChoiceQuestion:
    """Shuffle the right answer in among ``n - 1`` distractors and record its letter."""
    choices = [right, *rng.sample(others, n - 1)]
    rng.shuffle(choices)
    return ChoiceQuestion(question, tuple(choices), CHOICE_LETTERS[choices.index(right)])


def make_bar_chart(index: int) -> ChartSpec:
    """Five bars; asks for the largest category, one bar's value, and (choice) the smallest."""
    rng = random.Random(_SEED_BASE["bar"] + index)
    title, x_label, y_label, categories = _BAR_THEMES[index % len(_BAR_THEMES)]
    while True:  # distinct values at least 4 apart, so "highest"/"lowest" are plain to see
        values = sorted(rng.sample(range(12, 96), len(categories)))
        if all(b - a >= 4 for a, b in itertools.pairwise(values)):
            break
    rng.shuffle(values)
    top = categories[values.index(max(values))]
    low = categories[values.index(min(values))]
    asked = rng.randrange(len(categories))
    noun = x_label.lower()
    questions = (
        Question(f"Which {noun} has the highest value?", (top,)),
        Question(f"What is the value of {categories[asked]}?", (str(values[asked]),)),
    )
    others = [c for c in categories if c != low]
    choice = _choice_question(rng, f"Which {noun} has the lowest value?", low, others)
    return ChartSpec(
        f"bar-{index}",
        "bar",
        title,
        x_label,
        y_label,
        categories,
        (Series(y_label, tuple(values)),),
        questions,
        (choice,),
    )


def _walk(rng: random.Random, n: int) -> list[int]:
    values = [rng.randint(25, 75)]
    for _ in range(n - 1):
        values.append(min(95, max(8, values[-1] + rng.randint(-18, 18))))
    return values


def _unique_extremes(values: list[int]) -> bool:
    return values.count(max(values)) == 1 and values.count(min(values)) == 1


def make_line_chart(index: int) -> ChartSpec:
    """Two series over five years; asks a value in a year, the peak year, and (choice) the lowest year."""
    rng = random.Random(_SEED_BASE["line"] + index)
    title, y_label, names = _LINE_THEMES[index % len(_LINE_THEMES)]
    while True:  # lines at least 10 apart in every year, so their value labels never collide
        a, b = _walk(rng, len(YEARS)), _walk(rng, len(YEARS))
        if all(abs(x - y) >= 10 for x, y in zip(a, b)) and _unique_extremes(a) and _unique_extremes(b):
            break
    series = (Series(names[0], tuple(a)), Series(names[1], tuple(b)))
    asked_series = series[rng.randrange(2)]
    year_idx = rng.randrange(len(YEARS))
    peak_series = series[rng.randrange(2)]
    peak_year = YEARS[peak_series.values.index(max(peak_series.values))]
    questions = (
        Question(
            f"What is the value of {asked_series.name} in {YEARS[year_idx]}?", (str(asked_series.values[year_idx]),)
        ),
        Question(f"In which year did {peak_series.name} reach its highest value?", (peak_year,)),
    )
    low_series = series[rng.randrange(2)]
    low_year = YEARS[low_series.values.index(min(low_series.values))]
    choice = _choice_question(
        rng, f"In which year was {low_series.name} at its lowest?", low_year, [y for y in YEARS if y != low_year]
    )
    return ChartSpec(f"line-{index}", "line", title, "Year", y_label, YEARS, series, questions, (choice,))


def render_chart(spec: ChartSpec) -> bytes:
    """Draw the chart with matplotlib's Agg canvas and encode it as PNG (deterministic bytes)."""
    # Imported here: matplotlib takes ~1.5 s to import, and every CLI command
    # (``--help`` included) imports this module for the suite's defaults.
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # rc_context restores the global rcParams on exit; only fonts and sizes change.
    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 11}):
        fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_title(spec.title, fontweight="bold")
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(spec.y_label)
        ax.spines[["top", "right"]].set_visible(False)
        top = max(max(s.values) for s in spec.series)
        ax.set_ylim(0, top * 1.15 + 5)
        if spec.kind == "bar":
            values = spec.series[0].values
            bars = ax.bar(spec.x_values, values, color=BAR_COLOR, width=0.6, antialiased=False)
            ax.bar_label(bars, labels=[str(v) for v in values], padding=2)
        else:
            xs = range(len(spec.x_values))
            for s, color in zip(spec.series, LINE_COLORS, strict=True):
                ax.plot(xs, s.values, marker="o", color=color, label=s.name, linewidth=2)
            for i in xs:  # label the upper point above its marker and the lower one below
                hi, lo = sorted(spec.series, key=lambda s: s.values[i], reverse=True)
                ax.annotate(
                    str(hi.values[i]),
                    (i, hi.values[i]),
                    xytext=(0, 6),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                )
                ax.annotate(
                    str(lo.values[i]),
                    (i, lo.values[i]),
                    xytext=(0, -6),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                )
            ax.set_xticks(list(xs), spec.x_values)
            ax.set_xlim(-0.4, len(spec.x_values) - 0.6)
            # Outside the axes, so the legend can never hide a line or a value label.
            fig.legend(loc="outside lower center", ncols=2, frameon=False)
        buf = io.BytesIO()
        # No "Software" tag: the bytes then depend on what is drawn, not on the version string.
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


CHART_MAKERS: dict[ChartKind, Callable[[int], ChartSpec]] = {"bar": make_bar_chart, "line": make_line_chart}
"""Kind -> ``maker(index)``; the suite takes ``size`` charts of each."""
