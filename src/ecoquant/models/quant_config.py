"""The ``quantization_config`` a checkpoint's ``config.json`` names, wherever it sits.

A text model carries it at the top level; a vision-language model may carry
it in its ``text_config``. Plain JSON, no transformers: the CLI reads it at
start-up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ecoquant.errors import EcoquantError


def quantization_block(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (top level, else the text config's), or None for a plain model."""
    if not isinstance(config, Mapping):
        return None
    text = config.get("text_config")
    qc = config.get("quantization_config") or (text.get("quantization_config") if isinstance(text, Mapping) else None)
    if qc and not isinstance(qc, Mapping):
        raise EcoquantError(f"config.json's quantization_config is a {type(qc).__name__}, not an object")
    return dict(qc) if qc else None


def quantized_module_names(tensor_names: Iterable[str]) -> list[str]:
    """The modules a checkpoint holds quantized: each has one ``weight_scale``, whatever its format
    (packed int32 words for W4A16, one int8 / FP8 byte per weight for W8A8)."""
    return [n.removesuffix(".weight_scale") for n in tensor_names if n.endswith(".weight_scale")]
