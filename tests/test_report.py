"""The report: recovery arithmetic (zero base included), the gate, the Pareto front, the table and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from ecoquant.eval.runner import SCHEMA, EnergyInfo, EnergyResult, ModelRun, RunRecord, SampleResult
from ecoquant.report import render_report
from ecoquant.report.pareto import dominates, pareto_front
from ecoquant.report.plot import pareto_figure
from ecoquant.report.table import (
    GATE_RECOVERY,
    gate,
    markdown_report,
    mean_recovery,
    recovery,
    relative_change,
    report_rows,
)

TASKS = [
    {"name": "docs", "suite": "doc", "metric": "anls", "n_samples": 1, "max_new_tokens": 32, "prompt_suffix": ""},
    {
        "name": "charts",
        "suite": "image",
        "metric": "relaxed_accuracy",
        "n_samples": 1,
        "max_new_tokens": 16,
        "prompt_suffix": "",
    },
]


def run(
    label: str,
    role: str,
    doc: float,
    image: float,
    energy_j: float | None,
    wall_s: float = 10.0,
    prompt_variant: str = "default",
    tokens_out: int = 100,
) -> ModelRun:
    energy = None if energy_j is None else EnergyResult(wall_s, {"0": energy_j}, energy_j, energy_j - 50.0 * wall_s)
    samples = (
        SampleResult("docs", "d0", "x", doc, 300, tokens_out // 2, "stop"),
        SampleResult("charts", "c0", "y", image, 200, tokens_out - tokens_out // 2, "stop"),
    )
    return ModelRun(
        label=label,
        source=f"/models/{label}",
        role=role,  # type: ignore[arg-type]
        prompt_variant=prompt_variant,
        recipe=None if role == "base" else {"method": "rtn"},
        backend={"kind": "transformers"},
        wall_time_s=wall_s,
        energy=energy,
        requests=2,
        tokens_in=500,
        tokens_out=tokens_out,
        task_scores={"docs": doc, "charts": image},
        suite_scores={"doc": doc, "image": image},
        samples=samples,
    )


def record(runs: list[ModelRun], measured: bool = True, variants: tuple[str, ...] = ("default",)) -> RunRecord:
    return RunRecord(
        schema=SCHEMA,
        created_utc="2026-01-01T00:00:00Z",
        ecoquant={"version": "0.1.0", "git_sha": None},
        suite={"spec": "builtin", "name": "builtin", "size": 1, "limit": None, "n_samples": 2, "tasks": TASKS},
        generation={
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "seed": 0,
            "max_new_tokens": None,
        },
        prompt_variants=[
            {"name": v, "description": v, "system": None, "user_prefix": "", "suffix": None} for v in variants
        ],
        energy=EnergyInfo(
            measured=measured,
            meter="NVML total-energy counter, GPU 0" if measured else "no NVML device",
            idle_time_s=5.0 if measured else None,
            idle_gpu_power_w={"0": 50.0} if measured else None,
            warmup_requests=2,
        ),
        runs=tuple(runs),
    )


# The seed model card's numbers (BF16 base vs the NF4 artifact, NVIDIA L4).
SEED = [
    run("bf16", "base", 0.7608, 0.68, 99.71),
    run("nf4", "variant", 0.7576, 0.56, 113.41),
]


def test_recovery_and_mean_recovery_worked_example() -> None:
    assert recovery(0.7576, 0.7608) == pytest.approx(0.995794, abs=1e-6)
    assert recovery(0.56, 0.68) == pytest.approx(0.823529, abs=1e-6)
    assert mean_recovery([0.7576 / 0.7608, 0.56 / 0.68]) == pytest.approx((0.995794 + 0.823529) / 2, abs=1e-6)
    assert relative_change(113.41, 99.71) == pytest.approx(0.137398, abs=1e-6)


def test_zero_base_score_is_not_applicable_never_infinite() -> None:
    assert recovery(0.5, 0.0) is None
    assert recovery(0.0, 0.0) is None
    assert recovery(None, 0.5) is None
    assert mean_recovery([None, 1.0]) is None
    assert mean_recovery([]) is None
    assert relative_change(10.0, 0.0) is None
    rows = report_rows(record([run("b", "base", 0.0, 0.5, 100.0), run("v", "variant", 0.2, 0.45, 80.0)]))
    v = rows[1]
    assert v.recoveries["doc"] is None
    assert v.recoveries["image"] == pytest.approx(0.9)
    assert v.mean_recovery is None and v.gate == "n/a"
    text = markdown_report(record([run("b", "base", 0.0, 0.5, 100.0), run("v", "variant", 0.2, 0.45, 80.0)]))
    assert "inf" not in text.lower() and "nan" not in text.lower()
    assert "| n/a | 90.00% | n/a | n/a |" in text


def test_gate_is_mean_recovery_at_least_80_percent() -> None:
    assert GATE_RECOVERY == 0.80
    assert gate(0.80) == "pass"
    assert gate(0.7999) == "fail"
    assert gate(None) == "n/a"
    assert gate(1.0, role="base") == "base"


def test_rows_compare_each_prompt_variant_with_its_own_base() -> None:
    runs = [
        run("base", "base", 0.8, 0.6, 100.0, prompt_variant="default"),
        run("base", "base", 0.4, 0.3, 50.0, prompt_variant="short"),
        run("q", "variant", 0.6, 0.6, 60.0, prompt_variant="default"),
        run("q", "variant", 0.4, 0.15, 30.0, prompt_variant="short"),
    ]
    rows = report_rows(record(runs, variants=("default", "short")))
    assert [r.model for r in rows] == ["base · default", "base · short", "q · default", "q · short"]
    q_default, q_short = rows[2], rows[3]
    assert q_default.recoveries == pytest.approx({"doc": 0.75, "image": 1.0})
    assert q_default.mean_recovery == pytest.approx(0.875) and q_default.gate == "pass"
    assert q_default.energy_delta == pytest.approx(-0.4)
    assert q_short.recoveries == pytest.approx({"doc": 1.0, "image": 0.5})  # vs the short base, not the default one
    assert q_short.mean_recovery == pytest.approx(0.75) and q_short.gate == "fail"
    assert q_short.energy_delta == pytest.approx(-0.4)
    assert rows[0].mean_recovery == pytest.approx(1.0) and rows[0].gate == "base"


def test_table_shape_and_cells_like_the_seed_card() -> None:
    text = markdown_report(record(SEED))
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model", "energy J", "Δ energy vs base", "doc score", "image score", "recovery doc",
        "recovery image", "mean recovery", "≥80% gate", "output tokens", "wall s",
    ]  # fmt: skip
    base_row = next(line for line in lines if line.startswith("| bf16"))
    nf4_row = next(line for line in lines if line.startswith("| nf4"))
    assert base_row == "| bf16 (base) | 99.71 | — | 0.7608 | 0.6800 | 100.00% | 100.00% | 100.00% | — | 100 | 10.0 |"
    assert nf4_row == "| nf4 | 113.41 | +13.7% | 0.7576 | 0.5600 | 99.58% | 82.35% | 90.97% | pass | 100 | 10.0 |"
    assert "idle baseline: 50.0 W over 5.0 s" in text
    assert "energy above idle: bf16 -400.29 J, nf4 -386.59 J" in text  # raw minus 50 W x 10 s, shown as is


def test_table_without_a_meter_prints_no_energy_number() -> None:
    runs = [run("b", "base", 0.8, 0.6, None, wall_s=12.0), run("v", "variant", 0.7, 0.6, None, wall_s=8.0)]
    text = markdown_report(record(runs, measured=False))
    assert "energy: not measured (no NVML device)" in text
    row = next(line for line in text.splitlines() if line.startswith("| v "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "—" and cells[2] == "—"  # energy and its delta: no number at all
    assert cells[-1] == "8.0"  # wall time is still there
    assert "J" not in text.split("energy: not measured")[1].split("\n")[0]


def test_pareto_front_worked_example_and_edge_cases() -> None:
    points = [(100.0, 1.0), (60.0, 0.95), (70.0, 0.90), (40.0, 0.70)]
    assert pareto_front(points) == [3, 1, 0]
    assert dominates((60.0, 0.95), (70.0, 0.90))
    assert not dominates((60.0, 0.95), (60.0, 0.95))
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # identical points both stay
    assert pareto_front([(1.0, 0.5), (1.0, 0.9)]) == [1]  # same cost, better quality wins
    assert pareto_front([(2.0, 0.9), (1.0, 0.9)]) == [1]  # same quality, cheaper wins
    assert pareto_front([]) == []
    assert pareto_front([(5.0, 0.1)]) == [0]


def test_plot_marks_the_front_and_labels_the_axis_honestly(tmp_path: Path) -> None:
    runs = [
        run("base", "base", 0.8, 0.6, 100.0),
        run("rtn", "variant", 0.76, 0.57, 60.0),  # on the front
        run("gptq", "variant", 0.70, 0.50, 70.0),  # dominated by rtn
        run("awq", "variant", 0.60, 0.40, 40.0),  # cheapest: on the front
    ]
    rows = report_rows(record(runs))
    fig = pareto_figure(rows, energy_measured=True)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "energy over the suite (J), measured by NVML"
    (front_line,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert list(front_line.get_xdata()) == [40.0, 60.0, 100.0]

    timed = pareto_figure(rows, energy_measured=False, no_energy_reason="no NVML device")
    assert timed.axes[0].get_xlabel() == "wall time over the suite (s) — energy not measured (no NVML device)"

    files = render_report(record(runs), tmp_path)
    with Image.open(files.plot) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 300
    assert files.table.read_text().startswith("# ecoquant eval: builtin")


def test_record_round_trips_through_results_json(tmp_path: Path) -> None:
    original = record(SEED)
    path = original.save(tmp_path / "results.json")
    assert RunRecord.load(path) == original
    assert markdown_report(RunRecord.load(path)) == markdown_report(original)
