"""Weight footprint arithmetic: bytes before and after quantization, from shapes alone.

Works on a real checkpoint's safetensors headers and on a model built on the
meta device (the E4B shape twin), so the size of a checkpoint can be known
before it is written. The packed layout comes from the exporter itself
(:func:`~ecoquant.export.compressed_tensors.packed_entries`), so the estimate
and the written files cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ecoquant.export.compressed_tensors import packed_entries
from ecoquant.export.safetensors_stream import DTYPES
from ecoquant.models.selection import Selection
from ecoquant.quantize.scheme import QuantScheme

GIB = 1024**3


def human_bytes(n: int) -> str:
    """``1.23 GiB``, ``45.6 MiB`` or ``789 KiB``: readable for the E4B and for the tiny fixture."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.0f} KiB"


@dataclass(frozen=True)
class Footprint:
    """Weight bytes of a model before and after quantizing a selection."""

    before_bytes: int
    after_bytes: int
    quantized_modules: int

    @property
    def saved_fraction(self) -> float:
        """Share of the bytes that quantization removes."""
        return 1.0 - self.after_bytes / self.before_bytes

    def describe(self) -> str:
        """``16.00 GiB -> 9.50 GiB (-41%)``."""
        return f"{human_bytes(self.before_bytes)} -> {human_bytes(self.after_bytes)} (-{100 * self.saved_fraction:.0f}%)"


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def estimate_footprint(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], selection: Selection, scheme: QuantScheme
) -> Footprint:
    """Footprint from ``(tensor name, safetensors dtype, shape)`` triples."""
    before = after = count = 0
    for name, dtype, shape in tensors:
        size = _nbytes(dtype, shape)
        before += size
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in selection and len(shape) == 2:
            count += 1
            after += sum(_nbytes(d, s) for d, s in packed_entries(module, (shape[0], shape[1]), dtype, scheme).values())
        else:
            after += size
    return Footprint(before_bytes=before, after_bytes=after, quantized_modules=count)
