"""What every backend takes and returns, so that scores depend on outputs only.

A backend turns :class:`ChatRequest` s (chat messages whose parts are text
and images) into :class:`Completion` s (the answer text, tokens in and out,
why it stopped). The runner builds the requests once
(:func:`ecoquant.eval.economy.build_request`) and hands the same ones to the
transformers backend or to an OpenAI-compatible server, so the two can only
differ in what the model says, never in what it was asked.

:class:`GenerationSettings` is the sampling half of the run record. Greedy
decoding is the default because a recovery ratio between two models should
not move with the sampling seed; the seed model card's Gemma sampling
(temperature 1.0, top-p 0.95, top-k 64) is the named preset ``"gemma"``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from ecoquant.errors import EcoquantError
from ecoquant.eval.tasks import ImageRef

# ------------------------------------------------------------------ settings


@dataclass(frozen=True)
class GenerationSettings:
    """How tokens are chosen; recorded verbatim in the run record.

    Attributes:
        do_sample: False for greedy decoding (then temperature/top_p/top_k must be None).
        temperature, top_p, top_k: the sampling filters, used only when sampling.
        seed: seeds sampling (the transformers RNG before each batch; ``seed`` in
            OpenAI requests). Recorded for greedy runs too; it changes nothing there.
        max_new_tokens: None to use each task's own cap (the normal case: the cap
            is part of the task); an int lowers every task's cap to at most this,
            for smoke tests and quick looks.
    """

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.do_sample:
            if (self.temperature, self.top_p, self.top_k) != (None, None, None):
                raise ValueError("greedy decoding takes no temperature/top_p/top_k; set do_sample=True to sample")
        else:
            if self.temperature is None or self.temperature <= 0:
                raise ValueError("sampling needs a positive temperature")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
            if self.top_k is not None and self.top_k < 1:
                raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def cap(self, task_max_new_tokens: int) -> int:
        """The token cap for a task: its own, lowered to :attr:`max_new_tokens` if set."""
        if self.max_new_tokens is None:
            return task_max_new_tokens
        return min(task_max_new_tokens, self.max_new_tokens)

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


GENERATION_PRESETS: Mapping[str, GenerationSettings] = MappingProxyType(
    {
        # Deterministic: the same model gives the same answers on every run and backend.
        "greedy": GenerationSettings(),
        # The seed model card's settings (also Gemma-4's generation_config.json).
        "gemma": GenerationSettings(do_sample=True, temperature=1.0, top_p=0.95, top_k=64),
    }
)


def generation_settings(
    preset: str = "greedy", *, seed: int = 0, max_new_tokens: int | None = None
) -> GenerationSettings:
    """A preset of :data:`GENERATION_PRESETS` with the run's seed and optional token cap."""
    if preset not in GENERATION_PRESETS:
        raise EcoquantError(f"unknown sampling preset {preset!r}; known: {', '.join(GENERATION_PRESETS)}")
    return replace(GENERATION_PRESETS[preset], seed=seed, max_new_tokens=max_new_tokens)


DEFAULT_NUM_SPECULATIVE_TOKENS = 4
"""Tokens an assistant drafts per target step when not told. 4 is the value issue 30 takes from vLLM's Gemma-4
recipe for the E4B (not checked here; vLLM's MTP page, docs.vllm.ai features/speculative_decoding/mtp, shows 1
in its E2B example); the measured acceptance by k (bench/RESULTS.md) is what should set it per model."""


def check_num_speculative_tokens(k: int) -> None:
    """One line for a draft length that no speculative decoder takes."""
    if k < 1:
        raise EcoquantError(f"--num-speculative-tokens must be at least 1, got {k}")


# ------------------------------------------------------------------ requests

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    """An image as a file path or encoded bytes; decoded only by the backend that needs pixels."""

    image: ImageRef

    def encoded(self) -> bytes:
        return self.image if isinstance(self.image, bytes) else Path(self.image).read_bytes()

    def load(self) -> Image.Image:
        """RGB pixels, decoded the same way by the transformers backend and the server."""
        return decode_image(self.encoded())

    def data_url(self) -> str:
        """``data:image/png;base64,...`` for OpenAI-style ``image_url`` content parts."""
        data = self.encoded()
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "", "image/png")
        return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> an RGB image (what vision processors expect)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


Part = TextPart | ImagePart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        if self.role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown chat role {self.role!r}")
        if not self.parts:
            raise ValueError("a message needs at least one part")


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to complete, with its token cap.

    ``id`` is for bookkeeping (``task/sample``); backends do not send it.
    """

    id: str
    messages: tuple[Message, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(self.messages))
        if not self.messages:
            raise ValueError("a chat request needs at least one message")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """A backend's answer to one request.

    Attributes:
        text: the answer, special tokens removed and surrounding whitespace stripped.
        tokens_in: prompt tokens, image tokens included (padding excluded).
        tokens_out: generated tokens, the stop token included when there was one
            (it was computed, so it cost energy; vLLM counts it the same way).
        finish_reason: ``"stop"`` at a stop token, ``"length"`` at the cap.
        image_tokens: the image soft tokens among ``tokens_in``, where the backend tokenized the prompt
            itself; None where it only knows the total (an OpenAI-compatible server).
        target_steps, drafted_tokens, accepted_tokens: with an assistant drafting (speculative decoding),
            the target's verifying decode passes, the tokens drafted and those accepted; None without one.
    """

    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: FinishReason
    image_tokens: int | None = None
    target_steps: int | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None


@runtime_checkable
class Backend(Protocol):
    """A loaded model that completes chat requests. The runner holds one at a time."""

    @property
    def kind(self) -> str:
        """``"transformers"`` or ``"openai"``."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run record should say about where the answers came from (device, dtype, URL...)."""
        ...

    def generate(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        on_done: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """One completion per request, in order; ``on_done(n)`` after each ``n`` finish (progress)."""
        ...

    def close(self) -> None:
        """Free the model (memory, connections); the backend is unusable afterwards."""
        ...
