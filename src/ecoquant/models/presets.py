"""Named module selections ("presets"): which Linear layers to quantize, per model family.

Per-model knowledge lives here as data, one comment per choice, so that adding
a model family means adding a table row, not an if-chain. Patterns follow
llmcompressor: a plain string matches a module name exactly or a module class
name (``"Linear"``); ``"re:..."`` is a regular expression matched from the
start of the module name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ecoquant.errors import EcoquantError
from ecoquant.models.families import VLM_FAMILIES


@dataclass(frozen=True)
class Preset:
    """A named (targets, ignore) pair with the reason it exists, and what it does to the token tables.

    ``embeddings`` / ``lm_head`` are ``bf16``, ``int4`` or ``int8`` (see :mod:`ecoquant.models.tables`):
    the defaults ``quantize --embeddings`` / ``--lm-head`` take.
    """

    name: str
    description: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    embeddings: str = "bf16"
    lm_head: str = "bf16"


# What the seed W4A16 checkpoint kept in bf16 on Gemma-4 E models. Each entry is
# a regular expression so the same list works for E2B, E4B and the tiny fixture.
_GEMMA4_E_IGNORE: tuple[str, ...] = (
    # Tied to the 262k-row embedding: int4 here costs quality everywhere and
    # vLLM has no packed path for a tied lm_head.
    "lm_head",
    # The vision encoder is small next to the decoder and its errors are
    # amplified by every image token; the seed lost most on image tasks even so.
    "re:.*vision_tower.*",
    # The audio encoder is not on the image-to-text path at all.
    "re:.*audio_tower.*",
    # Projections from the towers into the text space: tiny, and sensitive.
    "re:.*embed_vision.*",
    "re:.*embed_audio.*",
    # PLE gate/projection: 2560x256 per layer, inputs of width 256 (too few
    # groups to matter for size), and they modulate the residual stream.
    "re:.*per_layer_input_gate$",
    "re:.*per_layer_projection$",
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="gemma4-e",
            description="Gemma-4 E models: every decoder Linear (q,k,v,o,gate,up,down) and "
            "per_layer_model_projection; towers, PLE gate/projection and lm_head stay bf16 "
            "(the seed W4A16 choice: 259 modules on E4B).",
            targets=("Linear",),
            ignore=_GEMMA4_E_IGNORE,
        ),
        Preset(
            name="gemma4-e-mlpo",
            description="Gemma-4 E models, MLP and attention-output projections only "
            "(gate, up, down, o_proj): q/k/v keep bf16, which protects attention patterns "
            "(the Round-2 'mlpo' variant).",
            targets=(
                r"re:.*language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj$",
                r"re:.*language_model\.layers\.\d+\.self_attn\.o_proj$",
            ),
            ignore=_GEMMA4_E_IGNORE,
        ),
        Preset(
            name="gemma4-e-int4-head",
            description="gemma4-e plus an untied int4 lm_head: the tied bf16 head (262144 x 2560 on E4B) is "
            "read in full for every token, about 28% of what the seed's W4A16 reads per token.",
            targets=("Linear",),
            ignore=_GEMMA4_E_IGNORE,
            lm_head="int4",
        ),
        Preset(
            name="gemma4-e-int4-tables",
            description="gemma4-e plus int4 embedding and Per-Layer-Embedding tables and an untied int4 lm_head "
            "(the community builds' footprint: PLE 5.25 -> ~1.5 GiB). vLLM runs quantized embeddings on GPU only.",
            targets=("Linear",),
            ignore=_GEMMA4_E_IGNORE,
            embeddings="int4",
            lm_head="int4",
        ),
        Preset(
            name="text-decoder",
            description="Any text-only decoder (Llama, Gemma-3, ...): every Linear except lm_head.",
            targets=("Linear",),
            # lm_head is usually tied to the embedding, and the logits are the
            # most quantization-sensitive output of the model.
            ignore=("lm_head",),
        ),
        # The vision-language families of ecoquant.models.families: the language stack only, as for
        # Gemma-4. The towers and projectors compose every vision token (the seed lost 17.6% of image
        # understanding quantizing them to NF4); --vision-scheme is the way to quantize them.
        *(
            Preset(
                name=f"{model_type}-decoder",
                description=f"{model_type}: every Linear of the language stack ({row.decoder}*); vision tower, "
                "projector and lm_head stay bf16.",
                targets=("Linear",),
                ignore=("lm_head", *(f"re:{re.escape(prefix)}.*" for prefix in row.towers)),
            )
            for model_type, row in VLM_FAMILIES.items()
        ),
    )
}


#: The preset ``auto`` picks by ``config.model_type``; any other model type gets ``text-decoder``.
AUTO_PRESETS: dict[str, str] = {
    # Gemma-4 checkpoints carry the multimodal wrapper (towers, PLE) the E preset knows.
    "gemma4": "gemma4-e",
    # One per row of ecoquant.models.families.
    **{model_type: f"{model_type}-decoder" for model_type in VLM_FAMILIES},
}
DEFAULT_PRESET = "text-decoder"


def get_preset(name: str, model_type: str | None = None) -> Preset:
    """The preset called ``name`` (``auto``: by model type); a clear error listing the known ones otherwise."""
    if name == "auto":
        name = AUTO_PRESETS.get(model_type or "", DEFAULT_PRESET)
    try:
        return PRESETS[name]
    except KeyError:
        raise EcoquantError(f"unknown preset {name!r}; choose one of: auto, {', '.join(PRESETS)}") from None
