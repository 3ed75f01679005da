"""The image-token budget: how many soft tokens each image may become, a serving option with an energy cost.

Every image is prefill: Gemma-4's image processor resizes an image to at
most ``max_soft_tokens x k²`` patches (``k x k`` pooled into one soft token;
k = 3 on E4B), and the budget is one of a few values the vision tower was
trained for. A budget
of 70 costs a quarter of the default 280's image tokens; whether the answers
survive is what an evaluation measures. vLLM reads it from
``mm_processor_kwargs`` (``serve-config --max-soft-tokens``), the
transformers backend and ecoquant's own server pass it to the processor.

Which values a processor allows is per-model knowledge, kept as data:
:data:`SOFT_TOKEN_BUDGETS`, keyed by the ``image_processor_type`` in the
checkpoint's ``processor_config.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ecoquant.errors import EcoquantError

SOFT_TOKEN_BUDGETS: Mapping[str, tuple[int, ...]] = MappingProxyType(
    {
        # Gemma-4 (transformers' _SUPPORTED_SOFT_TOKENS): the budgets its vision tower was trained with;
        # the processor refuses any other. Default 280.
        "Gemma4ImageProcessor": (70, 140, 280, 560, 1120),
        "Gemma4ImageProcessorPil": (70, 140, 280, 560, 1120),
    }
)


def image_processor_type(model: Path) -> str | None:
    """``image_processor_type`` of a local checkpoint (``processor_config.json`` or ``preprocessor_config.json``)."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # not JSON, or not UTF-8
            raise EcoquantError(f"{path} is not valid JSON; the file is damaged") from None
        if not isinstance(data, dict):
            raise EcoquantError(f"{path} is not a JSON object; the file is damaged")
        nested = data.get("image_processor")
        kind = (nested.get("image_processor_type") if isinstance(nested, dict) else None) or data.get("image_processor_type")
        if kind:
            if not isinstance(kind, str):
                raise EcoquantError(f"{path}: image_processor_type is {kind!r}, not a class name")
            return kind
    return None


def check_max_soft_tokens(model: Path | str, budget: int | None) -> int | None:
    """``budget`` if the checkpoint's image processor allows it; one clear line otherwise (None passes)."""
    if budget is None:
        return None
    kind = image_processor_type(Path(model))
    allowed = SOFT_TOKEN_BUDGETS.get(kind or "")
    if allowed is None:
        raise EcoquantError(
            f"--max-soft-tokens: {model}'s image processor ({kind or 'none found'}) takes no image-token budget; "
            f"known for: {', '.join(sorted(SOFT_TOKEN_BUDGETS))}"
        )
    if budget not in allowed:
        raise EcoquantError(
            f"--max-soft-tokens {budget} is not a budget {kind} allows; choose one of {', '.join(map(str, allowed))}"
        )
    return budget


def processor_kwargs(budget: int | None) -> dict[str, int]:
    """What the processor call takes for the budget (nothing for the checkpoint's own default)."""
    return {} if budget is None else {"max_soft_tokens": budget}
