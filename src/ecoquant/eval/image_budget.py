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

The families beyond Gemma-4 bound an image's work by their own processor key
(Qwen ``max_pixels``, Idefics3 and Mistral-3 ``size.longest_edge``, Gemma-3
pan-and-scan on or off): :func:`family_budget_kwargs` reads it from the
family's row (:data:`ecoquant.models.families.VLM_FAMILIES`), the same
keywords vLLM takes as ``mm_processor_kwargs``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from ecoquant.errors import EcoquantError
from ecoquant.models.families import VLM_FAMILIES

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


def family_budget_kwargs(model_type: str | None, value: int | None) -> dict[str, object]:
    """The processor keywords for image budget ``value`` under the family row of ``model_type`` (its own key:
    Qwen ``max_pixels``, Idefics3 / Mistral-3 ``size.longest_edge``, Gemma-3 ``do_pan_and_scan`` 0 or 1);
    nothing for None, one clear line for a family without a row or a value the key cannot take."""
    if value is None:
        return {}
    row = VLM_FAMILIES.get(model_type or "")
    if row is None:
        raise EcoquantError(
            f"--image-budget: {model_type or 'this model'} has no image-budget row (Gemma-4: use --max-soft-tokens); "
            f"known for: {', '.join(sorted(VLM_FAMILIES))}"
        )
    if value not in (0, 1) if row.budget.switch else value < 1:
        allowed = "0 (off) or 1 (on)" if row.budget.switch else "a positive number"
        raise EcoquantError(f"--image-budget {value}: {model_type}'s {row.budget.key} takes {allowed}, e.g. {row.budget.values[-1]}")
    return row.budget.processor_kwargs(value)
