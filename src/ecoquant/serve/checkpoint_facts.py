"""What a compressed-tensors checkpoint holds, read from its own ``quantization_config``.

The model card must describe what ships. The recipe (``quant_recipe.json``)
records what ecoquant was *asked* to do: its ignore patterns still list
``lm_head`` when a candidate later quantizes the head in a group of its own,
and its module list leaves that head out. ``config.json``'s
``quantization_config`` is what vLLM and compressed-tensors act on, so the
card's counts, ignore list and schemes come from it, resolved over the
model's module tree (built on the meta device: no weight memory) with
compressed-tensors' own matching. A card built this way cannot disagree with
the checkpoint it describes.

Which group a module belongs to follows compressed-tensors' precedence: a
target naming the module exactly beats a ``re:`` pattern, which beats a class
name (``Linear``). That is how a head group ``re:.*lm_head$`` takes
``lm_head`` from the ``Linear`` group.

The source model is named for a reader elsewhere: by hub id, or by folder
name for a local model, never by a path of the machine the card was made on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoquant.models.quant_config import quantization_block
from ecoquant.serve.config import checkpoint_config

#: A Hugging Face cache snapshot: ``.../models--OWNER--NAME/snapshots/REVISION``.
_HF_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


@dataclass(frozen=True)
class GroupFacts:
    """One ``config_groups`` entry and the modules it quantizes in this model."""

    name: str
    targets: tuple[str, ...]
    weights: Mapping[str, Any]
    input_activations: Mapping[str, Any] | None
    modules: tuple[str, ...]

    @property
    def scheme(self) -> dict[str, Any]:
        """The group's weights args plus ``act_bits``, the shape the card's scheme text reads."""
        acts = self.input_activations or {}
        return {**self.weights, "act_bits": acts.get("num_bits")}

    @property
    def label(self) -> str:
        """``W4A16``, ``W8A8-FP8``, ``W8A8-INT8``: as :attr:`ecoquant.quantize.scheme.QuantScheme.label` spells it."""
        bits, acts = self.weights.get("num_bits", 4), (self.input_activations or {}).get("num_bits")
        base = f"W{bits}A{acts or 16}"
        return base if acts is None else f"{base}-{'FP8' if self.weights.get('type') == 'float' else 'INT8'}"


@dataclass(frozen=True)
class CheckpointFacts:
    """The quantization a checkpoint declares, resolved to module names."""

    format: str | None
    groups: tuple[GroupFacts, ...]
    ignore: tuple[str, ...]
    kept_linears: tuple[str, ...]
    """Linear modules that ``ignore`` keeps unquantized."""

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g.modules)

    @property
    def main(self) -> GroupFacts | None:
        """The group holding the most modules (the decoder's, in every ecoquant checkpoint)."""
        return max(self.groups, key=lambda g: len(g.modules), default=None)


def _precedence(target: str) -> int:
    """compressed-tensors' order: an exact module name, then a ``re:`` pattern, then a class name."""
    if target.startswith("re:"):
        return 1
    return 0 if "." in target or target[:1].islower() else 2


def checkpoint_facts(path: Path) -> CheckpointFacts:
    """Resolve ``path``'s ``quantization_config`` over its module tree (see the module docstring)."""
    from compressed_tensors.utils.match import is_match
    from torch import nn

    from ecoquant.models.loading import load_config, meta_model

    qc = quantization_block(checkpoint_config(path)) or {}
    ignore = tuple(str(p) for p in qc.get("ignore") or [])
    raw_groups = [(str(k), v) for k, v in (qc.get("config_groups") or {}).items() if isinstance(v, Mapping)]
    named = [(n, m) for n, m in meta_model(load_config(path)).named_modules() if n]
    members: dict[str, list[str]] = {name: [] for name, _ in raw_groups}
    kept = []
    # ecoquant writes ignore as module names (hundreds on E4B): a set lookup, patterns and classes matched
    exact = {p for p in ignore if _precedence(p) == 0}
    patterns = [p for p in ignore if p not in exact]
    for name, module in named:
        if name in exact or any(is_match(name, module, p) for p in patterns):
            if isinstance(module, nn.Linear):
                kept.append(name)
            continue
        hits = [(_precedence(t), g) for g, spec in raw_groups for t in spec.get("targets") or [] if is_match(name, module, t)]
        if hits:
            members[min(hits, key=lambda h: h[0])[1]].append(name)
    groups = tuple(
        GroupFacts(name, tuple(spec.get("targets") or []), spec.get("weights") or {}, spec.get("input_activations"),
                   tuple(members[name]))
        for name, spec in raw_groups
    )
    fmt = qc.get("format")
    return CheckpointFacts(str(fmt) if fmt else None, groups, ignore, tuple(kept))


def public_source(source: Mapping[str, Any] | str | None) -> str:
    """The source model as a reader elsewhere can find it: a hub id, else the folder's name.

    ``source`` is ``quant_recipe.json``'s ``source`` block (``model`` as given on the
    command line, ``path`` where it was read) or the string given. A model fetched from
    the hub into the local cache is named by its hub id even when given as a path.
    """
    from ecoquant.models.loading import is_hub_id

    given = source.get("model") if isinstance(source, Mapping) else source
    read = source.get("path") if isinstance(source, Mapping) else None
    if not given and not read:
        return "the base model"
    for text in (given, read):
        if text and is_hub_id(str(text)) and not Path(str(text)).expanduser().exists():
            return str(text)
        snapshot = _HF_SNAPSHOT.search(str(text or ""))
        if snapshot:
            return f"{snapshot['owner']}/{snapshot['name']}"
    return Path(str(given or read)).expanduser().resolve().name
