"""The token tables of a model family: embeddings gathered per token, and the output head they may be tied to.

At batch 1, decode reads every decoder weight once per token, plus the
output head (all of it: one logit per vocabulary entry) and one row of each
embedding table. On Gemma-4 E4B the tied head is the 262144 x 2560
``embed_tokens`` (1.34 GB in bf16, read in full every token) and the
Per-Layer-Embedding table ``embed_tokens_per_layer`` is 262144 x 10752
(5.25 GiB, one row read per token). Which tensors those are is per-family
knowledge, kept here as data.

Fields: ``embeddings`` are the tables quantized by ``--embeddings`` (weights
``[vocab, width]``, gathered by row); ``head`` is the output projection's
module name; ``tied_to`` is the embedding the head shares its weight with when
the config ties them (``tie_word_embeddings``), which is the weight an
untied head is written from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ecoquant.errors import EcoquantError
from ecoquant.models.families import VLM_FAMILIES


@dataclass(frozen=True)
class TokenTables:
    embeddings: tuple[str, ...]
    head: str
    tied_to: str


TOKEN_TABLES: Mapping[str, TokenTables] = MappingProxyType(
    {
        # Gemma-4 (E2B/E4B): the token embedding and the Per-Layer-Embedding table (one 256-wide slice
        # per decoder layer, concatenated); the head is tied to embed_tokens. The vision/audio
        # projections (embed_vision, embed_audio) are Linears, not tables, and stay as the preset says.
        "gemma4": TokenTables(
            embeddings=("model.language_model.embed_tokens", "model.language_model.embed_tokens_per_layer"),
            head="lm_head",
            tied_to="model.language_model.embed_tokens",
        ),
        # Gemma-3 text models (the 270M fixture): one table, tied head.
        "gemma3_text": TokenTables(embeddings=("model.embed_tokens",), head="lm_head", tied_to="model.embed_tokens"),
        # Llama-style decoders: one table; the head is tied only where the config says so.
        "llama": TokenTables(embeddings=("model.embed_tokens",), head="lm_head", tied_to="model.embed_tokens"),
        "qwen2": TokenTables(embeddings=("model.embed_tokens",), head="lm_head", tied_to="model.embed_tokens"),
        # The vision-language families' rows (ecoquant.models.families): one table, the head tied where the config says.
        **{t: TokenTables(embeddings=(row.embed,), head=row.head, tied_to=row.embed) for t, row in VLM_FAMILIES.items()},
    }
)


def token_tables(model_type: str | None) -> TokenTables:
    """The family's tables, or one clear line when ecoquant does not know them."""
    try:
        return TOKEN_TABLES[model_type or ""]
    except KeyError:
        raise EcoquantError(
            f"ecoquant does not know the embedding tables of model type {model_type!r} (known: "
            f"{', '.join(TOKEN_TABLES)}); keep --embeddings bf16 and --lm-head bf16"
        ) from None


def ties_head(config: Mapping[str, object]) -> bool:
    """Whether ``config.json`` ties the head to the embedding.

    transformers reads the top level and vLLM a VLM's text config, so either one
    saying so (or saying nothing: transformers' default is to tie) means tied.
    """
    text = config.get("text_config")
    levels = [config, text] if isinstance(text, Mapping) else [config]
    return any(bool(level.get("tie_word_embeddings", True)) for level in levels)
