"""The levers the default search pulls, per model family, as data.

Suite energy is decode (weights read once per generated token: the weights'
format, the head), prefill (every prompt and image token: the image budget)
and how many tokens an answer takes (the response policy, an answer cap).
The default search (:mod:`ecoquant.optimize.stages`) first compares the
**weights** candidates, which need a quantization each, then applies the
**serving** levers, which reuse a checkpoint's weights, to the best few.

Per family (``model_type`` of the checkpoint's ``config.json``), a
:class:`FamilyLevers` entry says which; :data:`DEFAULT_LEVERS` serves any
family without one. Each weights candidate is written in the grid file's
vocabulary (:mod:`ecoquant.optimize.grid`), so ``--grid`` can reproduce any
of them by hand.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ecoquant.eval.image_budget import SOFT_TOKEN_BUDGETS, image_processor_type
from ecoquant.models.families import VLM_FAMILIES
from ecoquant.optimize.grid import Candidate, auto_name, grid_from_mapping

WEIGHTS_COMMON: tuple[Mapping[str, Any], ...] = (
    # Data-free W4A16: the floor every calibrated method must beat, and the cheapest to make.
    {"method": "rtn"},
    # GPTQ with its defaults (hessian observer, act-order, two scale passes): the best KL on Gemma-3 270M.
    {"method": "gptq"},
    # AWQ smoothing then GPTQ: issue 14's best on out-of-domain text at the same bytes.
    {"method": "awq-gptq"},
    # The untied int4 head: Gemma's head is the largest single read per decoded token (262k x d).
    {"method": "gptq", "lm_head": "int4"},
)
"""Weights candidates every family gets (all W4A16, group 128, the ``auto`` preset)."""

WEIGHTS_W8A8: tuple[Mapping[str, Any], ...] = (
    # W8A8 INT8 by RTN (data-free, per channel): prefill on int8 tensor cores, twice W4A16's decode bytes;
    # wins where prefill (image tokens) dominates the suite's energy. vLLM W8A8Int8 runs on Turing and later.
    {"method": "rtn", "scheme": "w8a8-int8"},
    # W8A8 FP8 (E4M3, data-free: RTN only): the same trade on fp8 tensor cores (the L4 is Ada, sm89).
    {"method": "rtn", "scheme": "w8a8-fp8"},
)
"""Cheap W8A8 weights candidates (RTN, no calibration) for families whose towers and decoder vLLM serves in W8A8."""


@dataclass(frozen=True)
class FamilyLevers:
    """What the default search tries for one model family.

    Attributes:
        weights: stage-1 candidates, in the grid file's vocabulary (a ``--budget`` that cannot
            take them all keeps the first ones: order them by expected value).
        responses: response policies tried on the best weights (``default`` is always there).
        answer_caps: ``max_new_tokens`` values shipped in ``generation_config.json`` (vLLM applies it
            to any request without ``max_tokens``; the evaluation lowers each task's cap to it).
        kv_cache_dtypes: vLLM ``kv_cache_dtype`` values (serving options: ``--backend vllm`` only).
        image_budget_max_factor: image budgets tried are the processor's allowed values up to this
            multiple of the checkpoint's own budget (lower ones save prefill; one step up can buy back
            quality a harsher weights format lost); 0 tries none.
        processor_budgets: image budgets as vLLM ``mm_processor_kwargs`` (the family's own key:
            ``max_pixels``, ``size.longest_edge``, ``do_pan_and_scan``), tried as serving options with
            ``--backend vllm`` (the transformers backend's budget is Gemma-4's ``max_soft_tokens`` only).
        note: why this family's entry differs from the default.
    """

    weights: tuple[Mapping[str, Any], ...] = WEIGHTS_COMMON
    responses: tuple[str, ...] = ("short",)
    answer_caps: tuple[int, ...] = (16,)
    kv_cache_dtypes: tuple[str, ...] = ("fp8",)
    image_budget_max_factor: float = 2.0
    processor_budgets: tuple[Mapping[str, Any], ...] = ()
    note: str = ""

    def weights_candidates(self) -> tuple[Candidate, ...]:
        return grid_from_mapping({"candidates": [dict(w) for w in self.weights]}, "levers").candidates


DEFAULT_LEVERS = FamilyLevers(note="any family without an entry: the common weights candidates and serving levers")

FAMILY_LEVERS: Mapping[str, FamilyLevers] = MappingProxyType(
    {
        # Gemma-4 (E2B/E4B and the tiny fixtures): also the seed's MLP + attention-output set, which keeps
        # q/k/v in bf16 (the seed's conservative Round-2 artifact), and the two RTN W8A8 schemes (image-heavy
        # prompts make prefill a large share of the suite's energy; both are data-free, so stage 1 stays cheap).
        "gemma4": FamilyLevers(
            weights=(*WEIGHTS_COMMON, {"method": "gptq", "preset": "gemma4-e-mlpo"}, *WEIGHTS_W8A8),
            note="adds the seed's gemma4-e-mlpo module set and RTN W8A8 (int8, fp8)",
        ),
        # The vision-language families (ecoquant.models.families): the common candidates, RTN W8A8, and
        # each image budget of the row other than the processor's default, under the family's own key.
        **{
            model_type: FamilyLevers(
                weights=(*WEIGHTS_COMMON, *WEIGHTS_W8A8),
                processor_budgets=tuple(
                    row.budget.processor_kwargs(v) for v in row.budget.values if v != row.budget.default
                ),
                note=f"RTN W8A8 and the image budget by {row.budget.key}",
            )
            for model_type, row in VLM_FAMILIES.items()
        },
    }
)


def family_levers(model_type: str | None) -> FamilyLevers:
    return FAMILY_LEVERS.get(model_type or "", DEFAULT_LEVERS)


def default_image_budget(model: Path) -> int | None:
    """The checkpoint's own image-token budget (its processor config's ``max_soft_tokens``), if it has one."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        try:
            data = json.loads((Path(model) / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        budget = (data.get("image_processor") or {}).get("max_soft_tokens") or data.get("max_soft_tokens")
        if isinstance(budget, int):
            return budget
    return None


def image_budgets(model: Path, factor: float) -> tuple[int, ...]:
    """The allowed budgets other than the checkpoint's own, up to ``factor`` times it."""
    allowed = SOFT_TOKEN_BUDGETS.get(image_processor_type(Path(model)) or "")
    default = default_image_budget(model)
    if not allowed or default is None or factor <= 0:
        return ()
    return tuple(b for b in allowed if b != default and b <= factor * default)


@dataclass(frozen=True)
class ServingLevers:
    """The serving levers resolved for one model and backend (what stage 2 applies, one at a time)."""

    responses: tuple[str, ...] = ()
    answer_caps: tuple[int, ...] = ()
    image_budgets: tuple[int, ...] = ()
    serving: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    def variants(self, c: Candidate) -> tuple[Candidate, ...]:
        """``c`` with each lever applied alone (levers it already carries are skipped)."""
        out: list[Candidate] = []
        out += [_renamed(replace(c, response=r)) for r in self.responses if r != c.response]  # type: ignore[arg-type]
        out += [_renamed(replace(c, answer_cap=n)) for n in self.answer_caps if n != c.answer_cap]
        out += [_renamed(replace(c, max_soft_tokens=b)) for b in self.image_budgets if b != c.max_soft_tokens]
        out += [_renamed(replace(c, serving={**c.serving, **s})) for s in self.serving if any(c.serving.get(k) != v for k, v in s.items())]
        return tuple(out)

    def count(self) -> int:
        return len(self.responses) + len(self.answer_caps) + len(self.image_budgets) + len(self.serving)


def serving_levers(model: Path, levers: FamilyLevers, backend: str) -> ServingLevers:
    """The family's serving levers this model and backend can take (kv-cache options need a vLLM server)."""
    return ServingLevers(
        responses=levers.responses,
        answer_caps=levers.answer_caps,
        image_budgets=image_budgets(model, levers.image_budget_max_factor),
        serving=(
            (*({"kv_cache_dtype": d} for d in levers.kv_cache_dtypes),
             *({"mm_processor_kwargs": dict(kw)} for kw in levers.processor_budgets))
            if backend == "vllm" else ()
        ),
    )


def _renamed(c: Candidate) -> Candidate:
    return replace(c, name=auto_name_for(c))


def auto_name_for(c: Candidate) -> str:
    """The grid's automatic name for ``c`` (see :func:`ecoquant.optimize.grid.auto_name`)."""
    return auto_name(
        c.method, c.preset, c.group_size, c.observer, c.response, c.serving, c.max_soft_tokens, c.scale_passes,
        c.dampening, lm_head=c.lm_head, answer_cap=c.answer_cap, scheme=c.scheme,
    )
