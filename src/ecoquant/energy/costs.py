"""What one request costs a checkpoint, in FLOPs and bytes, from its config and headers (no weights read).

Three kinds of work, each with its own bound on a GPU (see :mod:`ecoquant.energy.roofline`):

* **Prefill, per prompt token** (compute-bound): every decoder Linear once,
  ``2 x in x out`` FLOPs; plus attention's score and value matmuls,
  ``4 x (query heads x head dim) x context`` per layer, where a sliding-window
  layer sees at most its window. The output head runs once per request at
  prefill (a server computes logits for the last prompt position only), and
  once per decoded token.
* **The vision encoder, per image** (compute-bound): its Linears and its
  patch-embedding convolution (``2 x`` its weight's elements: one output per
  patch) once per patch, its (bidirectional) attention over all patches of the
  image, and the projection into the text space once per soft token (its
  Linears, and any Parameter the family's row names as a matmul weight).
  Modules the family's forward never reads (its row's ``unused``) are not
  priced. Gemma-4 pools ``k x k``
  patches into one soft token, so an image budget of ``B`` soft tokens is at
  most ``B x k²`` patches; the budget decides the vision cost.
* **Decode, per step** (memory-bound at small batch): the weight bytes read to
  decode one token (:func:`ecoquant.export.footprint.token_bytes`: every
  decoder weight, the whole head, one row per token table) plus the KV cache
  of the context.

Which modules are which is per-family knowledge: :data:`FAMILIES`, keyed by
``config.json``'s ``model_type``. The module tree itself comes from the model
built on the meta device, so KV-shared Gemma-4 layers (no ``k_proj`` /
``v_proj``) and the tied head (a Linear for FLOPs even when its weight is the
embedding's) are counted as they are, not as a formula says they should be.

Each Linear's compute precision is read from the checkpoint's compressed-tensors
``quantization_config``: a group with 8-bit weights *and* ``input_activations``
of type float runs at the FP8 tensor rate, of type int at the INT8 rate;
everything else (bf16 weights, weight-only int4/int8 dequantized into 16-bit
matmuls) at the bf16 rate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from torch import nn

from ecoquant.energy.gpus import Precision
from ecoquant.energy.vision_costs import REFERENCE_IMAGE, VisionCosts, tower_flops, vlm_vision_costs
from ecoquant.errors import EcoquantError
from ecoquant.eval.image_budget import SOFT_TOKEN_BUDGETS
from ecoquant.export.footprint import Layout, TokenBytes, token_bytes
from ecoquant.models.families import VLM_FAMILIES, VlmFamily
from ecoquant.models.quant_config import quantization_block
from ecoquant.models.tables import TOKEN_TABLES, ties_head

KV_BYTES_PER_VALUE = 2
"""The KV cache is kept in the model's 16-bit dtype (vLLM's ``kv_cache_dtype=auto``)."""


@dataclass(frozen=True)
class Family:
    """Where a family's parts sit in the module tree (names as ``named_modules`` gives them).

    Attributes:
        decoder: prefix of the text decoder's modules (its Linears run once per prompt token).
        layers: the decoder layers' ``ModuleList``.
        query: a decoder layer's query projection (its output width = heads x head dim).
        key: a decoder layer's key projection (absent on a KV-shared layer).
        ple: name fragments of the Per-Layer-Embedding Linears, reported as their own component.
        vision: prefix of the vision tower (its Linears run once per patch).
        vision_layers: the vision encoder layers (their attention spans every patch of an image).
        vision_query: a vision layer's query projection.
        vision_projection: prefix of the projection into text space (runs once per soft token).
        pooling: the vision config's ``k`` (``k x k`` patches make one soft token).
        budgets: the image-token budgets the processor accepts (see :mod:`ecoquant.eval.image_budget`).
        default_budget: the vision config's key for the default budget.
        not_modelled: prefixes of modules no request in the suites reaches (audio).
        vlm: the :mod:`ecoquant.models.families` row, for the families whose images are encoded by its geometry.
        not_decoded: prefixes of modules a decode step does not read (the towers: they run at prefill only).
    """

    decoder: str
    layers: str
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    ple: tuple[str, ...] = ()
    vision: str | None = None
    vision_layers: str | None = None
    vision_query: str | None = None
    vision_projection: str | None = None
    pooling: str | None = None
    budgets: tuple[int, ...] = ()
    default_budget: str | None = None
    not_modelled: tuple[str, ...] = ()
    vlm: VlmFamily | None = None
    not_decoded: tuple[str, ...] = ()


def _vlm_family(row: VlmFamily) -> Family:
    """An energy row from a vision-language family's row (the projector runs once per soft token)."""
    return Family(decoder=row.decoder, layers=row.layers, vision=row.vision[0], vision_layers=row.vision_layers,
                  vision_query=row.vision_query, budgets=row.budget.values, vlm=row, not_decoded=row.towers)



FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        # Gemma-4 E (E2B/E4B): the wrapper's text stack, PLE Linears (gate and projection per layer, one
        # model-level projection), a 16-layer ViT whose Linears are wrapped in clippable Linears (``.linear``),
        # average pooling of k x k patches (k = 3 on E4B), the budgets its processor was trained with.
        "gemma4": Family(
            decoder="model.language_model.",
            layers="model.language_model.layers",
            ple=("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection"),
            vision="model.vision_tower.",
            vision_layers="model.vision_tower.encoder.layers",
            vision_query="self_attn.q_proj.linear",
            vision_projection="model.embed_vision.",
            pooling="pooling_kernel_size",
            budgets=SOFT_TOKEN_BUDGETS["Gemma4ImageProcessor"],
            default_budget="default_output_length",
            # The audio tower and its projection: no built-in request carries audio.
            not_modelled=("model.audio_tower.", "model.embed_audio."),
        ),
        # Text-only decoders (the Gemma-3 270M fixture, Llama/Qwen-style checkpoints).
        "gemma3_text": Family(decoder="model.", layers="model.layers"),
        "llama": Family(decoder="model.", layers="model.layers"),
        "qwen2": Family(decoder="model.", layers="model.layers"),
        # The vision-language families of ecoquant.models.families, one row each there.
        **{model_type: _vlm_family(row) for model_type, row in VLM_FAMILIES.items()},
    }
)


def family(model_type: str | None) -> Family:
    """The family's row, or one line naming the known ones."""
    try:
        return FAMILIES[model_type or ""]
    except KeyError:
        raise EcoquantError(
            f"ecoquant cannot model the energy of model type {model_type!r} (known: {', '.join(FAMILIES)})"
        ) from None


# ------------------------------------------------------------------ precision


def _group_precision(group: Mapping[str, Any]) -> Precision:
    """A compressed-tensors config group's matmul precision (the contract in the module docstring)."""
    weights = group.get("weights") or {}
    acts = group.get("input_activations") or {}
    if weights.get("num_bits") == 8 and acts:
        return "fp8" if acts.get("type") == "float" else "int8"
    return "bf16"


def linear_precisions(model: nn.Module, qconfig: Mapping[str, Any] | None) -> dict[str, Precision]:
    """Linear module name -> the precision its matmul runs in, from ``quantization_config``.

    A group naming modules (by name or regex) wins over one naming a class (``Linear``), as in
    compressed-tensors; an ignored module stays bf16.
    """
    from compressed_tensors.utils.match import is_match

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not qconfig:
        return {n: "bf16" for n, _ in linears}
    ignore = list(qconfig.get("ignore") or ())
    groups = list((qconfig.get("config_groups") or {}).values())
    by_name = [g for g in groups if any(t != "Linear" for t in g.get("targets", ()))]
    by_class = [g for g in groups if g not in by_name]
    out: dict[str, Precision] = {}
    for name, module in linears:
        group = next((g for g in by_name if is_match(name, module, g["targets"])), None)
        if group is None and not is_match(name, module, ignore):
            group = next((g for g in by_class if is_match(name, module, g["targets"])), None)
        out[name] = "bf16" if group is None else _group_precision(group)
    return out


# ------------------------------------------------------------------ terms


@dataclass(frozen=True)
class AttentionLayer:
    """One attention layer's score+value cost: ``4 x width x context`` FLOPs per query token.

    ``width`` is query heads x head dim; ``window`` the sliding window (None: full context);
    ``kv_width`` the key (= value) width whose cache the layer reads at decode.
    """

    width: int
    window: int | None
    kv_width: int

    def flops_per_token(self, context: float) -> float:
        return 4.0 * self.width * (context if self.window is None else min(context, self.window))

    def prompt_flops(self, prompt: int) -> float:
        """Causal attention over a whole prompt: ``sum_{i=1..P} 4 x width x min(i, window)``."""
        w = prompt if self.window is None else min(prompt, self.window)
        inside = w * (w + 1) / 2  # positions 1..w see themselves and everything before
        return 4.0 * self.width * (inside + (prompt - w) * w)

    def kv_bytes(self, context: float) -> float:
        """Cache bytes read to attend once over ``context`` tokens (keys and values)."""
        seen = context if self.window is None else min(context, self.window)
        return 2.0 * self.kv_width * KV_BYTES_PER_VALUE * seen


@dataclass(frozen=True)
class CostTerms:
    """A checkpoint's cost terms (see the module docstring); every FLOP count is per token or per image.

    Attributes:
        linear_flops: component -> precision -> Linear FLOPs per prompt token (``decoder``, ``ple``).
        head_flops: precision -> the output head's FLOPs per position it scores.
        attention: the decoder's attention layers.
        vision: the vision encoder, or None for a text-only model.
        decode: weight bytes read per decoded token (:class:`~ecoquant.export.footprint.TokenBytes`).
    """

    model_type: str
    linear_flops: Mapping[str, Mapping[Precision, float]]
    head_flops: Mapping[Precision, float]
    attention: tuple[AttentionLayer, ...]
    vision: VisionCosts | None
    decode: TokenBytes

    @property
    def decoder_flops_per_token(self) -> float:
        """Linear FLOPs per prompt token, every component and precision (no attention, no head)."""
        return sum(sum(by_p.values()) for by_p in self.linear_flops.values())

    def prefill_flops(self, prompt: int) -> dict[Precision, float]:
        """FLOPs of prefilling a ``prompt``-token prompt, by precision: Linears, attention, one head row."""
        out: dict[Precision, float] = {}
        for by_p in self.linear_flops.values():
            for p, f in by_p.items():
                out[p] = out.get(p, 0.0) + f * prompt
        for p, f in self.head_flops.items():
            out[p] = out.get(p, 0.0) + f
        out["bf16"] = out.get("bf16", 0.0) + sum(a.prompt_flops(prompt) for a in self.attention)
        return out

    def kv_bytes(self, context: float) -> float:
        """KV cache bytes read by one decode step at ``context`` tokens."""
        return sum(a.kv_bytes(context) for a in self.attention)

    def to_record(self) -> dict[str, Any]:
        """What ``inspect`` prints and JSON carries."""
        record: dict[str, Any] = {
            "model_type": self.model_type,
            "decode_bytes_per_token": self.decode.to_record(),
            "prefill_flops_per_token": {
                **{c: sum(by_p.values()) for c, by_p in self.linear_flops.items()},
                "attention_per_context_token": sum(4.0 * a.width for a in self.attention),
            },
            "head_flops_per_position": sum(self.head_flops.values()),
            "precisions": _precision_shares(self),
        }
        if self.vision is not None and self.vision.reference is not None:
            record["vision_flops_per_image"] = {
                str(b): sum(self.vision.image_flops(enc).values()) for b, enc in self.vision.reference.items()
            }
            record["vision_reference_image"] = "x".join(map(str, REFERENCE_IMAGE))
            record["vision_soft_tokens_per_image"] = {str(b): enc.soft_tokens for b, enc in self.vision.reference.items()}
        elif self.vision is not None:
            record["vision_flops_per_image"] = {str(b): self.vision.total_flops(b) for b in self.vision.budgets}
        return record


def _precision_shares(terms: CostTerms) -> dict[str, dict[str, float]]:
    return {c: dict(by_p) for c, by_p in {**terms.linear_flops, "head": terms.head_flops}.items()}


def _add(table: dict[str, dict[Precision, float]], component: str, precision: Precision, flops: float) -> None:
    by_p = table.setdefault(component, {})
    by_p[precision] = by_p.get(precision, 0.0) + flops


def _attention_layers(model: nn.Module, fam: Family, config: Any) -> tuple[AttentionLayer, ...]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = list(getattr(text, "layer_types", None) or ())
    window = getattr(text, "sliding_window", None)
    layers: nn.Module = model.get_submodule(fam.layers)
    out: list[AttentionLayer] = []
    kv_by_type: dict[str, int] = {}
    for i, layer in enumerate(layers):  # type: ignore[arg-type]
        kind = layer_types[i] if i < len(layer_types) else "full_attention"
        query: nn.Linear = layer.get_submodule(fam.query)
        try:
            kv_width = layer.get_submodule(fam.key).out_features
            kv_by_type[kind] = kv_width
        except AttributeError:  # a KV-shared layer reads the cache of the last layer of its kind
            kv_width = kv_by_type[kind]
        out.append(AttentionLayer(query.out_features, window if kind == "sliding_attention" else None, kv_width))
    return tuple(out)


def _vision_costs(model: nn.Module, fam: Family, config: Any, precisions: Mapping[str, Precision]) -> VisionCosts | None:
    vision_config = getattr(config, "vision_config", None)
    if fam.vision is None or vision_config is None:
        return None
    if fam.vlm is not None:
        return vlm_vision_costs(model, fam.vlm, config, precisions)
    per_patch, per_soft = tower_flops(
        model, precisions, (fam.vision,), (fam.vision_projection,) if fam.vision_projection else ()
    )
    widths = tuple(
        layer.get_submodule(fam.vision_query).out_features  # type: ignore[union-attr]
        for layer in model.get_submodule(fam.vision_layers or "")  # type: ignore[union-attr]
    )
    pooling = int(getattr(vision_config, fam.pooling or "", 1) or 1)
    default = getattr(vision_config, fam.default_budget or "", None)
    return VisionCosts(
        MappingProxyType(per_patch), MappingProxyType(per_soft), widths, pooling, fam.budgets, default
    )


def cost_terms(
    model: nn.Module,
    config: Any,
    config_json: Mapping[str, Any],
    layout: Layout,
    source: Layout,
    precisions: Mapping[str, Precision] | None = None,
) -> CostTerms:
    """The cost terms of ``model`` (built on meta) whose tensors are stored as ``layout``.

    ``source`` is the bf16 layout the decode bytes are compared with; ``precisions`` maps each Linear
    to its matmul precision (default: :func:`linear_precisions` of ``config_json``'s quantization block).
    """
    model_type = config_json.get("model_type")
    fam = family(model_type)
    precisions = precisions or linear_precisions(model, quantization_block(config_json))
    tables = TOKEN_TABLES.get(model_type or "")
    head_name = tables.head if tables else "lm_head"
    linear: dict[str, dict[Precision, float]] = {}
    head: dict[Precision, float] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        flops = 2.0 * m.in_features * m.out_features
        if name == head_name:
            head[precisions[name]] = head.get(precisions[name], 0.0) + flops
        elif name.startswith(fam.decoder):
            _add(linear, "ple" if any(p in name for p in fam.ple) else "decoder", precisions[name], flops)
    names = tables.embeddings if tables else ()
    stored_head = any(n.rsplit(".", 1)[0] == head_name for n, _, _ in layout)
    source_head = any(n.rsplit(".", 1)[0] == head_name for n, _, _ in source)
    tied = tables.tied_to if tables and ties_head(config_json) else None
    skip = (*fam.not_modelled, *fam.not_decoded)
    decode = token_bytes(
        [t for t in layout if not t[0].startswith(skip)],
        [t for t in source if not t[0].startswith(skip)],
        names,
        head_name,
        None if stored_head else tied,
        None if source_head else tied,
    )
    return CostTerms(
        model_type=str(model_type),
        linear_flops=MappingProxyType({c: MappingProxyType(v) for c, v in linear.items()}),
        head_flops=MappingProxyType(head),
        attention=_attention_layers(model, fam, config),
        vision=_vision_costs(model, fam, config, precisions),
        decode=decode,
    )


# ------------------------------------------------------------------ folders


def _meta(path: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The module tree of a folder's config on meta (a quantization block is left out: it is read as data)."""
    from ecoquant.models.loading import load_config, meta_model

    config_json = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = load_config(path)
    for level in (config, getattr(config, "text_config", None)):
        if level is not None and getattr(level, "quantization_config", None) is not None:
            delattr(level, "quantization_config")
    return meta_model(config), config, config_json


def _meta_layout(model: nn.Module) -> Layout:
    """The bf16 source's tensors from meta shapes (a tied head is one tensor, named as the embedding)."""
    return [(n, "BF16" if p.dtype.is_floating_point else "I64", tuple(p.shape)) for n, p in model.named_parameters()]


def checkpoint_costs(model: str | Path) -> CostTerms:
    """Cost terms of a model folder as it is: its config, its safetensors headers (or meta shapes for a
    config-only folder such as the E4B twin) and its ``quantization_config``. Reads no weights."""
    from ecoquant.models.layout import model_tensor_infos
    from ecoquant.models.loading import resolve_model

    path = resolve_model(model)
    module_tree, config, config_json = _meta(path)
    source = _meta_layout(module_tree)
    stored = [(t.name, t.dtype, t.shape) for t in model_tensor_infos(path)] if any(path.glob("*.safetensors")) else source
    return cost_terms(module_tree, config, config_json, stored, source)


def planned_costs(
    model: str | Path, preset: str = "auto", scheme: Any = None, embeddings: str | None = None, lm_head: str | None = None
) -> CostTerms:
    """Cost terms of what ``ecoquant quantize`` would write from a bf16 folder with these choices (nothing read).

    Weight-only schemes compute in bf16, so only the decode bytes change; that is what the bench
    compares between bf16, W4A16 and W4A16 with an int4 head.
    """
    from ecoquant.plan import plan_model, plan_tables
    from ecoquant.quantize.scheme import QuantScheme

    plan = plan_model(Path(model), preset)
    scheme = scheme or QuantScheme()
    tables = plan_tables(plan, scheme, embeddings or plan.preset.embeddings, lm_head or plan.preset.lm_head)  # type: ignore[arg-type]
    return plan_costs(plan, scheme, tables)


def plan_costs(plan: Any, scheme: Any, tables: Any) -> CostTerms:
    """Cost terms of a :class:`~ecoquant.plan.ModelPlan` quantized with ``scheme`` and ``tables`` (a
    :class:`~ecoquant.plan.TablePlan`): the planned layout's bytes, the module tree's FLOPs."""
    from ecoquant.export.footprint import planned_layout
    from ecoquant.plan import source_layout

    source = source_layout(plan)
    after = planned_layout(source, plan.selection, scheme, tables.tables, tables.head)
    config_json = json.loads((plan.path / "config.json").read_text(encoding="utf-8"))
    return cost_terms(plan.model, plan.config, config_json, after, source)
