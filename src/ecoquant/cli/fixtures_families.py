"""``ecoquant fixtures tiny-qwen2_5_vl`` (and the other families): tiny random checkpoints, offline.

Each prints the folder's path on stdout (and nothing else there), so a script can
write ``MODEL=$(ecoquant fixtures tiny-qwen2_5_vl)``; what it built goes to stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ecoquant.cli.app import console, fixtures_app, guarded
from ecoquant.cli.fixtures_gemma4 import OutOption
from ecoquant.fixtures.tiny_families import FIXTURES

MemorisedOption = Annotated[
    bool,
    typer.Option(
        "--memorised",
        help="Then overfit it on the very requests of `--suite builtin-basic --size 2` (about half a minute): "
        "memorised eval pages, so optimize has real recoveries and a pick; its scores prove mechanics, not quality.",
    ),
]


def _register(name: str, model_class: str) -> None:
    @fixtures_app.command(name, help=f"Build a tiny random {model_class} checkpoint in the Hub's tensor layout, with "
                          "tokenizer, processor and chat template (offline, a few seconds), and print its folder.")
    @guarded
    def build(out: OutOption = None, memorised: MemorisedOption = False) -> None:
        from ecoquant.fixtures.cache import build_atomically
        from ecoquant.fixtures.memorise import MemoriseRecipe
        from ecoquant.fixtures.tiny_families import build_family_fixture, family_fixture_path

        recipe = MemoriseRecipe() if memorised else None
        with console.status(f"Building {name}" + (" and memorising the builtin-basic pages" if memorised else "")):
            folder = (
                family_fixture_path(name, memorised)
                if out is None
                else build_atomically(out, lambda d: build_family_fixture(name, d, recipe))
            )
        what = f"memorised eval pages: {recipe.note}" if recipe else "random weights"
        console.print(f"{name} ({model_class}, {what}): {folder}", highlight=False)
        typer.echo(str(folder))


for _row in FIXTURES.values():  # one command per family row
    _register(_row.name, _row.model_class)
