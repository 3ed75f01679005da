"""``ecoquant quality BASE VARIANT...``: perplexity, KL to the base and top-1 agreement, as a table and JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ecoquant.cli.app import app, console, guarded
from ecoquant.data.corpus import EVALUATION_TEXTS  # plain data, no torch: --help stays fast

if TYPE_CHECKING:  # torch is imported inside the command, so ``--help`` stays fast
    from ecoquant.quality.run import QualityReport

out_console = Console()

#: The --text help, from the corpus table, so it names exactly the texts there are.
TEXT_CHOICES = "; ".join(f"{name} = {part.title}" for name, part in EVALUATION_TEXTS.items())


def short_name(model: str) -> str:
    """A model's folder name: the table stays readable; the JSON report keeps full paths."""
    return Path(model).name or model


def report_tables(report: QualityReport) -> list[Table]:
    """One table per part, one row per model; ratios and divergences are relative to the base (first row)."""
    tables = []
    for part in report.parts:
        table = Table(title=f"{part.name}: quality against {short_name(report.base)}", title_justify="left")
        table.add_column("model", overflow="fold", min_width=12)
        for column in ("perplexity", "ppl/base", "KL nats", "top-1", "tokens"):
            table.add_column(column, justify="right", no_wrap=True)
        for i, score in enumerate((part.base, *part.variants)):
            table.add_row(
                short_name(score.model) + (" [dim](base)[/]" if i == 0 else ""),
                f"{score.perplexity:.3f}",
                f"{score.perplexity_ratio:.4f}",
                f"{score.kl_mean:.5f}",
                f"{score.top1_agreement:.2%}",
                f"{score.n_tokens:,}",
            )
        table.caption = part.description
        tables.append(table)
    return tables


@app.command("quality")
@guarded
def quality_cmd(
    base: Annotated[Path, typer.Argument(help="The reference model folder (e.g. the bf16 original).")],
    variants: Annotated[
        list[Path] | None,
        typer.Argument(help="Model folders to compare with BASE (bf16 or compressed-tensors); none: BASE's perplexity only."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the full report as JSON to this file.")] = None,
    window_tokens: Annotated[int, typer.Option(help="Tokens per evaluation window (each window starts with <bos>).")] = 512,
    max_windows: Annotated[
        int | None, typer.Option(help="Use only the first N windows of the evaluation text (default: all; 0: skip text).")
    ] = None,
    text: Annotated[str, typer.Option(help=f"The evaluation text, by name: {TEXT_CHOICES}.")] = "austen",
    image: Annotated[
        list[Path] | None, typer.Option(help="An image to ask about (image-text models only); repeatable.")
    ] = None,
    image_prompt: Annotated[str, typer.Option(help="The question asked about every --image.")] = "Describe this image.",
    answer_tokens: Annotated[
        int, typer.Option(help="Length of the base's greedy answer that every model is scored on, per image.")
    ] = 32,
    dtype: Annotated[str, typer.Option(help="Compute dtype: bfloat16, float16 or float32.")] = "bfloat16",
    device: Annotated[str, typer.Option(help="auto (cuda if available), cpu, cuda or cuda:N.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Measure each variant's perplexity on the shipped evaluation text, its mean KL(base‖variant) and its top-1 agreement with the base."""
    variants = variants or []
    from ecoquant.models.loading import resolve_model
    from ecoquant.quality.run import ImagePrompt, QualityConfig, compare, write_json

    for model in (base, *variants):  # a wrong folder: one line, before the progress bar
        resolve_model(model)

    cfg = QualityConfig(
        window_tokens=window_tokens,
        max_windows=max_windows,
        images=tuple(ImagePrompt(p, image_prompt) for p in image or ()),
        answer_tokens=answer_tokens,
        dtype=dtype,
        device=device,
        text=text,
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
    ) as bar:
        task = bar.add_task(f"{1 + len(variants)} models, sequence", total=None)
        report = compare(base, variants, cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
    for table in report_tables(report):
        out_console.print(table)
    console.print("[dim]KL nats: mean KL(base ‖ model) per scored token; top-1: argmax agrees with the base's[/]")
    if json_out is not None:
        write_json(report, json_out)
        console.print(f"[green]wrote[/] {json_out}", highlight=False)
