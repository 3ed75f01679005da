"""The offline suite ecoquant generates itself: documents (doc half) and charts (image half).

See :mod:`ecoquant.eval.builtin.suite` for what it contains and how it is cached.
"""

from ecoquant.eval.builtin.suite import (
    DEFAULT_SIZE,
    GENERATOR_VERSION,
    builtin_specs,
    builtin_suite,
    default_cache_dir,
)

__all__ = ["DEFAULT_SIZE", "GENERATOR_VERSION", "builtin_specs", "builtin_suite", "default_cache_dir"]
