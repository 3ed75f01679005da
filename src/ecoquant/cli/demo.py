"""``ecoquant demo``: the decision on an embedded default, offline."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ecoquant.cli.app import app, console, folder_arg, guarded


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "n/a" if not bounds else f"{bounds[0]:.1%}–{bounds[1]:.1%}"


def _stage_table(search: Mapping[str, Any], gate: float, gpu: str) -> Table:
    """Every candidate each stage evaluated (stages 1-2 on a subset of the pages): recovery and modelled energy."""
    table = Table(title=f"staged search: every candidate evaluated (energy modelled for {gpu}, not measured)")
    for col in ("stage", "candidate", "mean recovery", "90% interval", f"J modelled for {gpu}", f"gate {gate:.0%}"):
        table.add_column(col)
    for stage, outcomes in search.get("stages", {}).items():
        for name, o in outcomes.items():
            cost = o.get("cost")
            table.add_row(
                stage,
                name,
                _pct(o.get("mean_recovery")),
                _interval(o.get("interval")),
                "n/a" if cost is None else f"{cost:.3f}",
                "pass" if o.get("passes_gate_on_subset") else "fail",
            )
    return table


def _final_table(rows: Sequence[Any], gpu: str) -> Table:
    """The finalists on every page, with the modelled energy split into its parts."""
    from ecoquant.energy.roofline import PARTS

    table = Table(title=f"finalists on the whole suite (energy modelled for {gpu}, not measured)")
    for col in ("model", "mean recovery", "90% interval", "gate", f"J modelled for {gpu}", *PARTS):
        table.add_column(col)
    for row in rows:
        parts = (row.modelled_energy or {}).get("parts", {})
        total = row.modelled_energy_j
        interval = (row.recovery_interval or {}).get("mean")
        table.add_row(
            row.model + (" (base)" if row.role == "base" else ""),
            _pct(row.mean_recovery),
            "—" if row.role == "base" else _interval(interval),
            "—" if row.role == "base" else row.gate,
            "n/a" if total is None else f"{total:.3f}",
            *("n/a" if not total or p not in parts else f"{parts[p]:.3f} ({parts[p] / total:.0%})" for p in PARTS),
        )
    return table


@app.command("demo")
@guarded
def demo_cmd(
    out_text: Annotated[str, typer.Option("--out", help="Folder for the demo's store, report and submission (a rerun reuses what it holds).")] = "ecoquant-demo",
    verbose: Annotated[bool, typer.Option("--verbose", help="Off a terminal too: a line per module exported and per sample evaluated, and the progress bars and load messages of transformers and compressed-tensors.")] = False,
) -> None:
    """Run optimize's staged search on the shipped trained tiny Gemma-4 VLM, show the decision and the folder to upload. No network needed."""
    from ecoquant.demo import run_demo
    from ecoquant.energy.gpus import DEFAULT_GPU
    from ecoquant.optimize.run import CHOICE_FILE
    from ecoquant.report.table import report_rows

    from ecoquant.progress import verbose as verbose_logs

    with verbose_logs(verbose):
        result = run_demo(folder_arg(out_text))
    choice = json.loads((result.results.parent / CHOICE_FILE).read_text(encoding="utf-8"))
    gpu = result.choice.modelled_for or DEFAULT_GPU
    # tables are read in logs too: never squeeze a candidate's name to a narrow terminal
    wide = Console(width=max(console.width, 160))
    wide.print(_stage_table(choice.get("search") or {}, result.choice.threshold, gpu))
    wide.print(_final_table(report_rows(result.record), gpu))
    report = result.results.parent / "report.md"
    console.print(f"report: {report}  (pareto.png, energy_parts.png beside it)", highlight=False, soft_wrap=True)
    console.print(result.choice.summary(), highlight=False, soft_wrap=True)
    if result.submission is None:
        raise typer.Exit(code=1)
    console.print(
        f"[green]pick:[/] {result.choice.pick}  [green]submission folder:[/] {result.submission} "
        "(weights, vllm_config.yaml, README.md, quant_recipe.json: `vllm serve --config vllm_config.yaml` from inside it)",
        highlight=False,
        soft_wrap=True,
    )
