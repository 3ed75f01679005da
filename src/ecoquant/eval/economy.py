"""Response economy: prompt and chat-template variants, selectable by name.

Why this is first-class: the challenge sums energy over the whole suite
without normalizing by tokens, so a model that answers "The total amount due
on this invoice is $42.50." spends several times the decode energy of one
that answers "$42.50" -- and ANLS may even score the long answer lower. How a
question is asked is therefore as much an energy lever as the int4 kernels,
and the report puts the variants side by side (output tokens, scores, joules).

A :class:`PromptVariant` changes only how a task's question is wrapped:

* ``system`` -- a system turn before the question (``None``: no system turn);
* ``user_prefix`` -- text before the question in the user turn, for the same
  instruction where a chat template has no system role, or to compare placements;
* ``suffix`` -- replaces the task's own prompt suffix (``None`` keeps it).

Images always come first in the user turn, then the text, as lmms-eval asks
Gemma-style models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from ecoquant.errors import EcoquantError
from ecoquant.eval.backends.base import ChatRequest, GenerationSettings, ImagePart, Message, Part, TextPart
from ecoquant.eval.tasks import Sample, Suite, Task

SHORT_ANSWER = "Answer with a single word or number."
"""The seed's response-economy instruction: the shortest answer the metrics accept."""


@dataclass(frozen=True)
class PromptVariant:
    """A named way of asking every task's questions (see the module docstring)."""

    name: str
    description: str
    system: str | None = None
    user_prefix: str = ""
    suffix: str | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"a prompt variant needs a name without spaces, got {self.name!r}")

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


PROMPT_VARIANTS: Mapping[str, PromptVariant] = MappingProxyType(
    {
        v.name: v
        for v in (
            # The benchmark's own wording (lmms-eval post_prompts): the reference point.
            PromptVariant("default", "the task's own prompt suffix, no system turn"),
            # The seed model card's lever: a system turn asking for the shortest answer.
            PromptVariant(
                "short-system", f"system turn: {SHORT_ANSWER!r}, plus the task's suffix", system=SHORT_ANSWER
            ),
            # The same words inside the user turn: for chat templates without a
            # system role, and to see whether placement matters to the model.
            PromptVariant(
                "short-user",
                f"{SHORT_ANSWER!r} before the question, plus the task's suffix",
                user_prefix=SHORT_ANSWER + "\n",
            ),
            # Only the instruction, no benchmark suffix: does the task wording add tokens or score?
            PromptVariant(
                "short-only", f"system turn: {SHORT_ANSWER!r}, no task suffix", system=SHORT_ANSWER, suffix=""
            ),
            # No instruction at all: the cost of letting the model talk (the other end of the scale).
            PromptVariant("bare", "the question alone: no suffix, no system turn", suffix=""),
        )
    }
)


def prompt_variant(name: str) -> PromptVariant:
    """Look a variant up by name, with the known names in the error."""
    try:
        return PROMPT_VARIANTS[name]
    except KeyError:
        raise EcoquantError(f"unknown prompt variant {name!r}; known: {', '.join(PROMPT_VARIANTS)}") from None


def user_text(task: Task, sample: Sample, variant: PromptVariant) -> str:
    """The text of the user turn: prefix, question and choices, then the task's or the variant's suffix."""
    question = task.prompt(sample).removesuffix(task.prompt_suffix)
    suffix = task.prompt_suffix if variant.suffix is None else variant.suffix
    return variant.user_prefix + question + suffix


def build_request(task: Task, sample: Sample, variant: PromptVariant, settings: GenerationSettings) -> ChatRequest:
    """The chat request for one sample, the same for every backend."""
    messages: list[Message] = []
    if variant.system is not None:
        messages.append(Message("system", (TextPart(variant.system),)))
    parts: list[Part] = [ImagePart(image) for image in sample.images]
    parts.append(TextPart(user_text(task, sample, variant)))
    messages.append(Message("user", tuple(parts)))
    return ChatRequest(
        id=f"{task.name}/{sample.id}", messages=tuple(messages), max_new_tokens=settings.cap(task.max_new_tokens)
    )


def suite_requests(
    suite: Suite, variant: PromptVariant, settings: GenerationSettings
) -> list[tuple[Task, Sample, ChatRequest]]:
    """Every sample of the suite as a request, in task then sample order."""
    return [(t, s, build_request(t, s, variant, settings)) for t in suite.tasks for s in t.samples]


def describe_variants(names: Sequence[str]) -> list[dict[str, Any]]:
    """The variants' full definitions, for the run record."""
    return [prompt_variant(n).to_record() for n in names]
