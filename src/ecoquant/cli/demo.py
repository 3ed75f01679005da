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
    for col in ("stage", "candidate", "mean recovery", "90% interval", f"J modelled for {gpu}", f"gate {gate:.0%}",
                "drafts accepted / step (measured)"):
        table.add_column(col)
    for stage, outcomes in search.get("stages", {}).items():
        for name, o in outcomes.items():
            cost = o.get("cost")
            accepted = o.get("mean_accepted_per_step")
            table.add_row(
                stage,
                name,
                _pct(o.get("mean_recovery")),
                _interval(o.get("interval")),
                "n/a" if cost is None else f"{cost:.3f}",
                "pass" if o.get("passes_gate_on_subset") else "fail",
                "—" if accepted is None else f"{accepted:.2f}",
            )
    return table


def _mtp_energy_table(search: Mapping[str, Any], gpu: str) -> Table:
    """The MTP lever's candidates beside the weights they draft for: modelled energy by part (``draft`` is the assistant's)."""
    from ecoquant.energy.roofline import PARTS

    table = Table(title=f"MTP lever: energy modelled for {gpu} by part, with the weights it drafts for (stage-2 pages)")
    for col in ("candidate", "drafts accepted / step", f"J modelled for {gpu}", *PARTS):
        table.add_column(col)
    outcomes = {n: o for stage in ("weights", "serving") for n, o in search.get("stages", {}).get(stage, {}).items()}
    drafted = [n for n in outcomes if "+mtp" in n]
    for name in [*dict.fromkeys(n.rsplit("+mtp", 1)[0] for n in drafted), *drafted]:
        o = outcomes.get(name)
        if o is None:
            continue
        parts, total, accepted = o.get("parts") or {}, o.get("cost"), o.get("mean_accepted_per_step")
        table.add_row(
            name,
            "—" if accepted is None else f"{accepted:.2f}",
            "n/a" if total is None else f"{total:.3f}",
            *("n/a" if p not in parts else f"{parts[p]:.4f}" for p in PARTS),
        )
    return table


def _acceptance_table(rows: Sequence[Any]) -> Table:
    """The assistant's measured acceptance on the bf16 target and on quantized ones (same pages, same k)."""
    table = Table(title="MTP: the tiny assistant's acceptance by target (measured, greedy, stage-2 pages)")
    for col in ("target", "weights", "k", "drafts accepted / step", "acceptance rate", "tokens / target pass", "target passes"):
        table.add_column(col)
    for a in rows:
        table.add_row(
            a.target, a.role, str(a.num_speculative_tokens), f"{a.mean_accepted_per_step:.2f}", f"{a.acceptance_rate:.0%}",
            f"{a.tokens_per_step:.2f}", str(a.target_steps),
        )
    return table


def _mtp_line(record: Any, pick: str | None, gpu: str) -> str:
    """Whether the pick decodes with the assistant, and what the MTP lever's best finalist costs against it."""
    from ecoquant.report.table import report_rows

    rows = {r.model: r for r in report_rows(record)}
    run = next((r for r in record.runs if r.label == pick), None)
    if run is not None and run.speculative:
        s = run.speculative
        return (
            f"MTP: the pick decodes with the assistant (k={s['num_speculative_tokens']}, "
            f"{s['mean_accepted_per_step']:.2f} drafts accepted per target pass, measured on its own target)."
        )
    drafted = [r for r in record.runs if r.speculative and r.role == "variant"]
    if not drafted or pick is None:
        return "MTP: the pick does not use the assistant (no drafting candidate reached the finalists)."
    best = min(drafted, key=lambda r: rows[r.label].modelled_energy_j or float("inf"))
    cost, pick_cost = rows[best.label].modelled_energy_j, rows[pick].modelled_energy_j
    return (
        f"MTP: the pick does not use the assistant: the best drafting finalist {best.label} costs "
        f"{cost:.3f} J modelled for {gpu} against the pick's {pick_cost:.3f} J."
        if cost is not None and pick_cost is not None
        else f"MTP: the pick does not use the assistant ({best.label} was a finalist)."
    )


def _final_table(rows: Sequence[Any], gpu: str) -> Table:
    """The finalists on every page, with the modelled energy split into its parts (``draft``: the assistant's)."""
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
    """Run optimize's staged search offline on the shipped, trained tiny Gemma-4 VLM and show the decision and the folder to upload."""
    from ecoquant.demo import run_demo, target_acceptance
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
    wide.print(_mtp_energy_table(choice.get("search") or {}, gpu))
    wide.print(_acceptance_table(target_acceptance(folder_arg(out_text))))
    wide.print(_final_table(report_rows(result.record), gpu))
    report = result.results.parent / "report.md"
    console.print(f"report: {report}  (pareto.png, energy_parts.png beside it)", highlight=False, soft_wrap=True)
    console.print(result.choice.summary(), highlight=False, soft_wrap=True)
    console.print(_mtp_line(result.record, result.choice.pick, gpu), highlight=False, soft_wrap=True)
    if result.submission is None:
        raise typer.Exit(code=1)
    console.print(
        f"[green]pick:[/] {result.choice.pick}  [green]submission folder:[/] {result.submission} "
        "(weights, vllm_config.yaml, README.md, quant_recipe.json: `vllm serve --config vllm_config.yaml` from inside it)",
        highlight=False,
        soft_wrap=True,
    )
