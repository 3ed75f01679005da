"""What a model folder holds: a quantized checkpoint's modules and footprint, or a plan for one.

``ecoquant inspect`` works on three kinds of folder: a compressed-tensors
checkpoint (reports what is packed, its size, and its recipe), an ordinary
model (reports what a preset would quantize and the size after), and a
config-only folder such as the E4B shape twin (the same, from meta shapes).
A Gemma-4 MTP assistant's folder (``model_type: gemma4_assistant``) reports
the assistant's cost per drafted token instead (:func:`inspect_assistant`);
given with a target (``--assistant``), both, and what a drafted token reads
next to a target decode step.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoquant.energy.costs import CostTerms, checkpoint_costs, plan_costs
from ecoquant.energy.speculative import assistant_costs, is_assistant_folder
from ecoquant.errors import EcoquantError
from ecoquant.models.loading import resolve_model, tensor_infos
from ecoquant.models.quant_config import quantization_block, quantized_module_names
from ecoquant.models.selection import module_kind


@dataclass(frozen=True)
class Inspection:
    """The facts ``inspect`` reports."""

    path: Path
    quantized: bool
    #: module kind (the name with layer numbers replaced by ``*``) -> count
    module_kinds: dict[str, int]
    module_count: int
    #: bytes of weights before and after quantization (before is None when unknown)
    before_bytes: int | None
    after_bytes: int
    scheme: dict[str, Any] | None
    recipe: dict[str, Any] | None
    preset: str | None = None
    #: weight bytes read per decoded token (see :class:`ecoquant.export.footprint.TokenBytes`)
    bytes_per_token: dict[str, Any] | None = None
    #: FLOPs per prompt token, vision FLOPs per image at each budget, bytes per decode step
    #: (see :meth:`ecoquant.energy.costs.CostTerms.to_record`); None for a family ecoquant cannot model
    cost_terms: dict[str, Any] | None = None
    #: the MTP assistant given with the model (:func:`inspect_assistant`'s record), or None
    assistant: dict[str, Any] | None = None


def inspect_assistant(assistant: str | Path, target_step_bytes: float | None = None) -> dict[str, Any]:
    """A Gemma-4 MTP assistant's cost per drafted token
    (:meth:`~ecoquant.energy.speculative.AssistantTerms.to_record`) with its folder; with
    ``target_step_bytes`` (a target's weight bytes per decode step) also the fraction of them a drafted
    token reads (batch 1, KV aside)."""
    path = resolve_model(assistant)
    if not is_assistant_folder(path):
        raise EcoquantError(f"{path} is not a Gemma-4 assistant (config.json's model_type is not gemma4_assistant)")
    terms = assistant_costs(path)
    record: dict[str, Any] = {"path": str(path), **terms.to_record()}
    if target_step_bytes:
        record["bytes_vs_target_step"] = (terms.weight_bytes + terms.input_bytes) / target_step_bytes
    return record


def inspect_checkpoint(
    model: str | Path, preset: str = "auto", scheme: Any = None, embeddings: str | None = None, lm_head: str | None = None
) -> Inspection:
    """Describe a quantized checkpoint, or what quantizing a plain model with ``preset`` would give.

    A checkpoint's bytes per token come from its recipe (written when the source's layout was known).
    """
    path = resolve_model(model)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "gemma4_assistant":
        raise EcoquantError(f"{path} is a Gemma-4 MTP assistant; inspect it alone or pass it with --assistant")
    qconfig = quantization_block(config)
    if qconfig is not None:
        infos = list(tensor_infos(path))
        modules = quantized_module_names(t.name for t in infos)
        recipe_file = path / "quant_recipe.json"
        recipe = json.loads(recipe_file.read_text()) if recipe_file.is_file() else None
        before = recipe["footprint"]["weights_before_bytes"] if recipe else None
        weights = next(iter(qconfig.get("config_groups", {}).values()), {}).get("weights")
        return Inspection(
            path=path,
            quantized=True,
            module_kinds=dict(Counter(module_kind(m) for m in modules)),
            module_count=len(modules),
            before_bytes=before,
            after_bytes=sum(t.nbytes for t in infos),
            scheme=weights,
            recipe=recipe,
            bytes_per_token=None if recipe is None else recipe.get("bytes_per_token"),
            cost_terms=_cost_record(lambda: checkpoint_costs(path)),
        )

    from ecoquant.plan import plan_footprint, plan_model, plan_tables, plan_token_bytes
    from ecoquant.quantize.scheme import QuantScheme

    plan = plan_model(path, preset)
    scheme = scheme or QuantScheme()
    tables = plan_tables(plan, scheme, embeddings or plan.preset.embeddings, lm_head or plan.preset.lm_head)
    fp = plan_footprint(plan, scheme, tables)
    return Inspection(
        path=path,
        quantized=False,
        module_kinds=dict(Counter(module_kind(m) for m in plan.selection.modules)),
        module_count=len(plan.selection),
        before_bytes=fp.before_bytes,
        after_bytes=fp.after_bytes,
        scheme=scheme.to_dict(),
        recipe=None,
        preset=plan.preset.name,
        bytes_per_token=plan_token_bytes(plan, scheme, tables).to_record(),
        cost_terms=_cost_record(lambda: plan_costs(plan, scheme, tables)),
    )


def _cost_record(compute: Callable[[], CostTerms]) -> dict[str, Any] | None:
    """The cost terms' record, or None for a family the energy model does not know (inspect still works)."""
    try:
        return compute().to_record()
    except EcoquantError:
        return None
