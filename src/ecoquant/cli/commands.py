"""Imports every command module so that its ``@app.command`` decorators run.

Add one import line per command module.
"""
from ecoquant.cli import quantize  # noqa: F401,E402
from ecoquant.cli import fixtures_gemma4  # noqa: F401
from ecoquant.cli import demo  # noqa: F401,E402
from ecoquant.cli import fixtures_gemma3  # noqa: F401
from ecoquant.cli import quality  # noqa: F401
from ecoquant.cli import eval  # noqa: F401
from ecoquant.cli import serve  # noqa: F401
from ecoquant.cli import optimize  # noqa: F401
from ecoquant.cli import doctor  # noqa: F401
from ecoquant.cli import fixtures_families  # noqa: F401
