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

Every lever value names the vLLM features it needs (:data:`LEVER_FEATURES`,
keys of :data:`ecoquant.serve.vllm_features.FEATURES`), so ``--target-vllm``
leaves out what the organisers' vLLM is known to lack (:func:`fit_vllm`) and
the submission states the lowest vLLM its pick needs.

A family with a drafting assistant (Gemma-4's MTP assistant) gets the
**MTP** lever in stage 2 (:class:`MtpLever`): fewer target steps per answer
rather than cheaper ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.eval.image_budget import SOFT_TOKEN_BUDGETS, image_processor_type
from ecoquant.models.families import VLM_FAMILIES
from ecoquant.optimize.grid import Candidate, auto_name, grid_from_mapping
from ecoquant.serve.vllm_features import MODEL_FEATURES, VllmFeature, known_missing, lacks_text, unchecked

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
class MtpLever:
    """Stage 2's MTP lever: the best weights with a drafting assistant, k chosen by measured acceptance.

    How k is chosen (docs/optimize.md, "The MTP lever"): each kept weights candidate is first measured
    drafting ``probe_k`` tokens per step. Its measured ``mean_accepted_per_step`` a gives the per-draft
    acceptance alpha under the usual model (draft i is kept only if drafts 1..i-1 were, each with
    probability alpha: a = alpha + ... + alpha^probe_k). Draft i then pays off only while alpha^i is
    large enough that the draft's cost is likely bought back, so the k tried next are the largest
    k <= probe_k with alpha^k >= ``keep_share``, and half of it: at most two more evaluations, and none
    when the probe already is that k. The energy model (with the measured acceptance) ranks them.

    Attributes:
        probe_k: the draft length measured first (4: vLLM's Gemma-4 recipe value for the E4B).
        keep_share: the smallest chance that the last draft of a step is accepted for k to be worth trying.
        assistant_suffix: the published assistant of ``org/model`` is ``org/model`` + this suffix, and a
            local folder's is the sibling folder named so (Google publishes one per Gemma-4 IT checkpoint:
            google/gemma-4-E4B-it -> google/gemma-4-E4B-it-assistant).
    """

    probe_k: int = 4
    keep_share: float = 0.5
    assistant_suffix: str = "-assistant"

    def count(self) -> int:
        """Evaluations per kept weights candidate, at most: the probe and up to two more k."""
        return 3

    def ks_after(self, mean_accepted_per_step: float) -> tuple[int, ...]:
        """The k to try after the probe measured ``mean_accepted_per_step`` (see the class docstring)."""
        alpha = per_draft_acceptance(mean_accepted_per_step, self.probe_k)
        best = max((k for k in range(1, self.probe_k + 1) if alpha**k >= self.keep_share), default=1)
        return tuple(k for k in dict.fromkeys((best, max(best // 2, 1))) if k != self.probe_k)


def per_draft_acceptance(mean_accepted_per_step: float, k: int, tol: float = 1e-9) -> float:
    """alpha in [0, 1] with alpha + alpha^2 + ... + alpha^k = ``mean_accepted_per_step`` (bisection).

    Worked example: k = 4 and 2.0 accepted per step gives alpha ~ 0.74 (0.74 + 0.55 + 0.41 + 0.30).
    """
    target = min(max(mean_accepted_per_step, 0.0), float(k))
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if sum(mid**i for i in range(1, k + 1)) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


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
        mtp: the MTP lever, for families with a drafting assistant; None: none.
        note: why this family's entry differs from the default.
    """

    weights: tuple[Mapping[str, Any], ...] = WEIGHTS_COMMON
    responses: tuple[str, ...] = ("short",)
    answer_caps: tuple[int, ...] = (16,)
    kv_cache_dtypes: tuple[str, ...] = ("fp8",)
    image_budget_max_factor: float = 2.0
    processor_budgets: tuple[Mapping[str, Any], ...] = ()
    mtp: MtpLever | None = None
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
            # Every Gemma-4 IT checkpoint has a published MTP assistant (transformers'
            # Gemma4AssistantForCausalLM; vLLM's gemma4_mtp path, issue 30).
            mtp=MtpLever(),
            note="adds the seed's gemma4-e-mlpo module set, RTN W8A8 (int8, fp8) and the MTP assistant",
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
    mtp: MtpLever | None = None
    assistant: str | None = None
    """The assistant the MTP lever drafts with; the lever is off without one."""
    left_out: tuple[str, ...] = ()
    """Levers this model, backend or target vLLM cannot take, each with why (the dry run shows them)."""
    model_type: str | None = None

    def drafted(self, c: Candidate, k: int) -> Candidate:
        """``c`` decoding with the assistant drafting ``k`` tokens per step."""
        assert self.assistant is not None
        return _renamed(replace(c, assistant=self.assistant, num_speculative_tokens=k))

    def mtp_probes(self, c: Candidate) -> tuple[Candidate, ...]:
        """``c`` with the assistant at the probe's k (none when the lever is off or ``c`` already drafts)."""
        if self.mtp is None or self.assistant is None or c.assistant is not None or not drafter_fits(c, self.model_type):
            return ()
        return (self.drafted(c, self.mtp.probe_k),)

    def variants(self, c: Candidate) -> tuple[Candidate, ...]:
        """``c`` with each lever applied alone (levers it already carries are skipped)."""
        out: list[Candidate] = []
        out += [_renamed(replace(c, response=r)) for r in self.responses if r != c.response]  # type: ignore[arg-type]
        out += [_renamed(replace(c, answer_cap=n)) for n in self.answer_caps if n != c.answer_cap]
        out += [_renamed(replace(c, max_soft_tokens=b)) for b in self.image_budgets if b != c.max_soft_tokens]
        out += [_renamed(replace(c, serving={**c.serving, **s})) for s in self.serving if any(c.serving.get(k) != v for k, v in s.items())]
        return tuple(out)

    def count(self) -> int:
        mtp = self.mtp.count() if self.mtp is not None and self.assistant is not None else 0
        return len(self.responses) + len(self.answer_caps) + len(self.image_budgets) + len(self.serving) + mtp


def serving_levers(
    model: Path,
    levers: FamilyLevers,
    backend: str,
    target_vllm: str,
    assistant: str | None = None,
    model_type: str | None = None,
) -> ServingLevers:
    """The family's serving levers this model, backend and target vLLM can take.

    kv-cache options need a vLLM server; the MTP lever needs an assistant and the transformers backend
    (its acceptance is measured with assisted generation); a lever whose vLLM features ``target_vllm``
    is known to lack is left out, with why.
    """
    left_out: list[str] = []
    serving = []
    for d in levers.kv_cache_dtypes if backend == "vllm" else ():
        lacking = known_missing(target_vllm, lever_features("kv_cache_dtype", d))
        if lacking:
            left_out.append(f"kv_cache_dtype {d}: {lacks_text(target_vllm, lacking)}")
        else:
            serving.append({"kv_cache_dtype": d})
    if backend == "vllm":  # a family's own image-budget key, through vLLM's processor
        serving.extend({"mm_processor_kwargs": dict(kw)} for kw in levers.processor_budgets)
    mtp = levers.mtp
    if mtp is not None:
        lacking = known_missing(target_vllm, lever_features("assistant", assistant or "any"))
        why = (
            lacks_text(target_vllm, lacking)
            if lacking
            else "no assistant given or found beside the model (--assistant)"
            if assistant is None
            else "its acceptance is measured with --backend transformers"
            if backend != "transformers"
            else None
        )
        if why is not None:
            left_out.append(f"MTP: {why}")
            mtp = None
    return ServingLevers(
        responses=levers.responses,
        answer_caps=levers.answer_caps,
        image_budgets=image_budgets(model, levers.image_budget_max_factor),
        serving=tuple(serving),
        mtp=mtp,
        assistant=assistant if mtp is not None else None,
        left_out=tuple(left_out),
        model_type=model_type,
    )


# ------------------------------------------------------------------ what each lever needs of vLLM


@dataclass(frozen=True)
class LeverFeatures:
    """A lever's value and the vLLM features (:data:`~ecoquant.serve.vllm_features.FEATURES`) it needs."""

    lever: str
    """A candidate field (``scheme``, ``lm_head``, ``embeddings`` of its preset, ``assistant``) or a serving key."""
    value: str | None
    """The value that needs them; None: any value that is set."""
    features: tuple[str, ...]


LEVER_FEATURES: tuple[LeverFeatures, ...] = (
    # compressed-tensors pack-quantized int4 Linears (CompressedTensorsWNA16; Marlin on GPU).
    LeverFeatures("scheme", "w4a16", ("wna16",)),
    # int-quantized W8A8: int8 weights and per-token int8 activations (CompressedTensorsW8A8Int8).
    LeverFeatures("scheme", "w8a8-int8", ("w8a8_int8",)),
    # float-quantized W8A8: FP8 E4M3 weights and dynamic activations (CompressedTensorsW8A8Fp8).
    LeverFeatures("scheme", "w8a8-fp8", ("w8a8_fp8",)),
    # The untied quantized head is a weight-only quantized Linear (WNA16 at 4 or 8 bits).
    LeverFeatures("lm_head", "int4", ("wna16",)),
    LeverFeatures("lm_head", "int8", ("wna16",)),
    # Quantized token and Per-Layer-Embedding tables (CompressedTensorsEmbeddingWNA16Int; GPU only).
    LeverFeatures("embeddings", "int4", ("quantized_tables",)),
    LeverFeatures("embeddings", "int8", ("quantized_tables",)),
    # The kv-cache serving lever.
    LeverFeatures("kv_cache_dtype", "fp8", ("fp8_kv_cache",)),
    # A drafting assistant: shipped as speculative_config (method mtp), vLLM's Gemma-4 MTP path.
    LeverFeatures("assistant", None, ("gemma4_mtp",)),
)
"""What each lever value needs of vLLM, as data (``--target-vllm`` and the submission's minimum read it)."""

FAMILY_FEATURES = MODEL_FEATURES
"""What serving the family at all needs, whatever its levers (``model_type`` -> features; one table, in
:mod:`ecoquant.serve.vllm_features`, which ``ecoquant serve`` checks too)."""


def lever_features(lever: str, value: Any) -> tuple[str, ...]:
    """The features ``lever`` set to ``value`` needs (none for an unset value or a lever without a row)."""
    if value is None:
        return ()
    rows = (r for r in LEVER_FEATURES if r.lever == lever and (r.value is None or r.value == str(value)))
    return tuple(dict.fromkeys(f for r in rows for f in r.features))


def candidate_features(c: Candidate, model_type: str | None) -> tuple[str, ...]:
    """Every vLLM feature serving ``c`` needs: its family's and each of its levers'."""
    from ecoquant.models.presets import get_preset

    try:
        preset = get_preset(c.preset, model_type)
        embeddings, head = preset.embeddings, c.lm_head or preset.lm_head
    except EcoquantError:  # a preset this family lacks fails at quantization, with its own message
        embeddings, head = None, c.lm_head
    values: dict[str, Any] = {
        "scheme": c.scheme,
        "lm_head": head,
        "embeddings": embeddings,
        "assistant": c.assistant,
        **{str(k).replace("-", "_"): v for k, v in c.serving.items()},
    }
    names = [*FAMILY_FEATURES.get(model_type or "", ())]
    for lever, value in values.items():
        names += lever_features(lever, value)
    return tuple(dict.fromkeys(names))


NO_DRAFTER: tuple[str, ...] = (
    # vLLM's drafters (EAGLE, the Gemma-4 MTP assistant) read the target's embed_tokens.weight directly
    # (docs/serving.md, vLLM 0.32): quantized token tables and a drafter cannot be served together.
    "quantized_tables",
)
"""Features a checkpoint cannot have and be served with a drafter."""


def drafter_fits(c: Candidate, model_type: str | None) -> bool:
    """Whether vLLM can serve ``c``'s checkpoint with a drafting assistant (see :data:`NO_DRAFTER`)."""
    return not set(NO_DRAFTER) & set(candidate_features(replace(c, assistant=None, num_speculative_tokens=None), model_type))


@dataclass(frozen=True)
class VllmFit:
    """Which candidates a target vLLM can serve: those kept, those left out and why, and what is unchecked."""

    target: str
    kept: tuple[Candidate, ...]
    left_out: tuple[tuple[str, str], ...]
    """``(candidate, why)`` for each left out."""
    unchecked: tuple[VllmFeature, ...]
    """Features the kept candidates use that ecoquant only ran on a newer vLLM than the target."""

    def lines(self) -> list[str]:
        """What the dry run and the progress lines say about the target vLLM."""
        out = [f"left out for vLLM {self.target}: {name}: {why}" for name, why in self.left_out]
        if self.unchecked:
            out.append(
                f"not checked on vLLM {self.target} (kept): "
                + ", ".join(f"{f.name} (ecoquant's vLLM group ran {f.min_version})" for f in self.unchecked)
            )
        return out


def fit_vllm(candidates: Sequence[Candidate], model_type: str | None, target: str) -> VllmFit:
    """Split ``candidates`` by whether vLLM ``target`` is known to have every feature each needs."""
    kept: list[Candidate] = []
    left_out: list[tuple[str, str]] = []
    unknown: dict[str, VllmFeature] = {}
    for c in candidates:
        names = candidate_features(c, model_type)
        lacking = known_missing(target, names)
        if lacking:
            left_out.append((c.name, lacks_text(target, lacking)))
        else:
            kept.append(c)
            unknown |= {f.name: f for f in unchecked(target, names)}
    return VllmFit(target, tuple(kept), tuple(left_out), tuple(unknown.values()))


def require_family(model_type: str | None, target: str) -> None:
    """One line when the target vLLM is known to lack the model itself: no lever can help."""
    lacking = known_missing(target, FAMILY_FEATURES.get(model_type or "", ()))
    if lacking:
        raise EcoquantError(f"this model cannot be served by the target vLLM: {lacks_text(target, lacking)}; raise --target-vllm")


# ------------------------------------------------------------------ the assistant


def find_assistant(model: str, levers: FamilyLevers) -> str | None:
    """The assistant beside ``model``: a local folder's ``<name>-assistant`` sibling holding a
    ``config.json``, or a hub id's published ``<id>-assistant`` (named, never downloaded here).

    None when the family has no MTP lever, or a local model has no such sibling.
    """
    if levers.mtp is None:
        return None
    suffix = levers.mtp.assistant_suffix
    path = Path(model).expanduser()
    if path.exists():
        sibling = path.resolve().parent / f"{path.resolve().name}{suffix}"
        return str(sibling) if (sibling / "config.json").is_file() else None
    name = str(model).strip().rstrip("/")
    return f"{name}{suffix}" if name.count("/") == 1 and not name.startswith((".", "/", "~")) else None


def check_assistant(assistant: str) -> str:
    """A given assistant as it will be used: a local folder must hold a ``config.json`` (one line if not)."""
    path = Path(assistant).expanduser()
    if path.exists() or assistant.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise EcoquantError(f"--assistant {assistant}: no config.json there; pass the assistant's folder or hub id")
        return str(path.resolve())
    return assistant


def _renamed(c: Candidate) -> Candidate:
    return replace(c, name=auto_name_for(c))


def auto_name_for(c: Candidate) -> str:
    """The grid's automatic name for ``c`` (see :func:`ecoquant.optimize.grid.auto_name`)."""
    return auto_name(
        c.method, c.preset, c.group_size, c.observer, c.response, c.serving, c.max_soft_tokens, c.scale_passes,
        c.dampening, lm_head=c.lm_head, answer_cap=c.answer_cap, scheme=c.scheme,
        num_speculative_tokens=c.num_speculative_tokens,
    )
