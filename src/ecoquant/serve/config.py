"""``vllm_config.yaml``: how the challenge will serve a checkpoint, written next to it.

The organizers run every submission as ``vllm serve --config vllm_config.yaml``
and take the file as it is, so each key is a decision with a cost:

* ``max_model_len`` bounds every request (prompt with its image tokens, plus
  the answer). Too small and long requests are refused; larger than needed
  only reserves memory nobody uses. It is *measured*: every request of the
  chosen suite (every prompt variant) goes through this checkpoint's own
  processor and chat template, exactly as the transformers backend builds it
  and as vLLM counts ``prompt_tokens`` (the two agree; ``tests/test_vllm_cpu.py``
  checks it against a real vLLM), the longest prompt plus its task's answer
  cap is taken, and a margin is added for prompts worded differently from
  ours. The YAML says how the number was chosen, in a comment above it.
* ``limit_mm_per_prompt`` allows the most images any request of the suite
  has and sets the modalities the suite never uses (audio, video) to 0, so
  vLLM reserves no encoder memory for them.
* ``override_generation_config`` sets the sampling a request gets when it
  names none: greedy (the evaluation's default) or the seed card's Gemma
  sampling, from the same presets as ``ecoquant eval --sampling``.
* ``speculative_config`` (with an assistant): ``{"method": "mtp", "model":
  "./assistant", "num_speculative_tokens": k}``, vLLM's Gemma-4 MTP path
  (docs.vllm.ai, speculative decoding, "Gemma 4 Assistant Models"; vLLM maps
  a ``gemma4_assistant`` checkpoint to ``Gemma4MTPModel``, whose layers read
  the target's KV cache). The path is relative, as ``model: .`` is: vLLM
  resolves both from the folder it is started in, the submission's own. No
  ``quantization`` key inside it: vLLM reads the draft's quantization from
  the assistant's own ``config.json`` (``get_draft_quant_config``), and its
  docs say the key is only for a draft quantized as the target is.
  A checkpoint with quantized token tables gets none: vLLM's drafters read
  the target's ``embed_tokens.weight`` directly (docs/serving.md).
* A compressed-tensors checkpoint gets **no** ``quantization`` key: vLLM reads
  ``quantization_config`` from ``config.json`` and picks its W4A16 kernel. The
  NF4 baseline is a bf16 folder quantized at load time, which needs both
  ``quantization: bitsandbytes`` and ``load_format: bitsandbytes``.

Values that are mappings are written as JSON strings (``'{"image": 1}'``):
every vLLM version reads that form, while nested YAML mappings in ``--config``
files are only understood by recent ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import ecoquant
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import (
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    GENERATION_PRESETS,
    ChatRequest,
    GenerationSettings,
    ImagePart,
    check_num_speculative_tokens,
)
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.economy import PROMPT_VARIANTS, prompt_variant, suite_requests
from ecoquant.eval.image_budget import check_max_soft_tokens, processor_kwargs
from ecoquant.eval.tasks import Suite
from ecoquant.models.quant_config import quantization_block

CONFIG_FILE = "vllm_config.yaml"

MARGIN_FRACTION = 0.25
"""Head-room over the longest measured request. The organizers' prompts are not
ours: their question wording, system turn or chat template may add tokens. A
quarter more covers a question several times longer than the suite's longest,
while costing nothing at run time (vLLM allocates KV blocks per token used)."""

MIN_MARGIN_TOKENS = 64
"""At least this much head-room, for tiny suites where a quarter is a few tokens."""

ROUND_TO = 128
"""``max_model_len`` is rounded up to a multiple of this (a whole number of 16-token KV blocks, and readable)."""

NF4_KEYS: Mapping[str, str] = MappingProxyType({"quantization": "bitsandbytes", "load_format": "bitsandbytes"})
"""What makes vLLM quantize a bf16 checkpoint to NF4 at load time (both are needed)."""


@dataclass(frozen=True)
class ContextBudget:
    """The longest request of a suite, in this checkpoint's tokens.

    Attributes:
        prompt_tokens: prompt tokens of that request (chat template and image soft tokens included).
        answer_tokens: its task's answer cap (``max_new_tokens``).
        request: ``task/sample`` id of that request.
        prompt_variant: the prompt variant it was asked with.
        suite: the suite spec measured (``builtin``, ``doc``, a path...).
        requests: how many requests were measured.
        max_images: the most images in one request.
    """

    prompt_tokens: int
    answer_tokens: int
    request: str
    prompt_variant: str
    suite: str
    requests: int
    max_images: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.answer_tokens


def choose_max_model_len(needed: int, margin: float = MARGIN_FRACTION, limit: int | None = None) -> int:
    """``needed`` plus ``max(margin * needed, MIN_MARGIN_TOKENS)``, rounded up to :data:`ROUND_TO`.

    Worked example: the longest request is 372 prompt tokens + 32 answer tokens
    = 404; a quarter more is 505, rounded up to 512. ``limit`` is the model's
    own context length: asking for more than it can hold is an error.
    """
    if needed < 1:
        raise ValueError(f"needed tokens must be positive, got {needed}")
    if margin < 0:
        raise ValueError(f"margin cannot be negative, got {margin}")
    padded = needed + max(math.ceil(needed * margin), MIN_MARGIN_TOKENS)
    chosen = math.ceil(padded / ROUND_TO) * ROUND_TO
    if limit is not None and chosen > limit:
        if needed > limit:
            raise EcoquantError(f"the suite needs {needed} tokens but the model holds at most {limit}; use a shorter suite")
        return limit
    return chosen


def count_prompt_tokens(processor: Any, request: ChatRequest, max_soft_tokens: int | None = None) -> int:
    """Prompt tokens of one request: the chat template applied with images inline, image soft tokens included.

    The same call the transformers backend makes, and the number vLLM reports as ``prompt_tokens``
    (with the same image-token budget).
    """
    from ecoquant.eval.backends.transformers_backend import hf_messages

    inputs = processor.apply_chat_template(
        [hf_messages(request)],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs(max_soft_tokens),
    )
    return int(inputs["input_ids"].shape[1])


def load_processor(path: Path) -> Any:
    """The checkpoint's processor, which must be able to read images (the suites ask about images)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EcoquantError(f"{path} has no processor transformers can load ({exc}); pass --max-model-len") from None
    if getattr(processor, "image_processor", None) is None:
        raise EcoquantError(f"{path} has no image processor, so image prompts cannot be measured; pass --max-model-len")
    return processor


def prompt_lengths(path: Path, suite: Suite, variants: Sequence[str], max_soft_tokens: int | None = None) -> ContextBudget:
    """Measure every request of ``suite`` under each prompt variant with the checkpoint's processor.

    The requests are built by :func:`ecoquant.eval.economy.suite_requests`
    and counted by :func:`count_prompt_tokens`, so image soft tokens are included.
    """
    processor = load_processor(path)
    longest: tuple[int, int, str, str] | None = None
    count = max_images = 0
    for name in variants:
        for _task, _sample, request in suite_requests(suite, prompt_variant(name), GenerationSettings()):
            n_prompt = count_prompt_tokens(processor, request, max_soft_tokens)
            count += 1
            images = sum(isinstance(p, ImagePart) for m in request.messages for p in m.parts)
            max_images = max(max_images, images)
            if longest is None or n_prompt + request.max_new_tokens > longest[0] + longest[1]:
                longest = (n_prompt, request.max_new_tokens, request.id, name)
    if longest is None:
        raise EcoquantError("the suite has no samples to measure; choose another --suite")
    return ContextBudget(longest[0], longest[1], longest[2], longest[3], suite.name, count, max_images)


def generation_overrides(settings: GenerationSettings) -> dict[str, Any]:
    """The sampling defaults as vLLM's ``override_generation_config`` (temperature 0 is greedy in vLLM)."""
    if not settings.do_sample:
        return {"temperature": 0.0}
    out: dict[str, Any] = {"temperature": settings.temperature}
    if settings.top_p is not None:
        out["top_p"] = settings.top_p
    if settings.top_k is not None:
        out["top_k"] = settings.top_k
    return out


def modality_limits(config: Mapping[str, Any], images: int) -> dict[str, int]:
    """``limit_mm_per_prompt``: ``images`` images, 0 for the other inputs this checkpoint has.

    Read from ``config.json`` rather than a table by model type, because
    checkpoints of one type differ (Gemma-4 E models have an audio tower, the
    larger Gemma-4 models do not) and vLLM refuses limits for inputs a model lacks.
    """
    limits = {"image": images}
    if config.get("audio_config") is not None:
        limits["audio"] = 0
    if config.get("video_token_id") is not None:
        limits["video"] = 0
    return limits


def engine_key(key: str) -> str:
    """``max-num-seqs`` -> ``max_num_seqs``: the spelling this file uses (vLLM reads both)."""
    return str(key).strip().replace("-", "_")


@dataclass(frozen=True)
class ServeConfigOptions:
    """What ``ecoquant serve-config`` decides.

    Attributes:
        suite: the suite whose longest request sets ``max_model_len`` (``builtin``, ``doc``, ``image``, a ``.jsonl``).
        size: built-in suite size; limit: samples per task (None: all).
        prompt_variants: variants measured (default: all, so none of them can overflow).
        nf4: the NF4 runtime baseline: add ``quantization``/``load_format: bitsandbytes``.
        sampling: a preset name of :data:`GENERATION_PRESETS` for the generation defaults.
        max_model_len: set by hand instead of measured (then nothing is tokenized).
        max_images: images per prompt when ``max_model_len`` is set by hand.
        margin: head-room fraction over the longest measured request.
        model: what to write as ``model`` (default: the folder's absolute path; ``.`` for a folder served
            from inside itself; a hub id for publishing).
        cache_dir: built-in suite image cache.
        max_soft_tokens: the image-token budget (``mm_processor_kwargs``), validated against the checkpoint's
            image processor; ``max_model_len`` is measured with it. None: the processor's default.
        extra: more vLLM engine arguments, written as they are (``speculative_config``,
            ``mm_processor_kwargs``, ``max_num_seqs``...); a key the file already has is replaced.
            Dashes and underscores are the same key, as vLLM reads them.
        assistant: the drafting assistant as vLLM should find it (``./assistant`` for a folder inside the
            served one); writes ``speculative_config`` (see the module docstring). None: no drafter.
        num_speculative_tokens: tokens the assistant drafts per target step (k).
        min_vllm: the lowest vLLM version the served levers need, stated in the file's header (None: not stated).
    """

    suite: str = "builtin"
    size: int = DEFAULT_SIZE
    limit: int | None = None
    prompt_variants: tuple[str, ...] = tuple(PROMPT_VARIANTS)
    nf4: bool = False
    sampling: str = "greedy"
    max_model_len: int | None = None
    max_images: int = 1
    margin: float = MARGIN_FRACTION
    model: str | None = None
    cache_dir: Path | None = None
    max_soft_tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    assistant: str | None = None
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS
    min_vllm: str | None = None

    def __post_init__(self) -> None:
        check_num_speculative_tokens(self.num_speculative_tokens)
        if self.assistant is not None and "speculative_config" in {engine_key(k) for k in self.extra}:
            raise EcoquantError("give the assistant or a speculative_config option, not both")
        object.__setattr__(self, "prompt_variants", tuple(self.prompt_variants))
        object.__setattr__(self, "extra", MappingProxyType({engine_key(k): v for k, v in dict(self.extra).items()}))
        if "model" in self.extra:
            raise EcoquantError("the model is not a serving option; it is the checkpoint being served")
        if self.sampling not in GENERATION_PRESETS:
            raise EcoquantError(f"unknown sampling preset {self.sampling!r}; known: {', '.join(GENERATION_PRESETS)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EcoquantError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.max_images < 0:
            raise EcoquantError(f"--max-images cannot be negative, got {self.max_images}")
        if self.margin < 0:
            raise EcoquantError(f"--margin cannot be negative, got {self.margin}")
        if not self.prompt_variants:
            raise EcoquantError("measure at least one prompt variant")
        for name in self.prompt_variants:
            prompt_variant(name)


@dataclass(frozen=True)
class Entry:
    """One YAML key with the comment lines written above it."""

    key: str
    value: Any
    comment: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServeConfig:
    """The keys of ``vllm_config.yaml`` in file order, each with why it has its value."""

    entries: tuple[Entry, ...]
    header: tuple[str, ...] = ()
    budget: ContextBudget | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The keys as vLLM reads them (mappings still JSON strings, as in the file)."""
        return {e.key: _yaml_value(e.value, parse=True) for e in self.entries}

    def to_yaml(self) -> str:
        lines = [f"# {h}" if h else "#" for h in self.header]
        for e in self.entries:
            lines += [f"# {c}" for c in e.comment]
            lines.append(f"{e.key}: {_yaml_value(e.value)}")
        return "\n".join(lines) + "\n"


def _yaml_value(value: Any, parse: bool = False) -> Any:
    """A scalar as YAML (JSON scalars are valid YAML); a mapping as a single-quoted JSON string."""
    if isinstance(value, Mapping):
        text = json.dumps(dict(value))
        return text if parse else "'" + text.replace("'", "''") + "'"
    if parse:
        return value
    return json.dumps(value)


def checkpoint_config(path: Path) -> dict[str, Any]:
    """``config.json`` as plain JSON (no transformers: the keys vLLM itself reads)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EcoquantError(f"{path}/config.json cannot be read ({exc}); DIR must be a model folder") from None
    if not isinstance(config, dict):
        raise EcoquantError(f"{path}/config.json is not a JSON object; DIR must be a model folder")
    return config


def quantization_format(config: Mapping[str, Any]) -> str | None:
    """``compressed-tensors`` (or another quant method) named in ``config.json``, None for a plain model."""
    qc = quantization_block(config)
    if qc is None:
        return None
    return str(qc.get("quant_method", "compressed-tensors"))


def _context_length(config: Mapping[str, Any]) -> int | None:
    text = config.get("text_config") or config
    value = text.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def _dtype(config: Mapping[str, Any]) -> str:
    """The checkpoint's own activation dtype (``bfloat16`` for Gemma), as vLLM spells it."""
    value = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    return str(value) if value in ("bfloat16", "float16", "float32") else "bfloat16"


def has_quantized_tables(config: Mapping[str, Any]) -> bool:
    """Whether ``config.json`` stores quantized token tables (ecoquant writes them as ``embeddings_*`` groups)."""
    groups = (quantization_block(config) or {}).get("config_groups") or {}
    return any(str(name).startswith("embeddings_") for name in groups)


def speculative_entry(config: Mapping[str, Any], assistant: str, k: int) -> Entry:
    """``speculative_config`` for a drafting assistant; refused for quantized token tables (see the module docstring)."""
    if has_quantized_tables(config):
        raise EcoquantError(
            "this checkpoint stores quantized token tables, which vLLM's drafters cannot read (they take "
            "embed_tokens.weight directly); serve it without an assistant, or quantize with bf16 tables"
        )
    return Entry(
        "speculative_config",
        {"method": "mtp", "model": assistant, "num_speculative_tokens": k},
        (
            f"the drafting assistant ({assistant}, relative to the folder vLLM is started in) proposes {k} tokens per",
            "target step, verified in one pass (greedy answers unchanged); method mtp is vLLM's Gemma-4 assistant",
            "path (vLLM >= 0.21.0); the assistant's own config.json carries any quantization of its weights",
        ),
    )


def build_serve_config(path: Path, options: ServeConfigOptions, budget: ContextBudget | None = None) -> ServeConfig:
    """The config for ``path``; ``budget`` is measured here unless given or ``max_model_len`` is set by hand."""
    config = checkpoint_config(path)
    quant = quantization_format(config)
    if options.nf4 and quant is not None:
        raise EcoquantError(
            f"{path} is already quantized ({quant}); the NF4 baseline is built from the bf16 base model folder"
        )
    settings = GENERATION_PRESETS[options.sampling]
    model = options.model or str(path.resolve())
    check_max_soft_tokens(path, options.max_soft_tokens)

    if quant is None:
        model_note: tuple[str, ...] = ("the checkpoint; a positional MODEL on `vllm serve` overrides it",)
    else:
        model_note = (
            f"the checkpoint; its config.json names quantization_config ({quant}), which vLLM detects by",
            "itself: no `quantization` key here, so vLLM picks its W4A16 kernel (Marlin on GPU)",
        )
    entries = [Entry("model", model, model_note)]
    entries.append(Entry("dtype", _dtype(config), ("activations and unquantized weights, as the checkpoint stores them",)))

    if options.max_model_len is not None:
        max_model_len = options.max_model_len
        why: tuple[str, ...] = (f"max_model_len: {max_model_len}, set by hand (--max-model-len); nothing was measured",)
        images = options.max_images
    else:
        if budget is None:
            from ecoquant.eval.loaders import load_suite
            from ecoquant.eval.runner import limit_suite

            suite = limit_suite(
                load_suite(options.suite, cache_dir=options.cache_dir, size=options.size, limit=options.limit), options.limit
            )
            budget = prompt_lengths(path, suite, options.prompt_variants, options.max_soft_tokens)
        limit = _context_length(config)
        max_model_len = choose_max_model_len(budget.total_tokens, options.margin, limit)
        margin = max(math.ceil(budget.total_tokens * options.margin), MIN_MARGIN_TOKENS)
        why = (
            f"max_model_len: the longest request of suite {options.suite!r} ({budget.requests} requests measured over",
            f"prompt variants {', '.join(options.prompt_variants)}) with this checkpoint's processor and chat template,",
            f"image tokens included: {budget.request} ({budget.prompt_variant}) = {budget.prompt_tokens} prompt tokens",
            f"+ {budget.answer_tokens} answer tokens (the task's cap) = {budget.total_tokens}; plus a {options.margin:.0%} margin",
            f"(at least {MIN_MARGIN_TOKENS}: +{margin}) for prompts worded differently, rounded up to a multiple of {ROUND_TO}"
            + (f", at most the model's {limit}" if limit is not None and max_model_len == limit else "")
            + ".",
        )
        images = budget.max_images
    entries.append(Entry("max_model_len", max_model_len, why))
    if config.get("vision_config") is not None:
        entries.append(
            Entry(
                "limit_mm_per_prompt",
                modality_limits(config, images),
                (f"{images} image(s) per request, the most the suite asks with; the inputs it never uses get 0",),
            )
        )
    if options.max_soft_tokens is not None:
        entries.append(
            Entry(
                "mm_processor_kwargs",
                {"max_soft_tokens": options.max_soft_tokens},
                (
                    f"image-token budget: at most {options.max_soft_tokens} soft tokens per image (the processor's",
                    "default otherwise); max_model_len above was measured with it",
                ),
            )
        )
    preset_note = "greedy decoding" if not settings.do_sample else "the seed card's Gemma sampling"
    entries.append(
        Entry(
            "override_generation_config",
            generation_overrides(settings),
            (f"defaults for requests that name no sampling: {preset_note} (preset {options.sampling!r})",),
        )
    )
    if options.nf4:
        entries += [
            Entry(
                "quantization",
                NF4_KEYS["quantization"],
                ("NF4 baseline: bf16 weights quantized to 4-bit NF4 by bitsandbytes at load time",),
            ),
            Entry(
                "load_format",
                NF4_KEYS["load_format"],
                (
                    "vLLM needs the bitsandbytes loader too for in-flight NF4. Both exist up to vLLM 0.27.1 only",
                    "(0.28 removed them; later versions refuse this config): serve it with vLLM <= 0.27.1",
                ),
            ),
        ]
    if options.assistant is not None:
        entries.append(speculative_entry(config, options.assistant, options.num_speculative_tokens))
    for key, value in options.extra.items():
        note = ("set as a serving option (ecoquant optimize grid or serve-config --option)",)
        entries = [e for e in entries if e.key != key] + [Entry(key, value, note)]
    header = (
        f"vLLM serving config for {path.name}, written by ecoquant {ecoquant.__version__} (ecoquant serve-config).",
        f"Run: vllm serve --config {CONFIG_FILE}",
        *(() if options.min_vllm is None else (f"Needs vLLM >= {options.min_vllm} (the features its levers use).",)),
    )
    return ServeConfig(tuple(entries), header, budget)
