"""``ecoquant optimize``: the whole challenge workflow, from a model to the folder to upload.

Layout: :mod:`~ecoquant.optimize.grid` (candidates), :mod:`~ecoquant.optimize.plan`
(settings, keys, what is cached), :mod:`~ecoquant.optimize.store` (the keyed,
crash-safe folder), :mod:`~ecoquant.optimize.select` (the gate and the pick),
:mod:`~ecoquant.optimize.submission` (the upload folder) and
:mod:`~ecoquant.optimize.run` (quantize and evaluate a grid, decide, and drive the
layers below: ``api``, ``eval``, ``report``, ``serve``), :mod:`~ecoquant.optimize.stages`
(the staged search over ``run``) and :mod:`~ecoquant.optimize.main` (:func:`optimize`, above both).
"""

from ecoquant.optimize.grid import Candidate, Grid, default_grid, load_grid
from ecoquant.optimize.plan import OptimizeConfig, plan_optimize
from ecoquant.optimize.main import optimize
from ecoquant.optimize.run import OptimizeResult

__all__ = ["Candidate", "Grid", "OptimizeConfig", "OptimizeResult", "default_grid", "load_grid", "optimize", "plan_optimize"]
