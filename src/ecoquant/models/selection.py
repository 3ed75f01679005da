"""Which modules of a model get quantized, from llmcompressor-style targets and ignore lists.

Matching is compressed-tensors' own (``is_match``), so a pattern means here
exactly what it means in an llmcompressor recipe. On top of it ecoquant is
strict: a pattern that matches no module at all is almost always a typo or the
wrong preset for the model, so it is an error that names the pattern.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from torch import nn

from ecoquant.errors import EcoquantError


@dataclass(frozen=True)
class Selection:
    """The resolved choice: module names (in model order) and the patterns that produced it."""

    modules: tuple[str, ...]
    targets: tuple[str, ...]
    ignore: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    @cached_property
    def _set(self) -> frozenset[str]:
        return frozenset(self.modules)


def select_modules(model: nn.Module, targets: Sequence[str], ignore: Sequence[str] = ()) -> Selection:
    """Linear modules matching any target and no ignore pattern.

    Works on a model built on the meta device, so selection costs no weight memory.

    Raises:
        EcoquantError: a target or ignore pattern matches no module, or nothing is selected.
    """
    from compressed_tensors.utils.match import is_match

    named = [(name, module) for name, module in model.named_modules() if name]
    for pattern in (*targets, *ignore):
        if not any(is_match(name, module, pattern) for name, module in named):
            kind = "target" if pattern in targets else "ignore"
            raise EcoquantError(
                f"{kind} pattern {pattern!r} matches no module of {type(model).__name__}; "
                "check the spelling or choose a preset made for this model (ecoquant presets)"
            )
    chosen = tuple(
        name
        for name, module in named
        if isinstance(module, nn.Linear)
        and any(is_match(name, module, t) for t in targets)
        and not any(is_match(name, module, i) for i in ignore)
    )
    if not chosen:
        raise EcoquantError(
            f"targets {list(targets)} minus ignore {list(ignore)} select no Linear module of "
            f"{type(model).__name__}; loosen the ignore list or pick another preset"
        )
    return Selection(modules=chosen, targets=tuple(targets), ignore=tuple(ignore))


def module_kind(name: str) -> str:
    """``model.language_model.layers.7.self_attn.q_proj`` -> ``model.language_model.layers.*.self_attn.q_proj``."""
    return re.sub(r"\.\d+\.", ".*.", name)
