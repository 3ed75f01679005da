"""Per-model-family facts the calibration engine needs, as data.

Two questions have model-specific answers:

* **Where do the decoder layers live?** ``model.language_model.layers`` in the
  image-text wrappers (Gemma-3/4 ``ForConditionalGeneration``),
  ``model.layers`` in causal LMs. The engine walks that ``ModuleList`` one
  layer at a time.
* **Which AWQ smoothings are exact?** AWQ divides a group of input channels by
  ``s`` in the module that *produces* them (a norm, or a Linear) and
  multiplies the same channels by ``s`` in the Linears that *consume* them.
  That is only an identity when nothing between producer and consumer mixes
  channels non-linearly, so each family lists its producer -> consumers pairs
  with the reason it is exact. Getting this wrong silently changes the model;
  ``tests/test_calibrate_topology.py`` checks every row of this table on a
  real (tiny) model of its family, and checks that the tempting wrong rows
  (Gemma's ``post_attention_layernorm``, Gemma-4's ``v -> o``) do change outputs.

How a norm absorbs a scale (Gemma-3's ``(1 + w)`` against Gemma-4's and
Llama's plain ``w``) is a fact about the norm class, kept with the folding
code in :data:`ecoquant.quantize.awq.NORM_WEIGHT_OFFSET`.

Families are keyed by the *text* config's ``model_type`` (``gemma4_text`` for
both Gemma-4 wrappers), so one row serves the causal-LM and the image-text
class of a family. No class-name string matching anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.models.families import VLM_FAMILIES


@dataclass(frozen=True)
class AWQMapping:
    """One smoothing: ``smooth``'s output channels feed every module in ``balance``.

    Names are relative to a decoder layer. Balance modules missing from a
    layer (KV-shared Gemma-4 layers have no ``k_proj``/``v_proj``; some
    attention variants have ``v_proj = None``) are dropped for that layer.
    """

    smooth: str
    balance: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    """What the calibration engine must know about one model family.

    Attributes:
        family: the text config's ``model_type`` this row describes.
        layers_paths: where the decoder ``ModuleList`` may live, tried in order.
        awq_mappings: the exact smoothings, in the order AWQ searches them.
        awq_no_clip: layer-relative Linear names whose weights AWQ never clips.
    """

    family: str
    layers_paths: tuple[str, ...]
    awq_mappings: tuple[AWQMapping, ...]
    awq_no_clip: tuple[str, ...] = ()


_LAYERS_PATHS: tuple[str, ...] = (
    # Image-text wrappers (Gemma3/Gemma4ForConditionalGeneration): the text
    # stack sits under the language model; the vision tower's encoder layers
    # are elsewhere and are not part of the walk.
    "model.language_model.layers",
    # Causal LMs (Llama, Gemma3ForCausalLM, Gemma4ForCausalLM, Qwen, ...).
    "model.layers",
    # The vision-language families' language stacks (Idefics3's ``model.text_model.layers``).
    *dict.fromkeys(row.layers for row in VLM_FAMILIES.values() if row.layers != "model.language_model.layers"),
)

# llm-awq never clips the query and key projections: their errors are
# amplified by the softmax, and clipping them measurably hurts (their
# auto_clip skips "q_" and "k_" by name). Same choice for every family here.
_NO_CLIP_QK: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")

_ATTN_IN = AWQMapping(
    # The attention block reads input_layernorm's output through q, k and v,
    # and nothing else: scaling the norm's weight by 1/s and the projections'
    # input columns by s is exact. On KV-shared layers only q_proj is left.
    smooth="input_layernorm",
    balance=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)

_UP_DOWN = AWQMapping(
    # act(gate(x)) * up(x) is linear in up's output channel by channel, so
    # up's rows / s and down's columns * s cancel exactly.
    smooth="mlp.up_proj",
    balance=("mlp.down_proj",),
)

_V_O = AWQMapping(
    # softmax(QK^T) V is linear in V channel by channel, so v's rows / s and
    # o's columns * s cancel exactly -- when nothing normalises V per head and
    # every o column has its own v row (no grouped-query sharing; the engine
    # drops this mapping when v's out_features != o's in_features).
    smooth="self_attn.v_proj",
    balance=("self_attn.o_proj",),
)

_GEMMA_MLP_IN = AWQMapping(
    # Gemma's sandwich norms: the MLP is fed by pre_feedforward_layernorm.
    # post_attention_layernorm normalises the attention *output* before the
    # residual add, so it is not the MLP's producer (the Llama default would be
    # wrong here).
    smooth="pre_feedforward_layernorm",
    balance=("mlp.gate_proj", "mlp.up_proj"),
)

TOPOLOGIES: dict[str, Topology] = {
    t.family: t
    for t in (
        Topology(
            family="gemma4_text",
            layers_paths=_LAYERS_PATHS,
            awq_mappings=(
                _ATTN_IN,
                _GEMMA_MLP_IN,
                _UP_DOWN,
                # No v -> o: Gemma-4 applies a scale-free RMSNorm (v_norm) to
                # V per head, which undoes any per-channel scale folded into
                # v_proj's rows. The PLE pair (per_layer_input_gate ->
                # per_layer_projection) has a GELU in between: not exact either.
            ),
            awq_no_clip=_NO_CLIP_QK,
        ),
        Topology(
            family="gemma3_text",
            layers_paths=_LAYERS_PATHS,
            awq_mappings=(
                _ATTN_IN,
                _GEMMA_MLP_IN,  # same sandwich-norm layout as Gemma-4
                _UP_DOWN,
                # Gemma-3 has q_norm/k_norm but no v_norm, so v -> o is exact
                # where shapes allow (multi-head attention only).
                _V_O,
            ),
            awq_no_clip=_NO_CLIP_QK,
        ),
        *(
            Topology(
                family=family,
                layers_paths=_LAYERS_PATHS,
                awq_mappings=(
                    _ATTN_IN,
                    _V_O,
                    AWQMapping(
                        # Pre-norm blocks without sandwich norms: here the
                        # norm after attention *is* the MLP's input norm.
                        smooth="post_attention_layernorm",
                        balance=("mlp.gate_proj", "mlp.up_proj"),
                    ),
                    _UP_DOWN,
                ),
                awq_no_clip=_NO_CLIP_QK,
            )
            # Llama-style decoders with identical module names: Qwen2.5-VL's and Qwen3-VL's text stacks
            # too (pre-norm, no sandwich norms; Qwen3's q_norm/k_norm act on q and k only, no v_norm).
            for family in ("llama", "mistral", "qwen2", "qwen3", "qwen2_5_vl_text", "qwen3_vl_text")
        ),
    )
}

#: What the engine uses for a family it has no row for: GPTQ needs only the
#: layer path; AWQ refuses (see :func:`require_awq_mappings`).
GENERIC = Topology(family="generic", layers_paths=_LAYERS_PATHS, awq_mappings=())


def text_model_type(config: Any) -> str:
    """The text config's ``model_type`` (the family key)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return str(getattr(text, "model_type", getattr(config, "model_type", "")))


def topology_for(config: Any) -> Topology:
    """The family row for a transformers config, or :data:`GENERIC`."""
    return TOPOLOGIES.get(text_model_type(config), GENERIC)


def require_awq_mappings(topology: Topology, config: Any) -> None:
    """AWQ without smoothing mappings is not AWQ: say so and name the fix."""
    if not topology.awq_mappings:
        known = ", ".join(sorted(TOPOLOGIES))
        raise EcoquantError(
            f"no smoothing mappings (AWQ, SmoothQuant) are known for model type {text_model_type(config)!r} "
            f"(known: {known}); use --method gptq, or add a row to ecoquant.models.topology.TOPOLOGIES"
        )


def decoder_layers(model: nn.Module, topology: Topology) -> tuple[str, nn.ModuleList]:
    """The decoder ``ModuleList`` and its dotted path.

    Raises:
        EcoquantError: none of the family's paths names a ``ModuleList``.
    """
    for path in topology.layers_paths:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    raise EcoquantError(
        f"cannot find the decoder layers of {type(model).__name__} (looked for {', '.join(topology.layers_paths)}); "
        "add the path to ecoquant.models.topology"
    )


@dataclass(frozen=True)
class ResolvedMapping:
    """An :class:`AWQMapping` bound to one layer: the modules that exist there."""

    smooth_name: str
    smooth: nn.Module
    balance_names: tuple[str, ...]
    balance: tuple[nn.Linear, ...]


def _child(layer: nn.Module, name: str) -> nn.Module | None:
    """``layer.get_submodule(name)``, or None when absent (or set to None)."""
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None


def resolve_mappings(layer: nn.Module, mappings: Sequence[AWQMapping]) -> tuple[ResolvedMapping, ...]:
    """The mappings that apply to this layer, with missing balance modules dropped.

    A mapping is dropped entirely when its producer is missing, when no
    consumer is left, or when a Linear producer's output width differs from a
    consumer's input width (grouped-query ``v -> o``: one v row feeds several
    o columns, so no per-channel scale can be folded exactly).
    """
    resolved: list[ResolvedMapping] = []
    for m in mappings:
        smooth = _child(layer, m.smooth)
        if smooth is None:
            continue
        pairs = [(n, mod) for n in m.balance if isinstance(mod := _child(layer, n), nn.Linear)]
        if not pairs:
            continue
        if isinstance(smooth, nn.Linear) and any(mod.in_features != smooth.out_features for _, mod in pairs):
            continue
        resolved.append(
            ResolvedMapping(
                smooth_name=m.smooth,
                smooth=smooth,
                balance_names=tuple(n for n, _ in pairs),
                balance=tuple(mod for _, mod in pairs),  # type: ignore[misc]
            )
        )
    return tuple(resolved)
