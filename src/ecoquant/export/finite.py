"""NaN and inf in weights: counted as each tensor is read, refused unless allowed.

One NaN in a ``down_proj`` used to ship in a checkpoint that "wrote ... 37
modules" without a word; the evaluation gate would reject it only after hours
of GPU time, if it noticed at all. The count costs one comparison per value
already in memory, in bounded slices (E4B's 5.6 GB embedding is never
doubled as a boolean mask).

Refusing is the default. ``ecoquant quantize --allow-nonfinite`` runs the
work inside :func:`allow_nonfinite`, which records each such tensor instead
(the recipe keeps the record). The permission is a context variable rather
than an argument because tensors are read deep inside calibration and export;
it is scoped to one ``with`` block, never set globally.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ecoquant.errors import EcoquantError

_SLICE = 1 << 24  # elements compared at once

#: Tensors (by the last part of their name) where +/-inf is a meaning, not damage.
#: NaN is refused in them like anywhere else.
INF_MEANS_UNBOUNDED: dict[str, str] = {
    # Gemma-3n/Gemma-4 ClippableLinear (transformers modeling_gemma4.py): clamp bounds of a
    # Linear's input and output, initialised to -inf/+inf, i.e. "no clipping".
    "input_min": "Gemma-4 ClippableLinear clamp bound",
    "input_max": "Gemma-4 ClippableLinear clamp bound",
    "output_min": "Gemma-4 ClippableLinear clamp bound",
    "output_max": "Gemma-4 ClippableLinear clamp bound",
}


@dataclass(frozen=True)
class NonFinite:
    """Counts of NaN and of +/-inf values in a tensor."""

    nan: int = 0
    inf: int = 0

    def __add__(self, other: NonFinite) -> NonFinite:
        return NonFinite(self.nan + other.nan, self.inf + other.inf)

    def __bool__(self) -> bool:
        return bool(self.nan or self.inf)


class NonFiniteWeightsError(EcoquantError):
    """A weight tensor holds NaN or inf, and the run did not allow it."""


_ALLOWED: ContextVar[dict[str, dict[str, int]] | None] = ContextVar("ecoquant_nonfinite_allowed", default=None)


def count_nonfinite(t: torch.Tensor) -> NonFinite:
    """NaN and inf counts of a floating-point tensor (zero for other dtypes)."""
    if not t.is_floating_point() or t.numel() == 0:
        return NonFinite()
    flat = t.reshape(-1)

    def piece(i: int) -> torch.Tensor:
        # torch has no isfinite/isnan for the float8 dtypes (a W8A8-FP8 checkpoint's weights): widen the slice.
        part = flat[i : i + _SLICE]
        return part.float() if part.element_size() == 1 else part

    bad = 0
    for i in range(0, flat.numel(), _SLICE):
        bad += int((~torch.isfinite(piece(i))).sum())
    if not bad:
        return NonFinite()
    nan = sum(int(torch.isnan(piece(i)).sum()) for i in range(0, flat.numel(), _SLICE))
    return NonFinite(nan, bad - nan)


def report_nonfinite(name: str, counts: NonFinite) -> None:
    """Refuse tensor ``name`` with its counts, or record them where :func:`allow_nonfinite` is in force."""
    if counts.inf and not counts.nan and name.rsplit(".", 1)[-1] in INF_MEANS_UNBOUNDED:
        return
    if not counts:
        return
    found = _ALLOWED.get()
    if found is None:
        raise NonFiniteWeightsError(
            f"tensor {name} holds {counts.nan} NaN and {counts.inf} inf values; the source weights are damaged "
            "(pass --allow-nonfinite to quantize them anyway, recorded in quant_recipe.json)"
        )
    found[name] = {"nan": counts.nan, "inf": counts.inf}


def check_finite(name: str, t: torch.Tensor) -> None:
    """:func:`report_nonfinite` on the counts of ``t``."""
    report_nonfinite(name, count_nonfinite(t))


@contextmanager
def allow_nonfinite() -> Iterator[dict[str, dict[str, int]]]:
    """Within the block, tensors with NaN or inf are recorded (name -> ``{"nan", "inf"}``) instead of refused."""
    found: dict[str, dict[str, int]] = {}
    token = _ALLOWED.set(found)
    try:
        yield found
    finally:
        _ALLOWED.reset(token)
