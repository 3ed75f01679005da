"""ecoquant's command line: a thin layer over the library (see ``ecoquant --help``)."""

from ecoquant.cli.app import app

# Importing a command module registers its commands on ``app``.
from ecoquant.cli import commands  # noqa: F401,E402

__all__ = ["app"]
