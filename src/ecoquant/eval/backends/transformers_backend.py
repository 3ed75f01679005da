"""Answer chat requests with a transformers model in this process (CPU or GPU).

Batches of requests go through the model's own processor and chat template
(``processor.apply_chat_template`` with the images inline), left-padded, into
one ``generate`` call. Token counts come from the model's tokenizer: prompt
tokens are the attention mask's ones (image soft tokens included, padding
not), generated tokens run up to and including the first stop token.

Greedy answers can depend on the batch a request lands in: padding changes
the shapes, and with them the floating-point reduction order, so a near-tie
between two tokens may break differently. With ``batch_size=1`` every request
is computed alone, as the project's OpenAI-compatible server computes it,
which is what makes the two give identical greedy answers.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import transformers

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import (
    DEFAULT_NUM_SPECULATIVE_TOKENS,
    ChatRequest,
    Completion,
    FinishReason,
    GenerationSettings,
    ImagePart,
    TextPart,
    check_num_speculative_tokens,
)
from ecoquant.eval.image_budget import check_max_soft_tokens, family_budget_kwargs, processor_kwargs
from ecoquant.eval.speculative import DraftCounter, DraftCounts, load_assistant
from ecoquant.models.dense import decompress_now, loadable
from ecoquant.models.loading import load_config, model_class, resolve_model

DTYPES = MappingProxyType({"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32})


@dataclass(frozen=True)
class TransformersOptions:
    """Where and how the model runs.

    Attributes:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: activations/unquantized weights: ``bfloat16`` (the checkpoints' own), ``float16``, ``float32``.
        batch_size: requests per ``generate`` call.
        max_soft_tokens: the image-token budget per image (:mod:`ecoquant.eval.image_budget`);
            None for the checkpoint's own.
        image_budget: the image budget of the families beyond Gemma-4, under their own processor key
            (:func:`~ecoquant.eval.image_budget.family_budget_kwargs`); None for the checkpoint's own.
        assistant: a drafting assistant (folder or hub id; Gemma-4's MTP ``-assistant``) for speculative
            decoding, whose acceptance is then measured per request; None decodes plainly. transformers'
            assisted generation takes one request at a time, so ``batch_size`` is then 1 in effect.
        num_speculative_tokens: tokens the assistant drafts per target step (k); 4 is what vLLM's Gemma-4
            recipe recommends for the E4B. Unused without an assistant.
    """

    device: str = "auto"
    dtype: str = "bfloat16"
    batch_size: int = 8
    max_soft_tokens: int | None = None
    image_budget: int | None = None
    assistant: str | None = None
    num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EcoquantError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise EcoquantError(f"batch size must be at least 1, got {self.batch_size}")
        check_num_speculative_tokens(self.num_speculative_tokens)

    def resolved_device(self) -> torch.device:
        from ecoquant.devices import cuda_devices, resolve_device

        return torch.device(resolve_device(self.device, cuda_devices()))


def hf_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request as the chat structure processors take: content parts, images as RGB PIL images."""
    out = []
    for message in request.messages:
        content: list[dict[str, Any]] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                content.append({"type": "text", "text": part.text})
            elif isinstance(part, ImagePart):
                content.append({"type": "image", "image": part.load()})
            else:
                raise TypeError(f"unknown message part {type(part).__name__}")
        out.append({"role": message.role, "content": content})
    return out


def encode_prompts(processor: Any, requests: Sequence[ChatRequest], budget: Mapping[str, Any]) -> Any:
    """The model inputs for ``requests`` as the backend asks them: the processor's chat template with the images
    inline, padded on the tokenizer's ``padding_side``, with ``budget`` (the image budget's processor keys).

    One function so that whatever is trained on the evaluation's requests
    (:mod:`ecoquant.fixtures.memorise`) sees the very tokens the evaluation sends.
    """
    return processor.apply_chat_template(
        [hf_messages(r) for r in requests],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, **budget},
    )


def batches(requests: Sequence[ChatRequest], batch_size: int) -> Iterator[list[ChatRequest]]:
    """Consecutive runs of requests with the same token cap, at most ``batch_size`` long.

    Order is kept (no sorting by length): the batch a request falls in is then
    a function of the suite alone, so reruns batch identically.
    """
    batch: list[ChatRequest] = []
    for request in requests:
        if batch and (len(batch) == batch_size or request.max_new_tokens != batch[0].max_new_tokens):
            yield batch
            batch = []
        batch.append(request)
    if batch:
        yield batch


def trim_generated(tokens: Sequence[int], stop_ids: frozenset[int]) -> tuple[int, FinishReason]:
    """How many of a row's generated tokens were really produced, and why it ended.

    ``generate`` pads finished rows of a batch with the pad token (which may
    equal a stop token); the row's own output ends at its first stop token,
    counted, or runs to the cap.
    """
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return i + 1, "stop"
    return len(tokens), "length"


class TransformersBackend:
    """A model and its processor, loaded once; answers batches with ``generate``."""

    kind = "transformers"

    def __init__(self, model: Any, processor: Any, source: str, options: TransformersOptions) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.options = options
        self.device = next(model.parameters()).device
        self.budget = {
            **processor_kwargs(options.max_soft_tokens),
            **family_budget_kwargs(model.config.model_type, options.image_budget),
        }
        tokenizer = processor.tokenizer
        # Decoder-only generation appends after the prompt: padding must go on the left.
        tokenizer.padding_side = "left"
        self.generation_config = copy.deepcopy(model.generation_config)
        if self.generation_config.pad_token_id is None:
            self.generation_config.pad_token_id = tokenizer.pad_token_id
        eos = self.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.stop_ids = frozenset(int(i) for i in eos_ids)
        self.assistant = (
            None
            if options.assistant is None
            else load_assistant(
                options.assistant, model.config.model_type, self.device, model.dtype, options.num_speculative_tokens
            )
        )

    @classmethod
    def load(cls, model: str | Path, options: TransformersOptions | None = None) -> TransformersBackend:
        """Load a model folder (or hub id) with the transformers class its config names, plus its processor."""
        from transformers import AutoProcessor

        options = options or TransformersOptions()
        path = resolve_model(model)
        check_max_soft_tokens(path, options.max_soft_tokens)  # before seconds of loading
        config = load_config(path)
        family_budget_kwargs(config.model_type, options.image_budget)
        device = options.resolved_device()
        cls_ = model_class(config)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise EcoquantError(f"{path} has no processor transformers can load ({exc})") from None
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise EcoquantError(f"{path} has no image processor: the evaluation suites ask about images")
        # Loaded on the CPU, then moved: ``device_map`` would need accelerate.
        with loadable(path) as (folder, kwargs):  # a dense copy where transformers would misread the schemes
            loaded = decompress_now(cls_.from_pretrained(folder, dtype=DTYPES[options.dtype], **kwargs))  # type: ignore[attr-defined]
        return cls(loaded.to(device).eval(), processor, str(model), options)

    @property
    def batch_size(self) -> int:
        """Requests per ``generate`` call: the configured size, or 1 with an assistant (transformers' assisted
        generation rejects batches)."""
        return self.options.batch_size if self.assistant is None else 1

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "device": str(self.device),
            "dtype": self.options.dtype,
            "batch_size": self.batch_size,
            "max_soft_tokens": self.options.max_soft_tokens,
            **({} if self.options.image_budget is None else {"image_budget": self.budget}),
            **(
                {}
                if self.assistant is None
                else {"assistant": self.options.assistant, "num_speculative_tokens": self.options.num_speculative_tokens}
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    def _generation_config(self, settings: GenerationSettings, max_new_tokens: int) -> Any:
        config = copy.deepcopy(self.generation_config)
        config.do_sample = settings.do_sample
        if settings.do_sample:
            config.temperature = settings.temperature
            config.top_p = settings.top_p
            config.top_k = settings.top_k
        else:
            # do_sample=False is argmax whatever the filters say. ``generate`` copies the
            # checkpoint's filters (Gemma: top_k=64, top_p=0.95) into unset fields and then
            # warns that greedy ignores them; transformers' neutral values keep it quiet.
            config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
        config.max_new_tokens = max_new_tokens
        return config

    @torch.inference_mode()
    def _generate_batch(self, batch: Sequence[ChatRequest], settings: GenerationSettings) -> list[Completion]:
        inputs = encode_prompts(self.processor, batch, self.budget)
        inputs = {
            k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        if settings.do_sample:
            torch.manual_seed(settings.seed)
        config = self._generation_config(settings, batch[0].max_new_tokens)
        prompt_len = inputs["input_ids"].shape[1]
        drafts: DraftCounts | None = None
        if self.assistant is None:
            sequences = self.model.generate(**inputs, generation_config=config)
        else:  # one request (``batch_size`` is 1 in effect): assisted generation takes no batch
            with DraftCounter().observing(self.model, self.assistant) as counter:
                sequences = self.model.generate(**inputs, generation_config=config, assistant_model=self.assistant)
            drafts = counter.counts(sequences.shape[1] - prompt_len)
        tokens_in = inputs["attention_mask"].sum(dim=1).tolist()
        # The soft token the vision features fill (the config's): Gemma-3's processor names its <start_of_image>
        # placeholder as image_token_id, one per crop rather than 256.
        image_token = getattr(self.model.config, "image_token_id", None) or getattr(self.processor, "image_token_id", None)
        image_tokens = (
            [None] * len(batch) if image_token is None else (inputs["input_ids"] == image_token).sum(dim=1).tolist()
        )
        out = []
        for row, n_in, n_img in zip(sequences[:, prompt_len:].tolist(), tokens_in, image_tokens, strict=True):
            n_out, finish = trim_generated(row, self.stop_ids)
            text = self.processor.tokenizer.decode(row[:n_out], skip_special_tokens=True).strip()
            out.append(
                Completion(
                    text=text,
                    tokens_in=int(n_in),
                    tokens_out=n_out,
                    finish_reason=finish,
                    image_tokens=None if n_img is None else int(n_img),
                    target_steps=None if drafts is None else drafts.target_steps,
                    drafted_tokens=None if drafts is None else drafts.drafted_tokens,
                    accepted_tokens=None if drafts is None else drafts.accepted_tokens,
                )
            )
        return out

    def generate(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        out: list[Completion] = []
        for batch in batches(requests, self.batch_size):
            out.extend(self._generate_batch(batch, settings))
            if on_done is not None:
                on_done(len(batch))
        return out

    def close(self) -> None:
        """Drop the model so the next one fits (models are evaluated one at a time)."""
        on_cuda = self.device.type == "cuda"
        del self.model
        self.assistant = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
