"""The vision-language families beyond Gemma-4, one row each: parts, tables, vision geometry, image budget.

Why one row: what ecoquant must know about a family (which Linears ``auto``
quantizes, where the decoder layers and token tables are, how an image
becomes vision-encoder work, which processor key bounds that work) is data.
The tables that serve each concern (:data:`ecoquant.models.presets.AUTO_PRESETS`,
:data:`ecoquant.models.tables.TOKEN_TABLES`, :data:`ecoquant.energy.costs.FAMILIES`,
...) take their rows for these families from here, beside their Gemma-4 rows.
Module names are the module tree's (transformers 5), whatever the checkpoint's
own layout (:mod:`ecoquant.models.layout` maps between the two).

A :class:`VisionGeometry` turns an image (width x height, pixels) and an
image budget into the encoder's sequences (patches attended together) and the
soft tokens the decoder reads; each follows its processor's resizing rule,
cited on the class. All are pure arithmetic, checked against hand
calculations in ``tests/test_families.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Encoding:
    """What one image costs the vision encoder: patches per sequence (attention spans one sequence) and soft tokens."""

    sequences: tuple[int, ...]
    soft_tokens: int
    """Image tokens the vision features fill: what the projector maps, one feature each."""
    separators: int = 0
    """Placeholder tokens the processor adds that no feature fills (Pixtral's ``[IMG_BREAK]``/``[IMG_END]``):
    decoder positions, no projector work."""

    @property
    def patches(self) -> int:
        return sum(self.sequences)


@dataclass(frozen=True)
class DynamicResolution:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the image is resized to multiples of ``patch x merge`` pixels whose
    area lies in ``[min_pixels, budget]`` (transformers' ``qwen2_vl`` ``smart_resize``), cut into
    ``patch``-pixel patches, one sequence per image, and ``merge x merge`` patches make one soft token."""

    patch: int
    merge: int
    min_pixels: int

    @classmethod
    def from_config(cls, config: Any) -> DynamicResolution:
        v = config.vision_config
        return cls(v.patch_size, v.spatial_merge_size, 4 * (v.patch_size * v.spatial_merge_size) ** 2)

    sequence = None  # the whole image is one sequence

    @property
    def patches_per_token(self) -> float:
        return float(self.merge**2)

    def encode(self, width: int, height: int, budget: int) -> Encoding:
        factor = self.patch * self.merge
        h = max(factor, round(height / factor) * factor)
        w = max(factor, round(width / factor) * factor)
        if h * w > budget:
            beta = math.sqrt(height * width / budget)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        patches = (h // self.patch) * (w // self.patch)
        return Encoding((patches,), patches // self.merge**2)


def window_patches(config: Any, key: str) -> int:
    """Patches in one of Qwen2.5-VL's attention windows: whole ``merge x merge`` groups, ``key // merge // patch``
    of them a side (transformers' ``vision_utils.get_vision_window_index``); 64 at the released 112 px."""
    v = config.vision_config
    side = getattr(v, key) // v.spatial_merge_size // v.patch_size * v.spatial_merge_size
    return int(side**2)


@dataclass(frozen=True)
class ImageSplitting:
    """Idefics3 / SmolVLM: the image is resized so its longest edge is ``budget`` (``size.longest_edge``,
    rounded up to whole tiles), split into ``tile x tile`` crops plus one global image of the same size when
    there is more than one crop (transformers' ``Idefics3ImageProcessor``, ``do_image_splitting``); each crop
    is one encoder sequence of ``(tile / patch)²`` patches and becomes ``(tile / patch)² / scale²`` tokens."""

    tile: int
    patch: int
    scale: int

    @classmethod
    def from_config(cls, config: Any) -> ImageSplitting:
        return cls(config.vision_config.image_size, config.vision_config.patch_size, config.scale_factor)

    @property
    def sequence(self) -> int:
        return (self.tile // self.patch) ** 2

    @property
    def patches_per_token(self) -> float:
        return float(self.scale**2)

    def encode(self, width: int, height: int, budget: int) -> Encoding:
        longest = max(width, height)
        edge = math.ceil(min(budget, longest) / self.tile) * self.tile  # the processor rounds up to whole tiles
        w, h = (edge, max(1, round(height * edge / longest))) if width >= height else (max(1, round(width * edge / longest)), edge)
        crops = math.ceil(w / self.tile) * math.ceil(h / self.tile)
        crops += 1 if crops > 1 else 0  # the global image
        per_crop = (self.tile // self.patch) ** 2
        return Encoding((per_crop,) * crops, crops * per_crop // self.scale**2)


@dataclass(frozen=True)
class FixedTokensPanScan:
    """Gemma-3: every crop is resized to ``size x size`` (896 on the released models) and becomes a fixed
    ``tokens`` soft tokens (``mm_tokens_per_image``: 4096 patches average-pooled to 256). With pan-and-scan
    on (``budget`` 1), an image at least ``min_ratio`` times wider than tall (or taller than wide) adds
    ``min(max_crops, floor(ratio + 0.5))`` crops along its long side (transformers'
    ``Gemma3ImageProcessor.pan_and_scan``, simplified: crops smaller than the minimum size are not dropped)."""

    size: int
    patch: int
    tokens: int
    max_crops: int
    min_ratio: float = 1.2

    @classmethod
    def from_config(cls, config: Any) -> FixedTokensPanScan:
        v = config.vision_config
        return cls(v.image_size, v.patch_size, config.mm_tokens_per_image, max_crops=4)

    @property
    def sequence(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def patches_per_token(self) -> float:
        return self.sequence / self.tokens

    def encode(self, width: int, height: int, budget: int) -> Encoding:
        crops = 1
        ratio = max(width, height) / max(1, min(width, height))
        if budget and ratio >= self.min_ratio:
            crops += max(2, min(self.max_crops, math.floor(ratio + 0.5)))
        per_crop = (self.size // self.patch) ** 2
        return Encoding((per_crop,) * crops, crops * self.tokens)


@dataclass(frozen=True)
class LongestEdgePatches:
    """Pixtral (Mistral-3): the image is scaled down so its longest edge is at most ``budget``
    (``size.longest_edge``), cut into ``patch``-pixel patches (partial ones padded), one sequence per image;
    ``merge x merge`` patches make one soft token and every row of tokens ends with ``[IMG_BREAK]``
    (the last with ``[IMG_END]``): transformers' ``PixtralProcessor``. The row ends are text tokens (the
    embedding's rows), so they are separators, not soft tokens the projector fills."""

    patch: int
    merge: int

    @classmethod
    def from_config(cls, config: Any) -> LongestEdgePatches:
        return cls(config.vision_config.patch_size, config.spatial_merge_size)

    sequence = None  # the whole image is one sequence

    @property
    def patches_per_token(self) -> float:
        """``merge²`` (the ``[IMG_BREAK]`` tokens, one per row, are left out of this ratio)."""
        return float(self.merge**2)

    def encode(self, width: int, height: int, budget: int) -> Encoding:
        scale = min(1.0, budget / max(width, height))
        cols = math.ceil(width * scale / self.patch)
        rows = math.ceil(height * scale / self.patch)
        tok_rows, tok_cols = math.ceil(rows / self.merge), math.ceil(cols / self.merge)
        return Encoding((rows * cols,), tok_rows * tok_cols, separators=tok_rows)


VisionGeometry = DynamicResolution | ImageSplitting | FixedTokensPanScan | LongestEdgePatches
GeometryKind = type[DynamicResolution] | type[ImageSplitting] | type[FixedTokensPanScan] | type[LongestEdgePatches]


@dataclass(frozen=True)
class ImageBudget:
    """The image-budget lever: the processor key that bounds an image's vision work, and the values tried.

    ``key`` is what ``mm_processor_kwargs`` (vLLM) and the processor call take; ``nested`` names the dict it
    sits in (``size`` for ``{"size": {"longest_edge": N}}``), empty when it is a top-level keyword.
    """

    key: str
    values: tuple[int, ...]
    default: int
    nested: str = ""
    switch: bool = False
    """The key is on/off (``do_pan_and_scan``): values 0 and 1 are written as false and true."""

    def processor_kwargs(self, value: int) -> dict[str, object]:
        setting: object = bool(value) if self.switch else value
        return {self.nested: {self.key: setting}} if self.nested else {self.key: setting}


@dataclass(frozen=True)
class VlmFamily:
    """One vision-language family (``config.json``'s ``model_type``).

    Attributes:
        decoder: prefix of the language stack's modules (what ``auto`` quantizes; its layers are ``layers``).
        vision: prefixes of the vision tower (bf16 under ``auto``).
        projector: prefixes of what maps vision features into the text space (bf16 under ``auto``; run once
            per soft token).
        embed: the token embedding table; ``head``: the output head (tied to ``embed`` where the config says).
        vision_layers / vision_query / query_share: the encoder layers, each one's query projection, and the
            query's share of that Linear's outputs (1/3 for a fused ``qkv``): the attention width is
            ``out_features x query_share``.
        window_layers_key / window_key: windowed encoder layers (Qwen2.5-VL: all but the vision config's
            ``fullatt_block_indexes``) attend within windows of the vision config's ``window_key`` pixels a side
            (``window_size``: 112 on the released models, 8 x 8 = 64 patches of 14 px).
        projector_matmuls: Parameters the projector applies as a matmul weight rather than through an
            ``nn.Linear`` (Gemma-3's ``mm_input_projection_weight``): ``2 x`` their elements per soft token.
        unused: prefixes of modules the family builds but whose output its forward never reads (priced nowhere).
        geometry: how an image becomes encoder sequences and soft tokens (its sizes read from the config,
            so the tiny fixtures and the released models share the row).
        budget: the image-budget lever.
        source: where the names and numbers come from.
    """

    decoder: str
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    embed: str
    vision_layers: str
    vision_query: str
    geometry: GeometryKind
    budget: ImageBudget
    source: str
    head: str = "lm_head"
    query_share: float = 1.0
    window_layers_key: str = ""
    window_key: str = ""
    projector_matmuls: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    @property
    def layers(self) -> str:
        return f"{self.decoder}layers"

    @property
    def towers(self) -> tuple[str, ...]:
        """Everything ``auto`` keeps in bf16 besides the head: tower and projector."""
        return (*self.vision, *self.projector)


_QWEN_BUDGET = ImageBudget(
    # Pixels per image (28 x 28 = one soft token): 256, 512 and 1024 tokens' worth; the processor's own
    # default max is 12,845,056 (16,384 tokens), which a page seldom needs.
    key="max_pixels", values=(256 * 28 * 28, 512 * 28 * 28, 1024 * 28 * 28), default=1024 * 28 * 28,
)

VLM_FAMILIES: Mapping[str, VlmFamily] = MappingProxyType({
    # Qwen2.5-VL (3B/7B/32B/72B): 32-block windowed ViT, 14-px patches, 2x2 merger MLP into the decoder.
    "qwen2_5_vl": VlmFamily(
        decoder="model.language_model.", vision=("model.visual.",), projector=("model.visual.merger.",),
        embed="model.language_model.embed_tokens", vision_layers="model.visual.blocks", vision_query="attn.qkv",
        query_share=1 / 3, window_layers_key="fullatt_block_indexes", window_key="window_size",
        geometry=DynamicResolution, budget=_QWEN_BUDGET,
        source="transformers models/qwen2_5_vl; vLLM qwen2_5_vl.py (hf_to_vllm_mapper)",
    ),
    # Qwen3-VL dense (2B-32B): 16-px patches, merger plus DeepStack mergers feeding decoder layers.
    "qwen3_vl": VlmFamily(
        decoder="model.language_model.", vision=("model.visual.",),
        projector=("model.visual.merger.", "model.visual.deepstack_merger_list."),
        embed="model.language_model.embed_tokens", vision_layers="model.visual.blocks", vision_query="attn.qkv",
        query_share=1 / 3, geometry=DynamicResolution,
        budget=ImageBudget(key="max_pixels", values=(256 * 32 * 32, 512 * 32 * 32, 1024 * 32 * 32), default=1024 * 32 * 32),
        source="transformers models/qwen3_vl; vLLM qwen3_vl.py",
    ),
    # Gemma-3 multimodal (4B/12B/27B): SigLIP 896 px / 14-px patches, pooled to 256 tokens per crop.
    "gemma3": VlmFamily(
        decoder="model.language_model.", vision=("model.vision_tower.",), projector=("model.multi_modal_projector.",),
        embed="model.language_model.embed_tokens", vision_layers="model.vision_tower.encoder.layers",
        vision_query="self_attn.q_proj",
        # The projection into the text space is a bare Parameter (vision hidden x text hidden), applied by
        # torch.matmul after the 4 x 4 average pooling: 2 x 1152 x 2560 FLOPs per soft token on gemma-3-4b.
        projector_matmuls=("model.multi_modal_projector.mm_input_projection_weight",),
        # SigLIP's attention-pooling head: Gemma-3 reads last_hidden_state, never the pooled output, and the
        # released configs set vision_use_head false (no such module); a config that leaves it on builds it.
        unused=("model.vision_tower.head.",),
        geometry=FixedTokensPanScan,
        budget=ImageBudget(key="do_pan_and_scan", values=(0, 1), default=0, switch=True),
        source="transformers models/gemma3 (Gemma3ImageProcessor); vLLM gemma3_mm.py",
    ),
    # Idefics3 / SmolVLM: SigLIP on 364-px (SmolVLM) or 512-px (Idefics3) tiles, pixel shuffle x scale.
    "idefics3": VlmFamily(
        decoder="model.text_model.", vision=("model.vision_model.",), projector=("model.connector.",),
        embed="model.text_model.embed_tokens", vision_layers="model.vision_model.encoder.layers",
        vision_query="self_attn.q_proj",
        geometry=ImageSplitting,
        # SmolVLM's default longest edge is 4 x 364 = 1456 (its tile): 2 and 3 tiles' worth are the cheaper budgets.
        budget=ImageBudget(key="longest_edge", nested="size", values=(728, 1092, 1456), default=1456),
        source="transformers models/idefics3 (Idefics3ImageProcessor); vLLM idefics3.py",
    ),
    # Mistral-3 (Mistral-Small-3.1/3.2): Pixtral ViT, 14-px patches, 2x2 patch merger, Mistral decoder.
    "mistral3": VlmFamily(
        decoder="model.language_model.", vision=("model.vision_tower.",), projector=("model.multi_modal_projector.",),
        embed="model.language_model.embed_tokens", vision_layers="model.vision_tower.transformer.layers",
        vision_query="attention.q_proj",
        geometry=LongestEdgePatches,
        budget=ImageBudget(key="longest_edge", nested="size", values=(512, 1024, 1540), default=1540),
        source="transformers models/mistral3, models/pixtral; vLLM mistral3.py",
    ),
})


def vlm_family(model_type: str | None) -> VlmFamily | None:
    """The row for ``model_type``, or None (Gemma-4 and text-only models have their rows elsewhere)."""
    return VLM_FAMILIES.get(model_type or "")
