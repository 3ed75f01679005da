"""``ecoquant demo``: the whole job on an embedded default, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ecoquant.cli.app import app, console, guarded


@app.command("demo")
@guarded
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the demo's checkpoints (replaced on each run).")] = Path(
        "ecoquant-demo"
    ),
) -> None:
    """Quantize the built-in tiny Gemma-4 model (RTN min-max and MSE), verify, evaluate and report. No network needed."""
    from ecoquant.demo import run_demo
    from ecoquant.export.footprint import human_bytes
    from ecoquant.export.verify import summary

    result = run_demo(out)
    table = Table(title=f"ecoquant demo: tiny Gemma-4 ({result.base})")
    for col in ("variant", "modules", "weights", "mean rel. weight error", "top-1 agreement", "checkpoint"):
        table.add_column(col)
    for v in result.variants:
        s = summary(v.verification)
        table.add_row(
            v.name,
            str(v.result.modules),
            f"{human_bytes(v.result.source_bytes)} -> {human_bytes(v.result.output_bytes)}",
            f"{s['relative_error_mean']:.4f}",
            f"{s['top1_agreement']:.3f}",
            str(v.result.out),
        )
    console.print(table)
    console.print(f"evaluation report: {result.report.table}  plot: {result.report.plot}")
    console.print(
        "next: [bold]ecoquant inspect[/] on a checkpoint, [bold]ecoquant quantize MODEL --out DIR[/] on a real model"
    )
