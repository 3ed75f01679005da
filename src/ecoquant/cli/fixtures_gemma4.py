"""``ecoquant fixtures tiny-gemma4``, ``tiny-vlm``, ``tiny-vlm-assistant``, ``e4b-twin`` and ``e4b-assistant-twin``:
the offline Gemma-4 test models.

Each prints the folder's path on stdout (and nothing else there), so a script can
write ``MODEL=$(ecoquant fixtures tiny-gemma4)``; what it built goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ecoquant.cli.app import console, fixtures_app, guarded

# The builders import torch and transformers: imported inside the commands so ``--help`` stays fast.

OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Folder to create (must not exist yet). Default: a cached folder under $ECOQUANT_CACHE "
        "(or ~/.cache/ecoquant), built once and reused.",
        file_okay=False,
    ),
]


@fixtures_app.command("tiny-gemma4")
@guarded
def tiny_gemma4(out: OutOption = None) -> None:
    """Build the tiny Gemma-4 E checkpoint (vision, audio, PLE, KV sharing; ~13 MB) and print its folder."""
    from ecoquant.fixtures.cache import build_atomically
    from ecoquant.fixtures.tiny_gemma4 import build_tiny_gemma4, tiny_gemma4_path

    with console.status("Building the tiny Gemma-4 checkpoint"):
        folder = tiny_gemma4_path() if out is None else build_atomically(out, build_tiny_gemma4)
    console.print(f"tiny Gemma-4 checkpoint: {folder}", highlight=False)
    typer.echo(str(folder))


@fixtures_app.command("e4b-twin")
@guarded
def e4b_twin(out: OutOption = None) -> None:
    """Write google/gemma-4-E4B-it's config.json alone (a config-only model folder) and print its folder."""
    from ecoquant.fixtures.cache import build_atomically
    from ecoquant.fixtures.e4b_twin import build_e4b_twin, describe, e4b_twin_path, write_e4b_twin

    folder = e4b_twin_path() if out is None else build_atomically(out, write_e4b_twin)
    shape = describe(build_e4b_twin())
    console.print(
        f"E4B shape twin: {shape.num_layers} layers ({shape.kv_shared_layers} KV-shared), "
        f"{shape.num_parameters:,} parameters, {shape.parameter_gib:.2f} GiB in bf16 — {folder}",
        highlight=False,
    )
    typer.echo(str(folder))


@fixtures_app.command("e4b-assistant-twin")
@guarded
def e4b_assistant_twin(out: OutOption = None) -> None:
    """Write google/gemma-4-E4B-it-assistant's config.json alone (the MTP assistant's shapes, for the energy
    model) and print its folder."""
    from ecoquant.fixtures.cache import build_atomically
    from ecoquant.fixtures.e4b_assistant import e4b_assistant_twin_path, write_e4b_assistant_twin

    folder = e4b_assistant_twin_path() if out is None else build_atomically(out, write_e4b_assistant_twin)
    console.print(f"E4B assistant shape twin (config only): {folder}", highlight=False)
    typer.echo(str(folder))


@fixtures_app.command("tiny-vlm")
@guarded
def tiny_vlm() -> None:
    """Print the folder of the shipped, trained tiny Gemma-4 vision-language model (~13 MB; offline, no training)."""
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path

    folder = tiny_vlm_path()
    console.print(f"trained tiny Gemma-4 VLM: {folder}", highlight=False)
    typer.echo(str(folder))


@fixtures_app.command("tiny-vlm-assistant")
@guarded
def tiny_vlm_assistant() -> None:
    """Print the folder of the shipped MTP assistant distilled from the tiny VLM (Gemma4AssistantForCausalLM, ~3 MB; offline)."""
    from ecoquant.fixtures.tiny_assistant import tiny_vlm_assistant_path

    folder = tiny_vlm_assistant_path()
    console.print(f"tiny VLM's MTP assistant: {folder}", highlight=False)
    typer.echo(str(folder))
