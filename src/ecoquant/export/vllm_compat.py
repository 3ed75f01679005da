"""Will vLLM load and run what ecoquant is about to write? Checked before any work is done.

Two rules from vLLM's loader and kernels, kept here as data:

* vLLM fuses some sibling projections into one Linear (``q/k/v`` into
  ``qkv_proj``, ``gate/up`` into ``gate_up_proj``) and gives the fused layer a
  single quantization scheme, so siblings must be all quantized or all bf16.
  A KV-shared Gemma-4 layer has only ``q_proj``; a group with one present
  member is consistent by definition.
* Marlin (the fast W4A16 kernel on NVIDIA GPUs) takes group sizes 32, 64, 128
  or per-channel, and needs ``in_features % 128 == 0`` and
  ``out_features % 64 == 0``. A layer that misses these still loads in vLLM
  but falls back to a slower kernel, which costs energy; that is a warning,
  not an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from ecoquant.errors import EcoquantError
from ecoquant.models.selection import Selection, module_kind
from ecoquant.quantize.scheme import MARLIN_GROUP_SIZES, QuantScheme

#: Sibling projections vLLM fuses into one layer, by the last component of the module name.
FUSED_SIBLINGS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # -> qkv_proj
    frozenset({"gate_proj", "up_proj"}),  # -> gate_up_proj
)

MARLIN_IN_MULTIPLE = 128
MARLIN_OUT_MULTIPLE = 64


def check_fused_siblings(selection: Selection, linears: Mapping[str, tuple[int, int]]) -> None:
    """Refuse a selection that splits a group vLLM fuses (e.g. ``q_proj`` quantized, ``k_proj`` not).

    ``linears`` maps every Linear module name of the model to ``(in_features, out_features)``.
    """
    groups: dict[tuple[str, frozenset[str]], dict[str, bool]] = defaultdict(dict)
    for name in linears:
        parent, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings:
                groups[(parent, siblings)][leaf] = name in selection
    for (parent, _), members in groups.items():
        if len(set(members.values())) > 1:
            quantized = sorted(k for k, v in members.items() if v)
            kept = sorted(k for k, v in members.items() if not v)
            raise EcoquantError(
                f"{parent}: {', '.join(quantized)} quantized but {', '.join(kept)} not; vLLM fuses them into one "
                "layer with one scheme, so quantize or ignore them together"
            )


def marlin_warnings(selection: Selection, linears: Mapping[str, tuple[int, int]], scheme: QuantScheme) -> list[str]:
    """Reasons some selected layers would not run on Marlin (empty when all would)."""
    found: list[str] = []
    if scheme.act_bits is not None:
        return found  # W8A8 runs on vLLM's 8-bit scaled-matmul kernels, not Marlin
    if scheme.group_size not in MARLIN_GROUP_SIZES:
        found.append(f"group size {scheme.group_size} is not one of Marlin's (32, 64, 128, per channel)")
    if scheme.num_bits not in (4, 8):
        found.append(f"{scheme.num_bits}-bit weights have no Marlin kernel (4 or 8)")
    odd = [
        f"{module_kind(name)} (in {i}, out {o})"
        for name in selection.modules
        for i, o in [linears[name]]
        if i % MARLIN_IN_MULTIPLE or o % MARLIN_OUT_MULTIPLE
    ]
    for kind in sorted(set(odd)):
        found.append(f"{kind}: Marlin needs in % 128 == 0 and out % 64 == 0; vLLM will use a slower kernel")
    return found
