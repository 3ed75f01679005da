"""The offline suite ecoquant generates itself: basic pages, documents (doc half) and charts (image half).

See :mod:`ecoquant.eval.builtin.suite` for what it contains and how it is cached.
"""

from ecoquant.eval.builtin.suite import (
    BASIC_VERSION,
    DEFAULT_SIZE,
    GENERATOR_VERSION,
    SUITE_PARTS,
    builtin_specs,
    builtin_suite,
    default_cache_dir,
)

__all__ = ["BASIC_VERSION", "DEFAULT_SIZE", "GENERATOR_VERSION", "SUITE_PARTS", "builtin_specs", "builtin_suite", "default_cache_dir"]
