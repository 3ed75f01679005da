"""Weight footprint arithmetic: bytes before and after quantization, from shapes alone.

Works on a real checkpoint's safetensors headers and on a model built on the
meta device (the E4B shape twin), so the size of a checkpoint can be known
before it is written. The packed layout comes from the exporter itself
(:func:`~ecoquant.export.compressed_tensors.packed_entries`), so the estimate
and the written files cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ecoquant.export.compressed_tensors import HeadSpec, packed_entries, tensor_fates
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


Layout = list[tuple[str, str, tuple[int, ...]]]
"""``(tensor name, safetensors dtype, shape)`` of every tensor of a checkpoint."""


def planned_layout(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    selection: Selection,
    scheme: QuantScheme,
    tables: Mapping[str, QuantScheme] | None = None,
    head: HeadSpec | None = None,
) -> Layout:
    """The tensors the exporter would write for these choices, from the source's alone (nothing is read)."""
    out: Layout = []
    for name, dtype, shape in tensors:
        for fate in tensor_fates(name, selection, scheme, tables or {}, head):
            if fate.kind == "copy" or len(shape) != 2:
                out.append((name, dtype, shape))
            elif fate.scheme is None:
                out.append((f"{fate.module}.weight", dtype, shape))
            else:
                entries = packed_entries(fate.module, (shape[0], shape[1]), dtype, fate.scheme)
                out += [(n, d, s) for n, (d, s) in entries.items()]
    return out


def estimate_footprint(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    selection: Selection,
    scheme: QuantScheme,
    tables: Mapping[str, QuantScheme] | None = None,
    head: HeadSpec | None = None,
) -> Footprint:
    """Footprint from ``(tensor name, safetensors dtype, shape)`` triples."""
    source = list(tensors)
    before = sum(_nbytes(d, s) for _, d, s in source)
    after = sum(_nbytes(d, s) for _, d, s in planned_layout(source, selection, scheme, tables, head))
    count = sum(1 for n, _, s in source if n.endswith(".weight") and len(s) == 2 and n.removesuffix(".weight") in selection)
    return Footprint(before_bytes=before, after_bytes=after, quantized_modules=count)


NOT_PER_TOKEN: tuple[str, ...] = (
    # The towers and their projections into the text space run once per image or audio clip, at prefill;
    # a decoded token never reads them.
    "vision_tower.",
    "audio_tower.",
    "embed_vision.",
    "embed_audio.",
    "multi_modal_projector.",
    "visual.",  # Qwen2-VL / 2.5-VL / 3-VL: the tower, its merger inside it (models.families)
    "vision_model.",  # Idefics3 / SmolVLM: the SigLIP tower
    "connector.",  # Idefics3: the pixel-shuffle projector
)


@dataclass(frozen=True)
class TokenBytes:
    """Weight bytes read to decode one token at batch 1, by kind, and the same for the bf16 source.

    ``decoder``: every language-model weight (Linears packed or not, norms, the PLE projections);
    ``head``: the output projection, read in full (the tied embedding when the head is tied);
    ``embedding_rows``: one gathered row of each token table. The ratio to bf16 is the physical
    limit of what weight-only quantization can save in decode energy, where decode is bound by
    memory traffic.
    """

    decoder: int
    head: int
    embedding_rows: int
    bf16_total: int

    @property
    def total(self) -> int:
        return self.decoder + self.head + self.embedding_rows

    @property
    def ratio(self) -> float:
        return self.total / self.bf16_total

    def to_record(self) -> dict[str, float | int]:
        return {
            "decoder_bytes": self.decoder,
            "head_bytes": self.head,
            "embedding_row_bytes": self.embedding_rows,
            "total_bytes": self.total,
            "bf16_total_bytes": self.bf16_total,
            "ratio_to_bf16": round(self.ratio, 4),
        }


def _per_token(layout: Sequence[tuple[str, str, tuple[int, ...]]], tables: Sequence[str], head: str, tied_to: str | None) -> tuple[int, int, int]:
    decoder = head_bytes = rows = 0
    table_sizes: dict[str, int] = {}
    for name, dtype, shape in layout:
        if any(marker in name for marker in NOT_PER_TOKEN):
            continue
        size = _nbytes(dtype, shape)
        module = name.rsplit(".", 1)[0]
        if module in tables:
            table_sizes[module] = table_sizes.get(module, 0) + size
            if not name.endswith(".weight_shape"):
                rows += size // shape[0]
        elif module == head:
            head_bytes += size
        else:
            decoder += size
    if head_bytes == 0 and tied_to is not None:
        head_bytes = table_sizes.get(tied_to, 0)  # the tied head reads the whole table every token
    return decoder, head_bytes, rows


def token_bytes(
    layout: Sequence[tuple[str, str, tuple[int, ...]]],
    source: Sequence[tuple[str, str, tuple[int, ...]]],
    tables: Sequence[str],
    head: str = "lm_head",
    tied_to: str | None = None,
    source_tied_to: str | None = None,
) -> TokenBytes:
    """Bytes per decoded token of ``layout`` (tensors as stored), against the bf16 ``source``.

    ``tied_to`` is the embedding a tied head reads (None when the layout has its own head).
    """
    decoder, head_bytes, rows = _per_token(layout, tables, head, tied_to)
    bf16 = sum(_per_token(source, tables, head, source_tied_to))
    return TokenBytes(decoder, head_bytes, rows, bf16)
