"""``ecoquant demo``: the whole job on an embedded default, offline."""

from __future__ import annotations

from collections.abc import Mapping
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
    """Quantize the shipped trained tiny Gemma-4 VLM (RTN min-max, RTN MSE, GPTQ, AWQ), verify, evaluate, report. No network needed."""
    from ecoquant.demo import run_demo
    from ecoquant.export.footprint import human_bytes
    from ecoquant.export.verify import summary
    from ecoquant.report.table import report_rows

    result = run_demo(out)
    table = Table(title=f"ecoquant demo: trained tiny Gemma-4 VLM ({result.base})")
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

    n = result.record.suite["n_samples"]
    scores = Table(title=f"evaluation: {n} samples of the basic pages the model never trained on")
    for col in ("model", "doc", "image", "recovery doc", "recovery image", "mean recovery", "90% interval", "gate"):
        scores.add_column(col)

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    def interval(bounds: Mapping[str, tuple[float, float] | None] | None) -> str:
        mean = None if bounds is None else bounds.get("mean")
        return "n/a" if mean is None else f"{mean[0]:.1%}–{mean[1]:.1%}"

    for row in report_rows(result.record):
        scores.add_row(
            row.model + (" (base)" if row.role == "base" else ""),
            f"{row.scores.get('doc', 0.0):.3f}",
            f"{row.scores.get('image', 0.0):.3f}",
            "—" if row.role == "base" else pct(row.recoveries.get("doc")),
            "—" if row.role == "base" else pct(row.recoveries.get("image")),
            "—" if row.role == "base" else pct(row.mean_recovery),
            "—" if row.role == "base" else interval(row.recovery_interval),
            "—" if row.role == "base" else row.gate,
        )
    console.print(scores)
    console.print(f"evaluation report: {result.report.table}  plot: {result.report.plot}")
    console.print(
        "next: [bold]ecoquant inspect[/] on a checkpoint, [bold]ecoquant quantize MODEL --out DIR[/] on a real model"
    )
