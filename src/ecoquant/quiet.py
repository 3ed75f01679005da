"""Quiet model loads: no third-party progress bars, no known-harmless warnings, real warnings kept.

Loading a compressed-tensors checkpoint with transformers draws five progress
bars (``Applying quantization config``, ``Compressing model``, ``Loading
weights``, ``Dispatching model``, ``Decompressing model``) and warns that
``re:.*lm_head$`` matched nothing. Off a terminal each bar is a line of
carriage-return frames; the demo's log was 83 such lines of 662. ecoquant
prints its own line per step with its time, so within :func:`quiet_loads`:

* transformers' bars are off through its own switch
  (``transformers.utils.logging.disable_progress_bar``), restored after;
* compressed-tensors offers no switch for its bars (it calls ``tqdm``
  directly, and tqdm reads ``TQDM_DISABLE`` only at import), so the ``tqdm``
  name in the modules of :data:`CT_BARS` is bound to a disabled tqdm for the
  duration and restored after;
* the warnings in :data:`HARMLESS` are dropped by a logging filter on their
  logger; every other warning of those loggers still shows.

``--verbose`` (:func:`ecoquant.progress.is_verbose`) keeps everything.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

#: Modules of compressed-tensors 0.20 that draw a tqdm bar on every load, and their bar.
CT_BARS: tuple[tuple[str, str], ...] = (
    ("compressed_tensors.quantization.lifecycle.apply", "Applying quantization config"),
    ("compressed_tensors.compressors.model_compressors.model_compressor", "Compressing model / Decompressing model"),
    ("compressed_tensors.offload.dispatch", "Dispatching model"),
)

#: (logger, message pattern, why it is harmless here).
HARMLESS: tuple[tuple[str, str, str], ...] = (
    # ecoquant's head group targets `re:.*lm_head$`; transformers applies the config to the model before its
    # tied head exists as a module of its own, so the match fails once and the head is then quantized as written.
    ("compressed_tensors.utils.match", r"Could not match `re:\.\*lm_head\$`", "the head group is applied after untying"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, patterns: list[re.Pattern[str]]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


@contextmanager
def _transformers_bars_off() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _disabled(bar: Any) -> Any:
    """``bar`` with ``disable=True`` whatever the caller passes (some pass ``disable=not show_progress``)."""

    def make(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    return make


@contextmanager
def _ct_bars_off() -> Iterator[None]:
    saved: list[tuple[Any, Any]] = []
    try:
        for name, _ in CT_BARS:
            try:
                module = importlib.import_module(name)
            except ImportError:  # another compressed-tensors layout: its bars simply show
                continue
            bar = getattr(module, "tqdm", None)
            if bar is not None:
                saved.append((module, bar))
                module.tqdm = _disabled(bar)  # type: ignore[attr-defined]
        yield
    finally:
        for module, bar in saved:
            module.tqdm = bar


@contextmanager
def _harmless_dropped() -> Iterator[None]:
    by_logger: dict[str, list[re.Pattern[str]]] = {}
    for logger, pattern, _ in HARMLESS:
        by_logger.setdefault(logger, []).append(re.compile(pattern))
    filters = [(logging.getLogger(name), _DropHarmless(patterns)) for name, patterns in by_logger.items()]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


@contextmanager
def quiet_loads(enabled: bool | None = None) -> Iterator[None]:
    """Within: third-party load bars off and :data:`HARMLESS` warnings dropped (see the module docstring).

    ``enabled`` defaults to "not ``--verbose``".
    """
    from ecoquant.progress import is_verbose

    if enabled is None:
        enabled = not is_verbose()
    if not enabled:
        yield
        return
    with ExitStack() as stack:
        stack.enter_context(_transformers_bars_off())
        stack.enter_context(_ct_bars_off())
        stack.enter_context(_harmless_dropped())
        yield
