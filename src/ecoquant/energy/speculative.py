"""Speculative decoding with a Gemma-4 MTP assistant: what one drafted token costs, and how many target steps remain.

Why a model of its own: every other lever makes a decode step cheaper; the
assistant makes target steps rarer. It drafts ``k`` tokens one after another,
then the target verifies all of them in one forward pass over ``k + 1``
positions, which at small batch costs about what one decode step costs (the
target's weights are read once either way). Each accepted draft is a target
step of weight reads saved; each drafted token costs the assistant's forward.

What one drafted token computes (transformers 5.23
``models/gemma4_assistant/modeling_gemma4_assistant.py`` and its candidate
generator ``Gemma4AssistantCandidateGenerator`` in
``generation/candidate_generator.py``; vLLM's ``model_executor/models/gemma4_mtp.py``
computes the same):

* the input is the last token's row of the **target's** embedding table
  concatenated with the target's (or the previous draft's) last hidden state,
  ``2 x backbone_hidden_size`` wide, projected by ``pre_projection`` to the
  assistant's width;
* every assistant layer is KV-shared: it has ``q_proj``, ``o_proj`` and an MLP,
  no ``k_proj``/``v_proj``, and its attention reads the **target's** cache (a
  sliding layer the target's last sliding cache within the window, a full
  layer the target's last full cache over the whole context);
* ``post_projection`` maps back to the target's width (the next draft's input);
* the head: with ``use_ordered_embeddings`` (E2B and E4B assistants) a
  centroid-masked head scores ``num_centroids`` centroids, keeps the top
  ``centroid_intermediate_top_k``, gathers those clusters' ``vocab /
  num_centroids`` rows of the tied head each and scores only them
  (E4B: 2048 centroids, top 32, 128 tokens each: 4,096 of 262,144 rows);
  without it, the full ``vocab x hidden`` head.

The assistant's shapes come from its ``config.json`` (read as data: the installed
transformers cannot build an all-KV-shared text model on the meta device, see
:func:`assistant_costs`), its bytes from its safetensors headers when the folder
has weights (so a quantized draft is priced as stored), else bf16.

Tokens per target step: ``1 + mean_accepted_per_step`` (the contract's
definitions: ``accepted_tokens / target_steps``). With ``n`` output tokens the
first comes from prefill; the other ``n - 1`` take ``ceil((n - 1) / (1 + a))``
target steps (exactly ``ceil((n - 1) / (k + 1))`` at full acceptance), each
preceded by a draft round of ``k`` assistant forwards.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecoquant.energy.costs import AttentionLayer
from ecoquant.errors import EcoquantError

ASSISTANT_MODEL_TYPE = "gemma4_assistant"
"""``config.json``'s ``model_type`` of a Gemma-4 MTP assistant (transformers' ``Gemma4AssistantConfig``)."""

ASSUMED_MEAN_ACCEPTED_PER_STEP = 1.0
"""ASSUMPTION where nothing was measured: one accepted draft per target step (2 tokens per step).

Below Google's "up to about 3x" for the Gemma-4 assistants (ai.google.dev/gemma/docs/mtp) and at the low
end of the 1.5-3 tokens per step the E4B twin's bench sweeps; every figure using it says "assumed"."""

BYTES_PER_ORDERING_INDEX = 8
"""``token_ordering`` is an int64 buffer: the centroid head gathers one index per candidate."""

# Checkpoint names of the assistant's parts (transformers' Gemma4AssistantForCausalLM and vLLM's WeightsMapper agree).
_TABLE_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
_CENTROIDS = "masked_embedding.centroids"
_ORDERING = "masked_embedding.token_ordering"


@dataclass(frozen=True)
class AssistantTerms:
    """An MTP assistant's cost per drafted token (one forward of the assistant).

    Attributes:
        model_type: ``gemma4_assistant``.
        linears: Linear name -> ``(in, out)`` features: ``pre_projection``, each layer's ``q_proj``, ``o_proj`` and
            MLP, ``post_projection`` (the head is separate).
        linear_bytes: bytes of those Linears' tensors as stored (read once per drafted token, shared by ``c``).
        head_flops: FLOPs of the head per drafted token (centroid scoring + the candidates' logits, or the full head).
        head_bytes: bytes the head reads per drafted token (centroids, the candidates' rows and their indices;
            or the whole table).
        input_bytes: the drafted token's row of the target's embedding table (``backbone_hidden`` values, bf16:
            a target with quantized token tables cannot serve a drafter in vLLM 0.32, see docs/serving.md); each
            request reads its own row, so it is not shared by ``c``.
        attention: the assistant's layers, reading the target's cache (widths from the config, equal to the
            target's since it is the target's cache they read).
        candidates: vocabulary rows scored per drafted token (the whole vocabulary without centroid masking).
        vocab: vocabulary size.
    """

    model_type: str
    linears: Mapping[str, tuple[int, int]]
    linear_bytes: float
    head_flops: float
    head_bytes: float
    input_bytes: float
    attention: tuple[AttentionLayer, ...]
    candidates: int
    vocab: int

    @property
    def linear_flops(self) -> float:
        """``2 x in x out`` over the Linears: FLOPs per drafted token outside the head and attention."""
        return float(sum(2 * i * o for i, o in self.linears.values()))

    @property
    def weight_bytes(self) -> float:
        """Bytes read per drafted token that ``c`` requests in flight share: Linears and head."""
        return self.linear_bytes + self.head_bytes

    def flops(self, context: float) -> float:
        """FLOPs of one drafted token at ``context`` tokens of the target's cache."""
        return self.linear_flops + self.head_flops + sum(a.flops_per_token(context) for a in self.attention)

    def kv_bytes(self, context: float) -> float:
        """Target-cache bytes one drafted token reads (each request its own)."""
        return sum(a.kv_bytes(context) for a in self.attention)

    def to_record(self) -> dict[str, Any]:
        """What ``inspect`` prints and JSON carries (per drafted token)."""
        return {
            "model_type": self.model_type,
            "flops_per_drafted_token": {
                "linears": self.linear_flops,
                "head": self.head_flops,
                "attention_per_context_token": sum(4.0 * a.width for a in self.attention),
            },
            "bytes_per_drafted_token": {
                "linears": self.linear_bytes,
                "head": self.head_bytes,
                "input_embedding_row": self.input_bytes,
                "kv_per_context_token": sum(a.kv_bytes(1) for a in self.attention),
            },
            "head_candidates": self.candidates,
            "vocab": self.vocab,
            "layers": [{"query_width": a.width, "window": a.window, "kv_width": a.kv_width} for a in self.attention],
        }


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    if not isinstance(text, Mapping):
        raise EcoquantError("the assistant's config.json has no text_config; pass a Gemma-4 assistant folder")
    return text


def _layer_shapes(text: Mapping[str, Any]) -> list[tuple[str, int, int, int | None]]:
    """Per layer: ``(kind, head_dim, kv_heads, window)`` as Gemma-4's config resolves them.

    Full-attention layers use ``global_head_dim`` (transformers' default 512) and, with ``attention_k_eq_v``,
    ``num_global_key_value_heads``; sliding layers ``head_dim`` and ``num_key_value_heads``
    (transformers ``Gemma4TextConfig.__post_init__``; vLLM ``gemma4_layer_config``).
    """
    layers = int(text["num_hidden_layers"])
    types = list(text.get("layer_types") or ())
    if len(types) != layers:
        raise EcoquantError(f"the assistant's text_config has {len(types)} layer_types for {layers} layers")
    head_dim, kv_heads = int(text.get("head_dim", 256)), int(text.get("num_key_value_heads", 1))
    global_dim = int(text.get("global_head_dim") or 512)
    global_kv = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v") else None
    window = text.get("sliding_window")
    out: list[tuple[str, int, int, int | None]] = []
    for kind in types:
        if kind == "sliding_attention":
            out.append((kind, head_dim, kv_heads, None if window is None else int(window)))
        else:
            out.append((kind, global_dim, int(global_kv or kv_heads), None))
    return out


def assistant_shapes(config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, int]], tuple[AttentionLayer, ...]]:
    """The assistant's Linears (checkpoint names -> ``(in, out)``) and attention layers, from its ``config.json``."""
    text = _text(config)
    hidden, inter, heads = int(text["hidden_size"]), int(text["intermediate_size"]), int(text["num_attention_heads"])
    backbone = int(config.get("backbone_hidden_size") or hidden)
    linears: dict[str, tuple[int, int]] = {"pre_projection": (2 * backbone, hidden)}
    attention: list[AttentionLayer] = []
    for i, (_, dim, kv_heads, window) in enumerate(_layer_shapes(text)):
        p = f"model.layers.{i}"
        linears[f"{p}.self_attn.q_proj"] = (hidden, heads * dim)
        linears[f"{p}.self_attn.o_proj"] = (heads * dim, hidden)
        linears[f"{p}.mlp.gate_proj"] = (hidden, inter)
        linears[f"{p}.mlp.up_proj"] = (hidden, inter)
        linears[f"{p}.mlp.down_proj"] = (inter, hidden)
        attention.append(AttentionLayer(heads * dim, window, kv_heads * dim))
    linears["post_projection"] = (hidden, backbone)
    return linears, tuple(attention)


def assistant_terms(config: Mapping[str, Any], stored: Mapping[str, int] | None = None) -> AssistantTerms:
    """Cost terms of an assistant from its ``config.json`` and, optionally, its stored tensor bytes by name.

    ``stored`` maps safetensors tensor names to their bytes (a quantized Linear's ``weight_packed``,
    ``weight_scale`` ... all count); without it every tensor is bf16.
    """
    if config.get("model_type") != ASSISTANT_MODEL_TYPE:
        raise EcoquantError(
            f"not a Gemma-4 assistant: config.json's model_type is {config.get('model_type')!r}, "
            f"expected {ASSISTANT_MODEL_TYPE!r}"
        )
    text = _text(config)
    hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    backbone = int(config.get("backbone_hidden_size") or hidden)
    linears, attention = assistant_shapes(config)

    def linear_bytes(name: str, shape: tuple[int, int]) -> float:
        if stored is None:
            return 2.0 * shape[0] * shape[1]
        return float(sum(b for n, b in stored.items() if n.startswith(f"{name}.")))

    table = next((stored[n] for n in _TABLE_NAMES if stored and n in stored), None)
    row_bytes = 2.0 * hidden if table is None else table / vocab
    if config.get("use_ordered_embeddings"):
        centroids, top_k = int(config["num_centroids"]), int(config["centroid_intermediate_top_k"])
        if vocab % centroids:
            raise EcoquantError(f"the assistant's vocab {vocab} is not a multiple of its {centroids} centroids")
        candidates = top_k * (vocab // centroids)
        head_flops = 2.0 * hidden * centroids + 2.0 * hidden * candidates
        head_bytes = (
            linear_bytes(_CENTROIDS, (hidden, centroids))
            + candidates * row_bytes
            + candidates * BYTES_PER_ORDERING_INDEX
        )
    else:
        candidates = vocab
        head_flops = 2.0 * hidden * vocab
        head_bytes = vocab * row_bytes
    return AssistantTerms(
        model_type=ASSISTANT_MODEL_TYPE,
        linears=linears,
        linear_bytes=sum(linear_bytes(n, s) for n, s in linears.items()),
        head_flops=head_flops,
        head_bytes=head_bytes,
        input_bytes=2.0 * backbone,
        attention=attention,
        candidates=candidates,
        vocab=vocab,
    )


def is_assistant_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a Gemma-4 assistant's ``config.json``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == ASSISTANT_MODEL_TYPE
    except (json.JSONDecodeError, AttributeError):
        return False


def assistant_costs(path: str | Path) -> AssistantTerms:
    """Cost terms of an assistant folder: its ``config.json`` and, where it has weights, their stored bytes.

    Read as data rather than built on the meta device: transformers 5.23's ``Gemma4TextConfig.kv_sharing_modes``
    raises for a text model whose every layer is KV-shared (no layer of each type stores a cache), which is
    exactly the assistant's shape. No weights are read, only safetensors headers.
    """
    from ecoquant.models.loading import tensor_infos

    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EcoquantError(f"{folder} has no config.json; pass a Gemma-4 assistant folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    stored = {t.name: t.nbytes for t in tensor_infos(folder)} if any(folder.glob("*.safetensors")) else None
    return assistant_terms(config, stored)


# ------------------------------------------------------------------ acceptance


@dataclass(frozen=True)
class Speculation:
    """Speculative decoding as the roofline sees it: an assistant, ``k`` and the acceptance.

    Attributes:
        assistant: the assistant's cost terms.
        num_speculative_tokens: ``k``, tokens drafted per target step.
        mean_accepted_per_step: accepted drafts per target step, ``0..k``.
        measured: True where an evaluation counted it; False: an assumption, said so wherever shown.
        name: the assistant as given (a folder or hub id), for the record.
    """

    assistant: AssistantTerms
    num_speculative_tokens: int
    mean_accepted_per_step: float
    measured: bool
    name: str = ""

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if k < 1:
            raise EcoquantError(f"num_speculative_tokens must be at least 1, got {k}")
        if not 0.0 <= self.mean_accepted_per_step <= k:
            raise EcoquantError(
                f"mean accepted drafts per target step must be within 0..{k} (k), got {self.mean_accepted_per_step}"
            )

    @property
    def tokens_per_step(self) -> float:
        """The acceptance length: tokens each target step yields, ``1 + mean_accepted_per_step``."""
        return 1.0 + self.mean_accepted_per_step

    def target_steps(self, output_tokens: int) -> int:
        """Target verification steps for ``output_tokens`` (the first comes from prefill).

        ``ceil((n - 1) / (1 + a))``; a relative tolerance keeps an exact quotient (8 / 2.0 steps) from
        rounding up on a float's last bit.
        """
        rest = max(output_tokens - 1, 0)
        return math.ceil(rest / self.tokens_per_step - 1e-9) if rest else 0

    def label(self) -> str:
        """``MTP k=4, 2.50 tokens per target step (measured)``: how the lever is shown, everywhere."""
        return speculation_label(self.to_record())

    def to_record(self) -> dict[str, Any]:
        """What the modelled energy record carries about the lever."""
        return {
            "assistant": self.name,
            "num_speculative_tokens": self.num_speculative_tokens,
            "mean_accepted_per_step": self.mean_accepted_per_step,
            "tokens_per_step": self.tokens_per_step,
            "acceptance": "measured" if self.measured else "assumed",
        }


def speculation_label(record: Mapping[str, Any]) -> str:
    """``MTP k=4, 2.50 tokens per target step (measured)`` (or ``(ASSUMED)``) from :meth:`Speculation.to_record`."""
    how = "measured" if record.get("acceptance") == "measured" else "ASSUMED"
    k, per_step = record["num_speculative_tokens"], float(record["tokens_per_step"])
    return f"MTP k={k}, {per_step:.2f} tokens per target step ({how})"


def speculation(
    assistant: AssistantTerms,
    num_speculative_tokens: int,
    mean_accepted_per_step: float | None = None,
    name: str = "",
) -> Speculation:
    """A :class:`Speculation` with the measured acceptance, or :data:`ASSUMED_MEAN_ACCEPTED_PER_STEP` (capped at
    ``k``) where none was measured."""
    if mean_accepted_per_step is None:
        assumed = min(ASSUMED_MEAN_ACCEPTED_PER_STEP, float(num_speculative_tokens))
        return Speculation(assistant, num_speculative_tokens, assumed, measured=False, name=name)
    return Speculation(assistant, num_speculative_tokens, float(mean_accepted_per_step), measured=True, name=name)


__all__ = [
    "ASSISTANT_MODEL_TYPE",
    "ASSUMED_MEAN_ACCEPTED_PER_STEP",
    "AssistantTerms",
    "Speculation",
    "assistant_costs",
    "assistant_shapes",
    "assistant_terms",
    "is_assistant_folder",
    "speculation",
    "speculation_label",
]
