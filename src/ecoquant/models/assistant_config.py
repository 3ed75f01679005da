"""A Gemma-4 MTP assistant's config, made buildable on the locked transformers.

A Gemma-4 assistant (``Gemma4AssistantForCausalLM``) computes no keys or values of its own: every layer reads
the target's (``num_kv_shared_layers == num_hidden_layers``; its config's ``validate_architecture`` insists on
it). transformers 5.23's ``Gemma4TextConfig.kv_sharing_modes`` was written for targets, whose shared layers
reuse an earlier layer of theirs, and raises "The set of layer types producing a cache is different than the
set of layer types using them" for a stack with no producing layer, so no assistant can be built or loaded
on 5.23 (the published ones included). transformers 5.24 answers ``"reuse"`` for every layer in that case.

:func:`buildable` gives an assistant config whose text config answers as 5.24 does, and changes nothing
where the installed transformers already does (so the shim disappears with an upgrade). transformers' auto
classes find a config's model class by the config class's *name*, so the subclass keeps the name
``Gemma4TextConfig``; it is otherwise the same class, and writes the same ``config.json``.
"""

from __future__ import annotations

from functools import cache
from typing import Any


@cache
def _all_shared_text_config_class() -> type:
    from transformers import Gemma4TextConfig as Stock

    class Gemma4TextConfig(Stock):  # the same name: see the module docstring
        """``Gemma4TextConfig`` whose ``kv_sharing_modes`` accepts an all-shared stack (transformers 5.24's answer)."""

        @property
        def kv_sharing_modes(self) -> list[str | None]:
            if self.num_kv_shared_layers == self.num_hidden_layers:
                return ["reuse"] * self.num_hidden_layers
            return Stock.kv_sharing_modes.fget(self)  # type: ignore[attr-defined]

    return Gemma4TextConfig


def buildable(config: Any) -> Any:
    """``config`` (a ``Gemma4AssistantConfig``) with a text config the installed transformers can build a model
    from; the same object when it already can."""
    text = getattr(config, "text_config", None)
    if text is None:
        return config
    try:
        text.kv_sharing_modes  # noqa: B018 (the property is the check)
        return config
    except ValueError:
        fixed = _all_shared_text_config_class()
        config.text_config = fixed.from_dict(text.to_dict())
        return config
