"""What an evaluation run is asked to do, checked whole before any model loads (``EvalConfig``).

Kept apart from :mod:`ecoquant.eval.runner`, which runs it, so that the CLI, ``optimize`` and the
serving code can build and check a configuration without the runner's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ecoquant.energy.gpus import DEFAULT_GPU, gpu_spec
from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import DEFAULT_NUM_SPECULATIVE_TOKENS, GenerationSettings, check_num_speculative_tokens
from ecoquant.eval.builtin import DEFAULT_SIZE
from ecoquant.eval.economy import prompt_variant

BackendKind = Literal["transformers", "openai", "vllm"]

@dataclass(frozen=True)
class EvalConfig:
    """Everything about a run except which models.

    Attributes:
        suite: ``"builtin"``, ``"doc"``, ``"image"`` or a ``.jsonl`` path (see :func:`load_suite`).
        size: pages/charts per kind for the built-in suite.
        limit: at most this many samples per task (any suite); None for all.
        cache_dir: built-in suite image cache (None: the default cache).
        backend: ``"transformers"`` (models loaded here), ``"openai"`` (models behind ``urls``) or
            ``"vllm"`` (a ``vllm serve --config`` started per model; needs the factory of
            :mod:`ecoquant.serve.vllm_backend`, which ``ecoquant eval --backend vllm`` passes).
        urls: OpenAI-compatible servers: one for all models, or one per model in
            the order base, variants.
        device, dtype, batch_size: for the transformers backend.
        concurrency, timeout_s: for the OpenAI backend.
        generation: sampling settings (greedy by default).
        prompt_variants: names from :data:`ecoquant.eval.economy.PROMPT_VARIANTS`;
            every model runs every variant.
        warmup_requests: requests sent before each model's first window and not measured.
        idle_seconds: idle-power sampling before the first model (only with a real meter).
        max_soft_tokens: the image-token budget per image (transformers: passed to the processor; vllm:
            written into each server's ``mm_processor_kwargs``); None for each checkpoint's default.
        repeats: energy windows per model and prompt variant after warm-up (only with a meter: without
            one there is nothing to measure, so the suite runs once). The first window's answers are
            scored; the energy reported is the mean over the windows, with their spread kept.
        target_gpu: the GPU the modelled energy is for (:data:`ecoquant.energy.gpus.GPUS`; the challenge's L4).
        target_concurrency: requests the target server runs at once, for the modelled energy (1: one at a
            time, the worst case). Not ``concurrency``, which is how many this run sends to a server.
        assistant: a drafting assistant (folder or hub id) every model decodes with (transformers backend:
            assisted generation, one request at a time); each run then records its measured acceptance
            (``ModelRun.speculative``). None decodes plainly.
        num_speculative_tokens: tokens the assistant drafts per target step (k).
    """

    suite: str = "builtin"
    size: int = DEFAULT_SIZE
    limit: int | None = None
    cache_dir: Path | None = None
    backend: BackendKind = "transformers"
    urls: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "bfloat16"
    batch_size: int = 8
    concurrency: int = 8
    timeout_s: float = 600.0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prompt_variants: tuple[str, ...] = ("default",)
    warmup_requests: int = 2
    idle_seconds: float = 5.0
    max_soft_tokens: int | None = None
    repeats: int = 3
    target_gpu: str = DEFAULT_GPU
    target_concurrency: int = 1
    assistant: str | None = None
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS

    def __post_init__(self) -> None:
        check_num_speculative_tokens(self.num_speculative_tokens)
        if self.assistant is not None and self.backend != "transformers":
            raise EcoquantError(
                "--assistant is measured with --backend transformers (assisted generation counts drafted and"
                " accepted tokens per request); drop it or use --backend transformers"
            )
        object.__setattr__(self, "target_gpu", gpu_spec(self.target_gpu).name)  # unknown: one line, before any work
        if self.target_concurrency < 1:
            raise EcoquantError(f"--target-concurrency must be at least 1, got {self.target_concurrency}")
        object.__setattr__(self, "urls", tuple(self.urls))
        object.__setattr__(self, "prompt_variants", tuple(self.prompt_variants))
        if self.backend not in ("transformers", "openai", "vllm"):
            raise EcoquantError(f"unknown backend {self.backend!r}; use transformers, openai or vllm")
        if self.backend == "openai" and not self.urls:
            raise EcoquantError(
                "the openai backend needs --url (the OpenAI-compatible server, e.g. http://127.0.0.1:8000)"
            )
        if self.backend != "openai" and self.urls:
            raise EcoquantError("--url is only for --backend openai")
        if self.limit is not None and self.limit < 1:
            raise EcoquantError(f"limit must be at least 1, got {self.limit}")
        if not self.prompt_variants:
            raise EcoquantError("give at least one prompt variant")
        if len(set(self.prompt_variants)) != len(self.prompt_variants):
            raise EcoquantError(f"prompt variants repeat: {list(self.prompt_variants)}")
        for name in self.prompt_variants:
            prompt_variant(name)  # unknown names fail here, before any model loads
        if self.max_soft_tokens is not None and self.backend == "openai":
            raise EcoquantError(
                "--max-soft-tokens cannot reach a server someone else started; set it there "
                "(ecoquant serve-config --max-soft-tokens) or use --backend vllm / transformers"
            )
        if self.warmup_requests < 0 or self.idle_seconds < 0:
            raise EcoquantError("warm-up requests and idle seconds cannot be negative")
        if self.repeats < 1:
            raise EcoquantError(f"--repeats must be at least 1, got {self.repeats}")
