"""What an evaluation is made of: samples, tasks, suites, and scoring them.

A :class:`Task` is a list of (images, question, gold answers) :class:`Sample` s
plus everything needed to ask and to score them the same way on every backend:
the metric name, a prompt suffix ("Answer the question using a single word or
phrase.") and a max-new-tokens, in the manner of lmms-eval task YAMLs. A
:class:`Suite` groups tasks; each task belongs to one of the two halves the
report scores separately, ``"doc"`` (document analysis) and ``"image"`` (image
understanding).

Backends turn a sample into a request with :meth:`Task.prompt` and
:meth:`Sample.load_images` / :meth:`Sample.image_bytes`; the runner collects
one prediction per sample and calls :func:`score`. Nothing here knows about
models.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

from PIL import Image

from ecoquant.errors import EcoquantError
from ecoquant.eval.metrics import METRICS

SuiteKind = Literal["doc", "image"]
SUITE_KINDS: tuple[str, ...] = get_args(SuiteKind)

ImageRef = Path | bytes
"""An image as a file path, or the bytes of an encoded image (PNG, JPEG, ...)."""

CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class PromptDefaults:
    """How a task asks by default: the suffix after the question and the token cap."""

    prompt_suffix: str
    max_new_tokens: int


PROMPT_DEFAULTS: Mapping[str, PromptDefaults] = MappingProxyType(
    {
        # lmms-eval's DocVQA/InfoVQA "default" post_prompt and generation cap.
        "anls": PromptDefaults("\nAnswer the question using a single word or phrase.", 32),
        # Same wording for short free-text answers scored by string equality.
        "exact_match": PromptDefaults("\nAnswer the question using a single word or phrase.", 16),
        # lmms-eval's TextVQA post_prompt; its answers are a few words at most.
        "vqa_accuracy": PromptDefaults("\nAnswer the question using a single word or phrase.", 16),
        # lmms-eval's ChartQA post_prompt and its 16-token cap.
        "relaxed_accuracy": PromptDefaults("\nAnswer the question with a single word.", 16),
        # lmms-eval's AI2D "mcq" post_prompt; a letter needs few tokens, 16 leaves room for "The answer is B."
        "mc_accuracy": PromptDefaults("\nAnswer with the option's letter from the given choices directly.", 16),
    }
)
"""Metric -> the prompt suffix and max-new-tokens that tasks scored by it use
unless they say otherwise (JSONL rows may override both)."""


@dataclass(frozen=True)
class Sample:
    """One question about one or more images.

    Attributes:
        id: unique within its task; results are keyed by it.
        images: file paths or encoded image bytes (anything PIL can open), in
            the order the prompt refers to them.
        question: the question as shown to the model, without choices or suffix.
        answers: every accepted gold answer (DocVQA lists several spellings,
            TextVQA ten annotators); for multiple choice, the option letters.
        choices: the options of a multiple-choice question, shown as
            ``A. ...`` lines by :meth:`Task.prompt`; None for open questions.
    """

    id: str
    images: tuple[ImageRef, ...]
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Tuples, not lists: a frozen sample must not be mutated through a field.
        object.__setattr__(self, "images", tuple(Path(i) if isinstance(i, str) else i for i in self.images))
        object.__setattr__(self, "answers", tuple(self.answers))
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        if not self.id:
            raise ValueError("a sample needs a non-empty id")
        if not self.images:
            raise ValueError(f"sample {self.id!r} has no image")
        if not self.answers or any(not isinstance(a, str) for a in self.answers):
            raise ValueError(f"sample {self.id!r} needs at least one gold answer, all strings")
        if self.choices is not None:
            if len(self.choices) < 2 or len(self.choices) > len(CHOICE_LETTERS):
                raise ValueError(f"sample {self.id!r}: a multiple-choice question needs 2 to 26 choices")
            letters = CHOICE_LETTERS[: len(self.choices)]
            bad = [a for a in self.answers if a not in letters]
            if bad:
                raise ValueError(f"sample {self.id!r}: gold answers {bad} are not option letters {letters}")

    def image_bytes(self) -> list[bytes]:
        """The encoded bytes of each image (for APIs that take base64 images)."""
        return [i if isinstance(i, bytes) else i.read_bytes() for i in self.images]

    def load_images(self) -> list[Image.Image]:
        """Each image decoded to RGB, as processors of vision-language models expect."""
        out = []
        for ref in self.images:
            with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
                out.append(img.convert("RGB"))
        return out


@dataclass(frozen=True)
class Task:
    """A set of samples asked and scored one way.

    Attributes:
        name: unique within its suite, e.g. ``"docvqa_val"`` or ``"builtin_charts"``.
        suite: which half of the report the task counts towards, ``"doc"`` or ``"image"``.
        metric: a key of :data:`ecoquant.eval.metrics.METRICS`.
        prompt_suffix: appended to every question (after the choices), e.g.
            ``"\\nAnswer the question using a single word or phrase."``. It is
            part of the task, not the backend, so answer length -- which the
            energy total depends on -- is the same across backends.
        max_new_tokens: generation cap per sample.
        samples: the questions.
    """

    name: str
    suite: SuiteKind
    metric: str
    prompt_suffix: str
    max_new_tokens: int
    samples: tuple[Sample, ...] = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples", tuple(self.samples))
        if self.suite not in SUITE_KINDS:
            raise ValueError(f"task {self.name!r}: suite must be one of {SUITE_KINDS}, got {self.suite!r}")
        if self.metric not in METRICS:
            raise ValueError(f"task {self.name!r}: unknown metric {self.metric!r}; known: {sorted(METRICS)}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be positive")
        if not self.samples:
            raise ValueError(f"task {self.name!r} has no samples")
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"task {self.name!r}: duplicate sample ids {dupes[:5]}")

    def prompt(self, sample: Sample) -> str:
        """The text sent with the sample's images: question, ``A. ...`` choice lines, suffix.

        The choice layout is lmms-eval's AI2D "mcq" format, so letters in the
        gold answers refer to the order of ``sample.choices``.
        """
        text = sample.question
        if sample.choices is not None:
            lines = (f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(sample.choices))
            text += "\n" + "\n".join(lines)
        return text + self.prompt_suffix


@dataclass(frozen=True)
class Suite:
    """Named tasks evaluated together; energy is summed over the whole suite."""

    name: str
    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"suite {self.name!r}: duplicate task names {names}")

    @property
    def n_samples(self) -> int:
        return sum(len(t.samples) for t in self.tasks)

    def kinds(self) -> tuple[str, ...]:
        """The suite halves present, in :data:`SUITE_KINDS` order."""
        present = {t.suite for t in self.tasks}
        return tuple(k for k in SUITE_KINDS if k in present)

    def select(self, kind: SuiteKind) -> Suite:
        """The tasks of one half (``"doc"`` or ``"image"``) as their own suite."""
        tasks = tuple(t for t in self.tasks if t.suite == kind)
        if not tasks:
            raise EcoquantError(f"suite {self.name!r} has no {kind!r} tasks; it has {list(self.kinds())}")
        return Suite(name=f"{self.name}-{kind}", tasks=tasks)


@dataclass(frozen=True)
class TaskScore:
    """A task's score: the mean of its per-sample metric values, all in [0, 1]."""

    task: str
    suite: SuiteKind
    metric: str
    score: float
    per_sample: Mapping[str, float]
    """Sample id -> metric value, in task order."""

    @property
    def n_samples(self) -> int:
        return len(self.per_sample)


def score(task: Task, predictions: Sequence[str]) -> TaskScore:
    """Score one prediction per sample, aligned with ``task.samples``.

    Raises ValueError if the counts differ: silently scoring a prefix would
    inflate or deflate a recovery ratio without anyone noticing.
    """
    if isinstance(predictions, str):
        raise TypeError("predictions must be a sequence of strings, one per sample")
    if len(predictions) != len(task.samples):
        raise ValueError(f"task {task.name!r}: {len(predictions)} predictions for {len(task.samples)} samples")
    metric = METRICS[task.metric]
    per_sample = {s.id: metric(p, s.answers) for s, p in zip(task.samples, predictions, strict=True)}
    mean = math.fsum(per_sample.values()) / len(per_sample)
    return TaskScore(task=task.name, suite=task.suite, metric=task.metric, score=mean, per_sample=per_sample)


def score_in_order(tasks: Sequence[Task], predictions: Sequence[str]) -> list[TaskScore]:
    """Score predictions listed one per request, ``tasks[i]`` the task of ``predictions[i]``.

    Requests come task by task, sample by sample (the order
    :func:`ecoquant.eval.economy.suite_requests` builds), so each task's
    predictions are gathered in its samples' order and scored by :func:`score`.
    """
    by_task: dict[str, list[str]] = {}
    named: dict[str, Task] = {}
    for task, prediction in zip(tasks, predictions, strict=True):
        by_task.setdefault(task.name, []).append(prediction)
        named[task.name] = task
    return [score(named[name], texts) for name, texts in by_task.items()]


def suite_scores(scores: Sequence[TaskScore]) -> dict[str, float]:
    """Per-half score: the unweighted mean of the task scores in each half.

    Tasks are averaged, not samples, so a half with a 5,000-question DocVQA
    and a 500-question InfoVQA weighs both benchmarks equally, as results
    tables that list one number per benchmark do.
    """
    by_kind: dict[str, list[float]] = {}
    for s in scores:
        by_kind.setdefault(s.suite, []).append(s.score)
    return {k: math.fsum(v) / len(v) for k, v in by_kind.items()}
