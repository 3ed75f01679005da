"""``ecoquant doctor``: thin over :mod:`ecoquant.doctor` (probe the machine, print the report)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ecoquant.cli.app import app, folder_arg, guarded

_MARK = {"ok": "[green]ok  [/]", "warn": "[yellow]warn[/]", "info": "    "}


@app.command("doctor")
@guarded
def doctor_cmd(
    model: Annotated[str | None, typer.Argument(help="A model folder or hub id (hub ids only from the local cache: nothing is downloaded) to estimate optimize's work for.")] = None,
    out_text: Annotated[str, typer.Option("--out", "-o", help="The folder optimize would write into: its disk's free space, and its measured times for the estimate.")] = "ecoquant-optimize",
    vllm_python: Annotated[Path | None, typer.Option(help="Python interpreter with vLLM, as optimize --vllm-python (default: the usual search).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON lines (topic, text, status).")] = False,
) -> None:
    """Report what this machine can do for ecoquant (torch, GPUs, energy counter, vLLM and its features, disk, Hugging Face) and what optimize would do here."""
    from ecoquant.doctor import optimize_estimate, probe_machine, report

    out = folder_arg(out_text)
    lines = report(probe_machine(out, vllm_python), optimize_estimate(model, out) if model else None)
    console = Console(soft_wrap=True, highlight=False)
    for line in lines:
        if as_json:
            console.print_json(json.dumps(asdict(line)))
        else:
            console.print(f"{_MARK[line.status]} {line.topic}: {line.text}", markup=True)
