"""Plans: what quantizing a model would select, write and cost, from its config and headers alone.

Everything here works before any weight is read: the module selection a
preset resolves to (on a meta-device model), the token tables and head
(:mod:`ecoquant.models.tables`), the checks that refuse what vLLM cannot
load, the footprint and the bytes read per decoded token. ``api.quantize``
and ``inspect`` both use it (neither imports the other).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.export.compressed_tensors import HeadSpec
from ecoquant.export.footprint import Footprint, TokenBytes, estimate_footprint, planned_layout, token_bytes
from ecoquant.export.vllm_compat import check_fused_siblings, marlin_warnings
from ecoquant.models.components import ComponentSpec
from ecoquant.models.layout import checkpoint_layout, layout_for_names, tree_infos
from ecoquant.models.loading import load_config, meta_model, tensor_infos
from ecoquant.models.presets import Preset, get_preset
from ecoquant.models.quant_config import quantization_block
from ecoquant.models.selection import Selection, select_modules
from ecoquant.models.tables import TOKEN_TABLES, ties_head, token_tables
from ecoquant.quantize.primitives import check_group_size
from ecoquant.quantize.scheme import QuantScheme


@dataclass(frozen=True)
class ModelPlan:
    """A model folder and the modules a preset (plus overrides) selects in it."""

    path: Path
    config: Any
    preset: Preset
    selection: Selection
    #: Linear modules that stay unquantized: the checkpoint's ``quantization_config.ignore``.
    ignore_linears: tuple[str, ...]
    model: nn.Module = field(repr=False)


def require_unquantized(path: Path) -> None:
    """Refuse a source that is already quantized: quantizing packed tensors again would only copy them.

    ``config.json`` naming a ``quantization_config`` is the sign (top level or a VLM's text config).
    """
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # resolve_model / load_config report a missing or broken config with their own line
    qc = quantization_block(config)
    if qc:
        what = f"{qc.get('quant_method', 'quantized')}, format {qc.get('format', '?')}"
        raise EcoquantError(
            f"{path} is already quantized ({what}); quantize the bf16 model it was made from "
            "(quant_recipe.json names it under source) instead"
        )


def plan_model(
    path: Path, preset: str = "auto", targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> ModelPlan:
    """Resolve a preset and overrides against the model's module tree (built on meta: no weights).

    ``targets`` replaces the preset's targets when given; ``ignore`` extends its ignore list
    (e.g. ``re:.*layers\\.0\\..*`` keeps the first layer in bf16).
    """
    config = load_config(path)
    chosen = get_preset(preset, getattr(config, "model_type", None))
    if any(path.glob("*.safetensors")):
        checkpoint_layout(path)  # names that match neither the tree nor transformers' mapping: one error, before any work
    model = meta_model(config)
    selection = select_modules(model, targets or chosen.targets, (*chosen.ignore, *ignore))
    ignore_linears = tuple(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in selection
    )
    return ModelPlan(path, config, chosen, selection, ignore_linears, model)


def source_layout(plan: ModelPlan) -> list[tuple[str, str, tuple[int, ...]]]:
    """The source's tensors under their module-tree names: from the checkpoint's headers, or from meta
    shapes for a config-only folder."""
    if any(plan.path.glob("*.safetensors")):
        infos = list(tensor_infos(plan.path))
        layout = layout_for_names(plan.model, (t.name for t in infos), where=str(plan.path))
        return [(t.name, t.dtype, t.shape) for t in tree_infos(infos, layout)]
    return [
        (name, "BF16" if p.dtype.is_floating_point else "I64", tuple(p.shape)) for name, p in plan.model.named_parameters()
    ]


TableBits = Literal["bf16", "int4", "int8"]
TABLE_BITS: dict[str, int | None] = {"bf16": None, "int4": 4, "int8": 8}


@dataclass(frozen=True)
class TablePlan:
    """What happens to the token tables: which are quantized how, and the head written untied (if any)."""

    tables: dict[str, QuantScheme]
    head: HeadSpec | None
    names: tuple[str, ...]
    head_module: str | None
    tied_to: str | None
    """The embedding the *output* head reads when it stays tied (None once untied or if never tied)."""
    source_tied_to: str | None


def table_scheme(bits: int, scheme: QuantScheme) -> QuantScheme:
    """Token tables and the head: symmetric int (what vLLM's embedding scheme and Marlin take), the main group size."""
    observer = scheme.observer if scheme.observer in ("minmax", "grid") else "minmax"
    return QuantScheme(num_bits=bits, group_size=scheme.group_size, symmetric=True, observer=observer)


def plan_tables(plan: ModelPlan, scheme: QuantScheme, embeddings: TableBits, lm_head: TableBits) -> TablePlan:
    """Resolve ``--embeddings`` / ``--lm-head`` against the family's tables (:mod:`ecoquant.models.tables`).

    A quantized embedding cannot stay tied to the head (vLLM ties by sharing
    ``embed_tokens.weight``, which a packed table no longer has), so the head
    is then written untied: bf16, or as ``--lm-head`` says.
    """
    for what, value in (("--embeddings", embeddings), ("--lm-head", lm_head)):
        if value not in TABLE_BITS:
            raise EcoquantError(f"{what} takes bf16, int4 or int8, not {value!r}")
    cfg = json.loads((plan.path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if embeddings == "bf16" and lm_head == "bf16":
        known = TOKEN_TABLES.get(model_type or "")
        tied = None if known is None or not ties_head(cfg) else known.tied_to
        names = () if known is None else known.embeddings
        return TablePlan({}, None, names, None if known is None else known.head, tied, tied)
    tt = token_tables(model_type)
    has_head = any(name == f"{tt.head}.weight" for name, _, _ in source_layout(plan))
    tied = ties_head(cfg) and not has_head
    bits_e, bits_h = TABLE_BITS[embeddings], TABLE_BITS[lm_head]
    tables = {} if bits_e is None else {name: table_scheme(bits_e, scheme) for name in tt.embeddings}
    widths = {name.removesuffix(".weight"): shape[-1] for name, _, shape in source_layout(plan) if name.endswith(".weight")}
    for name, sch in tables.items():
        check_group_size(name, widths[name], sch)
    head_scheme = None if bits_h is None else table_scheme(bits_h, scheme)
    if head_scheme is not None:
        check_group_size(tt.head, widths.get(tt.head, widths[tt.tied_to]), head_scheme)
    head = None
    if tied and (tables or head_scheme is not None):
        head = HeadSpec(tt.head, tt.tied_to, head_scheme)
    elif head_scheme is not None:
        head = HeadSpec(tt.head, tt.head, head_scheme)  # an untied head, quantized in place
    return TablePlan(tables, head, tt.embeddings, tt.head, None, tt.tied_to if tied else None)


def plan_footprint(
    plan: ModelPlan, scheme: QuantScheme, tables: TablePlan | None = None
) -> Footprint:
    """Bytes before/after, from the checkpoint's headers, or from meta shapes for a config-only folder."""
    t = tables
    return estimate_footprint(source_layout(plan), plan.selection, scheme, None if t is None else t.tables, None if t is None else t.head)


def plan_token_bytes(plan: ModelPlan, scheme: QuantScheme, tables: TablePlan) -> TokenBytes:
    """Weight bytes read per decoded token (batch 1) after quantizing, against the bf16 source."""
    source = source_layout(plan)
    after = planned_layout(source, plan.selection, scheme, tables.tables, tables.head)
    return token_bytes(
        after, source, tables.names, tables.head_module or "lm_head", tables.tied_to, tables.source_tied_to
    )


def check_plan(plan: ModelPlan, scheme: QuantScheme) -> list[str]:
    """Refuse, before any work, what cannot be written or loaded; return what vLLM would run slowly.

    Errors: a group size that does not divide a selected layer's input, a selection
    that splits projections vLLM fuses. Warnings: layers Marlin cannot run.
    """
    linears = {n: (m.in_features, m.out_features) for n, m in plan.model.named_modules() if isinstance(m, nn.Linear)}
    for name in plan.selection.modules:
        check_group_size(name, linears[name][0], scheme)
    check_fused_siblings(plan.selection, linears)
    return marlin_warnings(plan.selection, linears, scheme)


def check_components(plan: ModelPlan, components: tuple[ComponentSpec, ...]) -> None:
    """Refuse a component scheme whose group size does not divide one of its Linears' inputs."""
    linears = {n: m.in_features for n, m in plan.model.named_modules() if isinstance(m, nn.Linear)}
    for component in components:
        for name in component.modules:
            check_group_size(name, linears[name], component.scheme)
