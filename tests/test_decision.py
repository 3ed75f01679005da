"""How sure the choice is: bootstrap intervals on recovery, the confidence gate, the ranking by energy
(measured, else modelled, never wall time), repeated NVML windows and ties, and the decision's pictures.

Repeats and ties run through the real runner and the real ``NvmlMeter`` over replayed counter readings
(:class:`~ecoquant.energy.replay.ReplayNvml`), with a scripted backend whose answers are right or wrong on
purpose, so recovery and energy are both known in advance.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ecoquant.cli import app
from ecoquant.energy.meter import Reading
from ecoquant.energy.nvml import NvmlMeter, open_meter
from ecoquant.energy.replay import ReplayNvml
from ecoquant.eval.backends.base import ChatRequest, Completion
from ecoquant.eval.bootstrap import BootstrapSpec, recovery_intervals
from ecoquant.eval.runner import (
    EvalConfig,
    ModelRef,
    RunRecord,
    build_record,
    energy_info,
    evaluate_model,
    prepare_suite,
)
from ecoquant.optimize.select import choose, row_cost
from ecoquant.report import render_report
from ecoquant.report.plot import parts_figure, pareto_figure
from ecoquant.report.table import ReportRow, markdown_report, model_check_lines, report_rows

# ------------------------------------------------------------------ bootstrap


def bernoulli_scores(rng: np.random.Generator, n: int, p_base: float, p_cand: float) -> tuple[dict, dict]:
    """Paired per-sample scores: the candidate fails where the base fails, and on some more."""
    base = rng.random(n) < p_base
    cand = base & (rng.random(n) < p_cand / p_base)
    return (
        {f"s{i}": float(v) for i, v in enumerate(base)},
        {f"s{i}": float(v) for i, v in enumerate(cand)},
    )


def test_interval_contains_the_point_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(1)
    doc_b, doc_c = bernoulli_scores(rng, 40, 0.8, 0.7)
    img_b, img_c = bernoulli_scores(rng, 30, 0.6, 0.5)
    base, cand = {"docs": doc_b, "charts": img_b}, {"docs": doc_c, "charts": img_c}
    halves = {"docs": "doc", "charts": "image"}
    found = recovery_intervals(base, cand, halves, BootstrapSpec(0.9, 1000, seed=7))
    point = {
        "doc": sum(doc_c.values()) / sum(doc_b.values()),
        "image": sum(img_c.values()) / sum(img_b.values()),
    }
    point["mean"] = (point["doc"] + point["image"]) / 2
    for key, value in point.items():
        lo, hi = found[key]  # type: ignore[misc]
        assert lo <= value <= hi and lo < hi, (key, lo, value, hi)
    assert recovery_intervals(base, cand, halves, BootstrapSpec(0.9, 1000, seed=7)) == found  # same seed, same interval
    assert recovery_intervals(base, cand, halves, BootstrapSpec(0.9, 1000, seed=8)) != found
    wider = recovery_intervals(base, cand, halves, BootstrapSpec(0.99, 1000, seed=7))
    assert wider["mean"][0] < found["mean"][0] and wider["mean"][1] > found["mean"][1]  # type: ignore[index]


def test_intervals_reach_their_nominal_coverage_on_synthetic_data() -> None:
    """90% intervals cover the true ratio (0.7 / 0.8 = 0.875) in at least ~85% of 200 seeded trials."""
    rng = np.random.default_rng(0)
    true_ratio = 0.7 / 0.8
    covered = 0
    trials = 200
    for trial in range(trials):
        b, c = bernoulli_scores(rng, 150, 0.8, 0.7)
        lo, hi = recovery_intervals({"t": b}, {"t": c}, {"t": "doc"}, BootstrapSpec(0.9, 400, seed=trial))["doc"]  # type: ignore[misc]
        covered += lo <= true_ratio <= hi
    assert 0.85 <= covered / trials <= 0.97, covered


def test_resamples_are_paired_same_samples_for_base_and_candidate() -> None:
    """Identical answers give recovery exactly 1 in every resample, only if both sides draw the same ids."""
    rng = np.random.default_rng(3)
    scores = {"t": {f"s{i}": float(v) for i, v in enumerate(rng.random(50) < 0.6)}}
    found = recovery_intervals(scores, scores, {"t": "image"}, BootstrapSpec(0.9, 500))
    assert found["image"] == pytest.approx((1.0, 1.0)) and found["mean"] == pytest.approx((1.0, 1.0))


def test_a_base_mostly_at_zero_gives_no_interval() -> None:
    base = {"t": {"a": 0.0, "b": 0.0, "c": 1.0}}
    cand = {"t": {"a": 0.0, "b": 1.0, "c": 1.0}}
    found = recovery_intervals(base, cand, {"t": "doc"}, BootstrapSpec(0.9, 500))
    assert found == {"doc": None, "mean": None}  # ~30% of resamples have no ratio: n/a, not an interval


# ------------------------------------------------------------------ records with known answers


class ScriptedBackend:
    """Answers each request right (the sample's answer) unless its id is in ``wrong``."""

    kind = "scripted"

    def __init__(self, answers: dict[str, str], wrong: set[str]) -> None:
        self.answers, self.wrong = answers, wrong
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def generate(self, requests: Sequence[ChatRequest], settings: Any, on_done: Any = None) -> list[Completion]:
        self.calls += 1
        out = [Completion("zzz" if r.id in self.wrong else self.answers[r.id], 10, 2, "stop") for r in requests]
        if on_done is not None:
            on_done(len(out))
        return out

    def close(self) -> None:
        pass


def readings_for(windows_j: Sequence[float], seconds: float = 2.0) -> list[Reading]:
    """Counter readings for consecutive windows of the given joules on GPU 0 (one reading at each edge)."""
    out, counter, t = [], 1_000_000, 0.0
    for joules in windows_j:
        out.append(Reading(t, {0: counter}))
        counter += int(joules * 1000)
        t += seconds
        out.append(Reading(t, {0: counter}))
        t += 0.5
    return out


def scripted_record(
    windows: dict[str, list[float] | None], wrong: dict[str, int], repeats: int = 3, intervals: BootstrapSpec = BootstrapSpec()
) -> tuple[RunRecord, dict[str, ScriptedBackend]]:
    """Evaluate base + variants with scripted answers; ``windows`` None for a model means no meter at all."""
    from ecoquant.energy.null import NullMeter

    config = EvalConfig(suite="builtin-basic", size=4, idle_seconds=0.0, warmup_requests=1, repeats=repeats)
    prepared = prepare_suite(config)
    items = prepared.requests["default"]
    answers = {r.id: s.answers[0] for _, s, r in items}
    ids = [r.id for _, _, r in items]
    backends: dict[str, ScriptedBackend] = {}
    runs = []
    measured = all(w is not None for w in windows.values())
    meter: Any = NullMeter("no NVML device")
    if measured:
        nvml = ReplayNvml(readings_for([j for w in windows.values() for j in w]))  # type: ignore[union-attr]
        meter = open_meter(nvml=nvml, clock=nvml.clock, environ={})
        assert isinstance(meter, NvmlMeter)
    for index, label in enumerate(windows):
        backends[label] = ScriptedBackend(answers, set(ids[: wrong.get(label, 0)]))
        ref = ModelRef(label, f"/models/{label}", "base" if index == 0 else "variant")
        runs += evaluate_model(
            ref, index, prepared, config, meter=meter, idle=None, backend_factory=lambda *_a, b=backends[label]: b
        )
    return build_record(config, prepared, energy_info(meter, None, config), runs, intervals=intervals), backends


def test_repeats_give_mean_and_spread_from_replayed_nvml_readings() -> None:
    record, backends = scripted_record({"base": [100.0, 104.0, 96.0], "q": [60.0, 66.0, 54.0]}, {})
    base, q = record.runs
    assert q.energy is not None and q.energy.total_j == pytest.approx(60.0)  # the mean of the three windows
    assert [e.total_j for e in q.energy_repeats] == pytest.approx([60.0, 66.0, 54.0])
    assert q.energy_spread_j == pytest.approx((54.0, 66.0))
    assert base.energy_j == pytest.approx(100.0) and base.energy_spread_j == pytest.approx((96.0, 104.0))
    assert q.wall_time_s == pytest.approx(2.0)
    assert backends["q"].calls == 1 + 3  # warm-up, then the scored window and two repeats
    # results.json keeps `energy` as before (the mean) and adds each window
    data = json.loads(json.dumps(record.to_dict()))
    assert data["runs"][1]["energy"]["total_j"] == pytest.approx(60.0) and len(data["runs"][1]["energy_repeats"]) == 3
    assert RunRecord.from_dict(data) == record
    text = markdown_report(record)
    assert "spread (min..max): base 96.00..104.00 J, q 54.00..66.00 J" in text


def test_without_a_meter_repeats_do_not_rerun_the_suite() -> None:
    record, backends = scripted_record({"base": None, "q": None}, {})
    assert backends["q"].calls == 1 + 1  # warm-up and the one scored window: nothing to measure twice
    assert all(r.energy is None and r.energy_repeats == () for r in record.runs)
    assert "the suite ran once per model (repeats need a meter)" in markdown_report(record)


def test_a_candidate_within_the_cheapest_one_s_spread_ties_and_the_tie_goes_to_recovery() -> None:
    # cheap: mean 60 J (54..66), one wrong answer (mean recovery < 1); close: 63 J, all right; far: 70 J, all right
    record, _ = scripted_record(
        {"base": [100.0] * 3, "cheap": [60.0, 66.0, 54.0], "close": [63.0, 63.5, 62.5], "far": [70.0, 70.0, 70.0]},
        {"cheap": 1},
    )
    rows = report_rows(record)
    by = {r.model: r for r in rows}
    assert 0.8 <= by["cheap"].mean_recovery < 1.0 and by["close"].mean_recovery == by["far"].mean_recovery == 1.0  # type: ignore[operator]
    choice = choose(rows, 0.8, energy_measured=True)
    assert choice.pick == "close"
    assert [s.name for s in choice.standings] == ["cheap", "close", "far"]  # still listed cheapest first
    assert choice.standing("cheap").tied and choice.standing("close").tied and not choice.standing("far").tied
    assert choice.standing("close").tie_rule == "tied on energy (within the cheapest's spread) with cheap; higher recovery wins"
    assert choice.standing("cheap").tie_rule == "tied on energy (within the cheapest's spread) with the pick; higher recovery wins"
    assert choice.standing("far").tie_rule is None
    assert "ties go to the higher mean recovery" in choice.metric_note
    # without the spread (one window each) the cheapest wins outright
    single, _ = scripted_record(
        {"base": [100.0], "cheap": [60.0], "close": [63.0], "far": [70.0]}, {"cheap": 1}, repeats=1
    )
    assert choose(report_rows(single), 0.8, energy_measured=True).pick == "cheap"


def test_recovery_interval_is_in_results_json_for_each_variant(tmp_path: Path) -> None:
    record, _ = scripted_record({"base": None, "q": None}, {"q": 1})
    path = record.save(tmp_path / "results.json")
    data = json.loads(path.read_text())
    assert data["intervals"]["confidence"] == 0.9 and data["intervals"]["seed"] == 0
    base, q = data["runs"]
    assert base["recovery_interval"] is None
    assert set(q["recovery_interval"]) == {"doc", "image", "mean"}
    row = report_rows(RunRecord.load(path))[1]
    lo, hi = q["recovery_interval"]["mean"]
    assert lo <= row.mean_recovery <= hi and row.recovery_interval["mean"] == (lo, hi)  # type: ignore[index,operator]
    assert "recovery 90% intervals (paired bootstrap" in markdown_report(record)


# ------------------------------------------------------------------ the confidence gate


def test_gate_confidence_gates_on_the_lower_bound() -> None:
    # three wrong answers in one task of four samples: mean recovery ~0.81 passes the point gate, its lower bound does not
    record, _ = scripted_record({"base": None, "q": None}, {"q": 3}, intervals=BootstrapSpec(0.9))
    point = report_rows(record, 0.8)[1]
    assert point.gate == "pass"
    strict = report_rows(record, 0.8, confidence=0.9)[1]
    lo = strict.recovery_interval["mean"][0]  # type: ignore[index]
    assert lo < 0.8 and strict.gate == "fail"
    text = markdown_report(record, 0.8, confidence=0.9)
    assert "gate = lower bound of the 90% interval on mean recovery ≥ 80%" in text
    choice = choose(report_rows(record, 0.8, 0.9), 0.8, energy_measured=False, confidence=0.9)
    assert choice.pick is None and choice.standing("q").why.startswith("lower bound of the 90% interval")
    relaxed = choose(report_rows(record, 0.5, 0.9), 0.5, energy_measured=False, confidence=0.9)
    assert relaxed.pick == "q" and relaxed.margin == pytest.approx(lo - 0.5)
    assert "margin" in relaxed.summary() and "lower bound of its 90% interval" in relaxed.summary()


def test_gate_confidence_and_repeats_out_of_range_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path / "none.json"), "--gate-confidence", "1.5"])
    assert result.exit_code == 2 and result.output.strip().startswith("error: --gate-confidence is a probability")
    for args in (["eval", "--base", "x", "--repeats", "0"], ["optimize", "x", "--out", str(tmp_path / "o"), "--gate-confidence", "0"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.output.strip().startswith("error: "), result.output
        assert "--repeats must be at least 1" in result.output or "--gate-confidence is a probability" in result.output
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ ranking


def row(name: str, role: str, energy: float | None, mean: float | None, wall: float, modelled: float | None) -> ReportRow:
    return ReportRow(
        name, role, "default", energy, None, None, {}, {}, mean, "n/a", 0, 0, 1, wall,
        modelled_energy_j=modelled, recovery_interval={"mean": None if mean is None else (mean - 0.05, mean + 0.05)},
    )  # fmt: skip


def test_without_nvml_the_ranking_is_modelled_energy_never_wall_time() -> None:
    rows = [
        row("base", "base", None, 1.0, 5.0, 200.0),
        row("fast-on-cpu", "variant", None, 0.9, 1.0, 150.0),  # quickest here, dearer on the GPU
        row("lean", "variant", None, 0.9, 3.0, 90.0),
    ]
    assert row_cost(rows[1], energy_measured=False) == 150.0 and row_cost(rows[1], energy_measured=True) is None
    choice = choose(rows, 0.8, energy_measured=False, modelled_for="L4")
    assert choice.pick == "lean" and choice.metric == "modelled_energy_j" and choice.base_cost == 200.0
    assert "ranked by energy modelled for L4" in choice.metric_note and "not by CPU wall time" in choice.metric_note
    assert choice.cost_label == "J, modelled for L4"
    summary = choice.summary()
    assert "90.00 J over the suite (modelled for L4)" in summary and "margin +10.0 points" in summary


def test_with_neither_energy_the_pick_is_the_best_quality_not_the_quickest() -> None:
    rows = [
        row("base", "base", None, 1.0, 5.0, None),
        row("quick", "variant", None, 0.85, 1.0, None),
        row("slow-better", "variant", None, 0.95, 9.0, None),
        row("bad", "variant", None, 0.5, 0.5, None),
    ]
    choice = choose(rows, 0.8, energy_measured=False)
    assert choice.metric == "none" and choice.pick == "slow-better" and choice.base_cost is None
    assert "cost unknown" in choice.metric_note and "wall time is not used" in choice.metric_note
    assert choice.cost_label == "unknown"


def test_a_tie_names_the_rule_that_broke_it_not_a_rule_that_did_not() -> None:
    """Found in the demo's card: "tied on energy; higher recovery" for two rows both at 100.00%."""
    rows = [
        row("base", "base", None, 1.0, 5.0, 200.0),
        row("first", "variant", None, 1.0, 1.0, 90.0),
        row("second", "variant", None, 1.0, 1.0, 90.0),
        row("dear", "variant", None, 1.0, 1.0, 120.0),
    ]
    choice = choose(rows, 0.8, energy_measured=False)
    assert choice.pick == "first"
    rule = choice.standing("first").tie_rule or ""
    assert rule == "tied on energy (equal energy) with second; equal recovery and energy; the earlier candidate in the grid wins"
    assert "higher recovery" not in rule and choice.standing("dear").tie_rule is None


def test_measured_over_modelled_is_reported_where_both_exist() -> None:
    rows = [row("base", "base", 110.0, 1.0, 5.0, 100.0), row("q", "variant", 60.0, 0.9, 3.0, 50.0)]
    choice = choose(rows, 0.8, energy_measured=True, modelled_for="L4")
    assert choice.metric == "energy_j" and choice.standing("q").measured_over_modelled == pytest.approx(1.2)
    assert choice.pick == "q" and choice.cost_label == "J, measured"  # measured energy ranks even where modelled exists
    record, _ = scripted_record({"base": [110.0] * 3, "q": [60.0] * 3}, {})
    both = [dataclasses.replace(r, modelled_energy_j=m) for r, m in zip(report_rows(record), (100.0, 50.0), strict=True)]
    assert model_check_lines(record, both) == ["measured / modelled energy (model for the target GPU): base 1.10, q 1.20."]
    unmeasured, _ = scripted_record({"base": None, "q": None}, {})
    assert model_check_lines(unmeasured, both) == []  # nothing measured: nothing to check the model against


# ------------------------------------------------------------------ pictures


def test_frontier_labels_modelled_energy_marks_the_pick_and_draws_intervals(tmp_path: Path) -> None:
    rows = [
        row("base", "base", None, 1.0, 5.0, 200.0),
        row("a", "variant", None, 0.9, 1.0, 150.0),
        row("b", "variant", None, 0.85, 3.0, 90.0),
    ]
    fig = pareto_figure(rows, energy_measured=False, pick="b", modelled_for="L4", no_energy_reason="no NVML device")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "energy over the suite (J), modelled for L4 — not measured"
    labels = ax.get_legend_handles_labels()[1]
    assert "pick: b" in labels and "80% gate" in labels
    assert ax.containers, "the recovery intervals are drawn as error bars"
    measured = pareto_figure(rows, energy_measured=True)
    assert measured.axes[0].get_xlabel().endswith("measured by NVML")


def test_frontier_shows_every_stage_with_its_marker_subset_results_labelled_the_gate_and_the_pick() -> None:
    """Found in the demo: pareto.png held the base and two finalists; the image budget at 25%, the short
    template at 83% and W8A8 (lost in stages 1 and 2) were nowhere."""
    from ecoquant.report.plot import STAGE_MARKERS, StagePoint, plot_points

    rows = [
        row("base", "base", None, 1.0, 5.0, 200.0),
        row("gptq", "variant", None, 1.0, 1.0, 100.0),
        row("rtn", "variant", None, 0.9, 1.0, 110.0),
    ]
    earlier = [
        StagePoint("gptq", "weights", 1.0, 40.0, 4, (0.95, 1.0)),
        StagePoint("w8a8", "weights", 0.97, 60.0, 4),
        StagePoint("gptq+img25", "serving", 0.25, 30.0, 4),
        StagePoint("gptq+short", "serving", 0.83, 35.0, 4),
        StagePoint("broken", "serving", None, 35.0, 4),
    ]
    points, xlabel, missing = plot_points(rows, False, modelled_for="L4", earlier=earlier, suite_samples=10)
    by = {(p.label, p.role): p for p in points}
    assert {p.label for p in points if p.role == "subset"} == {"gptq (subset)", "w8a8 (subset)", "gptq+img25 (subset)", "gptq+short (subset)"}
    assert missing == ["broken (stage serving)"]
    assert all(p.hollow and "subset, 4 samples" in p.series for p in points if p.role == "subset")
    assert not any(p.hollow for p in points if p.role != "subset")
    markers = {p.series.split(" (")[0]: p.marker for p in points}
    assert markers == {"bf16 base": "s", "stage 1 weights": STAGE_MARKERS["weights"][0], "stage 2 serving": STAGE_MARKERS["serving"][0],
                       "stage 3 final": STAGE_MARKERS["final"][0]}
    assert len(set(markers.values())) == 4  # each stage its own marker
    # per sample: the finalists' joules over the whole suite's 10 samples, the subset's over their 4
    assert by[("gptq", "variant")].x == pytest.approx(10.0) and by[("gptq (subset)", "subset")].x == pytest.approx(10.0)
    assert by[("gptq+img25 (subset)", "subset")].y == pytest.approx(25.0)
    assert xlabel.startswith("energy per sample (J), modelled for L4")
    fig = pareto_figure(rows, energy_measured=False, pick="gptq", modelled_for="L4", earlier=earlier, suite_samples=10)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "pick: gptq" in labels and "80% gate" in labels and "Pareto front" in labels
    assert "stage 1 weights (subset, 4 samples)" in labels and "stage 2 serving (subset, 4 samples)" in labels
    assert "stage 3 final (whole suite, 10 samples)" in labels and "bf16 base" in labels
    drawn = {t.get_text() for t in ax.texts}
    assert {"gptq+img25 (subset)", "gptq+short (subset)", "w8a8 (subset)", "gptq", "rtn", "base"} <= drawn
    assert "broken (stage serving)" in ax.get_title()
    # without a staged search the frontier is what it was: suite totals, plain candidates
    plain, plain_label, _ = plot_points(rows, False, modelled_for="L4")
    assert plain_label.startswith("energy over the suite") and {p.series for p in plain} == {"bf16 base", "candidates"}


def test_parts_bar_is_labelled_modelled_and_written(tmp_path: Path) -> None:
    parts = {
        "base": {"prefill_text": 10.0, "prefill_image": 20.0, "vision_encoder": 5.0, "decode": 40.0, "idle": 3.0},
        "w4a16": {"prefill_text": 10.0, "prefill_image": 20.0, "vision_encoder": 5.0, "decode": 15.0, "idle": 3.0},
    }
    fig = parts_figure(parts, "L4")
    ax = fig.axes[0]
    assert "modelled for L4" in ax.get_ylabel() and "not measured" in ax.get_ylabel()
    assert ax.get_legend_handles_labels()[1] == ["prefill_text", "prefill_image", "vision_encoder", "decode", "idle"]
    tops = {}
    for bar in ax.patches:
        tops[bar.get_x()] = max(tops.get(bar.get_x(), 0.0), bar.get_y() + bar.get_height())
    assert sorted(tops.values()) == pytest.approx([53.0, 78.0])  # each stack sums to the model's total


def test_render_report_writes_the_frontier_and_parts_only_when_modelled(tmp_path: Path) -> None:
    record, _ = scripted_record({"base": None, "q": None}, {"q": 1})
    files = render_report(record, tmp_path, pick="q", decision="pick: q: because")
    with Image.open(files.plot) as img:
        assert img.format == "PNG" and img.size[0] > 400
    assert files.parts is None and not (tmp_path / "energy_parts.png").exists()  # no modelled energy in this record
    assert files.table.read_text().rstrip().endswith("pick: q: because")

    parts = {"prefill_text": 1.0, "prefill_image": 2.0, "vision_encoder": 0.5, "decode": 3.0, "idle": 0.5}
    modelled = dataclasses.replace(
        record,
        runs=tuple(
            dataclasses.replace(r, modelled_energy={"gpu": "L4", "total_j": 7.0, "parts": parts}) for r in record.runs
        ),
    )
    files = render_report(modelled, tmp_path)
    assert files.parts is not None and files.parts.name == "energy_parts.png"
    with Image.open(files.parts) as img:
        assert img.format == "PNG"
