""":func:`optimize`: the entry point, above both ways of choosing what to evaluate.

A grid (``config.grid``) is a product evaluated whole by
:mod:`ecoquant.optimize.run`; without one the staged search of
:mod:`ecoquant.optimize.stages` drives the same machinery. This module sits
above both so that neither imports the other's caller: ``stages`` uses
``run``, and ``run`` knows nothing of ``stages``.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ecoquant.optimize.plan import OptimizeConfig
from ecoquant.optimize.run import BackendFactory, MeterFactory, OptimizeResult, _open_meter, decide, open_runner, run_grid
from ecoquant.optimize.stages import staged_optimize


def optimize(
    model: str | Path,
    config: OptimizeConfig,
    *,
    show_progress: bool | None = None,
    console: Console | None = None,
    meter_factory: MeterFactory = _open_meter,
    backend_factory: BackendFactory | None = None,
) -> OptimizeResult:
    """Quantize, evaluate, decide and write ``config.out/submission`` (see :mod:`ecoquant.optimize.run`).

    With a grid (``config.grid``) every candidate is evaluated on the whole
    suite (a product); without one, the staged search of
    :mod:`ecoquant.optimize.stages` chooses what to evaluate.
    ``meter_factory`` and ``backend_factory`` exist for tests (a recorded NVML,
    a scripted backend); by default NVML and the configured backend are used.
    """
    runner = open_runner(
        config, show_progress=show_progress, console=console, meter_factory=meter_factory, backend_factory=backend_factory
    )
    try:
        if config.grid is None:
            return staged_optimize(model, config, runner)
        return decide(run_grid(model, config, runner), config, runner)
    finally:
        runner.close()  # --gpus: the Ray instance it started
